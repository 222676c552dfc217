"""Build Subjects for pure rule tests: a process as /proc would show it."""

from __future__ import annotations

from rome_guard.detect.subject import Subject
from rome_guard.events import Attribution, Endpoint, ProcessInfo
from tests.fixtures.processes import process_info

_PATHS = {
    "ssh": "/usr/bin/ssh",
    "bash": "/usr/bin/bash",
    "sh": "/usr/bin/dash",
    "python3": "/usr/bin/python3.11",
}


def process(
    *argv: str,
    exe: str | None = None,
    comm: str | None = None,
    pid: int = 4242,
    container: str | None = None,
    cwd: str = "/home/agent",
) -> ProcessInfo:
    name = argv[0].rsplit("/", 1)[-1]
    return process_info(
        pid,
        comm=(comm or name)[:15],
        exe=exe or _PATHS.get(name, f"/usr/bin/{name}"),
        cmdline=tuple(argv),
        cwd=cwd,
        cgroup="/user.slice",
        attribution=Attribution(container_id=container),
    )


def tcp(daddr: str, dport: int, state: str = "ESTABLISHED") -> Endpoint:
    return Endpoint("tcp", 4, "10.0.0.2", 40000, daddr, dport, state, inode=1)


def subject(
    *argv: str,
    connections: list[Endpoint] | None = None,
    stdio_peer: Endpoint | None = None,
    lineage: list[ProcessInfo] | None = None,
    **kw,
) -> Subject:
    stdio = {0: stdio_peer, 1: stdio_peer, 2: stdio_peer} if stdio_peer else {}
    return Subject(process(*argv, **kw), lineage or [], connections or [], stdio)
