"""Every shipped method config loads to the validated config recorded in
``tests/unit/data/method_configs.json`` (the method YAMLs hold only their differences over
``base.yaml``; this checks that folding them changed no setting).

The record holds each config's fields that differ from the model defaults
(``model_dump(exclude_defaults=True)``), one method a line; two configs of one model with equal
records are equal. After a deliberate change to a shipped config, rewrite the record with
``python -m tests.unit.test_method_configs``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raykd.config import DistillConfig, load_config
from raykd.methods import CONFIG_DIR

RECORD = Path(__file__).parent / "data" / "method_configs.json"


def loaded(name: str) -> dict:
    """The non-default fields of the shipped config of method ``name``, as JSON values."""
    return load_config(DistillConfig, CONFIG_DIR / f"{name}.yaml").model_dump(mode="json", exclude_defaults=True)


def method_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("name", method_names())
def test_a_method_config_loads_to_the_recorded_config(name):
    assert loaded(name) == json.loads(RECORD.read_text())[name]


def test_the_record_covers_every_method_config():
    assert sorted(json.loads(RECORD.read_text())) == method_names()


if __name__ == "__main__":
    lines = [f"{json.dumps(n)}: {json.dumps(loaded(n), sort_keys=True)}" for n in method_names()]
    RECORD.write_text("{\n" + ",\n".join(lines) + "\n}\n")
