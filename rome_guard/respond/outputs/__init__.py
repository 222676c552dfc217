"""Alert outputs beside the journal: syslog, an HTTP webhook, journald.

The journal (respond/journal.py) is the durable record and is written
first; every record it takes is then offered to each configured output
(``Outputs.publish``), whose own bounded queue and thread send it on
(queue.py). The formats and transports live one per module:
syslog.py (RFC 5424 over UDP, TCP or a unix socket), webhook.py (Falco's
JSON over HTTP(S) with a bearer token), journald.py (the native protocol).

An output that cannot be built (a token file missing) is reported and left
out; the guard keeps guarding. This package never blocks the daemon's loop,
never delays a kill and never decides what is an alert.
"""

from __future__ import annotations

import logging
from typing import Iterable

from rome_guard.config import OutputConfig
from rome_guard.respond.outputs import journald, syslog, webhook
from rome_guard.respond.outputs.queue import Output, OutputState

log = logging.getLogger(__name__)

BUILDERS = {"syslog": syslog.build, "webhook": webhook.build, "journald": journald.build}
CLOSE_BUDGET_S = 0.5  # of the daemon's 2 s shutdown budget, for every output together


def build_output(config: OutputConfig) -> Output:
    """One output; OSError or ValueError (one line) when it cannot be built."""
    transport, encode, target = BUILDERS[config.type](config)
    return Output(
        config.name,
        config.type,
        target,
        transport,
        encode,
        config.queue_size,
        config.max_backoff,
        config.min_severity,
    )


class Outputs:
    """Every configured output; publish() hands a record to each."""

    def __init__(self, outputs: Iterable[Output] = ()):
        self.outputs = list(outputs)

    @classmethod
    def from_config(cls, configs: Iterable[OutputConfig]) -> Outputs:
        built = []
        for config in configs:
            try:
                built.append(build_output(config))
            except (OSError, ValueError) as exc:
                log.error(
                    "DEGRADED: output %s (%s) not started: %s; alerts still go to the journal",
                    config.name,
                    config.type,
                    exc,
                )
        return cls(built)

    def publish(self, record: dict) -> None:
        """Offer a record (already in the journal) to every output."""
        for output in self.outputs:
            output.offer(record)

    def states(self) -> list[OutputState]:
        return [output.state() for output in self.outputs]

    def close(self, budget_s: float = CLOSE_BUDGET_S) -> None:
        share = budget_s / max(1, len(self.outputs))
        for output in self.outputs:
            output.close(share)
