"""The shipped TA schedule-search configs (tune/configs/) load to the settings recorded in
tests/unit/data/ta_schedule_configs.json (validated fields, before the two config stacks were
merged into one), so a refactor of the config models cannot change a search silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raykd.config import load_config
from raykd.recipes.ta_search.config import ScheduleConfig
from raykd.recipes.ta_search.lm_config import LMScheduleConfig

ROOT = Path(__file__).resolve().parents[2]
RECORDED = json.loads((Path(__file__).parent / "data" / "ta_schedule_configs.json").read_text())


@pytest.mark.parametrize(("path", "model"), [("tune/configs/minidisc_bbc.yaml", ScheduleConfig),
                                             ("tune/configs/minidisc_smollm2.yaml", LMScheduleConfig)])
def test_shipped_configs_load_to_the_recorded_settings(path, model):
    cfg = load_config(model, ROOT / path)
    assert cfg.model_dump(mode="json") == RECORDED[path]
