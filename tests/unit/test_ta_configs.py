"""The shipped TA schedule-search configs (tune/configs/) load to the settings recorded in
tests/unit/data/ta_schedule_configs.json (validated fields, before the two config stacks were
merged into one), so a refactor of the config models cannot change a search silently; and
``task`` alone picks the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raykd.config import ConfigError
from raykd.recipes.ta_search.config import ClassifierScheduleConfig, LMScheduleConfig, load_schedule_config

ROOT = Path(__file__).resolve().parents[2]
RECORDED = json.loads((Path(__file__).parent / "data" / "ta_schedule_configs.json").read_text())


@pytest.mark.parametrize(("path", "model"), [("tune/configs/minidisc_bbc.yaml", ClassifierScheduleConfig),
                                             ("tune/configs/minidisc_smollm2.yaml", LMScheduleConfig)])
def test_shipped_configs_load_to_the_recorded_settings(path, model):
    cfg = load_schedule_config(ROOT / path)
    assert type(cfg) is model
    assert cfg.model_dump(mode="json") == RECORDED[path]


def test_task_picks_the_model_and_defaults_to_classifier():
    assert type(load_schedule_config()) is ClassifierScheduleConfig
    assert type(load_schedule_config(None, ["task=lm"])) is LMScheduleConfig
    assert load_schedule_config(None, ["task=lm"]).model_dump() == LMScheduleConfig().model_dump()
    assert load_schedule_config().model_dump() == ClassifierScheduleConfig().model_dump()
    with pytest.raises(ConfigError, match="classifier.*lm"):
        load_schedule_config(None, ["task=vision"])
    with pytest.raises(ConfigError, match="max_path_length"):  # an LM field in a classifier search
        load_schedule_config(None, ["maxidisc.max_path_length=3"])
    with pytest.raises(ConfigError, match="nothing to train on"):  # the shared KD check, in both tasks
        load_schedule_config(None, ["task=lm", "kd.kd_weight=0"])
    with pytest.raises(ConfigError, match="lambdas >= 0"):
        load_schedule_config(None, ["minidisc.lambda_sweep=[-1]"])
