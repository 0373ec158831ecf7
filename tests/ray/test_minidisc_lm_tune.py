"""A tiny MaxiDisc path search and MiniDisc on a tiny Llama teacher, on Ray Tune, through the
main job's soft-label cache (labeled once by the shared Serve teacher: the ``tiny_labeled`` fixture)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.ray


def _schedule(tiny_labeled, **sections):
    from raykd.recipes.ta_search.config import LMScheduleConfig

    cfg, _plan, _caches, _stats = tiny_labeled
    base = {"run_name": "tiny_lm", "data": cfg.data.model_dump(), "teacher": cfg.teacher.model_dump(), "labels": cfg.labels.model_dump(),
            "sparsify": {"student": "0.8", "grid": [0.4, 0.8], "importance_batches": 1},
            "kd": {"steps": 2, "batch_size": 4, "lr": 3e-3, "reports": 2, "eval_rows": 4, "eval_batch_size": 4},
            "minidisc": {"sandwich_steps": 2, "lambda_sweep": [0.0, 10.0]},
            "maxidisc": {"max_path_length": 2, "max_concurrent_trials": 2, "early_stopping": False}}
    base.update(sections)
    return LMScheduleConfig.model_validate(base)


def test_two_trial_maxidisc_path_search(ray_start, tiny_labeled, tmp_path):
    from raykd.recipes.ta_search.lm_search import main_maxidisc_lm

    cfg = _schedule(tiny_labeled)
    maxi = main_maxidisc_lm(cfg, tmp_path / "maxi")
    # the cache the fixture labeled is found: no teacher call, no teacher of the search's own
    assert maxi["labels"]["cache_hit"] is True and maxi["labels"]["teacher_calls"] == 0
    assert [r["path"] for r in maxi["candidates"]] == ["4L+0.8", "4L+0.4 > 4L+0.8"]  # direct + one TA: two trials
    assert maxi["trials_run"] == 2 and [r["status"] for r in maxi["candidates"]] == ["done", "done"]
    assert all(1.0 < r["student_ppl"] < 1e6 for r in maxi["candidates"])
    assert maxi["best"]["student_ppl"] == min(r["student_ppl"] for r in maxi["candidates"])
    assert maxi["candidates"][1]["tas"][0]["hop"] == "4L+0.4"  # the TA trained and measured
    assert set(maxi["best_up_to_length"]) == {"1", "2"}
    assert (tmp_path / "maxi" / "maxidisc.png").stat().st_size > 1000
    assert json.loads((tmp_path / "maxi" / "results.json").read_text())["trials_run"] == 2


def test_minidisc_in_one_trial(ray_start, tiny_labeled, tmp_path):
    from raykd.recipes.ta_search.lm_search import main_minidisc_lm

    mini = main_minidisc_lm(_schedule(tiny_labeled), tmp_path / "mini")
    assert mini["labels"]["cache_hit"] is True and mini["labels"]["teacher_calls"] == 0
    assert mini["trials_run"] == 1 and mini["chosen_ta"] == 0.4  # the only grid point below the student
    assert [r["sparsity"] for r in mini["candidates"]] == [0.4, 0.8]
    assert mini["candidates"][0]["params"] > mini["candidates"][1]["params"]
    assert mini["best"]["path"] == "4L+0.4 > 4L+0.8" and 1.0 < mini["best"]["student_ppl"] < 1e6
    assert [r["lambda"] for r in mini["lambda_sweep"]] == [0.0, 10.0]


def test_bad_paths_and_grids_fail_before_any_trial(ray_start, tiny_labeled, tmp_path):
    from raykd.recipes.ta_search.lm_search import main_maxidisc_lm
    from raykd.recipes.ta_search.paths import PathError
    from raykd.students.gqa_sparsify import UnrealisableSparsityError

    with pytest.raises(PathError, match="teacher has only 4"):
        main_maxidisc_lm(_schedule(tiny_labeled, sparsify={"student": "6L"}), tmp_path / "a")
    with pytest.raises(PathError, match="increases model size"):
        main_maxidisc_lm(_schedule(tiny_labeled, maxidisc={"paths": ["0.8 > 0.4 > 0.8"]}), tmp_path / "b")
    with pytest.raises(UnrealisableSparsityError, match="nearest valid sparsity"):
        main_maxidisc_lm(_schedule(tiny_labeled, sparsify={"student": "0.2", "grid": [0.1, 0.2], "units": ["heads"]}), tmp_path / "c")
    assert not (tmp_path / "a" / "tune").exists() and not (tmp_path / "c" / "tune").exists()
