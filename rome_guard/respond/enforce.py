"""From rules to kernel lists: what Prevention must hold for a rule set.

Rules with ``action: kill`` and a ``prevent`` block ask the kernel to act
before user space sees anything: SIGKILL at exec for deny-listed programs,
EPERM (or SIGKILL) at connect for blocked destinations, and the wire
programs' drops (JSON-RPC methods, pool domains: ``WirePolicy``, which
handlers/wire.py hands to the wire sensor). ``KernelPolicy``
is the pure, comparable description of the prevention lists, so a reload applies
only the difference; ``rule_for`` maps a kernel report back to the rule
that asked for it, for the journal. Host names are resolved here, with a
short timeout, and a name that does not resolve is logged, never fatal.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field

from rome_guard.detect.argv import basename, domain_matches
from rome_guard.detect.rules import Rule, RuleSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelPolicy:
    deny_names: frozenset[str] = frozenset()
    deny_paths: frozenset[str] = frozenset()
    ports: frozenset[tuple[int, bool]] = frozenset()  # (port, kill)
    cidrs: frozenset[tuple[str, bool]] = frozenset()  # (network, kill)
    owners: dict = field(default_factory=dict, compare=False, hash=False)  # entry -> rule


def resolve_host(name: str) -> list[str]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(2.0)
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("prevent.block_hosts: %s does not resolve (%s); not blocked", name, exc)
        return []
    finally:
        socket.setdefaulttimeout(previous)
    return sorted({info[4][0] for info in infos})


def policy_for(ruleset: RuleSet, resolve=resolve_host) -> KernelPolicy:
    names: set[str] = set()
    paths: set[str] = set()
    ports: set[tuple[int, bool]] = set()
    cidrs: set[tuple[str, bool]] = set()
    owners: dict = {}
    for rule in ruleset.rules:
        if not rule.enforces:
            continue  # weak evidence, or a kill rule staged in monitor mode
        prevent = rule.prevent
        for target in prevent.deny_exec:
            entry = ("path", target) if target.startswith("/") else ("name", target.lower())
            (paths if entry[0] == "path" else names).add(entry[1])
            owners.setdefault(entry, rule)
        for port in prevent.block_ports:
            ports.add((port, prevent.kill_on_connect))
            owners.setdefault(("port", port), rule)
        networks = list(prevent.block_cidrs)
        for host in prevent.block_hosts:
            networks.extend(resolve(host))
        for network in networks:
            text = str(ipaddress.ip_network(network, strict=False))
            cidrs.add((text, prevent.kill_on_connect))
            owners.setdefault(("cidr", text), rule)
    return KernelPolicy(
        frozenset(names), frozenset(paths), frozenset(ports), frozenset(cidrs), owners
    )


@dataclass(frozen=True)
class WirePolicy:
    """What the kernel drops, from the kill rules' prevent blocks."""

    methods: dict[str, bool] = field(default_factory=dict)  # method -> needs "agent"
    hosts: tuple[str, ...] = ()  # domain suffixes (SNI and DNS-named addresses)

    def names_pool(self, name: str) -> bool:
        return any(domain_matches(name, h) for h in self.hosts)


def wire_policy(ruleset: RuleSet) -> WirePolicy:
    """What the wire programs drop for a rule set (sensors.wire holds it)."""
    methods: dict[str, bool] = {}
    hosts: set[str] = set()
    for rule in ruleset.rules:
        if not rule.enforces:
            continue  # weak evidence, or a kill rule staged in monitor mode
        for method in rule.prevent.wire_methods:
            if not any(c in method for c in "*?["):
                methods[method] = False
        for method in rule.prevent.wire_agent_methods:
            methods.setdefault(method, True)
        hosts.update(h.lower().strip(".") for h in rule.prevent.wire_hosts)
    return WirePolicy(methods, tuple(sorted(hosts)))


def apply_policy(prevention, new: KernelPolicy, old: KernelPolicy | None = None) -> None:
    """Bring the kernel's lists from old (None: empty) to new."""
    old = old or KernelPolicy()
    prevention.allow_exec(
        names=old.deny_names - new.deny_names, paths=old.deny_paths - new.deny_paths
    )
    prevention.deny_exec(
        names=new.deny_names - old.deny_names, paths=new.deny_paths - old.deny_paths
    )
    prevention.unblock_ports(p for p, _ in old.ports - new.ports)
    prevention.unblock_cidrs(c for c, _ in old.cidrs - new.cidrs)
    for port, kill in new.ports - old.ports:
        prevention.block_ports([port], kill=kill)
    for cidr, kill in new.cidrs - old.cidrs:
        prevention.block_cidrs([cidr], kill=kill)


def rule_for(policy: KernelPolicy, event) -> Rule | None:
    """The rule whose prevent entry made the kernel act on event."""
    if event.filename:
        for entry in (("path", event.filename), ("name", basename(event.filename).lower())):
            if entry in policy.owners:
                return policy.owners[entry]
        name = event.comm.lower()
        for (kind, value), rule in policy.owners.items():
            if kind == "name" and value[:15] == name:
                return rule
        return None
    if ("port", event.dport) in policy.owners:
        return policy.owners[("port", event.dport)]
    try:
        address = ipaddress.ip_address(event.daddr)
    except ValueError:
        return None
    for (kind, value), rule in policy.owners.items():
        if kind == "cidr" and address in ipaddress.ip_network(value):
            return rule
    return None
