"""Every TCP/UDP socket on the host through netlink sock_diag.

One dump per (family, protocol) gives every socket with its state,
addresses and inode; processes are joined to sockets by the inodes behind
their fds (rome_guard.procfs.socket_inodes), never by parsing
/proc/net per process. Read-only; never decides anything.

The dump is decoded here with ``struct`` rather than through pyroute2's
message classes: pyroute2 spends ~150 us decoding each socket (4.7 s for
30,000 sockets, measured in bench/scan_bench.py), which alone would blow
the scan's 1 s budget. The wire format is the stable uapi
(linux/inet_diag.h, linux/sock_diag.h).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Iterable

from rome_guard.events import Endpoint

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
ALL_STATES = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")
# struct inet_diag_req_v2: family, protocol, ext, pad, states, sockid (48 bytes)
_REQUEST = struct.Struct("=BBBxI48x")
# struct inet_diag_msg: family, state, timer, retrans, sockid{sport, dport
# (big endian), src[16], dst[16], if, cookie[2]}, expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")

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
# state bitmasks (1 << state) of sockets that have a peer
CONNECTED_STATES = {
    "tcp": sum(1 << n for n in (1, 2, 3, 4, 5, 8, 9, 11)),  # not TIME_WAIT, CLOSE, LISTEN
    "udp": 1 << 1,  # connected datagram sockets
}
_PROTOCOLS = ((socket.IPPROTO_TCP, "tcp"), (socket.IPPROTO_UDP, "udp"))


class SockDiagError(OSError):
    pass


def _state_name(proto: str, state: int) -> str:
    if proto == "udp":
        # UDP reuses the TCP numbers: 1 means connected, 7 means unconnected.
        return "CONNECTED" if state == 1 else "UNCONNECTED"
    return TCP_STATES.get(state, str(state))


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _dump(
    sock: socket.socket,
    family: int,
    version: int,
    protocol: int,
    proto: str,
    owned_only: bool,
    states: int = ALL_STATES,
) -> list[Endpoint]:
    request = _REQUEST.pack(family, protocol, 0, states)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
    )
    sock.sendto(header + request, (0, 0))
    result: list[Endpoint] = []
    unpack_header, unpack_msg = _NLMSGHDR.unpack_from, _MSG.unpack_from
    from_bytes = int.from_bytes
    while True:
        data = sock.recv(1 << 20)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = unpack_header(data, offset)
            if length < _NLMSGHDR.size:
                return result
            if kind == NLMSG_DONE:
                return result
            if kind == NLMSG_ERROR:
                (errno,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                if errno == 0:
                    return result
                raise SockDiagError(-errno, os.strerror(-errno))
            if kind == SOCK_DIAG_BY_FAMILY:
                (
                    _fam,
                    state,
                    _t,
                    _r,
                    sport,
                    dport,
                    src,
                    dst,
                    _if,
                    _cookie,
                    _exp,
                    _rq,
                    _wq,
                    _uid,
                    inode,
                ) = unpack_msg(data, offset + _NLMSGHDR.size)
                if owned_only and not inode:
                    offset += (length + 3) & ~3
                    continue
                result.append(
                    Endpoint(
                        proto,
                        version,
                        _address(family, src),
                        from_bytes(sport, "big"),
                        _address(family, dst),
                        from_bytes(dport, "big"),
                        _state_name(proto, state),
                        inode,
                    )
                )
            offset += (length + 3) & ~3


def list_sockets(
    families: Iterable[tuple[int, int]] = _FAMILIES,
    protocols: Iterable[tuple[int, str]] = _PROTOCOLS,
    owned_only: bool = False,
    connected_only: bool = False,
) -> list[Endpoint]:
    """All inet sockets. TIME_WAIT and other orphaned sockets have inode 0
    and no owner; ``owned_only`` leaves them out (a scan cannot attribute
    them anyway). ``connected_only`` asks the kernel for sockets with a
    peer only (no listeners, no unconnected UDP, no TIME_WAIT)."""
    sockets: list[Endpoint] = []
    protocols = tuple(protocols)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for family, version in families:
            for protocol, proto in protocols:
                states = CONNECTED_STATES[proto] if connected_only else ALL_STATES
                sockets.extend(_dump(sock, family, version, protocol, proto, owned_only, states))
    return sockets


def by_inode(sockets: Iterable[Endpoint]) -> dict[int, Endpoint]:
    return {s.inode: s for s in sockets if s.inode}


# struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
_UNIX_REQUEST = struct.Struct("=BBHIII8s")
_UNIX_MSG_SIZE = 16  # struct unix_diag_msg: family, type, state, pad, ino, cookie[2]
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2
_NO_COOKIE = b"\xff" * 8


def unix_peer(inode: int) -> int | None:
    """The inode of the other end of the AF_UNIX socket with this inode (a
    socketpair, or a connected stream), None when it has none or is not a
    unix socket. One request for one socket: node's child_process gives a
    child socketpairs, not pipes, as its stdio."""
    request = _UNIX_REQUEST.pack(
        socket.AF_UNIX, 0, 0, ALL_STATES, inode, _UDIAG_SHOW_PEER, _NO_COOKIE
    )
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.sendto(header + request, (0, 0))
        data = sock.recv(65536)
    if len(data) < _NLMSGHDR.size:
        return None
    length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    if kind != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: not a unix socket (ENOENT), or no unix_diag
    offset = _NLMSGHDR.size + _UNIX_MSG_SIZE
    end = min(length, len(data))
    while offset + 4 <= end:
        attr_len, attr_type = struct.unpack_from("=HH", data, offset)
        if attr_len < 4:
            break
        if attr_type == _UNIX_DIAG_PEER and attr_len >= 8:
            (peer,) = struct.unpack_from("=I", data, offset + 4)
            return peer or None
        offset += (attr_len + 3) & ~3
    return None
