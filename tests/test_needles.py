"""The kernel's exec filter automaton (layout/needles.py) against the
engine's own needle test (detect/engine._text_test): wherever the engine
would consider a command line, the automaton must say "send it". A
disagreement in that direction would keep a miner's exec in the kernel.
Pure: no root, no BPF."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rome_guard.detect.conditions import AT_ARGUMENT, AT_ARGUMENT_OR_DASH
from rome_guard.detect.engine import _text_test
from rome_guard.layout.needles import build_dfa, dfa_matches

NEEDLES = frozenset(
    {
        "stratum+tcp://",
        AT_ARGUMENT + "--donate-level",
        AT_ARGUMENT_OR_DASH + "coin",
        AT_ARGUMENT + "xmrig",
        "pool.example",
    }
)
DFA = build_dfa(NEEDLES)
ENGINE = _text_test(NEEDLES)


def kernel_says(argv: list[str]) -> bool:
    return dfa_matches(DFA, b"\0".join(a.encode() for a in argv) + b"\0")


def engine_says(argv: list[str]) -> bool:
    assert ENGINE is not None
    return ENGINE.search(" ".join(argv).lower()) is not None


def test_known_spellings() -> None:
    for argv, want in (
        (["xmrig", "-o", "stratum+tcp://pool.example:3333"], True),
        (["/opt/x", "--donate-level=1"], True),
        (["/opt/x", "--coin", "monero"], True),
        (["/opt/x", "-coin", "monero"], True),
        (["python3", "train.py", "--lr", "3e-4"], False),
        (["torchrun", "--nproc_per_node=8", "train.py"], False),
        (["echo", "bitcoin"], False),  # "coin" inside a word is no argument
        (["echo", "my--donate-level"], False),
    ):
        assert engine_says(argv) is want, argv
        assert kernel_says(argv) is want, argv


_WORD = st.text(alphabet=st.sampled_from(list("abcdeilmnoprstx-=:/+.9 ")), min_size=0, max_size=24)


@settings(max_examples=400, deadline=None)
@given(st.lists(_WORD, min_size=1, max_size=5))
def test_the_kernel_never_keeps_back_what_the_engine_would_consider(argv: list[str]) -> None:
    if engine_says(argv):
        assert kernel_says(argv), argv
