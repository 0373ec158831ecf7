"""``raykd tune minidisc|maxidisc|sweep``: the two TA schedule searches on Ray Tune, and the lambda sweep.

Each ``main_*`` takes a config and an output folder, so the CLI, ``jobs/minidisc.py`` /
``jobs/maxidisc.py`` and the tests call the same function. Both searches first run
:func:`~raykd.recipes.ta_search.prepare.prepare` (teacher fine-tuned once, soft labels from the
Serve teacher into the cache, teacher importance), then hand the trials to a Ray Tune ``Tuner``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from raykd.cluster import connect
from raykd.recipes.ta_search.maxidisc import best_trial, collect_trials, maxidisc_trial
from raykd.recipes.ta_search.minidisc import lambda_tradeoff, minidisc_trial, sweep_lambdas
from raykd.recipes.ta_search.config import ScheduleConfig
from raykd.recipes.ta_search.report import plot_results, print_table, write_results

log = logging.getLogger(__name__)


def _tuner(trainable: Callable, param_space: dict[str, Any], cfg: ScheduleConfig, output_dir: Path, name: str, scheduler=None):
    from ray import tune

    mx = cfg.maxidisc
    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": mx.cpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="student_dev_acc", mode="max", scheduler=scheduler, max_concurrent_trials=mx.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=name, storage_path=str(output_dir.resolve() / "tune"), failure_config=tune.FailureConfig(max_failures=mx.max_failures), verbose=1
        ),
    )


def _start(cfg: ScheduleConfig, output_dir: Path, docs):
    # lazy: keeps pyarrow out of import time
    from raykd.recipes.ta_search.prepare import prepare

    output_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, output_dir, docs)  # fine-tunes and labels first; starts Ray only to label
    connect(cfg.ray)
    return prepared


def _header(search: str, cfg: ScheduleConfig, prepared) -> dict[str, Any]:
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
    print_table(results)
    return results


def main_minidisc(cfg: ScheduleConfig, output_dir: str | Path, docs=None) -> dict[str, Any]:
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
    result_file = output_dir / "minidisc_trial.json"
    space = {"schedule": cfg.model_dump(), "prepared": asdict(prepared), "result_file": str(result_file.resolve())}
    grid = _tuner(minidisc_trial, space, cfg, output_dir, f"{cfg.run_name}-minidisc").fit()
    if grid[0].error is not None:
        raise RuntimeError(f"the MiniDisc trial failed: {grid[0].error}")
    out = json.loads(result_file.read_text())
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


def main_maxidisc(cfg: ScheduleConfig, output_dir: str | Path, docs=None, trainable: Callable | None = None) -> dict[str, Any]:
    """MaxiDisc: one Tune trial per candidate TA (plus the direct baseline), ASHA early stopping.

    Args:
        cfg, output_dir, docs: as :func:`main_minidisc`.
        trainable: the trial function (default :func:`~raykd.recipes.ta_search.maxidisc.maxidisc_trial`;
            tests wrap it to make a trial fail).

    Raises:
        NotAClassifierError, MaskError: as :func:`main_minidisc`, before any trial. A failed trial
        is listed in ``trials_failed`` and does not raise.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    t0 = time.time()
    output_dir = Path(output_dir).resolve()  # trials run in their own folders
    prepared = _start(cfg, output_dir, docs)
    sparsities = ([0.0] if cfg.maxidisc.include_direct else []) + cfg.sparsify.candidates
    space = {"schedule": cfg.model_dump(), "prepared": asdict(prepared), "ta_sparsity": tune.grid_search(sparsities)}
    mx = cfg.maxidisc
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", max_t=cfg.kd.reports, grace_period=mx.grace_period, reduction_factor=mx.reduction_factor)
        if mx.early_stopping
        else None
    )
    grid = _tuner(trainable or maxidisc_trial, space, cfg, output_dir, f"{cfg.run_name}-maxidisc", scheduler).fit()
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


def main_sweep(minidisc_dir: str | Path, maxidisc_dir: str | Path, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Which TA each lambda picks (MiniDisc's sandwich table) against the MaxiDisc ground truth.

    Writes ``lambda_sweep.json`` (into ``output_dir``, default ``minidisc_dir``) and prints a table.

    Raises:
        FileNotFoundError: a ``results.json`` is missing.
    """
    mini = json.loads((Path(minidisc_dir) / "results.json").read_text())
    maxi = json.loads((Path(maxidisc_dir) / "results.json").read_text())
    by_s = {c["sparsity"]: c for c in maxi["candidates"]}
    best = maxi.get("best_ta")
    rows = []
    for pick in mini["lambda_sweep"]:
        s = pick["ta_sparsity"]
        trial = by_s.get(s, {})
        rows.append({"lambda": pick["lambda"], "minidisc_ta": s, "maxidisc_student_dev_acc": trial.get("student_dev_acc"),
                     "maxidisc_student_test_acc": trial.get("student_test_acc"), "matches_best": s == best})
    out = {"maxidisc_best_ta": best, "maxidisc_best": maxi.get("best"), "direct": maxi.get("direct"), "sweep": rows}
    target = Path(output_dir or minidisc_dir)
    target.mkdir(parents=True, exist_ok=True)
    (target / "lambda_sweep.json").write_text(json.dumps(out, indent=2))
    print(f"MaxiDisc best TA: {best}")
    print(f"{'lambda':>8} {'MiniDisc TA':>12} {'student dev':>12} {'student test':>13} {'= best':>7}")
    for r in rows:
        dev, test = r["maxidisc_student_dev_acc"], r["maxidisc_student_test_acc"]
        print(f"{r['lambda']:>8} {r['minidisc_ta']:>12} {dev if dev is None else round(dev, 3)!s:>12} {test if test is None else round(test, 3)!s:>13} {r['matches_best']!s:>7}")
    return out
