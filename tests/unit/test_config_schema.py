"""``raykd config --schema KIND`` prints the JSON schema of each config file kind, and every
config file the repository ships is valid against the schema of its kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raykd.cli import CONFIGS, cli, config_schema

ROOT = Path(__file__).resolve().parents[2]

SHIPPED = {
    "distill": ["jobs/configs/bbc_smollm2.yaml", "jobs/configs/gpu_example.yaml", *sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "raykd/methods/configs").glob("*.yaml"))],
    "mckd": ["jobs/configs/mckd_bbc.yaml", "jobs/configs/mckd_headlines.yaml"],
    "muki": ["jobs/configs/muki_bbc.yaml"],
    "tune": ["tune/configs/minidisc_bbc.yaml", "tune/configs/minidisc_smollm2.yaml"],
    "tune-kd": ["tune/configs/kd_smollm2.yaml"],
    "teacher": ["serve/teachers.yaml"],
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_schema_command_prints_the_schema_of_each_kind(kind, capsys):
    assert cli(["config", "--schema", kind]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == config_schema(kind)
    props = schema["properties"] if "properties" in schema else {
        k: v for option in schema["anyOf"] for k, v in schema["$defs"][option["$ref"].split("/")[-1]]["properties"].items()}
    assert props and all(v.get("description") for v in props.values()), [k for k, v in props.items() if not v.get("description")]


def test_the_schema_carries_types_ranges_and_defaults():
    train = config_schema("distill")["$defs"]["TrainConfig"]["properties"]
    assert train["max_steps"] == {"default": 150, "description": train["max_steps"]["description"], "minimum": 1,
                                  "title": "Max Steps", "type": "integer"}
    assert "warm-up" in train["warmup_steps"]["description"]
    assert config_schema("distill")["additionalProperties"] is False  # a misspelt key is flagged in the editor too


def test_an_unknown_kind_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["config", "--schema", "distil"])
    assert e.value.code == 2
    assert "distill" in capsys.readouterr().err


def test_every_shipped_config_is_valid_against_its_schema():
    jsonschema = pytest.importorskip("jsonschema")
    assert set(SHIPPED) == set(CONFIGS)
    for kind, files in SHIPPED.items():
        validator = jsonschema.Draft202012Validator(config_schema(kind))
        for rel in files:
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in
                      validator.iter_errors(yaml.safe_load((ROOT / rel).read_text()) or {})]
            assert not errors, f"{rel} against the {kind} schema: {errors}"


def test_the_schema_rejects_what_the_loader_rejects():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(config_schema("distill"))
    assert not validator.is_valid({"train": {"max_step": 10}})
    assert not validator.is_valid({"train": {"max_steps": 0}})
    assert validator.is_valid({"train": {"max_steps": 10}})
    assert validator.is_valid({"base": "base.yaml", "train": {"base": "train.yaml", "max_steps": 10}})  # load_config's base:
    assert not validator.is_valid({"base": 3})
