"""Rule regexes on hostile input: invalid UTF-8 in an argv (surrogate-escaped
by the decoders) is searched, not an error that switches the rule off for
that process (found running the container suite next to a hostile-argv test)."""

from __future__ import annotations

from rome_guard.detect.regex import compile_rule_regex


def test_invalid_utf8_in_the_text_is_searched_not_an_error():
    pattern = compile_rule_regex("^(client|server)$")
    hostile = b"\xff\xfe\xfd".decode("utf-8", "surrogateescape")
    assert pattern.search(hostile) is None
    assert pattern.search("client") is not None
    assert compile_rule_regex("xmrig").search(hostile + "xmrig") is not None
