"""Reading command lines the way the programs themselves read them.

Pure functions over argv tuples. Miners, tunnels and shells are driven by
options that may be spelled ``-o X``, ``-oX``, ``--url=X``, ``--url X`` or
bundled (``ssh -NfR 9000:localhost:22``); a rule states the option once and
these helpers find every spelling. Nothing here knows about rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

# [scheme://][user[:pass]@]host[:port][/path]
_HOSTISH = re.compile(
    r"^(?:(?P<scheme>[a-z][a-z0-9+.-]*)://)?"
    r"(?:[^@/\s]*@)?"
    r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9])?)"
    r"(?::(?P<port>\d{1,5}))?(?:/\S*)?$",
    re.IGNORECASE,
)
_DOMAIN = re.compile(r"^(?:[a-z0-9_-]+\.)+[a-z]{2,}$", re.IGNORECASE)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def option_values(argv: tuple[str, ...], name: str) -> Iterator[str]:
    """Every value given to option ``name`` in any common spelling.

    ``-o``: ``-o X``, ``-oX``; ``--url``: ``--url X``, ``--url=X``;
    single-dash long options (Go flags, ``-connect``): ``-connect X``,
    ``-connect=X``, ``--connect X``, ``--connect=X``. Parsing stops at ``--``.
    """
    args = argv[1:]
    long_alias = None
    if len(name) > 2 and name.startswith("-") and not name.startswith("--"):
        long_alias = "-" + name  # Go's flag package accepts both dash forms
    names = (name,) if long_alias is None else (name, long_alias)
    short = len(name) == 2 and name.startswith("-") and name != "--"
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return
        if token in names:
            if i + 1 < len(args):
                yield args[i + 1]
            i += 2
            continue
        if short:
            if token.startswith(name) and not token.startswith("--") and len(token) > 2:
                yield token[2:].removeprefix("=")
        else:
            for spelled in names:
                if token.startswith(spelled + "="):
                    yield token[len(spelled) + 1 :]
        i += 1


def has_flag(argv: tuple[str, ...], name: str) -> bool:
    """Option ``name`` present, with or without an attached value.
    A trailing ``*`` makes name a prefix (``--randomx-*``)."""
    prefix = name.endswith("*")
    stem = name[:-1] if prefix else name
    for token in argv[1:]:
        if token == "--":
            return False
        if prefix:
            if token.startswith(stem) and token.startswith("-"):
                return True
        elif token == stem or token.startswith(stem + "="):
            return True
    return False


@dataclass(frozen=True)
class GetoptResult:
    flags: frozenset[str]  # every option letter seen
    values: tuple[tuple[str, str], ...]  # (letter, value) for options with arguments
    operands: tuple[str, ...]
    # index in argv where option parsing stopped (the first token after the
    # interleaved operands that is not an option, or "--"); len(argv) if none
    stopped_at: int = 0


def getopt(argv: tuple[str, ...], spec: str, interleaved_operands: int = 0) -> GetoptResult:
    """POSIX getopt over argv[1:] with optstring ``spec`` ("ab:c" style).

    Bundled flags (``-NfR 9000:h:22``) are split the way the program would.
    ``interleaved_operands`` operands may appear between options before
    parsing stops (ssh re-parses options after the destination: 1)."""
    takes_value = {spec[i] for i in range(len(spec) - 1) if spec[i + 1] == ":"}
    flags: set[str] = set()
    values: list[tuple[str, str]] = []
    operands: list[str] = []
    args = list(argv[1:])
    i = 0
    skipped = 0
    stopped = len(args)
    while i < len(args):
        token = args[i]
        if token == "--":
            operands.extend(args[i + 1 :])
            stopped = i
            break
        if not token.startswith("-") or token == "-":
            if skipped < interleaved_operands:
                operands.append(token)
                skipped += 1
                i += 1
                continue
            operands.extend(args[i:])
            stopped = i
            break
        j = 1
        while j < len(token):
            letter = token[j]
            flags.add(letter)
            if letter in takes_value:
                rest = token[j + 1 :]
                if rest:
                    values.append((letter, rest))
                elif i + 1 < len(args):
                    i += 1
                    values.append((letter, args[i]))
                break
            j += 1
        i += 1
    return GetoptResult(frozenset(flags), tuple(values), tuple(operands), stopped + 1)


@dataclass(frozen=True)
class HostRef:
    host: str
    port: int | None
    scheme: str | None


def parse_hostref(text: str) -> HostRef | None:
    """``stratum+tcp://user@pool.example:3333`` -> HostRef, else None."""
    match = _HOSTISH.match(text.strip())
    if not match:
        return None
    port = int(match["port"]) if match["port"] else None
    if port is not None and port > 65535:
        return None
    host = match["host"].strip("[]").lower()
    return HostRef(host, port, match["scheme"].lower() if match["scheme"] else None)


def is_domain(host: str) -> bool:
    return bool(_DOMAIN.match(host))


def domain_matches(host: str, suffix: str) -> bool:
    """host is suffix or a subdomain of it (``eu.pool.minexmr.com``)."""
    host, suffix = host.lower().rstrip("."), suffix.lower().lstrip(".")
    return host == suffix or host.endswith("." + suffix)


def argument_values(argv: tuple[str, ...]) -> Iterator[str]:
    """Every argument and every ``--opt=value`` value: what a program might
    use as a URL, host or wallet."""
    for token in argv[1:]:
        yield token
        if token.startswith("-") and "=" in token:
            yield token.split("=", 1)[1]


# --- ssh ------------------------------------------------------------------------

# OpenSSH's getopt string (ssh.c), as in rules/reverse_tunnel.yaml
SSH_OPTSTRING = "1246ab:c:e:fgi:kl:m:no:p:qstvxAB:CD:E:F:GI:J:KL:M:NO:P:Q:R:S:TVw:W:XYy"
# -F values naming the client's own descriptors, which nobody else can read
# (OpenSSH closes fds above 2 before it reads its config: stdin and 0-2 work)
_SSH_DESCRIPTOR = re.compile(r"^(/dev/(stdin|fd/\d+|tty)|/proc/(self|thread-self|\d+)/fd/\d+)$")


def ssh_config_file(argv: tuple[str, ...]) -> str | None:
    """The ``-F`` file an ssh client reads (ssh keeps the last one given)."""
    found = None
    for letter, value in getopt(argv, SSH_OPTSTRING, 1).values:
        if letter == "F":
            found = value
    return found


def ssh_descriptor_config(argv: tuple[str, ...]) -> str | None:
    """The ``-F`` value when it names one of the client's descriptors
    (``/dev/stdin``, ``/dev/fd/N``, bash's ``<(...)``)."""
    value = ssh_config_file(argv)
    return value if value is not None and _SSH_DESCRIPTOR.match(value) else None


# Shells and interpreters: options that give the program on the command line
# (sh -c, python -c/-m, perl/ruby/node -e, php -r, node -p/--eval), options
# that ask for an interactive session, and options that take a value.
_PROGRAM_TEXT_OPTIONS = frozenset({"-c", "-e", "-E", "-r", "-m", "-p", "--eval", "--print"})
_INTERACTIVE_OPTIONS = frozenset({"-i", "-s", "-a", "--interactive"})
_VALUE_OPTIONS = frozenset(
    {"-o", "+o", "-O", "+O", "--rcfile", "--init-file", "-W", "-X", "--require"}
)


def reads_commands_from_stdin(argv: tuple[str, ...]) -> bool:
    """A shell or interpreter that takes its commands from stdin: asked for
    an interactive session (``sh -i``, ``python -i``, ``php -a``, ``bash
    -s``), or given neither a program on the command line (``-c``, ``-e``,
    ``-m``, ...) nor a script to run (``/bin/sh``, ``python3``, ``perl``,
    ``node``, ``bash -``). Every combined short form counts (``-ic``:
    interactive wins, as python -i -c does; a shell's -ic runs the
    command, a look-alike we accept)."""
    interactive = program_text = script = False
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "-":
            break  # the program is read from stdin
        if arg == "--":
            script = i < len(args) and args[i] != "-"
            break
        if arg in _VALUE_OPTIONS:
            i += 1
            continue
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            interactive |= name in _INTERACTIVE_OPTIONS
            program_text |= name in _PROGRAM_TEXT_OPTIONS
            continue
        if len(arg) > 1 and arg[0] in "-+":
            letters = {f"-{letter}" for letter in arg[1:]}
            interactive |= bool(letters & _INTERACTIVE_OPTIONS)
            program_text |= bool(letters & _PROGRAM_TEXT_OPTIONS)
            continue
        script = True  # the first operand: a script (or, after -c, the command)
        break
    if interactive:
        return True
    return not (program_text or script)
