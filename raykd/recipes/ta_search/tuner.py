"""The one Ray Tune ``Tuner`` both tasks' MiniDisc and MaxiDisc searches run their trials on.

What differs by task is read from the config: the metric its trials report and its direction
(``trial_metric`` of :class:`~raykd.recipes.ta_search.config.ClassifierScheduleConfig` and
:class:`~raykd.recipes.ta_search.config.LMScheduleConfig`); the trial resources, concurrency,
retries and ASHA come from the shared ``maxidisc`` settings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from raykd.recipes.ta_search.config import ScheduleSearchConfig


def asha(cfg: ScheduleSearchConfig):
    """ASHA (Li et al. 2020) over the ``kd.reports`` reports of a trial, or None when
    ``maxidisc.early_stopping`` is off."""
    from ray.tune.schedulers import ASHAScheduler

    mx = cfg.maxidisc
    if not mx.early_stopping:
        return None
    return ASHAScheduler(time_attr="training_iteration", max_t=cfg.kd.reports, grace_period=mx.grace_period,
                         reduction_factor=mx.reduction_factor)


def tuner(trainable: Callable, space: dict[str, Any], cfg: ScheduleSearchConfig, output_dir: Path, name: str, scheduler=None):
    """A ``tune.Tuner`` of ``trainable`` over ``space``, its trials under ``<output_dir>/tune/<name>``.

    Args:
        trainable: a Tune function trainable (one trial).
        space: its param space (the config as a dict, what ``prepare`` made, the grid searched).
        cfg: the search config (``maxidisc`` resources, the task's ``trial_metric``).
        output_dir: an absolute results folder (trials run in their own folders).
        name: the Tune experiment (``<run_name>-minidisc`` / ``-maxidisc``).
        scheduler: e.g. :func:`asha`'s, or None.
    """
    from ray import tune

    mx = cfg.maxidisc
    metric, mode = cfg.trial_metric
    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": mx.cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, max_concurrent_trials=mx.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=str(output_dir.resolve() / "tune"), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=mx.max_failures)),
    )


def minidisc_trial_result(trainable: Callable, cfg: ScheduleSearchConfig, output_dir: Path, prepared: Any):
    """MiniDisc as one Tune trial: runs ``trainable`` (which writes its result to
    ``config["result_file"]``, ``<output_dir>/minidisc_trial.json``) and returns ``(result, grid)``.

    Args:
        prepared: what the task prepared before any trial (a dataclass; it travels as a dict).

    Raises:
        RuntimeError: the trial failed (its error is in the message).
    """
    result_file = output_dir / "minidisc_trial.json"
    space = {"schedule": cfg.model_dump(), "prepared": asdict(prepared), "result_file": str(result_file.resolve())}
    grid = tuner(trainable, space, cfg, output_dir, f"{cfg.run_name}-minidisc").fit()
    if grid[0].error is not None:
        raise RuntimeError(f"the MiniDisc trial failed: {grid[0].error}")
    return json.loads(result_file.read_text()), grid


def maxidisc_trials(trainable: Callable, cfg: ScheduleSearchConfig, output_dir: Path, prepared: Any, key: str, values: list):
    """MaxiDisc: one Tune trial of ``trainable`` per value of ``config[key]`` (a TA sparsity or a
    TA path), under :func:`asha`; returns Tune's result grid (a failed trial is in it, not raised)."""
    from ray import tune

    space = {"schedule": cfg.model_dump(), "prepared": asdict(prepared), key: tune.grid_search(values)}
    return tuner(trainable, space, cfg, output_dir, f"{cfg.run_name}-maxidisc", asha(cfg)).fit()


def trial_status(result, kd_steps: int) -> str:
    """How a trial of Tune's result grid ended: ``error`` (it raised), ``done`` (it reported the
    student's last step, ``kd_steps``) or ``stopped_early`` (ASHA stopped it)."""
    if result.error is not None:
        return "error"
    return "done" if (result.metrics or {}).get("step") == kd_steps else "stopped_early"


def error_line(error: BaseException | None) -> str | None:
    """The last line of a failed trial's error (the exception's name when it has no text); None for none."""
    if error is None:
        return None
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def finite(x: Any) -> Any:
    """``x``, or None for a NaN metric (a report before the value existed)."""
    return None if isinstance(x, float) and math.isnan(x) else x
