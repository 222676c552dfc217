"""YAML that remembers where each value came from.

Rule and config files are written by people; every mistake must be reported
as ``path:line:column: what is wrong``. This loader returns ordinary dicts,
lists and scalars whose mappings and sequences also know the line and column
of each key and item, and ``SourceError`` carries the locations to the user.

Files are untrusted in size and shape too (a rules.d file, a SIGHUP reload):
a file is read up to ``MAX_FILE_BYTES``, nested at most ``MAX_DEPTH`` deep,
and may hold at most ``MAX_VALUES`` values counted *after* alias expansion,
so a "billion laughs" alias bomb is refused, with its line, before anything
is expanded. This module never builds more than MAX_VALUES values from one
file, whatever the file says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from rome_guard.textsafe import one_line

MAX_FILE_BYTES = 4 << 20  # one rule or config file
MAX_VALUES = 200_000  # mappings, sequences and scalars, aliases expanded
MAX_DEPTH = 64  # nesting of mappings and sequences


@dataclass(frozen=True)
class Location:
    path: str
    line: int  # 1-based
    column: int = 0  # 1-based; 0 when only the line is known

    def __str__(self) -> str:
        if self.column:
            return f"{self.path}:{self.line}:{self.column}"
        return f"{self.path}:{self.line}"


def _at(path: str, node: yaml.Node) -> Location:
    return Location(path, node.start_mark.line + 1, node.start_mark.column + 1)


class SourceError(Exception):
    """One or more mistakes in a user-written file, each with its location."""

    def __init__(self, problems: list[tuple[Location, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{loc}: {msg}" for loc, msg in problems))


class LineDict(dict):
    """A mapping with the line of the mapping and of each key."""

    location: Location
    key_locations: dict[str, Location]

    def where(self, key: str | None = None) -> Location:
        if key is not None and key in self.key_locations:
            return self.key_locations[key]
        return self.location


class LineList(list):
    location: Location
    item_locations: list[Location]

    def where(self, index: int | None = None) -> Location:
        if index is not None and index < len(self.item_locations):
            return self.item_locations[index]
        return self.location


# libyaml's parser when present (much faster); the pure-Python one otherwise.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# One constructor resolves every scalar's tag (int, bool, null, str).
_SCALARS = yaml.SafeLoader("")


def _check_size(node: yaml.Node, path: str) -> None:
    """Count the values node stands for once its aliases are expanded,
    visiting each distinct node once (an alias is the same node object),
    and refuse past MAX_VALUES or MAX_DEPTH: at the line of the innermost
    value that crosses the limit."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, depth: int) -> int:
        known = sizes.get(id(n))
        if known is not None:
            return known
        if depth > MAX_DEPTH:
            raise SourceError([(_at(path, n), f"nested deeper than {MAX_DEPTH} levels")])
        total = 1
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                total += size(key, depth + 1) + size(value, depth + 1)
        elif isinstance(n, yaml.SequenceNode):
            for item in n.value:
                total += size(item, depth + 1)
        if total > MAX_VALUES:
            raise SourceError(
                [
                    (
                        _at(path, n),
                        f"more than {MAX_VALUES} values once aliases (*name) are expanded: "
                        "refused (an alias bomb?)",
                    )
                ]
            )
        sizes[id(n)] = total
        return total

    size(node, 0)


def _build(node: yaml.Node, path: str) -> Any:
    loc = _at(path, node)
    if isinstance(node, yaml.MappingNode):
        result = LineDict()
        result.location = loc
        result.key_locations = {}
        for key_node, value_node in node.value:
            key = _build(key_node, path)
            key_loc = _at(path, key_node)
            if not isinstance(key, str):
                raise SourceError([(key_loc, f"keys must be strings, got {key!r}")])
            if key in result:
                raise SourceError([(key_loc, f"duplicate key {key!r}")])
            result[key] = _build(value_node, path)
            result.key_locations[key] = key_loc
        return result
    if isinstance(node, yaml.SequenceNode):
        result = LineList(_build(item, path) for item in node.value)
        result.location = loc
        result.item_locations = [_at(path, item) for item in node.value]
        return result
    try:
        return _SCALARS.construct_object(node, deep=True)
    except (ValueError, yaml.YAMLError) as exc:  # e.g. an int of 5,000 digits, a bad timestamp
        raise SourceError([(loc, f"invalid value: {one_line(str(exc), 120)}")]) from None


def load_documents(text: str, path: str) -> list[Any]:
    """Every YAML document in text, line-aware; syntax errors as SourceError."""
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = Location(path, mark.line + 1, mark.column + 1) if mark else Location(path, 1)
        raise SourceError([(at, f"invalid YAML: {exc.problem}")]) from None
    except yaml.YAMLError as exc:  # e.g. an undecodable stream: no position
        raise SourceError([(Location(path, 1), f"invalid YAML: {one_line(str(exc))}")]) from None
    except RecursionError:  # the pure-Python parser on absurd nesting
        raise SourceError([(Location(path, 1), "invalid YAML: nested too deep")]) from None
    for node in nodes:
        if node is not None:
            _check_size(node, path)
    try:
        return [_build(node, path) for node in nodes if node is not None]
    finally:
        _SCALARS.constructed_objects.clear()


def load_file(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_FILE_BYTES + 1)
        if len(text.encode("utf-8")) > MAX_FILE_BYTES:
            raise SourceError(
                [(Location(path, 1), f"larger than {MAX_FILE_BYTES // (1 << 20)} MiB: refused")]
            )
    except UnicodeDecodeError as exc:
        raise SourceError([(Location(path, 1), f"not UTF-8 text: {exc.reason}")]) from None
    except OSError as exc:
        raise SourceError([(Location(path, 1), f"cannot read: {exc.strerror}")]) from None
    return load_documents(text, path)


def where(value: Any, fallback: Location, key: str | None = None) -> Location:
    if isinstance(value, LineDict):
        return value.where(key)
    if isinstance(value, LineList):
        return value.location
    return fallback
