"""The responses rome-guard can make, named once.

Every ``action`` a rule asks for, a journal record carries and a metric
counts is one of these; modules import the name from here instead of
spelling the string. A rule may ask for ``alert`` or ``kill``
(``rule_action``); ``block`` (a connect denied, an exec killed in the
kernel by a rule's ``prevent:``) and ``drop`` (a flow's segment or a DNS
question dropped by the wire programs, so it never left) are what the
kernel did on a rule's behalf. Adding a
response is one line below and its handling where it acts
(respond/alerts.py for user space, respond/enforce.py and the wire
handler for the kernel).

Pure data: this module never acts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Response:
    name: str  # the ``action`` of rules, journal records and metrics
    rule_action: bool  # a rule may ask for it with ``action:``
    acts: bool  # it changes something on the host (enforce mode only)
    description: str


ALERT = Response("alert", True, False, "recorded: journal, metrics, log; nothing else")
KILL = Response("kill", True, True, "SIGKILL by verified pidfd (process, tree, cgroup, container)")
BLOCK = Response("block", False, True, "the kernel denied a connect or killed at exec (prevent:)")
DROP = Response("drop", False, True, "the kernel dropped a flow's packets (the wire's prevent:)")

# a prevention record's ``action`` for a connect the kernel denied (the
# other outcome is "killed"); counted under BLOCK in metrics
BLOCKED = "blocked"

RESPONSES: dict[str, Response] = {r.name: r for r in (ALERT, KILL, BLOCK, DROP)}
RULE_ACTIONS: tuple[str, ...] = tuple(r.name for r in RESPONSES.values() if r.rule_action)
