"""The decoder-LM task of the TA schedule search (``task: lm``): MiniDisc and MaxiDisc on Ray Tune.

Called through :mod:`raykd.recipes.ta_search.search` (``main_minidisc`` / ``main_maxidisc``
dispatch on ``task``).

Order of work (every check that can fail runs before the teacher labels anything or a trial starts):

1. :func:`check_lm_schedule`: the main job's :class:`~raykd.soft_labels.plan.Plan` (data, teacher
   files, tokenizer, cache keys), the student hop and every TA path against the teacher's depth,
   the sparsity grid against the teacher's GQA head groups;
2. :func:`prepare_lm`: the soft labels of the ``train`` and ``eval`` splits from the main job's
   cache, or labeled by the one Serve teacher into it (a second search asks the teacher nothing);
3. the trials (Tune function trainables) read that cache; no trial runs a teacher service of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd import console
from raykd.cluster import connect
from raykd.recipes.ta_search.config import LMScheduleConfig
from raykd.recipes.ta_search.paths import (
    Hop,
    PathError,
    enumerate_paths,
    format_path,
    parse_path,
    resolve_path,
)
from raykd.recipes.ta_search.report import Column, print_table, write_results
from raykd.recipes.ta_search.tuner import error_line, finite, maxidisc_trials, minidisc_trial_result, trial_status


@dataclass
class LMPrepared:
    """What a trial reads (paths and numbers only, so it pickles small)."""

    teacher_path: str
    train_files: list[str]
    eval_files: list[str]
    cached_temperature: float
    teacher_ppl: float
    stats: dict[str, Any] = field(default_factory=dict)


def _shape_model(teacher_path: Path):
    """A model of the teacher's shape on the meta device (no weights read): for the unit counts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(teacher_path)))


def schedule_paths(cfg: LMScheduleConfig, teacher_layers: int) -> list[list[Hop]]:
    """MaxiDisc's paths: ``maxidisc.paths`` or every shrinking path up to ``maxidisc.max_path_length``.

    Raises:
        PathError: a path that grows the model, a depth above the teacher's, a path that does not
            end at ``sparsify.student``, or no path at all.
    """
    target = resolve_path([cfg.sparsify.student_hop], teacher_layers)[0]
    if cfg.maxidisc.paths is not None:
        paths = [resolve_path(parse_path(p), teacher_layers) for p in cfg.maxidisc.paths]
        for p in paths:
            if p[-1] != target:
                raise PathError(f"maxidisc.paths: {format_path(p)} ends at {p[-1]}, not at the student {target} (sparsify.student)")
    else:
        for hop in cfg.sparsify.candidates():
            if hop.layers is not None and hop.layers > teacher_layers:
                raise PathError(f"sparsify.layer_candidates: {hop} keeps more layers than the teacher's {teacher_layers}")
        paths = enumerate_paths(cfg.sparsify.candidates(), target, cfg.maxidisc.max_path_length, teacher_layers)
    if not paths:
        raise PathError("no TA path to run: add maxidisc.paths or raise maxidisc.max_path_length")
    return paths


def check_lm_schedule(cfg: LMScheduleConfig, search: str):
    """Every cheap check of an LM search (``search``: ``minidisc``, ``maxidisc`` or ``kd``, which
    checks only the student hop); returns ``(plan, paths)``.

    Raises:
        ValueError (as ``error: ...`` under the CLI): bad data or teacher (from the plan), a bad
            path or student hop (:class:`PathError`), a grid the GQA groups cannot realise
            (:class:`~raykd.students.gqa_sparsify.UnrealisableSparsityError`).
    """
    # lazy: keeps torch out of import time
    from raykd.recipes.ta_search.lm_chain import check_minidisc_target
    from raykd.soft_labels.plan import Plan
    from raykd.students.gqa_sparsify import check_sparsity_grid, decoder_layers

    plan = Plan(cfg.distill_config())
    with console.user_errors(ValueError):
        shape = _shape_model(plan.teacher_path)
        decoder_layers(shape)
        L = shape.config.num_hidden_layers
        target = resolve_path([cfg.sparsify.student_hop], L)[0]
        grid = sorted({target.sparsity} - {0.0}) if search == "kd" else sorted({*cfg.sparsify.grid, target.sparsity} - {0.0})
        check_sparsity_grid(grid, shape, cfg.sparsify.units, cfg.sparsify.tolerance)
        if search == "maxidisc":
            paths = schedule_paths(cfg, L)
        else:
            paths = [[check_minidisc_target(cfg, L) if search == "minidisc" else target]]
    return plan, paths


def prepare_lm(cfg: LMScheduleConfig, plan) -> LMPrepared:
    """The train and eval soft-label caches of the main job (found, or labeled by the Serve teacher)."""
    # lazy: keeps pyarrow out of import time
    from raykd.soft_labels.cache import shard_paths
    from raykd.soft_labels.plan import ensure_soft_labels
    from raykd.train.evaluate import teacher_metrics

    t0 = time.time()
    connect(cfg.ray)
    caches, stats = ensure_soft_labels(plan)
    (train_dir, train_m), (eval_dir, eval_m) = caches["train"], caches["eval"]
    train_files, eval_files = shard_paths(train_dir, train_m), shard_paths(eval_dir, eval_m)
    labels = {"cache_hit": stats["hit"], "teacher_calls": stats["teacher_calls"], "label_s": round(stats["label_s"], 1),
              "train_rows": train_m.rows, "eval_rows": eval_m.rows, "train_cache": str(train_dir), "prepare_s": round(time.time() - t0, 1)}
    return LMPrepared(str(plan.teacher_path), train_files, eval_files, cfg.labels.temperature, teacher_metrics(eval_files)["ppl"], labels)


def _load(config: dict[str, Any]):
    """Inside a trial: the config, the teacher and the cached rows."""
    # lazy: keeps torch out of import time
    import torch
    from transformers import AutoModelForCausalLM

    from raykd.recipes.ta_search.lm_chain import load_lm_data

    cfg = LMScheduleConfig.model_validate(config["schedule"])
    prepared = LMPrepared(**config["prepared"])
    torch.set_num_threads(cfg.kd.torch_threads)
    teacher = AutoModelForCausalLM.from_pretrained(prepared.teacher_path, dtype=torch.float32).eval()
    data = load_lm_data(prepared.train_files, prepared.eval_files, cfg.kd, prepared.cached_temperature)
    return cfg, teacher, data


def maxidisc_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one TA path (``config["path"]``), reporting the student's held-out perplexity."""
    # lazy: keeps torch out of import time
    from ray import tune

    from raykd.recipes.ta_search.lm_chain import distill_path

    cfg, teacher, data = _load(config)
    path = resolve_path(parse_path(config["path"]), teacher.config.num_hidden_layers)
    distill_path(teacher, path, data, cfg, report=tune.report)


def minidisc_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: the whole MiniDisc search; its result goes to ``config["result_file"]``."""
    # lazy: keeps torch out of import time
    from ray import tune

    from raykd.recipes.ta_search.lm_chain import run_minidisc

    cfg, teacher, data = _load(config)
    reports: list[dict[str, Any]] = []
    out = run_minidisc(cfg, teacher, data, report=reports.append)
    Path(config["result_file"]).write_text(json.dumps(out, default=float))
    for r in reports:
        tune.report(r)


def _header(search: str, cfg: LMScheduleConfig, prepared: LMPrepared) -> dict[str, Any]:
    return {"search": search, "task": "lm", "run_name": cfg.run_name, "student": cfg.sparsify.student,
            "lambda_tradeoff": cfg.minidisc.lambda_tradeoff,
            "sign_convention": "metric = -log(held-out ppl), lambda_tradeoff = metric + lambda * sparsity, higher is better",
            "teacher": {"path": prepared.teacher_path, "heldout_ppl": prepared.teacher_ppl}, "labels": prepared.stats,
            "config": cfg.model_dump()}


def _finish(output_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    write_results(output_dir, results)
    _plot(output_dir, results)
    _print(results)
    return results


def main_minidisc_lm(cfg: LMScheduleConfig, output_dir: str | Path) -> dict[str, Any]:
    """MiniDisc for a decoder LM in one Tune trial; writes ``results.json`` and ``minidisc.png``.

    Raises:
        ValueError: bad input, before any labeling or trial (see :func:`check_lm_schedule`).
        RuntimeError: the trial failed (its error in the message).
    """
    t0 = time.time()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    plan, _ = check_lm_schedule(cfg, "minidisc")
    prepared = prepare_lm(cfg, plan)
    out, grid = minidisc_trial_result(minidisc_trial, cfg, output_dir, prepared)
    results = {**_header("minidisc", cfg, prepared), "candidates": out["table"], "chosen_ta": out["chosen_ta"], "hops": out["hops"],
               "best": {"path": out["student"]["path"], "student_ppl": out["student"]["student_ppl"],
                        "student_params": out["student"]["student_params"], "hops": out["student"]["hops"]},
               "lambda_sweep": out["sweep"], "trials_run": len(grid), "timings": out["timings"], "wall_s": round(time.time() - t0, 1)}
    return _finish(output_dir, results)


def collect_paths(result_grid, kd_steps: int) -> list[dict[str, Any]]:
    """One row per trial, shortest path first: ``path``, ``length``, ``student_ppl`` (last report),
    ``tas`` (the TAs' rows), ``status`` (``done``, ``stopped_early``, ``error``) and ``error``."""
    rows = []
    for r in result_grid:
        m = r.metrics or {}
        rows.append({"path": r.config["path"], "length": len(parse_path(r.config["path"])), "student_ppl": finite(m.get("student_ppl")),
                     "tas": json.loads(m["tas"]) if isinstance(m.get("tas"), str) else [], "status": trial_status(r, kd_steps),
                     "error": error_line(r.error)})
    return sorted(rows, key=lambda r: (r["length"], r["path"]))


def main_maxidisc_lm(cfg: LMScheduleConfig, output_dir: str | Path, trainable: Callable | None = None) -> dict[str, Any]:
    """MaxiDisc for a decoder LM: one Tune trial per TA path, ASHA on held-out perplexity.

    Args:
        trainable: the trial function (default :func:`maxidisc_trial`; tests wrap it).

    Raises:
        ValueError: bad input, before any labeling or trial. A failed trial is listed, not raised.
    """
    t0 = time.time()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    plan, paths = check_lm_schedule(cfg, "maxidisc")
    prepared = prepare_lm(cfg, plan)
    grid = maxidisc_trials(trainable or maxidisc_trial, cfg, output_dir, prepared, "path", [format_path(p) for p in paths])
    rows = collect_paths(grid, cfg.kd.steps)
    done = [r for r in rows if r["status"] == "done" and r["student_ppl"] is not None]
    best_by_length = {n: min((r for r in done if r["length"] <= n), key=lambda r: r["student_ppl"], default=None)
                      for n in range(1, max(r["length"] for r in rows) + 1)}
    results = {**_header("maxidisc", cfg, prepared), "candidates": rows,
               "best": min(done, key=lambda r: r["student_ppl"]) if done else None,
               "best_up_to_length": {str(n): b for n, b in best_by_length.items()},
               "trials_run": len(rows), "trials_failed": [r for r in rows if r["status"] == "error"],
               "trials_stopped_early": [r["path"] for r in rows if r["status"] == "stopped_early"], "wall_s": round(time.time() - t0, 1)}
    return _finish(output_dir, results)


MINIDISC_COLUMNS = (Column("sparsity", width=9, fmt=str), Column("params", width=11, fmt="{:,}".format),
                    Column("heldout_ppl", "held-out ppl", 13, "{:.2f}".format),
                    Column("lambda_tradeoff", "tradeoff", 9, "{:.3f}".format))
"""MiniDisc's sandwich table for an LM: held-out perplexity and lambda-tradeoff per sparsity."""

MAXIDISC_COLUMNS = (Column("path", width=28, fmt=str),
                    Column("student_ppl", "student ppl", 12, lambda ppl: "-" if ppl is None else f"{ppl:.2f}"),
                    Column("status", width=14, fmt=str))
"""MaxiDisc's trials for an LM: the student's held-out perplexity per TA path."""


def _print(results: dict[str, Any]) -> None:
    """The search's table (:func:`~raykd.recipes.ta_search.report.print_table`) under a line of
    teacher, trials and time, and the best path under it."""
    best = results.get("best")
    print_table(results["candidates"], MINIDISC_COLUMNS if results["search"] == "minidisc" else MAXIDISC_COLUMNS, sep=" ",
                above=[f"{results['search']} (LM): teacher held-out ppl {results['teacher']['heldout_ppl']:.2f}, "
                       f"{results['trials_run']} trial(s), {results['wall_s']:.0f} s"],
                below=[f"best path: {best['path']}  student held-out ppl {best['student_ppl']:.2f}"] if best else [])


def _plot(output_dir: Path, results: dict[str, Any]) -> Path:
    """``<search>.png``: MiniDisc's sandwich table (held-out ppl and lambda-tradeoff per sparsity),
    or MaxiDisc's student perplexity per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if results["search"] == "minidisc":
        rows = results["candidates"]
        xs = [r["sparsity"] for r in rows]
        ax.plot(xs, [r["heldout_ppl"] for r in rows], "o-", label="sandwich held-out ppl")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (share of prunable parameters removed)")
        ax.set_ylabel("held-out perplexity")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["lambda_tradeoff"] for r in rows], "s--", color="tab:orange", label=f"lambda-tradeoff (lambda={results['lambda_tradeoff']})")
        ax2.set_ylabel("-log ppl + lambda * sparsity")
        if results.get("chosen_ta") is not None:
            ax.axvline(results["chosen_ta"], color="black", ls="-.", lw=1, label=f"chosen TA {results['chosen_ta']}")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
    else:
        rows = [r for r in results["candidates"] if r["student_ppl"] is not None]
        ax.barh([r["path"] for r in rows], [r["student_ppl"] for r in rows],
                color=["tab:blue" if r["status"] == "done" else "tab:gray" for r in rows])
        ax.set_xlabel(f"student held-out perplexity (student {results['student']}; gray: stopped early)")
        ax.set_xscale("log")
    ax.set_title(f"{results['search']} (LM): {results['trials_run']} trial(s), {results['wall_s']:.0f} s")
    fig.tight_layout()
    path = output_dir / f"{results['search']}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
