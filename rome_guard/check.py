"""Everything wrong with a config and the rules it names, found in one pass.

``rome-guard config check`` and ``rome-guard rules validate`` call these:
they collect every mistake (``file:line:column: what is wrong``) in the
config file, in every rule file it names, in ``gpu.allow`` and in the
metrics web config, instead of stopping at the first, so an operator fixes
a file in one round. Pure checking: nothing here starts a sensor, opens a
port or signals a process.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Iterable

from rome_guard.config import DEFAULT_CONFIG_FILE, Config, parse_config
from rome_guard.detect.rules import RuleSet, load_rules, rules_for
from rome_guard.yamlsrc import Location, SourceError, load_file

Problems = list[tuple[Location, str]]


def check_rules(
    paths: Iterable[str], config: Config | None = None
) -> tuple[RuleSet | None, Problems]:
    """The rule set (shipped rules, then paths, or config's rules and then
    paths) and every problem: a path that does not exist is one too."""
    paths = list(paths)
    problems: Problems = [
        (Location(path, 1), "no such file or directory")
        for path in paths
        if not os.path.exists(path)
    ]
    try:
        if config is None:
            ruleset = load_rules(paths)
        else:
            ruleset = rules_for(replace(config, rules=list(config.rules) + paths))
    except SourceError as exc:
        return None, problems + exc.problems
    return (ruleset if not problems else None), problems


def check_config(
    path: str, extra_rules: Iterable[str] = ()
) -> tuple[Config | None, RuleSet | None, Problems]:
    """The config at path, the rules it loads, and every problem in either,
    in gpu.allow and in the metrics web config."""
    from rome_guard.gpu.registry import parse_allow
    from rome_guard.respond.webconfig import load_web_config

    problems: Problems = []
    if path == DEFAULT_CONFIG_FILE and not os.path.exists(path):
        docs: list = []  # the daemon runs on the built-in defaults then
    else:
        try:
            docs = load_file(path)
        except SourceError as exc:
            return None, None, exc.problems
    if len(docs) > 1:
        problems.append((Location(path, 1), "expected one YAML document"))
    config = parse_config(docs[0] if docs else None, path, problems)
    _ruleset, rule_problems = check_rules(extra_rules, config)
    problems.extend(rule_problems)
    for check, value in (
        (lambda v: parse_allow(v, path), config.gpu.allow),
        (load_web_config, config.metrics.web_config_file),
    ):
        if not value:
            continue
        try:
            check(value)
        except SourceError as exc:
            problems.extend(exc.problems)
        except (OSError, ValueError) as exc:  # a certificate that does not load
            problems.append((Location(path, 1), f"metrics.web_config_file: {exc}"))
    if problems:
        problems.sort(key=lambda p: (p[0].path, p[0].line, p[0].column))
        return None, None, problems
    return config, _ruleset, problems
