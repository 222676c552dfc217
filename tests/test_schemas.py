"""The shipped JSON Schemas (rome_guard/schemas) agree with the loaders:
every shipped rule file and the shipped config validate, the schemas know
every key the loaders accept (and no other), and what the schema refuses
the loader refuses too. A key added to a loader without the schema fails
here."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml

from rome_guard.config import _CHOICES, OUTPUT_TYPES, Config, OutputConfig, parse_config
from rome_guard.detect import rules as rulesmod
from rome_guard.detect.conditions import CONDITION_KEYS, SSH_FORWARD_KINDS
from rome_guard.detect.rules import load_rules, rule_files, shipped_rules_dir
from rome_guard.gpu.registry import _ALLOW_KEYS
from rome_guard.schemas import schema
from rome_guard.yamlsrc import SourceError, load_documents
from tests.detect.test_overrides import SITE
from tests.test_check import FIVE_MISTAKES

ROOT = Path(__file__).resolve().parents[1]
RULES = schema("rules")
CONFIG = schema("config")
DEFS = RULES["definitions"]


def validator(s: dict) -> jsonschema.Draft7Validator:
    jsonschema.Draft7Validator.check_schema(s)
    return jsonschema.Draft7Validator(s)


def schema_errors(s: dict, document) -> list[str]:
    return [e.message for e in validator(s).iter_errors(document)]


def uncommented_config() -> str:
    """systemd/config.yaml with every setting turned on ("#key" lines lose
    their "#"; "##" explanations stay comments): every key at its default."""
    text = (ROOT / "systemd" / "config.yaml").read_text()
    return re.sub(r"^#(?!#)", "", text, flags=re.MULTILINE)


@pytest.mark.parametrize("path", rule_files([shipped_rules_dir()]), ids=lambda p: Path(p).name)
def test_every_shipped_rule_file_validates(path: str) -> None:
    assert schema_errors(RULES, yaml.safe_load(Path(path).read_text())) == []


def test_the_shipped_config_validates_with_every_setting_on() -> None:
    text = uncommented_config()
    document = yaml.safe_load(text)
    assert {"mode", "gpu", "metrics", "sensor_filter"} <= set(document)
    assert schema_errors(CONFIG, document) == []
    # and the loader reads it as the built-in defaults
    config = parse_config(load_documents(text, "config.yaml")[0], "")
    assert config == Config()


def test_site_tuning_files_validate() -> None:
    assert schema_errors(RULES, yaml.safe_load(SITE)) == []
    docs = (ROOT / "docs" / "rules.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", docs, flags=re.DOTALL):
        document = yaml.safe_load(block)
        if set(document) == {"examples"}:  # a rule's examples, shown alone
            rule = {"id": "x", "category": "c", "severity": "low", "description": "d"}
            document = {"rules": [{**rule, "match": {"name": ["x"]}, **document}]}
        assert schema_errors(RULES, document) == [], block


def test_rule_schema_knows_every_key_the_loader_accepts() -> None:
    assert set(RULES["properties"]) == set(rulesmod._TOP_KEYS)
    assert set(DEFS["rule"]["properties"]) == set(rulesmod._RULE_KEYS)
    assert set(DEFS["prevent"]["properties"]) == set(rulesmod._PREVENT_KEYS)
    assert set(DEFS["tune"]["properties"]) == set(rulesmod._TUNE_KEYS)
    assert set(DEFS["condition"]["properties"]) == set(CONDITION_KEYS)
    assert set(RULES["properties"]["append"]["properties"]) == {"lists", "macros"}
    rule = DEFS["rule"]["properties"]
    for key, choices in rulesmod._CHOICES.items():
        assert rule[key]["enum"] == list(choices)
        assert DEFS["tune"]["properties"][key]["enum"] == list(choices)
    assert rule["detector"]["enum"] == list(rulesmod.DETECTORS)
    by_detector = {
        branch["if"]["properties"]["detector"]["const"]: branch["then"]["properties"]["params"]
        for branch in DEFS["rule"]["allOf"]
    }
    assert by_detector.keys() == rulesmod.DETECTORS.keys()
    for name, params in rulesmod.DETECTORS.items():
        assert set(by_detector[name]["properties"]) == set(params)
    ssh = DEFS["condition"]["properties"]["ssh_forwards"]["oneOf"][0]["enum"]
    assert ssh == list(SSH_FORWARD_KINDS)
    example = DEFS["example"]["oneOf"][1]["properties"]
    assert list(example) == list(rulesmod.EXAMPLE_KEYS)


def _walk(target, node: dict, prefix: str = "") -> None:
    props = node["properties"]
    known = [f.name for f in fields(target) if f.name != "source"]
    assert sorted(props) == sorted(known), prefix or "top level"
    assert node["additionalProperties"] is False
    for name in known:
        default, spec, key = getattr(target, name), props[name], prefix + name
        if is_dataclass(default):
            _walk(default, spec, key + ".")
        elif isinstance(default, bool):
            assert spec["type"] == "boolean", key
        elif isinstance(default, (int, float)):
            assert spec["type"] == "number" and spec["minimum"] == 0, key
        elif isinstance(default, str):
            assert spec.get("enum", "string") == list(_CHOICES.get(key, [])) or (
                key not in _CHOICES and spec["type"] == "string"
            ), key
        else:
            assert spec["type"] == "array", key


def test_config_schema_knows_every_key_the_loader_accepts() -> None:
    _walk(Config(), CONFIG)
    output = CONFIG["properties"]["outputs"]["items"]
    assert set(output["properties"]) == {f.name for f in fields(OutputConfig)}
    assert output["properties"]["type"]["enum"] == list(OUTPUT_TYPES)
    allow = CONFIG["properties"]["gpu"]["properties"]["allow"]["items"]
    assert set(allow["properties"]) == set(_ALLOW_KEYS)


@pytest.mark.parametrize(
    "text",
    [
        FIVE_MISTAKES,  # severity, action: enums; the others are the loader's alone
        "rules:\n  - {id: x, category: c, severity: low, description: d, match: {nmae: [a]}}\n",
        "tune:\n  - {rule: x, mode: audit}\n",
        "tune:\n  - {rule: x, exceptions: [{name: [a]}], replace_exceptions: []}\n",
        "disable:\n  - {rule: x, tag: y}\n",
        "append:\n  lists: {pool_domains: a.example}\n",
        "rules:\n  - {id: x, category: c, severity: low, description: d, detector: fanout,"
        " params: {window: 3}}\n",
    ],
)
def test_what_the_schema_refuses_the_loader_refuses(tmp_path: Path, text: str) -> None:
    assert schema_errors(RULES, yaml.safe_load(text))
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(SourceError):
        load_rules([str(path)])


def test_what_the_config_schema_refuses_the_loader_refuses() -> None:
    for text in ("mode: enforcing\n", "gpu: {poll_interval: often}\n", "metrics: {adr: x}\n",
                 "gpu: {allow: [{name: n}]}\n", "protect: {exe: /usr/bin/x}\n"):  # fmt: skip
        assert schema_errors(CONFIG, yaml.safe_load(text)), text
        if "allow" in text:  # gpu.allow is checked when the GPU watch starts
            continue
        with pytest.raises(SourceError):
            parse_config(load_documents(text, "c.yaml")[0], "c.yaml")
