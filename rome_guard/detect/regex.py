"""Rule regexes that run in bounded time, whatever the rule or the input.

Every regular expression a rule file supplies is compiled here, and only
here (``compile_rule_regex``; conditions get it through
``Compiler.regex``). The engine is RE2 (PyPI ``google-re2``): matching is
linear in the input, so a pattern such as ``(a+)+$`` that makes Python's
backtracking ``re`` run for minutes on 30 characters costs microseconds.
RE2 rejects what it cannot run in linear time (backreferences, look-around);
such a pattern is a rule error with its file:line, reported by
``rules validate`` and at load. Inputs are bounded too: a search reads at
most ``MAX_INPUT`` characters, and each compiled program at most
``MAX_PROGRAM_BYTES`` of memory.

This module never hands a rule's pattern to Python's ``re``.
"""

from __future__ import annotations

import re
from typing import Any

import re2

MAX_PATTERN = 1000  # characters in one rule regex
MAX_INPUT = 64 * 1024  # characters of one value a regex is searched in
MAX_PROGRAM_BYTES = 2 << 20  # RE2 memory budget per compiled regex

_OPTIONS = re2.Options()
_OPTIONS.case_sensitive = False
_OPTIONS.log_errors = False  # the error goes to the user with file:line instead
_OPTIONS.max_mem = MAX_PROGRAM_BYTES


class RegexError(ValueError):
    """The pattern cannot be used; the message says why, in one line."""


# lone surrogates (undecodable bytes under surrogateescape), which UTF-8 cannot
# carry; stdlib re on one character class is linear
_SURROGATE = re.compile("[\ud800-\udfff]")


class BoundedRegex:
    """A compiled rule regex: case-insensitive, linear-time ``search``."""

    __slots__ = ("pattern", "_compiled")

    def __init__(self, pattern: str, compiled: Any):
        self.pattern = pattern
        self._compiled = compiled

    def search(self, text: str) -> Any:
        """The first match in the first MAX_INPUT characters of text, or None.
        The match has ``group(0)``."""
        if len(text) > MAX_INPUT:
            text = text[:MAX_INPUT]
        try:
            return self._compiled.search(text)
        except UnicodeEncodeError:
            # argv, comm and paths arrive decoded with surrogateescape, and RE2
            # takes UTF-8 only: invalid UTF-8 in an attacker's command line must
            # not switch a rule off. Each lone surrogate becomes U+FFFD.
            return self._compiled.search(_SURROGATE.sub("\ufffd", text))

    def __repr__(self) -> str:
        return f"BoundedRegex({self.pattern!r})"


def compile_rule_regex(pattern: str) -> BoundedRegex:
    """Compile a rule's pattern with RE2, or raise RegexError."""
    if len(pattern) > MAX_PATTERN:
        raise RegexError(f"pattern longer than {MAX_PATTERN} characters")
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        raise RegexError(_reason(exc)) from None
    return BoundedRegex(pattern, compiled)


def _reason(exc: Exception) -> str:
    detail = exc.args[0] if exc.args else exc
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    detail = " ".join(str(detail).split())
    return (
        f"not accepted by the linear-time regex engine (RE2): {detail} "
        "(backreferences and look-around are not supported; write \\z for \\Z)"
    )
