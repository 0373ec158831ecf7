"""The classifier task of the TA schedule search (``task: classifier``): MiniDisc and MaxiDisc on Ray Tune.

Called through :mod:`raykd.recipes.ta_search.search` (``main_minidisc`` / ``main_maxidisc``
dispatch on ``task``). Both searches first run
:func:`~raykd.recipes.ta_search.prepare.prepare` (teacher fine-tuned once, soft labels from the
Serve teacher into the cache, teacher importance), then hand the trials to a Ray Tune ``Tuner``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raykd.cluster import connect
from raykd.recipes.ta_search.maxidisc import best_trial, collect_trials, maxidisc_trial
from raykd.recipes.ta_search.minidisc import lambda_tradeoff, minidisc_trial, sweep_lambdas
from raykd.recipes.ta_search.config import ClassifierScheduleConfig
from raykd.recipes.ta_search.report import CLASSIFIER_COLUMNS, classifier_summary, plot_results, print_table, write_results
from raykd.recipes.ta_search.tuner import maxidisc_trials, minidisc_trial_result

log = logging.getLogger(__name__)


def _start(cfg: ClassifierScheduleConfig, output_dir: Path, docs):
    # lazy: keeps pyarrow out of import time
    from raykd.recipes.ta_search.prepare import prepare

    output_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, output_dir, docs)  # fine-tunes and labels first; starts Ray only to label
    connect(cfg.ray)
    return prepared


def _header(search: str, cfg: ClassifierScheduleConfig, prepared) -> dict[str, Any]:
    return {
        "search": search,
        "run_name": cfg.run_name,
        "target_sparsity": cfg.sparsify.target,
        "lambda_tradeoff": cfg.minidisc.lambda_tradeoff,
        "teacher": {"path": prepared.teacher_path, "dev_acc": prepared.teacher_acc["dev"], "test_acc": prepared.teacher_acc["test"]},
        "labels": prepared.stats,
        "config": cfg.model_dump(),
    }


def _finish(output_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    write_results(output_dir, results)
    plot_results(output_dir, results)
    print_table(results["candidates"], CLASSIFIER_COLUMNS, below=[classifier_summary(results)])
    return results


def main_minidisc_classifier(cfg: ClassifierScheduleConfig, output_dir: str | Path, docs=None) -> dict[str, Any]:
    """MiniDisc in one Tune trial; writes ``results.json`` and ``minidisc.png`` in ``output_dir``.

    Args:
        cfg: the search config (checked when it was loaded: grid, target, lambdas).
        output_dir: results folder (Tune's trial folders go to ``<output_dir>/tune``).
        docs: a corpus instead of BBC News (tests).

    Raises:
        NotAClassifierError: the teacher has no classification head (before any trial).
        MaskError: ``sparsify.importance_file`` does not fit the teacher (before any trial).
        RuntimeError: the MiniDisc trial failed (its error is in the message).
    """
    t0 = time.time()
    output_dir = Path(output_dir).resolve()  # trials run in their own folders
    prepared = _start(cfg, output_dir, docs)
    out, grid = minidisc_trial_result(minidisc_trial, cfg, output_dir, prepared)
    student = out["student"]
    candidates = [
        {
            "sparsity": r["sparsity"],
            "params": r["params"],
            "ta_dev_metric": r["dev_metric"],
            "lambda_tradeoff": r["lambda_tradeoff"],
            "student_dev_acc": student["student_dev_acc"] if r["sparsity"] == out["chosen_ta"] else None,
            "student_test_acc": student["student_test_acc"] if r["sparsity"] == out["chosen_ta"] else None,
            "status": "chosen" if r["sparsity"] == out["chosen_ta"] else ("target" if r["sparsity"] == cfg.sparsify.target else "scored"),
        }
        for r in out["table"]
    ]
    results = {
        **_header("minidisc", cfg, prepared),
        "candidates": candidates,
        "chosen_ta": out["chosen_ta"],
        "hops": out["hops"],
        "student": student,
        "lambda_sweep": out["sweep"],
        "trials_run": len(grid),
        "trials_failed": [],
        "timings": {**out["timings"], "prepare_s": prepared.stats.get("prepare_s")},
        "wall_s": round(time.time() - t0, 1),
    }
    return _finish(output_dir, results)


def main_maxidisc_classifier(cfg: ClassifierScheduleConfig, output_dir: str | Path, docs=None, trainable: Callable | None = None) -> dict[str, Any]:
    """MaxiDisc: one Tune trial per candidate TA (plus the direct baseline), ASHA early stopping.

    Args:
        cfg, output_dir, docs: as :func:`main_minidisc_classifier`.
        trainable: the trial function (default :func:`~raykd.recipes.ta_search.maxidisc.maxidisc_trial`;
            tests wrap it to make a trial fail).

    Raises:
        NotAClassifierError, MaskError: as :func:`main_minidisc_classifier`, before any trial. A failed trial
        is listed in ``trials_failed`` and does not raise.
    """
    t0 = time.time()
    output_dir = Path(output_dir).resolve()  # trials run in their own folders
    prepared = _start(cfg, output_dir, docs)
    sparsities = ([0.0] if cfg.maxidisc.include_direct else []) + cfg.sparsify.candidates
    grid = maxidisc_trials(trainable or maxidisc_trial, cfg, output_dir, prepared, "ta_sparsity", sparsities)
    rows, failed = collect_trials(grid, cfg.kd.steps)
    for f in failed:
        log.warning("trial ta_sparsity=%s failed: %s", f["ta_sparsity"], f["error"])
    lam = cfg.minidisc.lambda_tradeoff
    candidates = [
        {
            "sparsity": r["ta_sparsity"],
            "params": r["ta_params"],
            "ta_dev_metric": r["ta_dev_acc"],
            "lambda_tradeoff": None if r["ta_dev_acc"] is None else lambda_tradeoff(r["ta_dev_acc"], r["ta_sparsity"], lam),
            "student_dev_acc": r["student_dev_acc"],
            "student_test_acc": r["student_test_acc"],
            "status": r["status"],
        }
        for r in rows
        if r["ta_sparsity"] > 0
    ]
    best = best_trial(rows)
    direct = next((r for r in rows if r["ta_sparsity"] == 0), None)
    scored = [{"sparsity": c["sparsity"], "dev_metric": c["ta_dev_metric"]} for c in candidates if c["ta_dev_metric"] is not None]
    results = {
        **_header("maxidisc", cfg, prepared),
        "candidates": candidates,
        "direct": direct,
        "best_ta": best["ta_sparsity"] if best else None,
        "chosen_ta": best["ta_sparsity"] if best else None,
        "best": best,
        "lambda_sweep_on_trained_tas": sweep_lambdas(scored, cfg.minidisc.lambda_sweep, 0.0, cfg.sparsify.target) if scored else [],
        "trials_run": len(rows),
        "trials_failed": failed,
        "trials_stopped_early": [r["ta_sparsity"] for r in rows if r["status"] == "stopped_early"],
        "wall_s": round(time.time() - t0, 1),
    }
    return _finish(output_dir, results)
