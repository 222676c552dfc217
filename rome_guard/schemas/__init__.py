"""JSON Schemas of the files people write: rule files and the config.

``rules.schema.json`` and ``config.schema.json`` (draft-07) describe every
key the loaders (rome_guard.detect.rules, rome_guard.config) accept, for
editors (docs/rules.md, "Editor support") and for tests, which check each
shipped file against them and each schema against the loader's keys, so
the two cannot drift. The loaders stay the authority: a schema only says
what is shaped right, never that a file loads (unknown list names, regexes
RE2 refuses, unknown rule ids are the loader's to report).
"""

from __future__ import annotations

import json
from importlib import resources

SCHEMAS = ("rules", "config")


def schema_text(kind: str) -> str:
    """The schema of "rules" or "config" files, as shipped."""
    if kind not in SCHEMAS:
        raise ValueError(f"no schema {kind!r} (known: {', '.join(SCHEMAS)})")
    return resources.files(__name__).joinpath(f"{kind}.schema.json").read_text(encoding="utf-8")


def schema(kind: str) -> dict:
    return json.loads(schema_text(kind))
