"""The exec filter's command-line test as bytes for the kernel: struct
needle_dfa of rome_guard/bpf/sensor.h, built from the engine's needles.

The engine checks a rule no name narrows only when its lower-cased command
line contains one of the rule's needles (conditions.Condition.text; a needle
led by AT_ARGUMENT must follow the start, whitespace or "=", one led by
AT_ARGUMENT_OR_DASH also a "-"). The eBPF sensor runs the same test on an
exec's argv before deciding to send it (process.c, needles_match), as one
deterministic automaton: one table step per byte, no backtracking. It must
never say "no needle" where the engine's regex would find one; where the
two could differ it says "match" (any byte outside ASCII: str.lower() and
\\s are Unicode-aware). argv's NUL separators stand for the engine's
joining spaces.

Pure: no BPF, no rules; tested without root.
"""

from __future__ import annotations

from typing import Iterable

from rome_guard.detect.conditions import AT_ARGUMENT, AT_ARGUMENT_OR_DASH
from rome_guard.layout.sensor import NEEDLE_CLASSES, NEEDLE_MATCH, NEEDLE_STATES, NeedleDfa

# What the character before a needle's first one was: where an anchored
# needle may start.
_AT_START = 0  # the start, whitespace (argv's NULs included) or "="
_AT_DASH = 1  # "-": AT_ARGUMENT_OR_DASH needles only
_INSIDE = 2

_SEPARATORS = frozenset([0, *(b for b in range(128) if chr(b).isspace()), ord("=")])


class TooComplex(ValueError):
    """The needles need more states or classes than the kernel's table holds."""


def _prev_kind(byte: int) -> int:
    if byte in _SEPARATORS:
        return _AT_START
    if byte == ord("-"):
        return _AT_DASH
    return _INSIDE


def _may_start(anchor: str, prev: int) -> bool:
    if anchor == AT_ARGUMENT:
        return prev == _AT_START
    if anchor == AT_ARGUMENT_OR_DASH:
        return prev in (_AT_START, _AT_DASH)
    return True


def _split(needle: str) -> tuple[str, bytes] | None:
    """(anchor, ASCII body) of a needle; None for one with characters
    outside ASCII (it can only occur in a line the kernel sends anyway)."""
    anchor = needle[:1] if needle[:1] in (AT_ARGUMENT, AT_ARGUMENT_OR_DASH) else ""
    body = needle[len(anchor) :]
    if not body.isascii():
        return None
    return anchor, body.lower().encode()


def build_dfa(needles: Iterable[str]) -> NeedleDfa:
    """The automaton for needles; TooComplex when it does not fit."""
    parts = [p for p in map(_split, needles) if p is not None and p[1]]
    if any(not p[1] for p in map(_split, needles) if p is not None):
        raise TooComplex("an empty needle matches every command line")
    alphabet = sorted({b for _, body in parts for b in body})
    # byte -> class: each needle byte its own class (upper case folded),
    # the rest by what they are as a needle's predecessor
    classes = [0] * 256
    other = {_AT_START: 1, _AT_DASH: 2, _INSIDE: 3}
    non_ascii = 4
    for byte in range(256):
        classes[byte] = non_ascii if byte >= 128 else other[_prev_kind(byte)]
    representative = {1: 0, 2: ord("-"), 3: ord("#")}
    for n, byte in enumerate(alphabet, start=5):
        classes[byte] = n
        representative[n] = byte
        if ord("a") <= byte <= ord("z"):
            classes[byte - 32] = n
    count = 5 + len(alphabet)
    if count > NEEDLE_CLASSES:
        raise TooComplex(f"{count} character classes, the kernel holds {NEEDLE_CLASSES}")
    # subset construction: a state is (partial matches, predecessor kind)
    start = (frozenset(), _AT_START)
    ids = {start: 0}
    todo = [start]
    table: dict[int, list[int]] = {}
    while todo:
        state = todo.pop()
        partial, prev = state
        row = [NEEDLE_MATCH] * NEEDLE_CLASSES
        for cls in range(1, count):
            if cls == non_ascii:
                continue
            byte = representative[cls]
            nxt = set()
            matched = False
            for i, (anchor, body) in enumerate(parts):
                positions = [j for (k, j) in partial if k == i]
                if _may_start(anchor, prev):
                    positions.append(0)
                for j in positions:
                    if body[j] == byte:
                        if j + 1 == len(body):
                            matched = True
                        else:
                            nxt.add((i, j + 1))
            if matched:
                continue
            target = (frozenset(nxt), _prev_kind(byte))
            if target not in ids:
                if len(ids) >= NEEDLE_STATES:
                    raise TooComplex(f"more than {NEEDLE_STATES} automaton states")
                ids[target] = len(ids)
                todo.append(target)
            row[cls] = ids[target]
        # class 0 is never produced (NUL maps to the start class)
        table[ids[state]] = row
    dfa = NeedleDfa()
    dfa.classes[:] = classes
    for state_id, row in table.items():
        base = state_id * NEEDLE_CLASSES
        dfa.next[base : base + NEEDLE_CLASSES] = row
    return dfa


def dfa_matches(dfa: NeedleDfa, args: bytes) -> bool:
    """What the kernel's needles_match says for NUL-separated args (tests)."""
    state = 0
    for byte in args:
        state = dfa.next[state * NEEDLE_CLASSES + dfa.classes[byte]]
        if state == NEEDLE_MATCH:
            return True
    return False
