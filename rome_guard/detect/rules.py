"""Rule files: loading, validation, merging and the RuleSet the engine runs.

Rules are data (YAML, docs/rules.md; JSON Schema in rome_guard/schemas):
named ``lists`` and ``macros`` shared by every file, and ``rules`` with an
id, category, severity, description, a ``match`` condition or a
``detector`` with parameters, ``exceptions``, an ``action`` and a ``mode``.
A site tunes shipped content without copying it (Falco's append/override):
``append`` adds to lists and macros, ``tune`` changes a rule by id,
``disable`` leaves rules out by id, glob or tag. Loading is all-or-nothing:
any mistake in any file rejects the whole set with
``path:line:column: what is wrong`` for every mistake found, in one pass,
so a running daemon can keep its old rules. This module never decides what
a finding leads to (rome_guard.respond does, reading ``Rule.enforces``).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any, Callable, Iterable

from rome_guard.detect.conditions import Compiler, Condition, RuleSyntaxError
from rome_guard.respond.responses import ALERT, KILL, RULE_ACTIONS
from rome_guard.yamlsrc import LineDict, LineList, Location, SourceError, load_file, where

SEVERITIES = ("critical", "high", "medium", "low")
# enforce: the rule acts (kill, kernel prevention) when the daemon enforces;
# monitor: it only alerts, whatever the daemon's mode (a staged roll-out)
RULE_MODES = ("enforce", "monitor")
KILL_SCOPES = ("process", "tree", "cgroup", "container")
SHIPPED_CATEGORIES = ("miner", "reverse_tunnel", "reverse_shell", "net_probe", "gpu_unregistered")
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_CATEGORY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_LIST_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

# Stateful detectors (code) and their parameters with defaults. A rule that
# names a detector may only set these parameters, with these types.
DETECTORS: dict[str, dict[str, float | int | bool]] = {
    # internal probing: weighted distinct destinations/ports per actor, any protocol
    "fanout": {
        "window_s": 30.0,
        "max_ports_per_destination": 50,
        "max_destinations": 100,
        "failed_weight": 1.0,
        "refused_weight": 1.0,
        "established_weight": 0.25,
        # a datagram destination (UDP, ICMP echo, raw IP): no outcome is seen
        "datagram_weight": 1.0,
        "per_container": True,
    },
    # a process holding a GPU context that no registration covers
    "gpu_unregistered": {"confirm_with_nvml": True},
}

# The rule file format this rome-guard reads (top-level ``version:``).
RULES_FORMAT_VERSION = 1
_TOP_KEYS = ("version", "lists", "macros", "append", "rules", "tune", "disable")

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
    "mode",
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


@dataclass(frozen=True)
class Example:
    """One process a rule must match or must not (``rome-guard rules
    test``): its argv, and where the rule looks further, what else it
    holds. Written as an argv list, or as a mapping with these keys."""

    argv: tuple[str, ...]
    exe: str = ""  # the executable's path ("/dev/shm/x", "/memfd:x (deleted)")
    connect: tuple[str, ...] = ()  # "ADDR:PORT" of TCP connections it holds
    stdio: str = ""  # "ADDR:PORT": fds 0, 1 and 2 are a TCP socket to that peer
    parents: tuple[Example, ...] = ()  # its ancestors, nearest first
    # a process feeding its stdin and reading its stdout through pipes while
    # holding its own ``connect`` peers (stdio_relay rules)
    stdio_relay: Example | None = None
    files: tuple[tuple[str, str], ...] = ()  # (path, text) of files it may read
    # the first bytes of a new flow (to the first ``connect``), for wire rules
    payload: str = ""
    sni: str = ""
    dns_query: tuple[str, ...] = ()
    remote_name: str = ""

    @property
    def on_the_wire(self) -> bool:
        return bool(self.payload or self.sni or self.dns_query or self.remote_name)


EXAMPLE_KEYS = tuple(f.name for f in fields(Example))


@dataclass
class Rule:
    id: str
    category: str
    severity: str
    description: str
    action: str = ALERT.name
    kill_scope: str = "process"
    mode: str = "enforce"  # RULE_MODES
    match: Condition | None = None
    detector: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    exceptions: list[Condition] = field(default_factory=list)
    prevent: PreventSpec = PreventSpec()
    tags: tuple[str, ...] = ()
    enabled: bool = True
    location: Location | None = None
    # argv lists the rule must match / must not match (`rome-guard rules test`)
    examples: dict[str, tuple[Example, ...]] = field(default_factory=dict)
    # where other files changed it: tune entries, and the disable entry (or
    # tune) that left it out
    tuned_at: tuple[Location, ...] = ()
    disabled_at: Location | None = None

    @property
    def needs_network(self) -> bool:
        """Its match looks at connections: re-checked when a process connects."""
        return self.match is not None and self.match.uses_network

    @property
    def needs_stdio(self) -> bool:
        return self.match is not None and self.match.uses_stdio

    @property
    def needs_wire(self) -> bool:
        """Its match looks at what a flow said: evaluated on wire events only
        (the live daemon's; a snapshot cannot see them)."""
        return self.match is not None and self.match.uses_wire

    @property
    def enforces(self) -> bool:
        """Whether an enforcing daemon acts on this rule's findings (kills,
        fills the kernel's lists); a ``mode: monitor`` kill rule only alerts."""
        return self.action == KILL.name and self.mode == "enforce"

    @property
    def enforce_response(self) -> str:
        """What an enforcing daemon does on a match: kill, or alert only."""
        return KILL.name if self.enforces else ALERT.name

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
    left_out: list[Rule] = field(default_factory=list)  # disabled (enabled: false, disable:)

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)

    @property
    def match_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.match is not None and r.detector is None]

    def detector_rules(self, name: str) -> list[Rule]:
        return [r for r in self.rules if r.detector == name]

    @property
    def staged(self) -> list[str]:
        """Ids of kill rules staged in ``mode: monitor``: they alert, never kill."""
        return [r.id for r in self.rules if r.action == KILL.name and not r.enforces]


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


def _unknown_keys(raw: LineDict, known: Iterable[str], what: str, problems: list) -> None:
    """A problem for each key of raw that is not known: ``WHAT 'k' (known: ...)``."""
    known = tuple(known)
    for key in raw:
        if key not in known:
            _problem(problems, raw.where(key), f"{what} {key!r} (known: {', '.join(known)})")


def _strings(key: str) -> Callable[[Compiler, Any, Location], tuple[str, ...]]:
    return lambda c, value, at: tuple(c.strings(value, at, f"prevent.{key}"))


# prevent: key -> its value, compiled (RuleSyntaxError when wrong)
_PREVENT_VALUES: dict[str, Callable[[Compiler, Any, Location], Any]] = {
    "deny_exec": _strings("deny_exec"),
    "block_ports": lambda c, value, at: tuple(sorted(c.ports(value, at))),
    "block_cidrs": lambda c, value, at: tuple(str(n) for n in c.networks(value, at)),
    "block_hosts": _strings("block_hosts"),
    "kill_on_connect": lambda c, value, at: c.boolean(value, at, "prevent.kill_on_connect"),
    "wire_methods": _strings("wire_methods"),
    "wire_agent_methods": _strings("wire_agent_methods"),
    "wire_hosts": _strings("wire_hosts"),
}


_PREVENT_KEYS = frozenset(_PREVENT_VALUES)


def _parse_prevent(raw: Any, loc: Location, compiler: Compiler, problems: list):
    """The PreventSpec raw describes, or None with each bad key's mistake
    added to problems."""
    if not isinstance(raw, LineDict):
        _problem(problems, loc, "prevent: expected a mapping")
        return None
    before = len(problems)
    _unknown_keys(raw, sorted(_PREVENT_KEYS), "prevent: unknown key", problems)
    kw = {
        key: _compiled(problems, build, compiler, raw[key], raw.where(key))
        for key, build in _PREVENT_VALUES.items()
        if key in raw
    }
    return None if len(problems) > before else PreventSpec(**kw)


_ARGV = "an argv: a non-empty list of strings"


def _argv(raw: Any, loc: Location, what: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
        raise RuleSyntaxError(where(raw, loc), f"{what}: expected {_ARGV}")
    return tuple(raw)


def _texts(raw: Any, loc: Location, what: str) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(i, str) and i for i in items):
        raise RuleSyntaxError(loc, f"{what}: expected a string or a list of strings")
    return tuple(items)


def _example(raw: Any, loc: Location, what: str) -> Example:
    """An argv list, or {argv: [...], exe, connect, stdio, stdio_relay,
    parents, files, payload, sni, dns_query, remote_name}."""
    if not isinstance(raw, LineDict):
        return Example(_argv(raw, loc, what))
    for key in raw:
        if key not in EXAMPLE_KEYS:
            raise RuleSyntaxError(
                raw.where(key), f"{what}: unknown key {key!r} (known: {', '.join(EXAMPLE_KEYS)})"
            )
    if "argv" not in raw:
        raise RuleSyntaxError(raw.location, f"{what}: needs argv ({_ARGV})")
    kw: dict[str, Any] = {"argv": _argv(raw["argv"], raw.where("argv"), f"{what}.argv")}
    for key in ("exe", "stdio", "payload", "sni", "remote_name"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise RuleSyntaxError(raw.where(key), f"{what}.{key}: expected a non-empty string")
            kw[key] = raw[key]
    for key in ("connect", "dns_query"):
        if key in raw:
            kw[key] = _texts(raw[key], raw.where(key), f"{what}.{key}")
    for key in ("stdio", "connect"):
        peers = kw.get(key, ())
        for peer in (peers,) if isinstance(peers, str) else peers:
            if not _PEER.match(peer):
                raise RuleSyntaxError(raw.where(key), f"{what}.{key}: {peer!r} is not ADDR:PORT")
    if "stdio_relay" in raw:
        kw["stdio_relay"] = _example(
            raw["stdio_relay"], raw.where("stdio_relay"), f"{what}.stdio_relay"
        )
    if "parents" in raw:
        parents = raw["parents"]
        if not isinstance(parents, LineList) or not parents:
            raise RuleSyntaxError(
                raw.where("parents"), f"{what}.parents: expected a list of examples"
            )
        kw["parents"] = tuple(
            _example(p, parents.where(i), f"{what}.parents[{i}]") for i, p in enumerate(parents)
        )
    if "files" in raw:
        files = raw["files"]
        if not isinstance(files, LineDict) or not all(isinstance(v, str) for v in files.values()):
            raise RuleSyntaxError(raw.where("files"), f"{what}.files: expected path: text")
        kw["files"] = tuple(files.items())
    return Example(**kw)


_PEER = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[0-9.]+):\d{1,5}$")


def _parse_examples(raw: Any, loc: Location) -> dict[str, tuple[Example, ...]]:
    """``examples: {match: [example, ...], no_match: [example, ...]}``."""
    if not isinstance(raw, LineDict) or not raw or set(raw) - {"match", "no_match"}:
        raise RuleSyntaxError(loc, "examples: expected {match: [argv, ...], no_match: [argv, ...]}")
    examples = {}
    for kind, items in raw.items():
        if not isinstance(items, LineList):
            raise RuleSyntaxError(
                raw.where(kind), f"examples.{kind}: expected a list of argv lists or examples"
            )
        examples[kind] = tuple(
            _example(item, items.where(i), f"examples.{kind}[{i}]") for i, item in enumerate(items)
        )
    return examples


def _parse_params(detector: str, raw: Any, loc: Location, problems: list):
    """The detector's parameters (its defaults where not given), or None
    with each bad parameter's mistake added to problems."""
    schema = DETECTORS[detector]
    params = dict(schema)
    if raw is None:
        return params
    if not isinstance(raw, LineDict):
        _problem(problems, loc, "params: expected a mapping")
        return None
    before = len(problems)
    _unknown_keys(raw, schema, f"params: {detector} has no parameter", problems)
    for key, value in raw.items():
        if key not in schema:
            continue
        default = schema[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                _problem(problems, raw.where(key), f"params.{key}: expected true or false")
                continue
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            _problem(problems, raw.where(key), f"params.{key}: expected a non-negative number")
            continue
        params[key] = type(default)(value)
    return None if len(problems) > before else params


_CHOICES = {
    "severity": SEVERITIES,
    "action": RULE_ACTIONS,
    "kill_scope": KILL_SCOPES,
    "mode": RULE_MODES,
}


def _choice(raw: LineDict, key: str, default: Any, bad: Callable[[str, str], None]) -> Any:
    """raw[key] when it is one of the key's choices; else the problem is
    reported through bad and default stands in (so checking goes on)."""
    value = raw.get(key, default)
    choices = _CHOICES[key]
    if not isinstance(value, str) or value not in choices:
        bad(key, f"{key} must be one of {', '.join(choices)}, got {value!r}")
        return default
    return value


def _flag(raw: LineDict, key: str, default: bool, bad: Callable[[str, str], None]) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        bad(key, f"{key} must be true or false, got {value!r}")
        return default
    return value


def _compiled(problems: list, build: Callable[..., Any], *args: Any) -> Any:
    """build(*args), or None with its RuleSyntaxError added to problems."""
    try:
        return build(*args)
    except RuleSyntaxError as exc:
        _problem(problems, exc.location, exc.message)
        return None


def _exception_list(raw: Any, loc: Location, compiler: Compiler, problems: list, what: str):
    """Each exception compiled on its own, so every bad one is reported;
    None when any is bad."""
    if not isinstance(raw, LineList) or not raw:
        _problem(problems, where(raw, loc), f"{what}: expected a non-empty list of conditions")
        return None
    before = len(problems)
    compiled = [
        _compiled(problems, compiler.condition, item, raw.where(i)) for i, item in enumerate(raw)
    ]
    return None if len(problems) > before else compiled


def _parse_rule(raw: Any, loc: Location, compiler: Compiler, problems: list) -> Rule | None:
    """The rule raw describes, or None with every mistake found in it added
    to problems (one per key; a condition stops at its first mistake)."""
    if not isinstance(raw, LineDict):
        _problem(problems, loc, "a rule must be a mapping")
        return None
    before = len(problems)
    _unknown_keys(raw, sorted(_RULE_KEYS), "unknown rule key", problems)
    for key in ("id", "category", "severity", "description"):
        if key not in raw:
            _problem(problems, raw.location, f"rule is missing required key {key!r}")
    rule_id = raw.get("id", "?")
    if "id" in raw and (not isinstance(rule_id, str) or not _ID.match(rule_id)):
        _problem(problems, raw.where("id"), f"id {rule_id!r} must match {_ID.pattern}")

    def bad(key: str, message: str) -> None:
        _problem(problems, raw.where(key), f"rule {rule_id}: {message}")

    category = raw.get("category", "?")
    if "category" in raw and (not isinstance(category, str) or not _CATEGORY.match(category)):
        bad("category", f"category {category!r} must match {_CATEGORY.pattern}")
    severity = _choice(raw, "severity", "low", bad) if "severity" in raw else "low"
    description = raw.get("description", "?")
    if "description" in raw and (not isinstance(description, str) or not description.strip()):
        bad("description", "description must be a non-empty string")
    action = _choice(raw, "action", ALERT.name, bad)
    scope = _choice(raw, "kill_scope", "process", bad)
    mode = _choice(raw, "mode", "enforce", bad)
    enabled = _flag(raw, "enabled", True, bad)
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        bad("tags", "tags must be a list of strings")
        tags = []

    detector = raw.get("detector")
    if detector is not None and detector not in DETECTORS:
        bad("detector", f"unknown detector {detector!r} (known: {', '.join(DETECTORS)})")
        detector = None
    elif detector is None and "match" not in raw:
        _problem(
            problems, raw.location, f"rule {rule_id}: needs a 'match' condition or a 'detector'"
        )
    if "params" in raw and detector is None and "detector" not in raw:
        bad("params", "params only apply to a rule with a detector")
    match = (
        _compiled(problems, compiler.condition, raw["match"], raw.where("match"))
        if "match" in raw
        else None
    )
    exceptions = (
        _exception_list(
            raw["exceptions"], raw.where("exceptions"), compiler, problems, "exceptions"
        )
        if "exceptions" in raw
        else []
    )
    prevent = (
        _parse_prevent(raw["prevent"], raw.where("prevent"), compiler, problems)
        if "prevent" in raw
        else PreventSpec()
    )
    params = (
        _parse_params(detector, raw.get("params"), raw.where("params"), problems)
        if detector
        else {}
    )
    examples = (
        _compiled(problems, _parse_examples, raw["examples"], raw.where("examples"))
        if "examples" in raw
        else {}
    )
    if len(problems) > before:
        return None
    rule = Rule(
        id=rule_id,
        category=category,
        severity=severity,
        description=description.strip(),
        action=action,
        kill_scope=scope,
        mode=mode,
        match=match,
        detector=detector,
        params=params,
        exceptions=exceptions,
        prevent=prevent,
        tags=tuple(tags),
        enabled=enabled,
        location=raw.location,
        examples=examples,
    )
    return rule


def _hint(name: str, known: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for a near miss among known names."""
    close = difflib.get_close_matches(name, list(known), n=1) if isinstance(name, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _list_problem(name: str, items: Any) -> str | None:
    if not isinstance(items, list) or not items:
        return f"list {name!r} must be a non-empty list"
    if not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in items):
        return f"list {name!r} may hold only strings and numbers"
    return None


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
            _problem(
                problems,
                loc,
                f"list {name!r} is already defined at {origins[name]} "
                "(add to it with append: {lists: {" + name + ": [...]}})",
            )
        elif _list_problem(name, items):
            _problem(problems, loc, _list_problem(name, items))
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


_APPEND_PARTS = ("lists", "macros")


def _append_section(doc: LineDict, problems: list) -> dict[str, dict]:
    """``append: {lists: {...}, macros: {...}}``, shape-checked: each part
    that is a mapping, an empty one where absent or wrong."""
    parts: dict[str, dict] = {part: {} for part in _APPEND_PARTS}
    raw = doc.get("append")
    if raw is None:
        return parts
    if not isinstance(raw, LineDict):
        _problem(problems, doc.where("append"), "append: expected {lists: {...}, macros: {...}}")
        return parts
    _unknown_keys(raw, _APPEND_PARTS, "append: unknown key", problems)
    for key, value in raw.items():
        if key not in parts:
            continue
        if not isinstance(value, LineDict):
            _problem(problems, raw.where(key), f"append.{key}: expected a mapping of name -> ...")
        else:
            parts[key] = value
    return parts


def _append_lists(raw: dict, lists: dict, problems: list) -> None:
    """``append: {lists: {name: [items]}}``: items added to a list another
    file defined (Falco's ``override: {items: append}``); a shipped update of
    the list still reaches the site."""
    for name, items in raw.items():
        loc = raw.where(name)
        if name not in lists:
            _problem(
                problems, loc, f"append.lists: no list {name!r} to append to{_hint(name, lists)}"
            )
        elif _list_problem(name, items):
            _problem(problems, loc, f"append.lists: {_list_problem(name, items)}")
        else:
            lists[name] = [*lists[name], *(i for i in items if i not in lists[name])]


def _append_macros(raw: dict, macros: dict, problems: list) -> None:
    """``append: {macros: {name: condition}}``: the macro then holds when
    its definition or the appended condition does (Falco appends ``or ...``
    to a macro's condition)."""
    for name, node in raw.items():
        loc = raw.where(name)
        if name not in macros:
            _problem(
                problems, loc, f"append.macros: no macro {name!r} to append to{_hint(name, macros)}"
            )
            continue
        old, defined_at = macros[name]
        either = LineDict(any=LineList([old, node]))
        either.location, either.key_locations = defined_at, {"any": defined_at}
        either["any"].location = defined_at
        either["any"].item_locations = [defined_at, where(node, loc)]
        macros[name] = (either, defined_at)


_TUNE_KEYS = (
    "rule",
    *_CHOICES,  # severity, action, kill_scope, mode
    "enabled",
    "exceptions",
    "replace_exceptions",
    "examples",
)


def _apply_tuning(
    doc: LineDict, by_id: dict[str, Rule], compiler: Compiler, problems: list
) -> None:
    """``tune: [{rule: ID, ...}]``: a site changes a rule another file
    defined (a shipped one) by its id, without copying it, so a shipped
    update of the rule still reaches it: severity, action, kill_scope,
    mode, enabled; ``exceptions`` appended, or ``replace_exceptions``
    (Falco's ``override:`` append / replace)."""
    raw = doc.get("tune")
    if raw is None:
        return
    if not isinstance(raw, LineList):
        _problem(problems, doc.where("tune"), "tune: expected a list of {rule: ID, ...}")
        return
    for index, entry in enumerate(raw):
        if not isinstance(entry, LineDict) or "rule" not in entry:
            known = ", ".join(_TUNE_KEYS[1:])
            _problem(problems, raw.where(index), f"tune: each entry is {{rule: ID, {known}}}")
        else:
            _tune(entry, by_id, compiler, problems)


def _tune(entry: LineDict, by_id: dict[str, Rule], compiler: Compiler, problems: list) -> None:
    """One tune entry: checked whole (every mistake reported), applied only
    when it has none."""
    before = len(problems)
    rule_id = entry["rule"]
    rule = by_id.get(rule_id) if isinstance(rule_id, str) else None
    if rule is None:
        _problem(
            problems,
            entry.where("rule"),
            f"tune: no rule {rule_id!r} to tune{_hint(rule_id, by_id)}",
        )
    _unknown_keys(entry, _TUNE_KEYS, "tune: unknown key", problems)
    if "exceptions" in entry and "replace_exceptions" in entry:
        _problem(
            problems,
            entry.where("replace_exceptions"),
            "tune: exceptions (append) and replace_exceptions cannot be used together",
        )

    def bad(key: str, message: str) -> None:
        _problem(problems, entry.where(key), f"tune {rule_id}: {message}")

    settings = {key: _choice(entry, key, None, bad) for key in _CHOICES if key in entry}
    if "enabled" in entry:
        settings["enabled"] = _flag(entry, "enabled", True, bad)
    added = replaced = None
    if "exceptions" in entry:
        added = _exception_list(
            entry["exceptions"], entry.where("exceptions"), compiler, problems, "exceptions"
        )
    if "replace_exceptions" in entry:
        value = entry["replace_exceptions"]
        replaced = (
            []
            if isinstance(value, list) and not value
            else _exception_list(
                value, entry.where("replace_exceptions"), compiler, problems, "replace_exceptions"
            )
        )
    examples = (
        _compiled(problems, _parse_examples, entry["examples"], entry.where("examples"))
        if "examples" in entry
        else {}
    )
    if rule is None or len(problems) > before:
        return
    rule.tuned_at = (*rule.tuned_at, entry.location)
    for kind, argvs in examples.items():  # the site's own examples of the tuned rule
        rule.examples = {**rule.examples, kind: (*rule.examples.get(kind, ()), *argvs)}
    if "enabled" in settings:
        rule.disabled_at = None if settings["enabled"] else entry.location
    for key, value in settings.items():
        setattr(rule, key, value)
    if replaced is not None:
        rule.exceptions = list(replaced)
    if added is not None:
        rule.exceptions = [*rule.exceptions, *added]


def _apply_disable(doc: LineDict, rules: list[Rule], problems: list) -> None:
    """``disable: [{rule: ID or glob}, {tag: TAG}]``: leave rules out by id,
    by an fnmatch glob on the id (``tunnel-ssh-*``) or by tag (Falco's
    ``-D``/``-T``, Sigma's tags). A selector that selects nothing is an
    error: a typo must not leave rules running."""
    raw = doc.get("disable")
    if raw is None:
        return
    if not isinstance(raw, LineList):
        _problem(
            problems, doc.where("disable"), "disable: expected a list of {rule: ID} or {tag: T}"
        )
        return
    for index, entry in enumerate(raw):
        if not isinstance(entry, LineDict) or len(entry) != 1 or set(entry) - {"rule", "tag"}:
            _problem(
                problems,
                raw.where(index),
                "disable: each entry is {rule: ID or glob} or {tag: TAG}",
            )
            continue
        (kind, value), loc = next(iter(entry.items())), entry.where(next(iter(entry)))
        if not isinstance(value, str) or not value:
            _problem(problems, loc, f"disable.{kind}: expected a non-empty string, got {value!r}")
            continue
        if kind == "rule":
            chosen = [r for r in rules if fnmatch.fnmatchcase(r.id, value)]
            missing = f"disable: no rule matches {value!r}{_hint(value, (r.id for r in rules))}"
        else:
            chosen = [r for r in rules if value in r.tags]
            tags = {t for r in rules for t in r.tags}
            missing = f"disable: no rule has tag {value!r}{_hint(value, tags)}"
        if not chosen:
            _problem(problems, loc, missing)
        for rule in chosen:
            rule.enabled, rule.disabled_at = False, loc


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
    does not exist is an error, so a typo cannot leave a rule running.

    Files merge in order: every file's lists, then every ``append.lists``;
    every macro, then every ``append.macros``; every rule; then, file by
    file, its ``tune`` entries and then its ``disable`` entries (so a later
    file can re-enable what an earlier one disabled)."""
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
            _unknown_keys(doc, _TOP_KEYS, "unknown top-level key", problems)
            _check_version(doc, problems)
            documents.append((path, doc))

    lists: dict[str, list] = {}
    origins: dict[str, Location] = {}
    for _path, doc in documents:
        _collect_lists(doc, lists, origins, problems)
    appends = [_append_section(doc, problems) for _path, doc in documents]
    for append in appends:
        _append_lists(append["lists"], lists, problems)

    macros: dict[str, tuple[Any, Location]] = {}
    for _path, doc in documents:
        _collect_macros(doc, macros, problems)
    for append in appends:
        _append_macros(append["macros"], macros, problems)
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
            rule = _parse_rule(raw, raw_rules.where(index), compiler, problems)
            if rule is None:
                continue
            if rule.id in seen:
                _problem(
                    problems,
                    rule.location,
                    f"rule id {rule.id!r} is already defined at {seen[rule.id]} "
                    "(change it with tune: [{rule: " + rule.id + ", ...}])",
                )
                continue
            seen[rule.id] = rule.location
            rules.append(rule)
    by_id = {rule.id: rule for rule in rules}
    for _path, doc in documents:
        _apply_tuning(doc, by_id, compiler, problems)
        _apply_disable(doc, rules, problems)
    off = set(disabled)
    for rule_id in sorted(off - set(seen)):
        where_ = Location(disabled_source or "disabled_rules", 1)
        _problem(problems, where_, f"disabled_rules names unknown rule {rule_id!r}")
    if problems:
        problems.sort(key=lambda p: (p[0].path, p[0].line, p[0].column))
        raise SourceError(problems)
    return RuleSet(
        rules=[r for r in rules if r.enabled and r.id not in off],
        lists=lists,
        sources=files,
        left_out=[r for r in rules if not r.enabled or r.id in off],
    )
