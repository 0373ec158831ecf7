"""``raykd tune minidisc|maxidisc|sweep``: the TA schedule search on Ray Tune, and the lambda sweep.

One entry per search for both tasks: :func:`main_minidisc` and :func:`main_maxidisc` take a
config of either task (:data:`~raykd.recipes.ta_search.config.TAScheduleConfig`; its ``task``
picks the model when it is loaded) and an output folder, and hand it to that task's
:class:`SearchTask` in :data:`TASKS`. The CLI, ``jobs/minidisc.py`` / ``jobs/maxidisc.py`` and the
tests call the same functions. Each task prepares its teacher and soft labels once, then runs its
trials on the one :func:`~raykd.recipes.ta_search.tuner.tuner`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.recipes.ta_search import classifier_search, lm_search
from raykd.recipes.ta_search.config import ScheduleSearchConfig


@dataclass(frozen=True)
class SearchTask:
    """One task's two searches, each ``(cfg, output_dir, **options) -> results`` (the results are
    also written to ``<output_dir>/results.json``)."""

    minidisc: Callable[..., dict[str, Any]]
    """MiniDisc in one Tune trial: the sandwich table, the TA each lambda picks, the student."""
    maxidisc: Callable[..., dict[str, Any]]
    """MaxiDisc: one Tune trial per TA (path), ASHA early stopping."""


TASKS: dict[str, SearchTask] = {
    "classifier": SearchTask(classifier_search.main_minidisc_classifier, classifier_search.main_maxidisc_classifier),
    "lm": SearchTask(lm_search.main_minidisc_lm, lm_search.main_maxidisc_lm),
}
"""``task`` -> its searches (the keys are :data:`~raykd.recipes.ta_search.config.TASKS`)."""


def main_minidisc(cfg: ScheduleSearchConfig, output_dir: str | Path, **options: Any) -> dict[str, Any]:
    """MiniDisc of ``cfg.task``; writes ``results.json`` and ``minidisc.png`` in ``output_dir``.

    Args:
        cfg: the search config of either task (checked when it was loaded).
        output_dir: results folder (Tune's trial folders go to ``<output_dir>/tune``).
        options: the task's own (the classifier's ``docs``: a corpus instead of BBC News, for tests).

    Raises:
        ValueError: bad input, before any labeling or trial (the task's checks).
        RuntimeError: the MiniDisc trial failed (its error is in the message).
    """
    return TASKS[cfg.task].minidisc(cfg, output_dir, **options)


def main_maxidisc(cfg: ScheduleSearchConfig, output_dir: str | Path, **options: Any) -> dict[str, Any]:
    """MaxiDisc of ``cfg.task``; writes ``results.json`` and ``maxidisc.png`` in ``output_dir``.

    Args:
        cfg, output_dir: as :func:`main_minidisc`.
        options: the task's own (``trainable``: the trial function, tests wrap it; the classifier's ``docs``).

    Raises:
        ValueError: bad input, before any labeling or trial. A failed trial is listed in the
            results' ``trials_failed``, not raised.
    """
    return TASKS[cfg.task].maxidisc(cfg, output_dir, **options)


SEARCHES: dict[str, Callable[..., dict[str, Any]]] = {"minidisc": main_minidisc, "maxidisc": main_maxidisc}
"""``raykd tune <search>`` -> its entry."""


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
