"""The layering docs/architecture.md promises, read from the source (every
import statement, TYPE_CHECKING ones included): a package that starts
importing what it must never use fails here, not in a reviewer's eye."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rome_guard"


def imports_of(part: str) -> dict[str, set[str]]:
    """rome_guard modules each file of part (a module or a package) imports,
    by file."""
    target = PACKAGE / part
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
    found: dict[str, set[str]] = {}
    for path in files:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(PACKAGE.parent))] = {
            n for n in names if n == "rome_guard" or n.startswith("rome_guard.")
        }
    return found


def offending(part: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    """ "file imports module" for each import of part under a forbidden prefix
    that no allowed prefix permits."""

    def under(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return sorted(
        f"{path} imports {name}"
        for path, names in imports_of(part).items()
        for name in names
        if under(name, forbidden) and not under(name, allowed)
    )


EVERYTHING = ("rome_guard",)


@pytest.mark.parametrize(
    "part, forbidden, allowed",
    [
        # the event types import nothing of rome-guard
        ("events", EVERYTHING, ()),
        # kernel plumbing is one layer that sensors/ and respond/ both use
        ("sensors", ("rome_guard.respond",), ()),
        ("respond", ("rome_guard.sensors",), ()),
        ("kernel", EVERYTHING, ("rome_guard.kernel", "rome_guard.linux", "rome_guard.procfs")),
        # decoding records needs no kernel, no sensor and no responder
        (
            "layout",
            ("rome_guard.kernel", "rome_guard.sensors", "rome_guard.respond", "rome_guard.state"),
            (),
        ),
        # deciding never touches the kernel, the loop or a responder that acts
        (
            "detect",
            (
                "rome_guard.kernel",
                "rome_guard.sensors",
                "rome_guard.handlers",
                "rome_guard.respond",
            ),
            ("rome_guard.respond.responses",),  # the names of the responses: pure data
        ),
        ("gpu", ("rome_guard.kernel", "rome_guard.handlers", "rome_guard.respond"), ()),
        # the loop is the top: only the command line starts it
        ("state", ("rome_guard.daemon", "rome_guard.handlers", "rome_guard.respond"), ()),
        ("handlers", ("rome_guard.daemon",), ()),
    ],
)
def test_a_layer_never_imports_what_it_must_not(part, forbidden, allowed) -> None:
    assert offending(part, forbidden, allowed) == []


def test_the_check_sees_imports() -> None:
    """The reader finds a known import, so an empty list above means none."""
    assert "rome_guard.kernel.loader" in set().union(*imports_of("sensors").values())
