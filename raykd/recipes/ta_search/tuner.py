"""The one Ray Tune ``Tuner`` both tasks' MiniDisc and MaxiDisc searches run their trials on.

What differs by task is read from the config: the metric its trials report and its direction
(``trial_metric`` of :class:`~raykd.recipes.ta_search.config.ClassifierScheduleConfig` and
:class:`~raykd.recipes.ta_search.config.LMScheduleConfig`); the trial resources, concurrency,
retries and ASHA come from the shared ``maxidisc`` settings.
"""

from __future__ import annotations

from collections.abc import Callable
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
