"""What the one wait over every ring buffer (kernel/poller.py) costs and
buys: the daemon doing nothing, side by side with a bare bpftrace exec
logger doing nothing, measured over the same seconds, and then how fast
an exec reaches the journal (issue 20 targets: idle CPU <= 0.3% of a core,
RSS <= 200 MiB, exec -> alert p99 <= 5 ms still):

- CPU while idle, as bench/daemon_bench.py measures it (utime + stime
  from /proc/PID/stat), after both have settled;
- wakeups per second (voluntary context switches of every thread): what
  the one epoll over every ring buffer (kernel/poller.py) is for;
- RSS idle (VmRSS) and its high-water mark (VmHWM: the compile);
- the host's forks per second over the window (/proc/stat "processes"),
  and the events each daemon handled per second (its status file): a
  process the rules may concern, a connect, a payload is a record the
  daemon decodes and judges, so "idle" on a busy host is not idle.
  Measuring every consumer over the same window lets them share that noise;
- exec -> alert, spawn to journal line, p50/p99 (bench/load.py), for a
  program a rule names (its exec wakes the daemon at once) and for a
  miner-only flag under an unnamed program (a quiet record: it wakes the
  daemon only when no quiet record did for BATCH_MS).

--against REV also runs a daemon from that commit of this repository
(`git archive REV`, unpacked into a temporary directory), --baseline DIR one
from another checkout, over the same window: before and after a change,
under the same host activity. --idle-only leaves out the latency figures.

Needs root and eBPF; each daemon runs in monitor mode with the shipped rules
and its own journal and run dir, as in bench/daemon_bench.py. Nothing
leaves the host. Run: .venv/bin/python -m bench.poller_bench [--idle-s 20]
[--against REV | --baseline DIR] [--idle-only]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

from bench.daemon_bench import cpu_seconds, rss_mib, start_bpftrace_logger
from bench.load import percentile, spawn_to_journal_ms
from tests.fixtures.daemon import Daemon

SETTLE_S = 3.0


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def voluntary_switches(pid: int) -> int:
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        with contextlib.suppress(OSError), open(status) as f:  # a thread may end meanwhile
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def host_forks() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("processes "):
                return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class Idle:
    cpu_pct: float
    wakeups: float  # per second
    rss: float  # MiB
    hwm: float  # MiB
    events: float | None  # handled per second, for a daemon


def events_handled(daemon: Daemon) -> int:
    """The events a daemon handled so far, from its status file."""
    with open(os.path.join(daemon.run_dir, "status.json")) as f:
        return int(json.load(f)["events"])


def measure(
    pids: dict[str, int], seconds: float, events: dict[str, Callable[[], int]]
) -> tuple[dict[str, Idle], float]:
    """Every pid over the same window (events: the counters of those that
    count what they handle); and the host's forks per second."""
    time.sleep(SETTLE_S)
    before = {name: (cpu_seconds(pid), voluntary_switches(pid)) for name, pid in pids.items()}
    handled0 = {name: count() for name, count in events.items()}
    forks0, t0 = host_forks(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    forks = (host_forks() - forks0) / elapsed
    found = {}
    for name, pid in pids.items():
        cpu0, switches0 = before[name]
        found[name] = Idle(
            (cpu_seconds(pid) - cpu0) / elapsed * 100,
            (voluntary_switches(pid) - switches0) / elapsed,
            rss_mib(pid),
            _status_kib(pid, "VmHWM") / 1024,
            (events[name]() - handled0[name]) / elapsed if name in events else None,
        )
    return found, forks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--alerts", type=int, default=100, help="spawns per latency figure")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", help="another rome-guard checkout, run alongside")
    baseline.add_argument(
        "--against", metavar="REV", help="a commit of this repository, run alongside"
    )
    parser.add_argument("--idle-only", action="store_true", help="no exec -> alert figures")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rg-poller-bench-")
    if args.against:
        args.baseline = checkout(args.against, os.path.join(work, "against"))
    daemons = {"daemon": Daemon(config_text="rules: []\n")}  # the shipped rules, nothing added
    if args.baseline:
        # run from that checkout: `python -m rome_guard` imports the one in its cwd
        daemons["baseline"] = Daemon(
            config_text="rules: []\n", wrapper=("env", "-C", os.path.abspath(args.baseline))
        )
    logger = None
    try:
        for daemon in daemons.values():
            daemon.wait_ready()
        logger = start_bpftrace_logger(os.path.join(work, "bpftrace.log"))
        pids = {name: d.proc.pid for name, d in daemons.items()}
        pids["bpftrace logger"] = logger.pid
        counters = {name: partial(events_handled, d) for name, d in daemons.items()}
        found, forks = measure(pids, args.idle_s, counters)
        logger.terminate()
        logger.wait()
        logger = None
        latencies = (
            {}
            if args.idle_only
            else {name: exec_to_alert(d, work, args.alerts) for name, d in daemons.items()}
        )
    finally:
        if logger is not None:
            logger.terminate()
            logger.wait()
        for daemon in daemons.values():
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"poller benchmark ({os.cpu_count()} CPUs), monitor mode, eBPF sensor, shipped rules; "
        f"{args.idle_s:.0f} s, host forks {forks:.0f}/s over the window; load average "
        f"{load_average()}"
        + (f"; baseline {args.against or args.baseline}" if args.baseline else "")
    )
    for name, idle in found.items():
        handled = f", {idle.events:.1f} events/s handled" if idle.events is not None else ""
        print(
            f"  {name:16s} CPU {idle.cpu_pct:.2f}% of a core, {idle.wakeups:.0f} wakeups/s"
            f"{handled}, RSS {idle.rss:.0f} MiB (peak {idle.hwm:.0f})"
        )
    ours, logger_idle = found["daemon"], found["bpftrace logger"]
    print(
        f"  daemon idle CPU {ours.cpu_pct:.2f}% (target <= 0.3%), "
        f"{ours.cpu_pct / max(logger_idle.cpu_pct, 0.01):.1f}x the logger's; "
        f"RSS {ours.rss:.0f} MiB (target <= 200 MiB)"
    )
    for name, (named, unnamed) in latencies.items():
        print(
            f"  {name:16s} exec -> alert: named program {_ms(named, args.alerts)}; "
            f"unnamed program {_ms(unnamed, args.alerts)}  (target p99 <= 5 ms)"
        )
    if "baseline" in found:
        base = found["baseline"]
        print(
            f"  vs baseline: CPU {ours.cpu_pct / max(base.cpu_pct, 0.01):.2f}x, "
            f"wakeups {ours.wakeups / max(base.wakeups, 0.01):.2f}x, "
            f"RSS {ours.rss - base.rss:+.0f} MiB"
        )


def checkout(rev: str, into: str) -> str:
    """The tree of commit rev of this repository, unpacked into a directory."""
    os.makedirs(into)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(
        ["git", "-C", root, "archive", rev], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def exec_to_alert(daemon: Daemon, work: str, count: int) -> tuple[list[float], list[float]]:
    """Spawn-to-journal milliseconds for a named miner binary and for a
    miner-only flag under a program no rule names."""
    named = os.path.join(work, "xmrig")
    unnamed = os.path.join(work, "helper")
    for path in (named, unnamed):
        shutil.copy("/bin/true", path)
    return (
        spawn_to_journal_ms(
            daemon.alerts, lambda: subprocess.Popen([named]), "miner-known-binary", count
        ),
        spawn_to_journal_ms(
            daemon.alerts,
            lambda: subprocess.Popen([unnamed, "--donate-level=1"]),
            "miner-only-flags",
            count,
        ),
    )


def _ms(latencies: list[float], count: int) -> str:
    if not latencies:
        return f"n=0/{count}"
    return (
        f"n={len(latencies)}/{count}, p50 {percentile(latencies, 50):.1f} ms, "
        f"p99 {percentile(latencies, 99):.1f} ms"
    )


if __name__ == "__main__":
    main()
