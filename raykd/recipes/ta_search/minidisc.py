"""MiniDisc: choose the teacher assistant in one trial (Zhang et al. 2022, "Minimal Distillation
Schedule for Language Model Compression", arXiv:2205.14570).

1. A *sandwich* student, a copy of the current teacher, is trained at every candidate sparsity
   at once: each step distils the least sparse grid point, the target and
   ``minidisc.sandwich_random`` random grid points (masks from the teacher's Taylor importance,
   applied with :class:`~raykd.students.sparsify.Masker`) from the teacher's cached logits.
2. Each grid sparsity is evaluated on dev (the sandwich weights, densified).
3. The TA is the sparsity with the best *lambda-tradeoff* ``dev metric + lambda * sparsity``
   among those strictly between the current teacher and the target
   (:func:`select_teacher_assistant`, a pure function).
4. Teacher -> TA -> student at the target, exactly as one MaxiDisc trial does it
   (:func:`raykd.recipes.ta_search.classifier_chain.distill_chain`), so the two searches differ only in how the
   TA is picked. With ``minidisc.iterations > 2`` the search repeats from the new TA.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raykd.recipes.ta_search.config import ClassifierScheduleConfig
from raykd.recipes.ta_search.classifier_chain import distill_chain, importance_of, kd_phase, prune_to
from raykd.teacher.engines.classifier import load_classifier
from raykd.train.local import ClassData, accuracy, class_batches, device_of, logits_fn_of, train_classifier
from raykd.students.sparsify import Masker, densify, masks_for_sparsity, prunable_params, unit_params


def lambda_tradeoff(metric: float, sparsity: float, lam: float) -> float:
    """``metric + lam * sparsity``: MiniDisc's score of a candidate TA (higher is better)."""
    return metric + lam * sparsity


def select_teacher_assistant(table: Sequence[dict[str, float]], lam: float, current: float, target: float) -> float:
    """The TA sparsity with the best lambda-tradeoff strictly between ``current`` and ``target``.

    Args:
        table: rows with ``sparsity`` and ``dev_metric`` (e.g. the sandwich student's dev accuracy).
        lam: the lambda of :func:`lambda_tradeoff`, >= 0.
        current: sparsity of the current teacher (0 for the original teacher).
        target: the student's sparsity.

    Returns:
        The chosen sparsity; ties go to the less sparse candidate.

    Raises:
        ValueError: ``lam < 0``, or no row lies strictly between ``current`` and ``target``.
    """
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    candidates = [r for r in table if current + 1e-9 < r["sparsity"] < target - 1e-9]
    if not candidates:
        raise ValueError(f"no candidate TA sparsity strictly between {current} and the target {target}")
    return max(candidates, key=lambda r: (lambda_tradeoff(r["dev_metric"], r["sparsity"], lam), -r["sparsity"]))["sparsity"]


def sweep_lambdas(table: Sequence[dict[str, float]], lambdas: Sequence[float], current: float, target: float) -> list[dict[str, float]]:
    """The TA each lambda picks: ``[{"lambda": ..., "ta_sparsity": ...}, ...]``."""
    return [{"lambda": lam, "ta_sparsity": select_teacher_assistant(table, lam, current, target)} for lam in lambdas]


def sandwich_table(
    teacher: torch.nn.Module, importance, grid: Sequence[float], splits: dict[str, ClassData], cfg: ClassifierScheduleConfig, teacher_fn=None
) -> list[dict[str, float]]:
    """Train the sandwich student from ``teacher`` and evaluate every grid sparsity on dev.

    Args:
        teacher: the current teacher (not changed).
        importance: its unit scores; grid: sparsities *of this teacher's prunable parameters*.
        splits: ``train`` / ``dev`` rows with the original teacher's cached logits.
        teacher_fn: batch -> logits of the current teacher (None: the cached logits).

    Returns:
        One row per grid point: ``sparsity``, ``params`` (densified), ``dev_metric`` (accuracy).
    """
    kd, md = cfg.kd, cfg.minidisc
    student = copy.deepcopy(teacher)
    per = unit_params(teacher)
    masks = {s: masks_for_sparsity(importance, s, *per) for s in grid}
    masker = Masker(student)
    rng = np.random.default_rng(kd.seed + 7)
    torch.manual_seed(kd.seed + 7)  # dropout: the table must not depend on what ran before in the process

    def sandwich_groups():
        """Each step: one batch under the least sparse mask, the target's and random ones."""
        for b in class_batches(splits["train"], kd.batch_size, md.sandwich_steps, kd.seed + 3, device_of(student)):
            widths = [grid[0], grid[-1], *rng.choice(grid, size=md.sandwich_random)]
            yield [replace(b, context=lambda m=masks[float(s)]: masker.use(m)) for s in widths]

    train_classifier(student, splits["train"], kd.objective(), temperature=kd.temperature, steps=md.sandwich_steps,
                     batch_size=kd.batch_size, lr=kd.lr, weight_decay=md.sandwich_weight_decay, teacher=teacher_fn,
                     freeze_embeddings=kd.freeze_embeddings, groups=sandwich_groups())
    masker.remove()
    table = []
    for s in grid:
        dense = densify(student, masks[s])
        table.append({"sparsity": float(s), "params": sum(p.numel() for p in dense.parameters()), "dev_metric": accuracy(dense, splits["dev"], kd.eval_batch_size)})
    return table


def run_minidisc(cfg: ClassifierScheduleConfig, teacher: torch.nn.Module, importance, splits: dict[str, ClassData], report=None) -> dict[str, Any]:
    """The whole MiniDisc search in one process: sandwich, selection, TA -> student.

    Returns:
        ``table`` (per grid point, the first hop's sandwich numbers), ``hops`` (TA sparsities
        chosen, in order), ``chosen_ta``, ``sweep`` (the pick of each ``minidisc.lambda_sweep``
        lambda on the first hop's table), ``student`` (the chain's numbers), ``timings``.
    """
    sp, md, kd = cfg.sparsify, cfg.minidisc, cfg.kd
    base = prunable_params(teacher)
    t0 = time.time()
    current, cur_s, cur_imp, teacher_fn, hops, first_table = teacher, 0.0, importance, None, [], None
    for _ in range(md.iterations - 1):
        grid = [s for s in sp.grid if s > cur_s + 1e-9]
        have = prunable_params(current)
        # grid points of the original teacher's sparsity, as shares of what ``current`` still has
        rel = [(s * base - (base - have)) / have for s in grid]
        table = sandwich_table(current, cur_imp, rel, splits, cfg, teacher_fn)
        for row, s in zip(table, grid):
            row["sparsity"] = s
            row["lambda_tradeoff"] = lambda_tradeoff(row["dev_metric"], s, md.lambda_tradeoff)
        first_table = first_table or table
        try:
            s_ta = select_teacher_assistant(table, md.lambda_tradeoff, cur_s, sp.target)
        except ValueError:
            break  # no grid point left between the current teacher and the target
        hops.append(s_ta)
        if len(hops) < md.iterations - 1:  # an intermediate TA: distil it now and search again from it
            nxt = prune_to(current, s_ta, base, cur_imp)
            kd_phase(nxt, teacher_fn, splits["train"], kd, seed=kd.seed)
            teacher_fn = logits_fn_of(nxt)
            current, cur_s, cur_imp = nxt, s_ta, importance_of(nxt, splits["train"], kd, sp.importance_batches)
    select_s = time.time() - t0
    ta = None
    if len(hops) > 1:  # the last TA is distilled from the previous one
        ta = prune_to(current, hops[-1], base, cur_imp)
        kd_phase(ta, teacher_fn, splits["train"], kd, seed=kd.seed)
    chain = distill_chain(teacher, hops[-1] if hops else 0.0, importance, splits, kd, sp, report=report, ta=ta)
    return {
        "table": first_table,
        "hops": hops,
        "chosen_ta": hops[0] if hops else None,
        "sweep": sweep_lambdas(first_table, md.lambda_sweep, 0.0, sp.target),
        "student": chain.as_dict(),
        "timings": {"select_s": round(select_s, 1), "total_s": round(time.time() - t0, 1)},
    }


def minidisc_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: the whole MiniDisc search as one trial.

    ``config`` carries ``schedule`` (a :class:`ClassifierScheduleConfig` as a dict) and ``prepared`` (a
    :class:`~raykd.recipes.ta_search.prepare.Prepared` as a dict); the result dict is reported
    with the chain's last report and written to ``minidisc_trial.json`` in the trial folder.
    """
    # lazy: keeps pyarrow out of import time
    import json

    from ray import tune

    from raykd.recipes.ta_search.prepare import Prepared, load_importance, load_splits

    cfg = ClassifierScheduleConfig.model_validate(config["schedule"])
    prepared = Prepared(**config["prepared"])
    torch.set_num_threads(cfg.kd.torch_threads)
    splits = load_splits(prepared)
    teacher = load_classifier(prepared.teacher_path)
    reports: list[dict[str, Any]] = []
    out = run_minidisc(cfg, teacher, load_importance(prepared.importance_file), splits, report=reports.append)
    Path(config["result_file"]).write_text(json.dumps(out, default=float))
    for r in reports[:-1]:
        tune.report({**r, "stage": "student"})
    tune.report({**reports[-1], "stage": "done", "chosen_ta": out["chosen_ta"]})
