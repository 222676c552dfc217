"""Fuzzing the rule loader (Hypothesis): whatever a rules.d file holds,
loading it either gives a RuleSet or a SourceError naming file:line;
never another exception, never unbounded work."""

from __future__ import annotations

import os
import tempfile

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rome_guard.detect.rules import RuleSet, load_rules, shipped_rules_dir
from rome_guard.yamlsrc import SourceError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# the words a rule file is made of, so that generated documents get past
# the first key check often enough to reach conditions and regexes
KEYS = st.sampled_from(
    [
        "rules", "lists", "id", "category", "severity", "description", "match", "action",
        "exceptions", "prevent", "detector", "params", "enabled", "kill_scope", "any", "all",
        "not", "name", "arg", "arg_prefix", "arg_regex", "cmdline_regex", "remote_port",
        "remote_cidr", "option", "names", "regex", "prefix", "getopt", "spec", "flags",
        "block_ports", "block_cidrs", "lineage", "parent",
        # tuning (append / tune / disable) and examples
        "tune", "append", "disable", "macros", "rule", "tag", "mode", "replace_exceptions",
        "pool_domains", "text_tool", "examples", "no_match", "argv", "connect", "stdio",
        "parents", "files", "payload", "sni", "dns_query", "remote_name",
    ]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from(
        [
            "miner",
            "low",
            "kill",
            "(a+)+$",
            "$miner_names",
            "[",
            "x{1001}",
            "*",
            "-1",
            "miner-known-binary",
            "monitor",
            "mitre-t1046",
            "tunnel-*",
            "10.0.0.1:22",
        ]
    ),  # fmt: skip
    st.text(max_size=20),
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=40,
)


def load_text(text: str) -> RuleSet | SourceError:
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, "fuzz.yaml")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        try:
            return load_rules([path])
        except SourceError as exc:
            assert exc.problems
            for location, message in exc.problems:
                assert location.line >= 1 and message
            return exc


@FUZZ
@given(DOCUMENTS)
def test_any_document_loads_or_is_a_located_error(document: object) -> None:
    load_text(yaml.safe_dump(document, allow_unicode=True))


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\" \n\t#%@`,?1$\\")), max_size=300))
def test_any_yaml_like_text_loads_or_is_a_located_error(text: str) -> None:
    load_text(text)


with open(os.path.join(shipped_rules_dir(), "reverse_shell.yaml"), encoding="utf-8") as _f:
    SHIPPED = _f.read()


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(SHIPPED)), st.integers(0, 8), st.text(max_size=6)),
        min_size=1,
        max_size=6,
    )
)
def test_a_damaged_shipped_file_loads_or_is_a_located_error(edits: list) -> None:
    text = SHIPPED
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut :]
    load_text(text.replace("id: ", "id: fuzz-"))  # no clash with the shipped copy
