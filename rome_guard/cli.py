"""The `rome-guard` command line. Commands are thin: they parse options,
call library code and choose the exit status (0 clean, 1 findings, 2 error).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import replace

import click

from rome_guard import __version__
from rome_guard.config import DEFAULT_CONFIG_FILE, Config, load_config
from rome_guard.detect.rules import RuleSet, load_rules, rule_files, rules_for
from rome_guard.respond.responses import ALERT
from rome_guard.yamlsrc import SourceError

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def fail(message: str) -> None:
    click.echo(f"rome-guard: {message}", err=True)
    sys.exit(EXIT_ERROR)


def config_from(path: str | None) -> Config:
    try:
        return load_config(path)
    except SourceError as exc:
        fail(f"invalid config:\n{exc}")
        raise  # unreachable


def rules_from(config: Config, extra: tuple[str, ...]) -> RuleSet:
    try:
        return rules_for(replace(config, rules=list(config.rules) + list(extra)))
    except SourceError as exc:
        fail(f"invalid rules, nothing loaded:\n{exc}")
        raise


config_option = click.option(
    "--config",
    "config_path",
    default=DEFAULT_CONFIG_FILE,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="YAML config; the built-in defaults apply when the default path is absent.",
)
rules_option = click.option(
    "--rules",
    "extra_rules",
    multiple=True,
    type=click.Path(exists=True),
    help="Extra rule file or directory (repeatable), on top of the shipped rules.",
)


@click.group()
@click.version_option(__version__, prog_name="rome-guard")
def main() -> None:
    """rome-guard: runtime guard for GPU training hosts running autonomous agents."""


@main.command()
@config_option
@rules_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document with every finding.")
def scan(config_path: str, extra_rules: tuple[str, ...], as_json: bool) -> None:
    """One-off scan of live processes and sockets. Exit 0 clean, 1 findings, 2 error."""
    from rome_guard.findings import finding_record
    from rome_guard.report import findings_table
    from rome_guard.scan import scan as run_scan
    from rome_guard.scan import visibility_warning

    config = config_from(config_path)
    ruleset = rules_from(config, extra_rules)
    warning = visibility_warning()
    if warning:
        click.echo(f"rome-guard: {warning}", err=True)
    result = run_scan(ruleset, config, exclude_pids=frozenset({os.getpid()}))
    wire_only = sorted(r.id for r in ruleset.rules if r.needs_wire)
    not_evaluated = (
        f"{len(wire_only)} wire rule(s) not evaluated: a snapshot cannot see bytes already "
        f"sent (Stratum first lines, DNS questions, TLS SNI); only `rome-guard run` can: "
        f"{', '.join(wire_only)}"
    )
    if as_json:
        document = {
            "version": __version__,
            "processes": result.processes,
            "sockets": result.sockets,
            "duration_s": round(result.duration_s, 4),
            "rules": len(ruleset),
            "findings": [finding_record(f, ALERT.name, result.timestamp) for f in result.findings],
            "not_evaluated": {"rules": wire_only, "why": not_evaluated} if wire_only else None,
        }
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        if result.findings:
            click.echo(findings_table(result.findings))
        click.echo(
            f"\n{len(result.findings)} finding(s); {result.processes} processes, "
            f"{result.sockets} sockets, {len(ruleset)} rules, {result.duration_s:.2f}s",
            err=not result.findings,
        )
        if wire_only:
            click.echo(not_evaluated, err=True)
    sys.exit(EXIT_FINDINGS if result.findings else EXIT_CLEAN)


@main.command()
@config_option
@rules_option
@click.option(
    "--mode", type=click.Choice(["monitor", "enforce"]), help="Override the config's mode."
)
@click.option(
    "--sensor", type=click.Choice(["auto", "ebpf", "poll"]), help="Override the config's sensor."
)
@click.option("--alerts-file", type=click.Path(), help="Alert journal (JSON lines).")
@click.option(
    "--metrics-addr",
    default=None,
    help="HOST:PORT for /metrics (default from config, :9985); '' disables.",
)
@click.option("--run-dir", type=click.Path(file_okay=False), help="Runtime state directory.")
def run(
    config_path: str,
    extra_rules: tuple[str, ...],
    mode: str | None,
    sensor: str | None,
    alerts_file: str | None,
    metrics_addr: str | None,
    run_dir: str | None,
) -> None:
    """Run the guard in the foreground (systemd Type=notify)."""
    from rome_guard.daemon import main as daemon_main
    from rome_guard.siteconfig import usable_config

    # degraded, never down: what cannot be used is left out and reported
    config, rejected = usable_config(config_path)
    overrides = {"mode": mode, "sensor": sensor, "alerts_file": alerts_file, "run_dir": run_dir}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    status = daemon_main(config, extra_rules, metrics_addr, rejected)
    # Everything is detached and closed by now. Skip the interpreter's and
    # libbcc's exit-time destructors: LLVM's alone take ~1.8 s, and SIGTERM
    # must end the daemon within 2 s.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@main.command()
@config_option
@click.option("--run-dir", type=click.Path(file_okay=False), help="Runtime state directory.")
@click.option("--json", "as_json", is_flag=True)
def status(config_path: str, run_dir: str | None, as_json: bool) -> None:
    """Show the running daemon's live state. Exit 2 when no daemon is
    running or its status is stale (older than 5 s: stopped or hung)."""
    from rome_guard.status import StatusUnavailable, problem, read_status, render

    config = config_from(config_path)
    path = os.path.join(run_dir or config.run_dir, "status.json")
    try:
        reading = read_status(path)
    except StatusUnavailable as exc:
        fail(str(exc))
        return
    if as_json:
        click.echo(json.dumps(reading.as_json(), indent=2, sort_keys=True))
    else:
        click.echo(render(reading))
    trouble = problem(reading)
    if trouble:
        fail(trouble)


@main.group()
def rules() -> None:
    """Check and list detection rules."""


def report_problems(problems: list) -> None:
    """Every problem as ``file:line:column: what is wrong``, a count, exit 2."""
    for location, message in problems:
        click.echo(f"{location}: {message}", err=True)
    click.echo(f"{len(problems)} error{'s' if len(problems) != 1 else ''}", err=True)
    sys.exit(EXIT_ERROR)


@rules.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
def rules_validate(paths: tuple[str, ...]) -> None:
    """Validate rule files (with the shipped rules and lists available):
    every error in one pass. Exit 2 on any error."""
    from rome_guard.check import check_rules

    ruleset, problems = check_rules(paths)
    if problems or ruleset is None:
        report_problems(problems)
        return
    click.echo(f"ok: {len(ruleset)} rules from {len(ruleset.sources)} files")


@rules.command("test")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True)
def rules_test(paths: tuple[str, ...], as_json: bool) -> None:
    """Run the examples of the rules these files (or directories' files:
    rules.d) define or tune (examples: match / no_match), and say what
    their tuning changed. Exit 0 all pass, 1 any fails, 2 the files do not
    load."""
    from rome_guard.detect.examples import concerned, disabled_by, run_examples
    from rome_guard.textsafe import command_line

    try:
        ruleset = load_rules(list(paths))
    except SourceError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_ERROR)
    files = set(rule_files(paths))
    results = run_examples(ruleset, files)
    failed = [r for r in results if not r.passed]
    tuned = [r for r in concerned(ruleset, files) if r.tuned_at]
    disabled = disabled_by(ruleset, files)
    if as_json:
        document = {
            "examples": [
                {
                    "rule": r.rule,
                    "kind": r.kind,
                    "argv": list(r.argv),
                    "passed": r.passed,
                    "response": r.response if r.kind == "match" else None,
                }
                for r in results
            ],
            "tuned": [
                {
                    "rule": r.id,
                    "severity": r.severity,
                    "action": r.action,
                    "mode": r.mode,
                    "enforce_response": r.enforce_response,
                    "at": [str(at) for at in r.tuned_at],
                }
                for r in tuned
            ],
            "disabled": [{"rule": r.id, "by": str(r.disabled_at)} for r in disabled],
        }
        click.echo(json.dumps(document))
    else:
        for r in failed:
            said = f"matched ({r.reason})" if r.reason else "did not match"
            click.echo(f"FAIL {r.rule} {r.kind}: {command_line(r.argv, 160)} {said}")
        for r in tuned:
            response = "kills" if r.enforces else "alerts only"
            click.echo(
                f"tuned {r.id} at {', '.join(str(at) for at in r.tuned_at)}: severity "
                f"{r.severity}, action {r.action}, mode {r.mode} (in enforce mode it {response})"
            )
        for r in disabled:
            click.echo(f"disabled {r.id} by {r.disabled_at}")
        rules_with = len({r.rule for r in results})
        click.echo(
            f"{len(results) - len(failed)}/{len(results)} examples pass ({rules_with} rules)"
        )
    sys.exit(EXIT_FINDINGS if failed else EXIT_CLEAN)


@rules.command("schema")
def rules_schema() -> None:
    """Print the JSON Schema of rule files (for editors: docs/rules.md)."""
    from rome_guard.schemas import schema_text

    click.echo(schema_text("rules"), nl=False)


@rules.command("list")
@config_option
@rules_option
@click.option("--json", "as_json", is_flag=True)
def rules_list(config_path: str, extra_rules: tuple[str, ...], as_json: bool) -> None:
    """List the loaded rules."""
    from rome_guard.report import table

    ruleset = rules_from(config_from(config_path), extra_rules)
    keys = ("id", "category", "severity", "action", "mode", "kind", "location")
    rows = [
        (r.id, r.category, r.severity, r.action, r.mode, r.detector or "match", str(r.location))
        for r in ruleset.rules
    ]
    if as_json:
        click.echo(json.dumps([dict(zip(keys, row)) for row in rows], indent=2))
    else:
        click.echo(table(keys, rows, 90))


@main.group("config")
def config_group() -> None:
    """Check the configuration."""


@config_group.command("check")
@click.argument("path", default=DEFAULT_CONFIG_FILE, type=click.Path(dir_okay=False))
@rules_option
def config_check(path: str, extra_rules: tuple[str, ...]) -> None:
    """Check a config file and everything it names (rule files and
    directories, gpu.allow, the metrics web config): every error in one
    pass as file:line:column. Exit 0 clean, 2 on any error."""
    from rome_guard.check import check_config

    config, ruleset, problems = check_config(path, extra_rules)
    if problems or config is None or ruleset is None:
        report_problems(problems)
        return
    shown = path if os.path.exists(path) else f"{path} (absent: the built-in defaults)"
    click.echo(
        f"ok: {shown}: mode {config.mode}, {len(ruleset)} rules from "
        f"{len(ruleset.sources)} files ({len(ruleset.left_out)} disabled)"
    )


@config_group.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of the config file (for editors)."""
    from rome_guard.schemas import schema_text

    click.echo(schema_text("config"), nl=False)


from rome_guard.gpu.cli import gpu  # noqa: E402

main.add_command(gpu)
