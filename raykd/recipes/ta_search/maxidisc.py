"""MaxiDisc: every candidate TA as a Ray Tune trial (teacher -> TA -> student).

The exhaustive ground truth MiniDisc is measured against: one trial per grid sparsity below
the target (plus, by default, the direct teacher -> student baseline as TA sparsity 0), each
reporting the student's dev accuracy ``maxidisc.reports`` times so ASHA can stop hopeless
trials, and its test accuracy at the end. A failed trial is reported from Tune's result grid
and does not stop the others.
"""

from __future__ import annotations

from typing import Any

from raykd.recipes.ta_search.config import ClassifierScheduleConfig
from raykd.recipes.ta_search.tuner import error_line, finite, trial_status
from raykd.teacher.engines.classifier import load_classifier


def maxidisc_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable for one candidate: ``config["ta_sparsity"]`` (0 = direct).

    ``config`` also carries ``schedule`` (the :class:`ClassifierScheduleConfig` as a dict) and ``prepared``
    (a :class:`~raykd.recipes.ta_search.prepare.Prepared` as a dict).
    """
    # lazy: keeps pyarrow out of import time
    import torch
    from ray import tune

    from raykd.recipes.ta_search.prepare import Prepared, load_importance, load_splits
    from raykd.recipes.ta_search.classifier_chain import distill_chain

    cfg = ClassifierScheduleConfig.model_validate(config["schedule"])
    prepared = Prepared(**config["prepared"])
    torch.set_num_threads(cfg.kd.torch_threads)
    splits = load_splits(prepared)
    teacher = load_classifier(prepared.teacher_path)
    distill_chain(teacher, float(config["ta_sparsity"]), load_importance(prepared.importance_file), splits, cfg.kd, cfg.sparsify, report=tune.report)


def collect_trials(result_grid, kd_steps: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows per trial from a Tune ``ResultGrid`` and the failed trials.

    Returns:
        ``(rows, failed)``: rows hold ``ta_sparsity``, ``ta_params``, ``ta_dev_acc``,
        ``student_params``, ``student_dev_acc``, ``student_test_acc`` (None unless the trial ran
        to the end) and ``status`` (``done``, ``stopped_early`` or ``error``); ``failed`` holds
        ``ta_sparsity`` and ``error`` (the exception's last line).
    """
    rows, failed = [], []
    for result in result_grid:
        s = float(result.config["ta_sparsity"])
        m = result.metrics or {}
        if result.error is not None:
            failed.append({"ta_sparsity": s, "error": error_line(result.error)})
        status = trial_status(result, kd_steps)
        rows.append(
            {
                "ta_sparsity": s,
                "ta_params": m.get("ta_params"),
                "ta_dev_acc": finite(m.get("ta_dev_acc")),
                "student_params": m.get("student_params"),
                "student_dev_acc": finite(m.get("student_dev_acc")),
                "student_test_acc": finite(m.get("student_test_acc")) if status == "done" else None,
                "status": status,
            }
        )
    return sorted(rows, key=lambda r: r["ta_sparsity"]), failed


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished TA trial (sparsity > 0) with the best student dev accuracy (ties: test, then less sparse)."""
    done = [r for r in rows if r["status"] == "done" and r["ta_sparsity"] > 0]
    if not done:
        return None
    return max(done, key=lambda r: (r["student_dev_acc"], r["student_test_acc"] or 0.0, -r["ta_sparsity"]))
