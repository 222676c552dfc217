"""The match language of rules: YAML conditions compiled to predicates.

A condition is a mapping; several keys in one mapping must all hold. Each
key names one test (see docs/rules.md). Compilation validates everything
up front and raises ``RuleSyntaxError`` with the YAML location, so a rule
that loads cannot fail at match time. A compiled condition is a
``Condition``: a test that takes a Subject and returns a short reason ("why
it matched") or None, and the facts the engine's index and the rule need
about it (the names, text and connections it requires, what it looks at),
each set by the builder that knows it; all/any/not derive theirs from their
parts. Nothing else works these facts out again from the YAML.

This module never reads /proc or the network: it only looks at Subjects.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from rome_guard.detect import argv as argvlib
from rome_guard.detect.regex import BoundedRegex, RegexError, compile_rule_regex
from rome_guard.detect.subject import Subject
from rome_guard.linux import has_peer
from rome_guard.yamlsrc import LineDict, LineList, Location, where

Predicate = Callable[[Subject], "str | None"]
ValueTest = Callable[[str], bool]

# Monero: 95 base58 chars starting with 4 or 8 (106 for integrated);
# Ethereum-style: 0x + 40 hex. Either may carry ".worker" or "+diff".
_WALLET = re.compile(
    r"^(?:[48][1-9A-HJ-NP-Za-km-z]{94}(?:[1-9A-HJ-NP-Za-km-z]{11})?|0x[0-9a-fA-F]{40})"
    r"(?:[./+:][\w.+-]*)?$"
)


class RuleSyntaxError(Exception):
    def __init__(self, location: Location, message: str):
        self.location = location
        self.message = message
        super().__init__(f"{location}: {message}")


class Compiler:
    """Compiles conditions against a set of named lists and named
    conditions (macros: name -> (condition node, where it is defined))."""

    def __init__(
        self, lists: Mapping[str, list], macros: Mapping[str, tuple[Any, Location]] | None = None
    ):
        self.lists = lists
        self.macros = macros or {}
        self._compiled_macros: dict[str, Condition] = {}
        self._expanding: list[str] = []

    def macro(self, name: Any, loc: Location) -> Condition:
        """The named condition, compiled once; a reference to an unknown or
        self-referencing macro is an error at its place of use."""
        if not isinstance(name, str) or name.lstrip("$") not in self.macros:
            known = ", ".join(sorted(self.macros)) or "none defined"
            raise RuleSyntaxError(loc, f"macro: unknown macro {name!r} (known: {known})")
        name = name.lstrip("$")
        compiled = self._compiled_macros.get(name)
        if compiled is not None:
            return compiled
        if name in self._expanding:
            chain = " -> ".join([*self._expanding, name])
            raise RuleSyntaxError(loc, f"macro: {name!r} refers to itself ({chain})")
        node, defined_at = self.macros[name]
        self._expanding.append(name)
        try:
            compiled = self.condition(node, defined_at)
        finally:
            self._expanding.pop()
        self._compiled_macros[name] = compiled
        return compiled

    # --- values --------------------------------------------------------------

    def strings(self, value: Any, loc: Location, what: str) -> list[str]:
        """A list of strings; ``$name`` items expand to the named list."""
        items = value if isinstance(value, list) else [value]
        out: list[str] = []
        for index, item in enumerate(items):
            item_loc = value.where(index) if isinstance(value, LineList) else loc
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                item = str(item)
            if not isinstance(item, str) or not item:
                raise RuleSyntaxError(
                    item_loc, f"{what}: expected a non-empty string, got {item!r}"
                )
            if item.startswith("$"):
                name = item[1:]
                if name not in self.lists:
                    raise RuleSyntaxError(item_loc, f"{what}: unknown list {item!r}")
                out.extend(str(x) for x in self.lists[name])
            else:
                out.append(item)
        if not out:
            raise RuleSyntaxError(loc, f"{what}: the list is empty")
        return out

    def regex(self, value: Any, loc: Location, what: str) -> BoundedRegex:
        """Every regex of every condition is compiled here: linear time
        (RE2), case-insensitive, bounded input (rome_guard.detect.regex)."""
        if not isinstance(value, str) or not value:
            raise RuleSyntaxError(loc, f"{what}: expected a regular expression string")
        try:
            return compile_rule_regex(value)
        except RegexError as exc:
            raise RuleSyntaxError(loc, f"{what}: {exc}") from None

    def boolean(self, value: Any, loc: Location, what: str) -> bool:
        if not isinstance(value, bool):
            raise RuleSyntaxError(loc, f"{what}: expected true or false, got {value!r}")
        return value

    def ports(self, value: Any, loc: Location) -> frozenset[int]:
        result: set[int] = set()
        for item in self.strings(value, loc, "remote_port"):
            low, sep, high = item.partition("-")
            try:
                a, b = int(low), int(high) if sep else int(low)
            except ValueError:
                raise RuleSyntaxError(
                    loc, f"remote_port: {item!r} is not a port or range"
                ) from None
            if not (0 < a <= b <= 65535):
                raise RuleSyntaxError(loc, f"remote_port: {item!r} is out of range 1-65535")
            result.update(range(a, b + 1))
        return frozenset(result)

    def networks(self, value: Any, loc: Location) -> tuple:
        nets = []
        for item in self.strings(value, loc, "remote_cidr"):
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise RuleSyntaxError(loc, f"remote_cidr: {item!r} is not a CIDR") from None
        return tuple(nets)

    def value_test(self, spec: Any, loc: Location, what: str) -> tuple[ValueTest, str]:
        """Tests on one option value: prefix, equals, regex, host_suffix,
        hostport. No test at all means "the option is present"."""
        if spec is None or spec == {}:
            return (lambda _v: True), "present"
        if not isinstance(spec, LineDict):
            raise RuleSyntaxError(loc, f"{what}: expected a mapping of value tests")
        tests: list[ValueTest] = []
        for key, arg in spec.items():
            key_loc = spec.where(key)
            if key == "prefix":
                prefixes = tuple(s.lower() for s in self.strings(arg, key_loc, f"{what}.prefix"))
                tests.append(lambda v, p=prefixes: v.lower().startswith(p))
            elif key == "equals":
                options = frozenset(s.lower() for s in self.strings(arg, key_loc, f"{what}.equals"))
                tests.append(lambda v, o=options: v.lower() in o)
            elif key == "regex":
                pattern = self.regex(arg, key_loc, f"{what}.regex")
                tests.append(lambda v, p=pattern: p.search(v) is not None)
            elif key == "host_suffix":
                suffixes = self.strings(arg, key_loc, f"{what}.host_suffix")
                tests.append(lambda v, s=suffixes: _host_in(v, s))
            elif key == "hostport":
                self.boolean(arg, key_loc, f"{what}.hostport")
                tests.append(lambda v, want=arg: _is_hostport(v) == want)
            else:
                raise RuleSyntaxError(
                    key_loc,
                    f"{what}: unknown value test {key!r} "
                    "(known: prefix, equals, regex, host_suffix, hostport)",
                )
        return (lambda v: any(t(v) for t in tests)), "/".join(spec)

    # --- conditions ------------------------------------------------------------

    def condition(self, node: Any, loc: Location) -> Condition:
        if not isinstance(node, LineDict) or not node:
            raise RuleSyntaxError(where(node, loc), "a condition must be a non-empty mapping")
        parts = []
        for key, value in node.items():
            key_loc = node.where(key)
            builder = _BUILDERS.get(key)
            if builder is None:
                known = ", ".join(sorted(_BUILDERS))
                raise RuleSyntaxError(key_loc, f"unknown condition {key!r} (known: {known})")
            parts.append(builder(self, value, key_loc))
        if len(parts) == 1:
            return parts[0]
        return _all(parts)

    def conditions(self, node: Any, loc: Location, what: str) -> list[Condition]:
        if not isinstance(node, LineList) or not node:
            raise RuleSyntaxError(
                where(node, loc), f"{what}: expected a non-empty list of conditions"
            )
        return [self.condition(item, node.where(i)) for i, item in enumerate(node)]


# required text markers: the needle must start an argument (or the value of
# a --opt=value argument), or, for Go-style -long options also spelled
# --long, start an argument or follow a dash
AT_ARGUMENT = "\x01"
AT_ARGUMENT_OR_DASH = "\x02"


@dataclass(frozen=True, eq=False)
class Condition:
    """One compiled condition: ``test(subject)`` says why it holds, or None.
    The other fields are what is known of it without evaluating it, set by
    the builder that made it and derived by all/any/not from their parts;
    the engine's rule index (and through it the kernel's exec filter) reads
    the first three, a rule the ``uses_*`` ones."""

    test: Predicate
    # names (lower-case) of which a subject must go by at least one for test
    # to hold, or None when any subject might match; an entry ending in "*"
    # is a name prefix (from a glob such as "python3*"). The engine indexes
    # rules by these, and the eBPF sensor sends (and wakes the daemon for)
    # the execs of these names (wake_names; rome_guard/bpf/process.c).
    names: frozenset[str] | None = None
    # lower-case strings of which the lower-cased command line must contain
    # at least one for test to hold, or None when nothing is known; one led
    # by AT_ARGUMENT must start an argument there. A cheap test the engine
    # runs before a rule no name narrows (a pool URL, a miner-only flag
    # under any program name), and the kernel's exec filter before it sends
    # an exec no name wants (layout/needles.py).
    text: frozenset[str] | None = None
    # holds only for a subject with connections (remote_port, remote_cidr):
    # an exec, which has none yet, skips it
    needs_connection: bool = False
    # what it looks at anywhere inside (negated, or asked of a parent or a
    # relay, too): connections (a rule is re-checked at a connect), stdio,
    # what a flow said (a rule is evaluated on wire events only)
    uses_network: bool = False
    uses_stdio: bool = False
    uses_wire: bool = False

    def __call__(self, subject: Subject) -> str | None:
        return self.test(subject)


def _looking_at(parts: Iterable[Condition], uses_stdio: bool = False) -> dict[str, bool]:
    """The ``uses_*`` facts of a condition made of parts: whatever any uses."""
    parts = list(parts)
    return {
        "uses_network": any(part.uses_network for part in parts),
        "uses_stdio": uses_stdio or any(part.uses_stdio for part in parts),
        "uses_wire": any(part.uses_wire for part in parts),
    }


def _through(test: Predicate, inner: Condition | None, uses_stdio: bool = False) -> Condition:
    """A condition that negates inner, or asks it of another process (a
    parent, an ancestor, a relay): it looks at what inner looks at, but
    inner's index facts (names, text, connections) say nothing of the
    subject itself, so it has none."""
    return Condition(test, **_looking_at([] if inner is None else [inner], uses_stdio))


def _needing(test: Predicate, text: Iterable[str]) -> Condition:
    """A condition on the command line that holds only if it contains one
    of text (an empty string: nothing is known)."""
    needles = frozenset(text)
    return Condition(test, text=None if "" in needles else needles)


def _all(parts: list[Condition]) -> Condition:
    tests = [part.test for part in parts]

    def test(subject: Subject) -> str | None:
        reasons = []
        for part in tests:
            reason = part(subject)
            if reason is None:
                return None
            reasons.append(reason)
        return "; ".join(reasons)

    # every part must hold: the narrowest requirement of any part applies
    names = [part.names for part in parts if part.names is not None]
    texts = [part.text for part in parts if part.text is not None]
    return Condition(
        test,
        names=min(names, key=len) if names else None,
        text=min(texts, key=len) if texts else None,
        needs_connection=any(part.needs_connection for part in parts),
        **_looking_at(parts),
    )


def _any(parts: list[Condition]) -> Condition:
    tests = [part.test for part in parts]

    def test(subject: Subject) -> str | None:
        for part in tests:
            reason = part(subject)
            if reason is not None:
                return reason
        return None

    # one part is enough: a requirement only if every part has one
    names = [part.names for part in parts]
    texts = [part.text for part in parts]
    return Condition(
        test,
        names=_union(names),
        text=_union(texts),
        needs_connection=all(part.needs_connection for part in parts),
        **_looking_at(parts),
    )


def _union(sets: list[frozenset[str] | None]) -> frozenset[str] | None:
    """Every item of sets, or None (nothing known) if one of them is None."""
    if any(items is None for items in sets):
        return None
    return frozenset().union(*sets)


def _host_in(value: str, suffixes: list[str]) -> bool:
    ref = argvlib.parse_hostref(value)
    return ref is not None and any(argvlib.domain_matches(ref.host, s) for s in suffixes)


def _is_hostport(value: str) -> bool:
    ref = argvlib.parse_hostref(value)
    return ref is not None and ref.port is not None


def _glob_or_exact(patterns: list[str]) -> Callable[[str], bool]:
    """Case-insensitive name test: a set lookup, plus one compiled regex
    for all glob patterns together."""
    exact = frozenset(p.lower() for p in patterns if not any(c in p for c in "*?["))
    globs = [fnmatch.translate(p.lower()) for p in patterns if any(c in p for c in "*?[")]
    if not globs:
        return lambda name: name.lower() in exact
    combined = re.compile("|".join(f"(?:{g})" for g in globs))
    return lambda name: (lowered := name.lower()) in exact or combined.match(lowered) is not None


def _short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


# --- builders: one per condition key ----------------------------------------


def _b_all(c: Compiler, value: Any, loc: Location) -> Condition:
    return _all(c.conditions(value, loc, "all"))


def _b_any(c: Compiler, value: Any, loc: Location) -> Condition:
    return _any(c.conditions(value, loc, "any"))


def _b_not(c: Compiler, value: Any, loc: Location) -> Condition:
    inner = c.condition(value, loc)
    return _through(lambda s: None if inner(s) is not None else "not matched", inner)


def _b_name(c: Compiler, value: Any, loc: Location) -> Condition:
    patterns = c.strings(value, loc, "name")
    test = _glob_or_exact(patterns)
    # comm is cut to 15 bytes by the kernel: compare the cut names too
    short = _glob_or_exact([p[:15] for p in patterns if not any(ch in p for ch in "*?[")])

    def predicate(s: Subject) -> str | None:
        for name in s.names:
            if test(name) or (len(name) == 15 and short(name)):
                return f"name {name}"
        return None

    exact = frozenset(p.lower() for p in patterns if not _is_glob(p))
    prefixes = frozenset(_glob_prefix(p.lower()) for p in patterns if _is_glob(p))
    if "" in prefixes:
        return Condition(predicate)  # a glob that starts with a wildcard
    return Condition(
        predicate, names=exact | frozenset(n[:15] for n in exact) | {p + "*" for p in prefixes}
    )


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _glob_prefix(pattern: str) -> str:
    """The literal start of a glob: every name it matches starts with it."""
    cut = min(pattern.index(ch) for ch in "*?[" if ch in pattern)
    return pattern[:cut]


def _b_exe_path(c: Compiler, value: Any, loc: Location) -> Condition:
    test = _glob_or_exact(c.strings(value, loc, "exe_path"))
    return Condition(lambda s: f"exe {_short(s.exe)}" if s.exe and test(s.exe) else None)


def _b_exe_deleted(c: Compiler, value: Any, loc: Location) -> Condition:
    want = c.boolean(value, loc, "exe_deleted")
    return Condition(lambda s: "exe deleted" if s.exe_deleted == want else None)


def _b_exe_memfd(c: Compiler, value: Any, loc: Location) -> Condition:
    want = c.boolean(value, loc, "exe_memfd")
    return Condition(lambda s: "exe in memfd" if s.exe_memfd == want else None)


def _b_cwd(c: Compiler, value: Any, loc: Location) -> Condition:
    test = _glob_or_exact(c.strings(value, loc, "cwd"))
    return Condition(
        lambda s: f"cwd {_short(s.process.cwd)}" if s.process.cwd and test(s.process.cwd) else None
    )


def _b_user(c: Compiler, value: Any, loc: Location) -> Condition:
    users = frozenset(c.strings(value, loc, "user"))
    return Condition(lambda s: f"user {s.process.user}" if s.process.user in users else None)


def _b_in_container(c: Compiler, value: Any, loc: Location) -> Condition:
    want = c.boolean(value, loc, "in_container")
    return Condition(
        lambda s: (
            "in a container" if (s.process.attribution.container_id is not None) == want else None
        )
    )


def _argument_predicate(tokens: Callable[[Subject], Any], test: Callable[[str], bool]) -> Predicate:
    """The first argument (from tokens(subject)) that passes test."""

    def predicate(s: Subject) -> str | None:
        for token in tokens(s):
            if test(token):
                return f"argument {_short(token)}"
        return None

    return predicate


def _b_arg(c: Compiler, value: Any, loc: Location) -> Condition:
    wanted = frozenset(x.lower() for x in c.strings(value, loc, "arg"))
    predicate = _argument_predicate(lambda s: s.argv[1:], lambda t: t.lower() in wanted)
    return _needing(predicate, (AT_ARGUMENT + x for x in wanted))


def _b_arg_prefix(c: Compiler, value: Any, loc: Location) -> Condition:
    prefixes = tuple(x.lower() for x in c.strings(value, loc, "arg_prefix"))
    predicate = _argument_predicate(
        lambda s: s.argument_values, lambda t: t.lower().startswith(prefixes)
    )
    return _needing(predicate, (AT_ARGUMENT + x for x in prefixes))


def _b_arg_regex(c: Compiler, value: Any, loc: Location) -> Condition:
    pattern = c.regex(value, loc, "arg_regex")
    return Condition(
        _argument_predicate(lambda s: s.argument_values, lambda t: pattern.search(t) is not None)
    )


def _b_cmdline_regex(c: Compiler, value: Any, loc: Location) -> Condition:
    pattern = c.regex(value, loc, "cmdline_regex")

    def predicate(s: Subject) -> str | None:
        match = pattern.search(s.command_line)
        return f"command line {_short(match.group(0))}" if match else None

    return Condition(predicate)


def _b_flag(c: Compiler, value: Any, loc: Location) -> Condition:
    names = c.strings(value, loc, "flag")
    for name in names:
        if not name.startswith("-"):
            raise RuleSyntaxError(loc, f"flag: {name!r} must start with '-'")

    def predicate(s: Subject) -> str | None:
        for name in names:
            if argvlib.has_flag(s.argv, name):
                return f"flag {name}"
        return None

    # has_flag needs an argument that starts with the flag's stem
    return _needing(predicate, (AT_ARGUMENT + n.removesuffix("*").lower() for n in names))


def _b_option(c: Compiler, value: Any, loc: Location) -> Condition:
    if not isinstance(value, LineDict) or "names" not in value:
        raise RuleSyntaxError(loc, "option: expected a mapping with 'names' and value tests")
    names = c.strings(value["names"], value.where("names"), "option.names")
    for name in names:
        if not name.startswith("-"):
            raise RuleSyntaxError(
                value.where("names"), f"option.names: {name!r} must start with '-'"
            )
    tests = LineDict({k: v for k, v in value.items() if k != "names"})
    tests.location, tests.key_locations = value.location, value.key_locations
    test, _ = c.value_test(tests, loc, "option")

    def predicate(s: Subject) -> str | None:
        for name in names:
            for found in argvlib.option_values(s.argv, name):
                if test(found):
                    return f"option {name} {_short(found)}"
        return None

    # every spelling option_values accepts starts an argument with the name
    # (a -long name also as --long)
    return _needing(predicate, (_option_needle(name.lower()) for name in names))


def _option_needle(name: str) -> str:
    single_dash_long = len(name) > 2 and not name.startswith("--")
    return (AT_ARGUMENT_OR_DASH if single_dash_long else AT_ARGUMENT) + name


def _b_getopt(c: Compiler, value: Any, loc: Location) -> Condition:
    if not isinstance(value, LineDict) or not isinstance(value.get("spec"), str):
        raise RuleSyntaxError(loc, "getopt: expected a mapping with a 'spec' optstring")
    allowed = {"spec", "interleaved_operands", "flags", "values", "operands"}
    for key in value:
        if key not in allowed:
            raise RuleSyntaxError(value.where(key), f"getopt: unknown key {key!r}")
    spec = value["spec"]
    interleaved = value.get("interleaved_operands", 0)
    if not isinstance(interleaved, int) or isinstance(interleaved, bool) or interleaved < 0:
        raise RuleSyntaxError(
            value.where("interleaved_operands"), "getopt.interleaved_operands: expected a count"
        )
    letters = (
        frozenset(c.strings(value["flags"], value.where("flags"), "getopt.flags"))
        if "flags" in value
        else frozenset()
    )
    for letter in letters:
        if len(letter) != 1 or letter not in spec:
            raise RuleSyntaxError(
                value.where("flags"), f"getopt.flags: {letter!r} is not an option in spec"
            )
    value_tests: dict[str, ValueTest] = {}
    if "values" in value:
        raw = value["values"]
        if not isinstance(raw, LineDict):
            raise RuleSyntaxError(
                value.where("values"), "getopt.values: expected letter -> value tests"
            )
        for letter, spec_tests in raw.items():
            if f"{letter}:" not in spec:
                raise RuleSyntaxError(
                    raw.where(letter), f"getopt.values: {letter!r} takes no value in spec"
                )
            value_tests[letter] = c.value_test(
                spec_tests, raw.where(letter), f"getopt.values.{letter}"
            )[0]
    operand_test = (
        _operand_test(c, value["operands"], value.where("operands"))
        if "operands" in value
        else None
    )
    if not letters and not value_tests and operand_test is None:
        raise RuleSyntaxError(loc, "getopt: give 'flags', 'values' or 'operands' to match")

    def option_hit(parsed: argvlib.GetoptResult) -> str | None:
        hit = sorted(parsed.flags & letters)
        if hit:
            return f"option -{hit[0]}"
        for letter, found in parsed.values:
            test = value_tests.get(letter)
            if test is not None and test(found):
                return f"option -{letter} {_short(found)}"
        return None

    def predicate(s: Subject) -> str | None:
        parsed = argvlib.getopt(s.argv, spec, interleaved)
        reason = option_hit(parsed) if letters or value_tests else None
        if (letters or value_tests) and reason is None:
            return None
        if operand_test is None:
            return reason
        operands = operand_test(parsed.operands)
        if operands is None:
            return None
        return f"{reason} with {operands}" if reason else operands

    return Condition(predicate)


def _operand_test(
    c: Compiler, value: Any, loc: Location
) -> Callable[[tuple[str, ...]], str | None]:
    """getopt ``operands``: ``{min: N}`` (at least N operands) and/or
    ``{regex: R}`` (an operand matching R); either one satisfies it."""
    if not isinstance(value, LineDict) or not value or set(value) - {"min", "regex"}:
        raise RuleSyntaxError(loc, "getopt.operands: expected {min: N} and/or {regex: R}")
    least = value.get("min")
    if least is not None and (not isinstance(least, int) or isinstance(least, bool) or least < 1):
        raise RuleSyntaxError(value.where("min"), "getopt.operands.min: expected a count >= 1")
    pattern = (
        c.regex(value["regex"], value.where("regex"), "getopt.operands.regex")
        if "regex" in value
        else None
    )

    def test(operands: tuple[str, ...]) -> str | None:
        if least is not None and len(operands) >= least:
            return f"{len(operands)} operands"
        if pattern is not None:
            for operand in operands:
                if pattern.search(operand):
                    return f"operand {_short(operand)}"
        return None

    return test


def _b_arg_host(c: Compiler, value: Any, loc: Location) -> Condition:
    suffixes = c.strings(value, loc, "arg_host")

    def predicate(s: Subject) -> str | None:
        for ref in s.host_refs:
            if argvlib.is_domain(ref.host) and any(
                argvlib.domain_matches(ref.host, x) for x in suffixes
            ):
                return f"host {ref.host}"
        return None

    # a matching host is an argument's substring that ends in the suffix
    return _needing(predicate, (x.lower().lstrip(".") for x in suffixes))


def _b_wallet_arg(c: Compiler, value: Any, loc: Location) -> Condition:
    want = c.boolean(value, loc, "wallet_arg")
    if not want:
        raise RuleSyntaxError(loc, "wallet_arg: only 'true' is meaningful; use not: for absence")

    def predicate(s: Subject) -> str | None:
        for token in s.argument_values:
            if len(token) < 200 and _WALLET.match(token):
                return f"wallet {_short(token, 24)}"
        return None

    return Condition(predicate)


def _b_parent(c: Compiler, value: Any, loc: Location) -> Condition:
    inner = c.condition(value, loc)

    def predicate(s: Subject) -> str | None:
        if not s.lineage:
            return None
        reason = inner(s.related(s.lineage[0], s.lineage[1:]))
        return f"parent {s.lineage[0].pid}: {reason}" if reason else None

    return _through(predicate, inner)


def _b_ancestor(c: Compiler, value: Any, loc: Location) -> Condition:
    inner = c.condition(value, loc)

    def predicate(s: Subject) -> str | None:
        for depth, ancestor in enumerate(s.lineage):
            reason = inner(s.related(ancestor, s.lineage[depth + 1 :]))
            if reason:
                return f"ancestor {ancestor.pid}: {reason}"
        return None

    return _through(predicate, inner)


def _b_stdio_socket(c: Compiler, value: Any, loc: Location) -> Condition:
    want = c.boolean(value, loc, "stdio_socket")

    def predicate(s: Subject) -> str | None:
        connected = sorted(fd for fd, ep in s.stdio.items() if has_peer(ep))
        if bool(connected) != want:
            return None
        if not connected:
            return "no socket on stdio"
        ep = s.stdio[connected[0]]
        return f"fd {','.join(map(str, connected))} is a {ep.proto} socket to {ep.daddr}:{ep.dport}"

    return Condition(predicate, uses_stdio=True)


def _b_commands_from_stdin(c: Compiler, value: Any, loc: Location) -> Condition:
    want = c.boolean(value, loc, "commands_from_stdin")

    def predicate(s: Subject) -> str | None:
        reads = argvlib.reads_commands_from_stdin(s.argv)
        if reads != want:
            return None
        return "reads its commands from stdin" if reads else "runs a given program"

    return Condition(predicate)


def _b_stdio_relay(c: Compiler, value: Any, loc: Location) -> Condition:
    """``stdio_relay: true``, or ``stdio_relay: {condition}`` on the relay:
    some process feeds the subject's stdin and reads its stdout (through
    pipes, a fifo, a pty or a socket pair) while holding a network
    connection (state.stdio), and satisfies the condition."""
    inner = None if value is True else c.condition(value, loc)

    def predicate(s: Subject) -> str | None:
        for relay in s.stdio_relays:
            if inner is None:
                return relay.describe()
            if inner(s.related(relay.process, [])) is not None:  # a filter on the relay
                return relay.describe()
        return None

    return _through(predicate, inner, uses_stdio=True)


SSH_FORWARD_KINDS = ("remote", "dynamic", "local", "tunnel")


def _b_ssh_forwards(c: Compiler, value: Any, loc: Location) -> Condition:
    kinds = c.strings(value, loc, "ssh_forwards")
    for kind in kinds:
        if kind not in SSH_FORWARD_KINDS:
            raise RuleSyntaxError(
                loc, f"ssh_forwards: {kind!r} is not one of {', '.join(SSH_FORWARD_KINDS)}"
            )

    def predicate(s: Subject) -> str | None:
        forwards = s.ssh_forwards
        if forwards is None:
            return None
        found = forwards.kinds()
        for kind in kinds:
            if kind in found:
                return f"effective ssh config has {kind} forward {_short(found[kind])}"
        return None

    return Condition(predicate)


def _b_ssh_config_unknown(c: Compiler, value: Any, loc: Location) -> Condition:
    """``ssh_config_unknown: true``: the client's effective configuration
    cannot be established -- -F names a descriptor (from the argv alone), or
    the reader says why not (sensors.sshconfig.SshConfigUnknown)."""
    want = c.boolean(value, loc, "ssh_config_unknown")

    def predicate(s: Subject) -> str | None:
        named = argvlib.ssh_descriptor_config(s.argv)
        if named is not None:
            reason = f"ssh config from a descriptor ({_short(named)}): the guard cannot read it"
        else:
            found = s.ssh_forwards
            detail = getattr(found, "detail", None)
            reason = f"ssh config not established: {_short(detail, 160)}" if detail else None
        if want:
            return reason
        return None if reason else "ssh config established"

    return Condition(predicate)


def _b_config_file(c: Compiler, value: Any, loc: Location) -> Condition:
    """``config_file: {options: [-c, --config], all_regex: [R, ...]}``: a
    file named by one of the options holds text matching every regex (the
    subject's reader fetches it; this module reads nothing itself)."""
    if not isinstance(value, LineDict) or set(value) != {"options", "all_regex"}:
        raise RuleSyntaxError(loc, "config_file: expected {options: [...], all_regex: [...]}")
    names = c.strings(value["options"], value.where("options"), "config_file.options")
    raw = value["all_regex"]
    if not isinstance(raw, list) or not raw:
        raise RuleSyntaxError(value.where("all_regex"), "config_file.all_regex: a list of regexes")
    patterns = [c.regex(item, value.where("all_regex"), "config_file.all_regex") for item in raw]

    def predicate(s: Subject) -> str | None:
        for name in names:
            for path in argvlib.option_values(s.argv, name):
                text = s.config_text(path)
                if text and all(p.search(text) for p in patterns):
                    return f"config {_short(path)} ({', '.join(p.pattern for p in patterns)})"
        return None

    # a file is named only through one of the options (see _b_option)
    return _needing(predicate, (_option_needle(name.lower()) for name in names))


def _b_macro(c: Compiler, value: Any, loc: Location) -> Condition:
    return c.macro(value, loc)


def _b_remote_port(c: Compiler, value: Any, loc: Location) -> Condition:
    ports = c.ports(value, loc)

    def predicate(s: Subject) -> str | None:
        hit = s.peer_ports.keys() & ports
        return f"connects to port {min(hit)}" if hit else None

    return Condition(predicate, needs_connection=True, uses_network=True)


def _b_remote_cidr(c: Compiler, value: Any, loc: Location) -> Condition:
    ranges = _address_ranges(c.networks(value, loc))

    def predicate(s: Subject) -> str | None:
        for daddr, ep in s.peer_addresses.items():
            number = _address_number(daddr)
            if number is not None and any(lo <= number <= hi for lo, hi in ranges):
                return f"connects to {ep.daddr}:{ep.dport}"
        return None

    return Condition(predicate, needs_connection=True, uses_network=True)


def _address_ranges(nets: tuple) -> tuple[tuple[int, int], ...]:
    """Networks as integer ranges in one space: v4 as v4-mapped v6."""
    out = []
    for net in nets:
        lo, hi = int(net.network_address), int(net.broadcast_address)
        if net.version == 4:
            lo, hi = lo | _V4_MAPPED, hi | _V4_MAPPED
        out.append((lo, hi))
    return tuple(out)


_V4_MAPPED = 0xFFFF << 32


@functools.lru_cache(maxsize=65536)
def _address_number(address: str) -> int | None:
    try:
        if ":" in address:
            return int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
        return int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big") | _V4_MAPPED
    except OSError:
        return None


# --- wire conditions: what a new flow said first (Subject.wire) ---------------

PAYLOAD_REGEX_LIMIT = 8192  # characters searched: a client stream (4 KiB) and its decoded bodies


def _wire_names(c: Compiler, value: Any, loc: Location, what: str, facts) -> Condition:
    """Some name the flow showed (facts(wire) -> names) is in one of the
    listed domains or a subdomain of one."""
    suffixes = [s.lower().strip(".") for s in c.strings(value, loc, what)]

    def predicate(s: Subject) -> str | None:
        if s.wire is None:
            return None
        for name in facts(s.wire):
            if name and any(argvlib.domain_matches(name, x) for x in suffixes):
                return f"{what} {_short(name)}"
        return None

    return Condition(predicate, uses_wire=True)


def _b_dns_query(c: Compiler, value: Any, loc: Location) -> Condition:
    return _wire_names(c, value, loc, "dns_query", lambda w: w.dns_queries)


def _b_tls_sni(c: Compiler, value: Any, loc: Location) -> Condition:
    return _wire_names(c, value, loc, "tls_sni", lambda w: (w.sni,))


def _b_remote_name(c: Compiler, value: Any, loc: Location) -> Condition:
    return _wire_names(c, value, loc, "remote_name", lambda w: (w.remote_name,))


def _b_stratum_method(c: Compiler, value: Any, loc: Location) -> Condition:
    test = _glob_or_exact(c.strings(value, loc, "stratum_method"))

    def predicate(s: Subject) -> str | None:
        w = s.wire
        if w is None or not w.jsonrpc:
            return None
        for method in w.methods:  # every message of the stream, in order
            if test(method):
                return f"JSON-RPC method {_short(method, 64)}"
        return None

    return Condition(predicate, uses_wire=True)


def _b_payload_regex(c: Compiler, value: Any, loc: Location) -> Condition:
    pattern = c.regex(value, loc, "payload_regex")

    def predicate(s: Subject) -> str | None:
        if s.wire is None:
            return None
        match = pattern.search(s.wire.text[:PAYLOAD_REGEX_LIMIT])
        return f"payload {_short(match.group(0), 64)!r}" if match else None

    return Condition(predicate, uses_wire=True)


def _b_http_header(c: Compiler, value: Any, loc: Location) -> Condition:
    if not isinstance(value, LineDict) or "names" not in value:
        raise RuleSyntaxError(loc, "http_header: expected a mapping with 'names' and value tests")
    names = [n.lower() for n in c.strings(value["names"], value.where("names"), "http_header")]
    tests = LineDict({k: v for k, v in value.items() if k != "names"})
    tests.location, tests.key_locations = value.location, value.key_locations
    test, _ = c.value_test(tests, loc, "http_header")

    def predicate(s: Subject) -> str | None:
        if s.wire is None:
            return None
        for name in names:
            for found in s.wire.header(name):
                if test(found):
                    return f"HTTP {name}: {_short(found, 64)}"
        return None

    return Condition(predicate, uses_wire=True)


_BUILDERS: dict[str, Callable[[Compiler, Any, Location], Condition]] = {
    "all": _b_all,
    "any": _b_any,
    "not": _b_not,
    "name": _b_name,
    "exe_path": _b_exe_path,
    "exe_deleted": _b_exe_deleted,
    "exe_memfd": _b_exe_memfd,
    "cwd": _b_cwd,
    "user": _b_user,
    "in_container": _b_in_container,
    "arg": _b_arg,
    "arg_prefix": _b_arg_prefix,
    "arg_regex": _b_arg_regex,
    "cmdline_regex": _b_cmdline_regex,
    "flag": _b_flag,
    "option": _b_option,
    "getopt": _b_getopt,
    "arg_host": _b_arg_host,
    "wallet_arg": _b_wallet_arg,
    "parent": _b_parent,
    "ancestor": _b_ancestor,
    "stdio_socket": _b_stdio_socket,
    "stdio_relay": _b_stdio_relay,
    "commands_from_stdin": _b_commands_from_stdin,
    "ssh_forwards": _b_ssh_forwards,
    "ssh_config_unknown": _b_ssh_config_unknown,
    "macro": _b_macro,
    "config_file": _b_config_file,
    "remote_port": _b_remote_port,
    "remote_cidr": _b_remote_cidr,
    "stratum_method": _b_stratum_method,
    "payload_regex": _b_payload_regex,
    "dns_query": _b_dns_query,
    "tls_sni": _b_tls_sni,
    "remote_name": _b_remote_name,
    "http_header": _b_http_header,
}

CONDITION_KEYS = frozenset(_BUILDERS)
