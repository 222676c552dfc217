"""Rule regexes (detect/regex.py) on what attackers can put in a command
line: invalid UTF-8 (decoded with surrogateescape) must not make RE2 raise,
which would leave the rule unevaluated for that process."""

from __future__ import annotations

from rome_guard.detect.regex import compile_rule_regex

INVALID_UTF8 = b"\xff\xfe".decode("utf-8", "surrogateescape")


def test_invalid_utf8_in_the_text_still_matches() -> None:
    regex = compile_rule_regex(r"\bchisel\s+client\b")
    text = f"/tmp/{INVALID_UTF8}x chisel client 127.0.0.2:8080 R:socks"
    match = regex.search(text)
    assert match is not None and match.group(0) == "chisel client"


def test_invalid_utf8_alone_is_no_match_and_no_error() -> None:
    regex = compile_rule_regex(r"xmrig")
    assert regex.search(INVALID_UTF8 * 1000) is None
    assert regex.search("\ud800 lone high surrogate xmrig") is not None


def test_an_anchored_pattern_on_invalid_utf8_is_searched_not_an_error() -> None:
    pattern = compile_rule_regex("^(client|server)$")
    hostile = b"\xff\xfe\xfd".decode("utf-8", "surrogateescape")
    assert pattern.search(hostile) is None
    assert pattern.search("client") is not None
    assert compile_rule_regex("xmrig").search(hostile + "xmrig") is not None
