"""Rule files: loading, validation and the RuleSet the engine runs.

Rules are data (YAML, schema in docs/rules.md): named ``lists`` shared by
every file, and ``rules`` with an id, category, severity, description, a
``match`` condition or a ``detector`` with parameters, ``exceptions`` and an
``action``. Loading is all-or-nothing: any mistake in any file rejects the
whole set with ``path:line: what is wrong`` for every mistake found, so a
running daemon can keep its old rules.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable, NamedTuple

from rome_guard.detect.conditions import (
    NETWORK_KEYS,
    STDIO_KEYS,
    WIRE_KEYS,
    Compiler,
    Predicate,
    RuleSyntaxError,
)
from rome_guard.respond.responses import ALERT, RULE_ACTIONS
from rome_guard.yamlsrc import LineDict, LineList, Location, SourceError, load_file, where

SEVERITIES = ("critical", "high", "medium", "low")

KILL_SCOPES = ("process", "tree", "cgroup", "container")
SHIPPED_CATEGORIES = ("miner", "reverse_tunnel", "reverse_shell", "net_probe", "gpu_unregistered")
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_CATEGORY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_LIST_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

# Stateful detectors (code) and their parameters with defaults. A rule that
# names a detector may only set these parameters, with these types.
DETECTORS: dict[str, dict[str, float | int | bool]] = {
    # internal probing: weighted distinct destinations/ports per actor
    "fanout": {
        "window_s": 30.0,
        "max_ports_per_destination": 50,
        "max_destinations": 100,
        "failed_weight": 1.0,
        "refused_weight": 1.0,
        "established_weight": 0.25,
        "per_container": True,
    },
    # a process holding a GPU context that no registration covers
    "gpu_unregistered": {"confirm_with_nvml": True},
}

# The rule file format this rome-guard reads (top-level ``version:``).
RULES_FORMAT_VERSION = 1
_TOP_KEYS = ("version", "lists", "macros", "rules", "tune")

_RULE_KEYS = {
    "examples",
    "id",
    "category",
    "severity",
    "description",
    "match",
    "detector",
    "params",
    "exceptions",
    "action",
    "kill_scope",
    "prevent",
    "tags",
    "enabled",
}
_PREVENT_KEYS = {
    "deny_exec",
    "block_ports",
    "block_cidrs",
    "block_hosts",
    "kill_on_connect",
    "wire_methods",
    "wire_agent_methods",
    "wire_hosts",
}


@dataclass(frozen=True)
class PreventSpec:
    """What a rule asks the kernel to enforce before user space sees it."""

    deny_exec: tuple[str, ...] = ()  # basenames (comm) or absolute paths
    block_ports: tuple[int, ...] = ()
    block_cidrs: tuple[str, ...] = ()
    block_hosts: tuple[str, ...] = ()  # resolved to addresses by the daemon
    kill_on_connect: bool = False  # SIGKILL at SYN_SENT instead of EPERM
    # the wire sensor drops a flow whose first JSON-RPC line calls one of
    # these methods (agent_methods: only with an "agent" member), whose TLS
    # SNI is in one of wire_hosts, or whose address DNS named in one of them
    wire_methods: tuple[str, ...] = ()
    wire_agent_methods: tuple[str, ...] = ()
    wire_hosts: tuple[str, ...] = ()


@dataclass
class Rule:
    id: str
    category: str
    severity: str
    description: str
    action: str = ALERT.name
    kill_scope: str = "process"
    match: Predicate | None = None
    detector: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    exceptions: list[Predicate] = field(default_factory=list)
    prevent: PreventSpec = PreventSpec()
    tags: tuple[str, ...] = ()
    enabled: bool = True
    needs_network: bool = False
    needs_stdio: bool = False
    needs_wire: bool = False  # looks at what a flow said: live daemon only
    location: Location | None = None
    # command lines the rule must match / must not match (`rome-guard rules test`)
    examples: dict[str, tuple[Example, ...]] = field(default_factory=dict)

    def evaluate(self, subject) -> str | None:
        """Why subject matches this rule, or None (exceptions applied)."""
        if self.match is None:
            return None
        reason = self.match(subject)
        if reason is None:
            return None
        for exception in self.exceptions:
            if exception(subject) is not None:
                return None
        return reason


@dataclass
class RuleSet:
    rules: list[Rule]
    lists: dict[str, list]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)

    @property
    def match_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.match is not None and r.detector is None]

    def detector_rules(self, name: str) -> list[Rule]:
        return [r for r in self.rules if r.detector == name]


def shipped_rules_dir() -> str:
    """The installed rome_guard.rules package, or the repository's rules/
    folder when running from a source tree that was not installed."""
    try:
        return str(resources.files("rome_guard.rules"))
    except ModuleNotFoundError:
        return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "rules")


def rule_files(paths: Iterable[str]) -> list[str]:
    """Expand directories to their *.yaml/*.yml files (sorted). A missing
    directory (no YAML suffix) is skipped: rules.d is optional; a missing
    file is reported by the loader."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(
                os.path.join(path, name)
                for name in sorted(os.listdir(path))
                if name.endswith((".yaml", ".yml")) and not name.startswith(".")
            )
        elif os.path.exists(path) or path.endswith((".yaml", ".yml")):
            files.append(path)
    return files


def _problem(problems: list, loc: Location, message: str) -> None:
    problems.append((loc, message))


def _parse_prevent(raw: Any, loc: Location, compiler: Compiler) -> PreventSpec:
    if not isinstance(raw, LineDict):
        raise RuleSyntaxError(loc, "prevent: expected a mapping")
    for key in raw:
        if key not in _PREVENT_KEYS:
            known = ", ".join(sorted(_PREVENT_KEYS))
            raise RuleSyntaxError(raw.where(key), f"prevent: unknown key {key!r} (known: {known})")
    kw: dict[str, Any] = {}
    if "deny_exec" in raw:
        kw["deny_exec"] = tuple(
            compiler.strings(raw["deny_exec"], raw.where("deny_exec"), "prevent.deny_exec")
        )
    if "block_ports" in raw:
        kw["block_ports"] = tuple(
            sorted(compiler.ports(raw["block_ports"], raw.where("block_ports")))
        )
    if "block_cidrs" in raw:
        nets = compiler.networks(raw["block_cidrs"], raw.where("block_cidrs"))
        kw["block_cidrs"] = tuple(str(n) for n in nets)
    if "block_hosts" in raw:
        kw["block_hosts"] = tuple(
            compiler.strings(raw["block_hosts"], raw.where("block_hosts"), "prevent.block_hosts")
        )
    for key in ("wire_methods", "wire_agent_methods", "wire_hosts"):
        if key in raw:
            kw[key] = tuple(compiler.strings(raw[key], raw.where(key), f"prevent.{key}"))
    if "kill_on_connect" in raw:
        kw["kill_on_connect"] = compiler.boolean(
            raw["kill_on_connect"], raw.where("kill_on_connect"), "prevent.kill_on_connect"
        )
    return PreventSpec(**kw)


def _uses(node: Any, keys: frozenset[str], macros: dict | None = None, depth: int = 0) -> bool:
    """Whether a condition tree uses any of the given condition keys
    (through the macros it names, too)."""
    if depth > 32:
        return False  # a macro loop: reported by the compiler
    if isinstance(node, dict):
        for k, v in node.items():
            if k in keys:
                return True
            if k == "macro" and macros and isinstance(v, str) and v.lstrip("$") in macros:
                if _uses(macros[v.lstrip("$")][0], keys, macros, depth + 1):
                    return True
            elif _uses(v, keys, macros, depth + 1):
                return True
        return False
    if isinstance(node, list):
        return any(_uses(v, keys, macros, depth + 1) for v in node)
    return False


class Example(NamedTuple):
    """One command line of a rule's ``examples``; ``stdio_relay``: the argv
    of a process that feeds its stdin and reads its stdout while holding
    a connection (``{argv: [...], stdio_relay: [...]}``; stdio_relay rules)."""

    argv: tuple[str, ...]
    stdio_relay: tuple[str, ...] = ()


def _argv(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        return tuple(value)
    return None


def _example(item: Any) -> Example | None:
    argv = _argv(item)
    if argv is not None:
        return Example(argv)
    if isinstance(item, dict) and set(item) == {"argv", "stdio_relay"}:
        argv, relay = _argv(item["argv"]), _argv(item["stdio_relay"])
        if argv is not None and relay is not None:
            return Example(argv, relay)
    return None


def _parse_examples(raw: Any, loc: Location) -> dict[str, tuple[Example, ...]]:
    """``examples: {match: [argv, ...], no_match: [argv, ...]}``; an argv
    may also be ``{argv: [...], stdio_relay: [...]}``."""
    if not isinstance(raw, LineDict) or not raw or set(raw) - {"match", "no_match"}:
        raise RuleSyntaxError(loc, "examples: expected {match: [argv, ...], no_match: [argv, ...]}")
    examples = {}
    for kind, items in raw.items():
        parsed = [_example(item) for item in items] if isinstance(items, list) else [None]
        if None in parsed:
            raise RuleSyntaxError(
                raw.where(kind),
                f"examples.{kind}: expected a list of argv lists of strings"
                " (or {argv: [...], stdio_relay: [...]})",
            )
        examples[kind] = tuple(parsed)
    return examples


def _parse_params(detector: str, raw: Any, loc: Location) -> dict[str, Any]:
    schema = DETECTORS[detector]
    params = dict(schema)
    if raw is None:
        return params
    if not isinstance(raw, LineDict):
        raise RuleSyntaxError(loc, "params: expected a mapping")
    for key, value in raw.items():
        key_loc = raw.where(key)
        if key not in schema:
            known = ", ".join(schema)
            raise RuleSyntaxError(
                key_loc, f"params: {detector} has no parameter {key!r} (known: {known})"
            )
        default = schema[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise RuleSyntaxError(key_loc, f"params.{key}: expected true or false")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise RuleSyntaxError(key_loc, f"params.{key}: expected a non-negative number")
        params[key] = type(default)(value)
    return params


def _parse_rule(raw: Any, loc: Location, compiler: Compiler) -> Rule:
    if not isinstance(raw, LineDict):
        raise RuleSyntaxError(loc, "a rule must be a mapping")
    for key in raw:
        if key not in _RULE_KEYS:
            raise RuleSyntaxError(
                raw.where(key), f"unknown rule key {key!r} (known: {', '.join(sorted(_RULE_KEYS))})"
            )
    for key in ("id", "category", "severity", "description"):
        if key not in raw:
            raise RuleSyntaxError(raw.location, f"rule is missing required key {key!r}")
    rule_id = raw["id"]
    if not isinstance(rule_id, str) or not _ID.match(rule_id):
        raise RuleSyntaxError(raw.where("id"), f"id {rule_id!r} must match {_ID.pattern}")

    def field_error(key: str, message: str) -> RuleSyntaxError:
        return RuleSyntaxError(raw.where(key), f"rule {rule_id}: {message}")

    category = raw["category"]
    if not isinstance(category, str) or not _CATEGORY.match(category):
        raise field_error("category", f"category {category!r} must match {_CATEGORY.pattern}")
    severity = raw["severity"]
    if severity not in SEVERITIES:
        raise field_error(
            "severity", f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}"
        )
    description = raw["description"]
    if not isinstance(description, str) or not description.strip():
        raise field_error("description", "description must be a non-empty string")
    action = raw.get("action", ALERT.name)
    if action not in RULE_ACTIONS:
        raise field_error(
            "action", f"action must be one of {', '.join(RULE_ACTIONS)}, got {action!r}"
        )
    scope = raw.get("kill_scope", "process")
    if scope not in KILL_SCOPES:
        raise field_error(
            "kill_scope", f"kill_scope must be one of {', '.join(KILL_SCOPES)}, got {scope!r}"
        )
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise field_error("enabled", "enabled must be true or false")
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise field_error("tags", "tags must be a list of strings")

    detector = raw.get("detector")
    if detector is not None and detector not in DETECTORS:
        raise field_error(
            "detector", f"unknown detector {detector!r} (known: {', '.join(DETECTORS)})"
        )
    if detector is None and "match" not in raw:
        raise RuleSyntaxError(
            raw.location, f"rule {rule_id}: needs a 'match' condition or a 'detector'"
        )
    if "params" in raw and detector is None:
        raise field_error("params", "params only apply to a rule with a detector")
    match = compiler.condition(raw["match"], raw.where("match")) if "match" in raw else None
    exceptions = (
        compiler.conditions(raw["exceptions"], raw.where("exceptions"), "exceptions")
        if "exceptions" in raw
        else []
    )
    prevent = (
        _parse_prevent(raw["prevent"], raw.where("prevent"), compiler)
        if "prevent" in raw
        else PreventSpec()
    )
    rule = Rule(
        id=rule_id,
        category=category,
        severity=severity,
        description=description.strip(),
        action=action,
        kill_scope=scope,
        match=match,
        detector=detector,
        params=_parse_params(detector, raw.get("params"), raw.where("params")) if detector else {},
        exceptions=exceptions,
        prevent=prevent,
        tags=tuple(tags),
        enabled=enabled,
        needs_network=_uses(raw.get("match"), NETWORK_KEYS, compiler.macros),
        needs_stdio=_uses(raw.get("match"), STDIO_KEYS, compiler.macros),
        needs_wire=_uses(raw.get("match"), WIRE_KEYS, compiler.macros),
        location=raw.location,
        examples=(
            _parse_examples(raw["examples"], raw.where("examples")) if "examples" in raw else {}
        ),
    )
    return rule


def _collect_lists(doc: LineDict, lists: dict, origins: dict, problems: list) -> None:
    raw = doc.get("lists")
    if raw is None:
        return
    if not isinstance(raw, LineDict):
        _problem(problems, doc.where("lists"), "lists: expected a mapping of name -> list")
        return
    for name, items in raw.items():
        loc = raw.where(name)
        if not _LIST_NAME.match(name):
            _problem(problems, loc, f"list name {name!r} must match {_LIST_NAME.pattern}")
        elif name in lists:
            _problem(problems, loc, f"list {name!r} is already defined at {origins[name]}")
        elif not isinstance(items, list) or not items:
            _problem(problems, loc, f"list {name!r} must be a non-empty list")
        elif not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in items):
            _problem(problems, loc, f"list {name!r} may hold only strings and numbers")
        else:
            lists[name] = list(items)
            origins[name] = loc


def _check_version(doc: LineDict, problems: list) -> None:
    if "version" not in doc:
        return
    version = doc["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        _problem(
            problems, doc.where("version"), f"version must be a positive integer, got {version!r}"
        )
    elif version > RULES_FORMAT_VERSION:
        _problem(
            problems,
            doc.where("version"),
            f"rule format version {version} needs a newer rome-guard "
            f"(this one reads version {RULES_FORMAT_VERSION})",
        )


def _collect_macros(doc: LineDict, macros: dict, problems: list) -> None:
    """``macros: {name: condition}``: named conditions any rule file may
    use as ``{macro: name}`` (Falco's macros)."""
    raw = doc.get("macros")
    if raw is None:
        return
    if not isinstance(raw, LineDict):
        _problem(problems, doc.where("macros"), "macros: expected a mapping of name -> condition")
        return
    for name, node in raw.items():
        loc = raw.where(name)
        if not _LIST_NAME.match(name):
            _problem(problems, loc, f"macro name {name!r} must match {_LIST_NAME.pattern}")
        elif name in macros:
            _problem(problems, loc, f"macro {name!r} is already defined at {macros[name][1]}")
        else:
            macros[name] = (node, loc)


def _apply_tuning(
    doc: LineDict, by_id: dict[str, Rule], seen: dict, compiler: Compiler, problems: list
) -> None:
    """``tune: [{rule: ID, exceptions: [...]}]``: a site appends exceptions
    to a shipped (or any) rule from rules.d without copying the rule."""
    raw = doc.get("tune")
    if raw is None:
        return
    if not isinstance(raw, LineList):
        _problem(problems, doc.where("tune"), "tune: expected a list of {rule, exceptions}")
        return
    for index, entry in enumerate(raw):
        loc = raw.where(index)
        if not isinstance(entry, LineDict) or set(entry) != {"rule", "exceptions"}:
            _problem(problems, loc, "tune: each entry is {rule: ID, exceptions: [conditions]}")
            continue
        rule_id = entry["rule"]
        if rule_id not in seen:
            _problem(problems, entry.where("rule"), f"tune: no rule {rule_id!r} to tune")
            continue
        try:
            added = compiler.conditions(
                entry["exceptions"], entry.where("exceptions"), "exceptions"
            )
        except RuleSyntaxError as exc:
            _problem(problems, exc.location, exc.message)
            continue
        rule = by_id.get(rule_id)
        if rule is not None:  # a disabled rule is tuned for nothing
            rule.exceptions = [*rule.exceptions, *added]


def rules_for(config) -> RuleSet:
    """The rule set a config asks for: its rule paths on top of the shipped
    rules, less the rules it disables."""
    return load_rules(config.rules, disabled=config.disabled_rules, disabled_source=config.source)


def load_rules(
    paths: Iterable[str],
    include_shipped: bool = True,
    disabled: Iterable[str] = (),
    disabled_source: str = "",
) -> RuleSet:
    """Load and validate every rule file; raise SourceError listing every
    problem in every file if anything at all is wrong. ``disabled`` names
    rule ids to leave out (config ``disabled_rules``); naming a rule that
    does not exist is an error, so a typo cannot leave a rule running."""
    files: list[str] = []
    seen_files: set[str] = set()
    for path in rule_files(([shipped_rules_dir()] if include_shipped else []) + list(paths)):
        real = os.path.realpath(path)
        if real not in seen_files:  # a shipped file named again is loaded once
            seen_files.add(real)
            files.append(path)
    problems: list[tuple[Location, str]] = []
    documents: list[tuple[str, LineDict]] = []
    for path in files:
        try:
            docs = load_file(path)
        except SourceError as exc:
            problems.extend(exc.problems)
            continue
        for doc in docs:
            if not isinstance(doc, LineDict):
                _problem(
                    problems,
                    where(doc, Location(path, 1)),
                    "a rule file must be a mapping with 'lists' and/or 'rules'",
                )
                continue
            for key in doc:
                if key not in _TOP_KEYS:
                    _problem(
                        problems,
                        doc.where(key),
                        f"unknown top-level key {key!r} (known: {', '.join(_TOP_KEYS)})",
                    )
            _check_version(doc, problems)
            documents.append((path, doc))

    lists: dict[str, list] = {}
    origins: dict[str, Location] = {}
    for _path, doc in documents:
        _collect_lists(doc, lists, origins, problems)

    macros: dict[str, tuple[Any, Location]] = {}
    for _path, doc in documents:
        _collect_macros(doc, macros, problems)
    compiler = Compiler(lists, macros)
    rules: list[Rule] = []
    seen: dict[str, Location] = {}
    for _path, doc in documents:
        raw_rules = doc.get("rules")
        if raw_rules is None:
            continue
        if not isinstance(raw_rules, LineList):
            _problem(problems, doc.where("rules"), "rules: expected a list of rules")
            continue
        for index, raw in enumerate(raw_rules):
            try:
                rule = _parse_rule(raw, raw_rules.where(index), compiler)
            except RuleSyntaxError as exc:
                _problem(problems, exc.location, exc.message)
                continue
            if rule.id in seen:
                _problem(
                    problems,
                    rule.location,
                    f"rule id {rule.id!r} is already defined at {seen[rule.id]}",
                )
                continue
            seen[rule.id] = rule.location
            if rule.enabled:
                rules.append(rule)
    by_id = {rule.id: rule for rule in rules}
    for _path, doc in documents:
        _apply_tuning(doc, by_id, seen, compiler, problems)
    off = set(disabled)
    for rule_id in sorted(off - set(seen)):
        where_ = Location(disabled_source or "disabled_rules", 1)
        _problem(problems, where_, f"disabled_rules names unknown rule {rule_id!r}")
    if problems:
        problems.sort(key=lambda p: (p[0].path, p[0].line))
        raise SourceError(problems)
    return RuleSet(rules=[r for r in rules if r.id not in off], lists=lists, sources=files)
