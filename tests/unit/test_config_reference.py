"""The committed config reference page (docs/reference/config.md) is what the models generate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_config_reference_is_up_to_date():
    gen = _generator()
    assert gen.PAGE.is_file(), f"{gen.PAGE} is missing: generate it with `{gen.COMMAND}`"
    assert gen.PAGE.read_text() == gen.reference(), (
        f"docs/reference/config.md is out of date with the config models: regenerate with `{gen.COMMAND}`")


def test_the_reference_lists_every_kind_and_field(capsys):
    gen = _generator()
    text = gen.reference()
    for anchor in ("{#distill}", "{#mckd}", "{#muki}", "{#tune-classifier}", "{#tune-lm}", "{#tune-kd}", "{#teacher}"):
        assert anchor in text
    assert "| `max_steps` | `int` (>= 1) | `150` | Optimizer steps to train" in text
    assert "| `lr` | `float` (> 0) | `0.0003` | Peak AdamW learning rate" in text


def test_check_mode_fails_naming_the_command_when_out_of_date(tmp_path, monkeypatch, capsys):
    gen = _generator()
    page = tmp_path / "config.md"
    page.write_text("# stale\n")
    monkeypatch.setattr(gen, "PAGE", page)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert "regenerate with `python scripts/gen_config_reference.py`" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
