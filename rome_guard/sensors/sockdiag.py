"""Every TCP/UDP socket on the host through netlink sock_diag.

One dump per (family, protocol) gives every socket with its state,
addresses and inode; processes are joined to sockets by the inodes behind
their fds (rome_guard.sensors.procfs.socket_inodes), never by parsing
/proc/net per process. Read-only; never decides anything.
"""

from __future__ import annotations

import socket
from typing import Iterable

from pyroute2 import DiagSocket

from rome_guard.events import Endpoint

# include/net/tcp_states.h
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
_FAMILIES = ((socket.AF_INET, 4), (socket.AF_INET6, 6))
_PROTOCOLS = ((socket.IPPROTO_TCP, "tcp"), (socket.IPPROTO_UDP, "udp"))


def _state_name(proto: str, state: int) -> str:
    if proto == "udp":
        # UDP reuses the TCP numbers: 1 means connected, 7 means unconnected.
        return "CONNECTED" if state == 1 else "UNCONNECTED"
    return TCP_STATES.get(state, str(state))


def list_sockets(
    families: Iterable[tuple[int, int]] = _FAMILIES,
    protocols: Iterable[tuple[int, str]] = _PROTOCOLS,
) -> list[Endpoint]:
    """All inet sockets, including those in TIME_WAIT (inode 0, no owner)."""
    sockets: list[Endpoint] = []
    protocols = tuple(protocols)
    with DiagSocket() as diag:
        diag.bind()
        for family, version in families:
            for protocol, proto in protocols:
                for msg in diag.get_sock_stats(family=family, protocol=protocol):
                    sockets.append(
                        Endpoint(
                            proto=proto,
                            family=version,
                            saddr=msg["idiag_src"],
                            sport=msg["idiag_sport"],
                            daddr=msg["idiag_dst"],
                            dport=msg["idiag_dport"],
                            state=_state_name(proto, msg["idiag_state"]),
                            inode=msg["idiag_inode"],
                        )
                    )
    return sockets


def by_inode(sockets: Iterable[Endpoint]) -> dict[int, Endpoint]:
    return {s.inode: s for s in sockets if s.inode}
