"""``raykd tune kd`` on the tiny teacher: a Tune search with ASHA whose trials share the caches,
a temperature the cache lacks labeled once through the served teacher, and the baseline."""

from __future__ import annotations

import math

import pytest

from raykd.recipes.lm.kd_search import KDSearchConfig, main_kd_search
from raykd.teacher.apps import TeacherNotRunningError

pytestmark = pytest.mark.ray


def _search(cfg0, **changes) -> KDSearchConfig:
    distill = cfg0.model_dump()
    distill["train"].update(max_steps=4, checkpoint_every=2)
    tree = {"run_name": "tiny_kd", "distill": distill, "num_samples": 2, "seed": 3,
            "space": {"temperature": [1.0, 2.0], "kd_weight": [0.5, 1.0], "divergence": ["reverse_kl", "generalized_jsd"],
                      "jsd_beta": [0.5], "k": [4, 8]},
            "asha": {"eval_every": 2, "grace_period": 1, "reduction_factor": 2}}
    for key, value in changes.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) and key in tree else value
    return KDSearchConfig.model_validate(tree)


def test_kd_search_trials_share_the_caches_and_the_baseline_trains_the_whole_budget(ray_start, tiny_labeled, tmp_path):
    cfg0, _, _, _ = tiny_labeled  # its cache: temperature 1, k = 8
    res = main_kd_search(_search(cfg0), tmp_path)
    labels = res["labels"]
    assert labels["k"] == 8 and labels["labeled"] == [2.0] and labels["teacher_calls"] > 0  # only T=2 asked the teacher
    assert res["trials_run"] == 2 and not res["trials_failed"]
    for r in res["trials"]:
        assert r["steps"] in (2, 4) and r["curve"][-1]["step"] == r["steps"] and math.isfinite(r["eval_ppl"])
        assert r["temperature"] in (1.0, 2.0) and r["k"] in (4, 8)
    base = res["baseline"]
    assert (base["divergence"], base["kd_weight"], base["k"]) == ("forward_kl", 0.5, 8)
    assert [c["step"] for c in base["curve"]] == [2, 4]  # evaluated after each segment, resumed in between
    assert (tmp_path / "results.md").read_text().count("| ") > 4 and (tmp_path / "results.json").exists()


def test_a_space_the_cache_cannot_serve_with_the_teacher_down_is_refused_before_any_trial(ray_start, tiny_labeled, tmp_path):
    cfg0, _, _, _ = tiny_labeled
    cfg = _search(cfg0, space={"temperature": [3.0]})
    cfg.distill.teacher.start = False
    cfg.distill.teacher.name = "no-such-teacher"
    with pytest.raises(TeacherNotRunningError, match=r"temperature\(s\) \[3.0\].*not running"):
        main_kd_search(cfg, tmp_path)
    assert not (tmp_path / "tune").exists()  # no trial started
