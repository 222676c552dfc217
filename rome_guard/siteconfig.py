"""The site's config and rule files at the daemon's start: what is usable is
used, what is not is left out and said.

One broken file in rules.d, a typo in config.yaml or a key a newer version
knows must never leave a host unguarded: `rome-guard run` starts on the
shipped rules and every good file, and each file (or config key) it left
out is a ``Rejection`` with its ``file:line`` problems, which the daemon
logs, journals (a ``config_rejected`` record), counts (a metric) and shows
in ``rome-guard status``. `rules validate` and `config check` stay strict.

The rule loader is used per file through its public entry points
(``rule_files``, ``load_rules``): a file is kept when the shipped rules and
the files kept before it load together with it. A broken shipped rule set
is an installation error and is raised (SourceError), never left out.

Enforcement stays on only when the protection it relies on was read: a
config whose ``protect`` was left out runs in monitor mode.

This module reads files and decides what is usable; it never logs, writes
the journal or starts anything.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from rome_guard.config import Config, load_config, parse_config
from rome_guard.detect.rules import RuleSet, load_rules, rule_files
from rome_guard.textsafe import one_line
from rome_guard.yamlsrc import LineDict, SourceError, load_file

# config keys without which enforcing would be unsafe
ENFORCE_NEEDS = ("protect",)


@dataclass(frozen=True)
class Rejection:
    """A file, or some of a config file's keys, left out."""

    path: str
    what: str  # "rule file", "config file" or "config keys a, b"
    problems: tuple[tuple[int, str], ...]  # (line, problem), in file order

    def lines(self) -> list[str]:
        return [one_line(f"{self.path}:{line}: {problem}", 400) for line, problem in self.problems]

    def to_status(self) -> dict[str, Any]:
        return {"file": self.path, "left_out": self.what, "problems": self.lines()}


def rejected_reload(exc: SourceError) -> list[Rejection]:
    """A reload the daemon refused (it keeps the rules in force), one
    Rejection per file the problems name."""
    by_file: dict[str, list[tuple[int, str]]] = {}
    for loc, msg in exc.problems:
        by_file.setdefault(loc.path, []).append((loc.line, msg))
    return [Rejection(path, "the reloaded version", tuple(p)) for path, p in by_file.items()]


def _rejection(path: str, what: str, exc: SourceError) -> Rejection:
    problems = tuple((loc.line, msg) for loc, msg in exc.problems) or ((1, str(exc)),)
    return Rejection(path, what, problems)


def _subset(raw: LineDict, keys: list[str]) -> LineDict:
    part = LineDict((k, raw[k]) for k in keys)
    part.location = raw.location
    part.key_locations = {k: raw.key_locations[k] for k in keys if k in raw.key_locations}
    return part


def usable_config(path: str | None) -> tuple[Config, list[Rejection]]:
    """The config at path with every unusable key left out (the built-in
    defaults when the file itself cannot be read or parsed)."""
    try:
        return load_config(path), []
    except SourceError as exc:
        failed = exc
    assert path is not None  # load_config(None) cannot fail
    try:
        docs = load_file(path)
    except SourceError as exc:
        return Config(source=path), [_rejection(path, "config file", exc)]
    raw = docs[0] if len(docs) == 1 else None
    if not isinstance(raw, LineDict):
        return Config(source=path), [_rejection(path, "config file", failed)]
    good = []
    for key in raw:
        try:
            parse_config(_subset(raw, [key]), path)
            good.append(key)
        except SourceError:
            pass
    bad = [key for key in raw if key not in good]
    try:
        config = parse_config(_subset(raw, good), path)
    except SourceError:  # the good keys disagree with each other
        config, bad = Config(source=path), list(raw)
    if config.mode == "enforce" and any(k in bad for k in ENFORCE_NEEDS):
        config = replace(config, mode="monitor")
        bad.append("mode (enforce needs the protect list)")
    return config, [_rejection(path, f"config keys {', '.join(bad)}", failed)]


def usable_rules(config: Config, extra: tuple[str, ...] = ()) -> tuple[RuleSet, list[Rejection]]:
    """The shipped rules plus every site rule file that loads, less the
    disabled rules that exist. Raises SourceError when the shipped rules
    themselves do not load."""
    paths = list(config.rules) + list(extra)
    disabled = config.disabled_rules
    try:
        return load_rules(paths, disabled=disabled, disabled_source=config.source), []
    except SourceError:
        pass
    shipped = load_rules([])  # an installation error if this raises
    kept: list[str] = []
    rejected: list[Rejection] = []
    for path in rule_files(paths):
        try:
            load_rules([*kept, path])
            kept.append(path)
        except SourceError as exc:
            rejected.append(_rejection(path, "rule file", exc))
    loaded = load_rules(kept)
    known = {rule.id for ruleset in (loaded, shipped) for rule in ruleset.rules + ruleset.left_out}
    unknown = [rule_id for rule_id in disabled if rule_id not in known]
    if unknown:
        where = config.source or "disabled_rules"
        problems = tuple((1, f"disabled_rules names unknown rule {r!r}") for r in unknown)
        rejected.append(Rejection(where, "disabled_rules entries", problems))
    ruleset = load_rules(kept, disabled=[r for r in disabled if r in known])
    return ruleset, rejected
