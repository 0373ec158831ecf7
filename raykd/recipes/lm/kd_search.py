"""``raykd tune kd``: a Ray Tune search over the KD settings of the main job, trials sharing one cache.

The search space is the distillation temperature, the weight of the divergence against the
hard-label CE (``kd_weight``; CE gets ``1 - kd_weight``), the divergence (forward KL, reverse KL
or the generalized JSD of GKD with its ``beta``) and the teacher's top-``k`` the loss sees.
Random search over that grid (``num_samples`` trials, a seeded Tune ``BasicVariantGenerator``),
stopped early by ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter
Tuning") on held-out perplexity, lower is better.

Where the labels come from:

- a trial's ``k`` at or below the cache's is cut from the one cache
  (:func:`raykd.losses.targets.truncate_topk`, exact): the cache is labeled once at the largest
  ``k`` of the space;
- a temperature is a property of the cached distribution (``softmax(z / T)`` restricted to the
  top-k is not a re-tempered top-k at another T), so each temperature of the space has its own
  cache, labeled through the one shared teacher service (the main job's ``teacher``: a running
  application of that name is reused) on the driver, before the first trial. A rerun finds
  every cache and asks the teacher nothing.

Each trial trains the main job's student (same init, data, optimizer, budget) through the shared
loop (:func:`raykd.train.trainer.train_student`, in Ray Train's local mode, one Ray task per
segment) in segments of ``asha.eval_every`` steps: after each it evaluates held-out perplexity, top-1
agreement and KL, and reports them to Tune; the next segment resumes from the segment's
checkpoint with the learning-rate schedule of the whole budget (``train.schedule_steps``). The
main job's default setting (its first student) is trained on the same budget in a trial of its
own, outside ASHA, as the baseline.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from raykd import console
from raykd.cluster import connect
from raykd.config import ConfigError, DistillConfig, RayConfig, Strict, TrainConfig

log = logging.getLogger(__name__)

DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd")
"""Divergences the search can choose (names of the loss registry)."""


class KDSpace(Strict):
    """The grid each trial samples one point of (every list: the values to choose from)."""

    temperature: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    """Distillation temperatures; each is one cache (labeled once through the teacher service)."""
    kd_weight: list[float] = Field(default_factory=lambda: [0.5], min_length=1)
    """Weight of the divergence; the CE on the data gets ``1 - kd_weight``."""
    divergence: list[str] = Field(default_factory=lambda: ["forward_kl"], min_length=1)
    """Registered divergences: ``forward_kl``, ``reverse_kl``, ``generalized_jsd``."""
    jsd_beta: list[float] = Field(default_factory=lambda: [0.5], min_length=1)
    """``beta`` of ``generalized_jsd`` (GKD, Agarwal et al. 2024); ignored by the KLs."""
    k: list[int] = Field(default_factory=lambda: [32], min_length=1)
    """Teacher top-k the loss sees; the cache is labeled at the largest."""

    @field_validator("temperature")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not 0 < t <= 100 for t in v):
            raise ValueError(f"temperatures must lie in (0, 100], got {v}")
        return sorted(set(v))

    @field_validator("kd_weight", "jsd_beta")
    @classmethod
    def _unit(cls, v: list[float]) -> list[float]:
        if any(not 0 <= x <= 1 for x in v):
            raise ValueError(f"values must lie in [0, 1], got {v}")
        return sorted(set(v))

    @field_validator("divergence")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(DIVERGENCES))
        if unknown:
            raise ValueError(f"unknown divergence(s) {unknown}; choose from {list(DIVERGENCES)}")
        return sorted(set(v))

    @field_validator("k")
    @classmethod
    def _k(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"k must be at least 1, got {v}")
        return sorted(set(v))

    def size(self) -> int:
        """Points in the grid (``generalized_jsd`` counts once per ``beta``)."""
        divs = sum(len(self.jsd_beta) if d == "generalized_jsd" else 1 for d in self.divergence)
        return len(self.temperature) * len(self.kd_weight) * divs * len(self.k)


class ASHAConfig(Strict):
    """Segments and early stopping (Tune's ``ASHAScheduler`` on ``training_iteration``)."""

    eval_every: int = Field(default=20, ge=1)
    """Steps per segment: held-out metrics are reported to Tune after each."""
    grace_period: int = Field(default=1, ge=1)
    """Segments every trial trains before ASHA may stop it."""
    reduction_factor: int = Field(default=2, ge=2)
    """ASHA keeps about ``1 / reduction_factor`` of the trials at each rung."""


class KDSearchConfig(Strict):
    """``raykd tune kd`` settings: the main job to tune, the grid, the trial budget."""

    run_name: str = "kd_search"
    """Name of the search (its Tune experiments are ``<run_name>-search`` / ``-baseline``) and in the results JSON."""
    distill: DistillConfig
    """The main job whose KD settings are searched (data, teacher, student, budget); in YAML
    usually a ``distill:`` mapping that says ``base: <distill config>`` plus its changes."""
    space: KDSpace = Field(default_factory=KDSpace)
    """The grid of KD settings the trials draw from."""
    num_samples: int = Field(default=12, ge=1)
    """Trials of the search (points drawn from the grid; a point may repeat when the grid is small)."""
    seed: int = 0
    """Seed of the trial sampler."""
    asha: ASHAConfig = Field(default_factory=ASHAConfig)
    """Segment length and ASHA early stopping."""
    baseline: bool = True
    """Also train the main job's first student on the same budget (outside ASHA) for comparison."""
    max_concurrent_trials: int = Field(default=1, ge=1)
    """Tune trials run at once (>= 1)."""
    cpus_per_trial: float = Field(default=1.0, gt=0)
    """CPUs a trial reserves: its training and evaluation (each segment is a Ray task on the
    trial's node that runs inside this reservation). Ray Data's read and decode tasks take theirs
    from the CPUs left, so leave at least one free beside ``max_concurrent_trials`` trials."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """How to reach Ray (the soft labels are made and the Tune trials run on it)."""

    @model_validator(mode="after")
    def _budget(self) -> KDSearchConfig:
        steps, every = self.distill.train.max_steps, self.asha.eval_every
        if steps % every:
            raise ValueError(f"distill.train.max_steps={steps} is not a multiple of asha.eval_every={every}")
        if self.asha.grace_period > steps // every:
            raise ValueError(f"asha.grace_period={self.asha.grace_period} exceeds the {steps // every} segments of the budget")
        return self

    @property
    def segments(self) -> int:
        """Evaluations per full-budget trial."""
        return self.distill.train.max_steps // self.asha.eval_every

    def default_setting(self) -> dict[str, Any]:
        """The main job's own setting (its first student), in the search's terms."""
        weights = next(iter(self.distill.train.students.values()))
        divs = [d for d in DIVERGENCES if weights.get(d, 0.0) > 0]
        div = divs[0] if divs else "forward_kl"
        kd = weights.get(div, 0.0)
        total = kd + weights.get("ce", 0.0)
        return {"temperature": self.distill.labels.temperature, "kd_weight": kd / total if total else 0.0,
                "divergence": div, "jsd_beta": self.distill.train.loss_params.get("generalized_jsd", {}).get("beta", 0.5),
                "k": self.distill.labels.k}


def trial_objective(setting: dict[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The ``{loss: weight}`` objective and loss parameters of one point of the grid."""
    w = float(setting["kd_weight"])
    weights = {setting["divergence"]: w, "ce": 1.0 - w}
    params = {"generalized_jsd": {"beta": float(setting["jsd_beta"])}} if setting["divergence"] == "generalized_jsd" else {}
    return weights, params


def _distill_at(cfg: DistillConfig, temperature: float, k: int) -> DistillConfig:
    return cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"temperature": temperature, "k": k})})


def _label_all(cfg: KDSearchConfig) -> tuple[dict[float, dict[str, Any]], dict[str, Any]]:
    """Open (or label, through the shared teacher service) one cache per temperature of the space.

    Returns:
        ``({temperature: {"train": files, "eval": files, "plan": plan}}, stats)``.

    Raises:
        TeacherNotRunningError: a cache is missing, ``teacher.start`` is false and no teacher of
            that name runs (checked before any labeling).
    """
    # lazy: keeps pyarrow out of import time
    from raykd import storage
    from raykd.soft_labels.cache import shard_paths
    from raykd.soft_labels.plan import Plan, ensure_soft_labels
    from raykd.teacher.apps import check_teacher_reachable, stop_teacher

    k_label = max(cfg.space.k)
    plans = {t: Plan(_distill_at(cfg.distill, t, k_label)) for t in cfg.space.temperature}
    missing = [t for t, plan in plans.items()
               if not all(storage.is_file(storage.join(tg.cache_dir, "manifest.json")) for tg in plan.targets().values())]
    if missing:
        with console.user_errors(ValueError):
            check_teacher_reachable(cfg.distill.teacher, f"the search space (labels at temperature(s) {missing}, k={k_label}, "
                                                         "which the cache lacks)")
    out, stats, owned = {}, {"teacher_calls": 0, "label_s": 0.0, "labeled": [], "k": k_label}, False
    try:
        for t, plan in plans.items():
            plan.teacher.hold = True  # one teacher for every temperature; stopped below if this search started it
            caches, s = ensure_soft_labels(plan)
            owned = owned or plan.teacher.owns
            stats["teacher_calls"] += s["teacher_calls"]
            stats["label_s"] += s["label_s"]
            if not s["hit"]:
                stats["labeled"].append(t)
            out[t] = {"train": shard_paths(*caches["train"]), "eval": shard_paths(*caches["eval"]), "plan": plan}
    finally:
        if owned and not cfg.distill.teacher.keep_alive:
            stop_teacher(cfg.distill.teacher.name)
    return out, stats


def train_segment(name: str, setting: dict[str, Any], train: dict[str, Any], init_dir: str, labels: dict[str, list[str]],
                  storage: str, eval_batch_size: int) -> dict[str, float]:
    """Train one segment of a trial (resuming from the previous segment's checkpoint in
    ``storage/name``) and evaluate the student on the held-out split.

    Runs as a Ray task: Ray Train's local mode (the loop in this process) cannot run inside a
    Tune trial's own process, and a task costs far less to start than a Train worker group.

    Returns:
        ``eval_ppl``, ``top1_agreement``, ``kl`` (at the trial's temperature), ``step``,
        ``train_loss`` and ``train_s`` of the segment.
    """
    # lazy: keeps torch and pyarrow out of import time
    from raykd.train.evaluate import evaluate_folder
    from raykd.train.run import StudentRun
    from raykd.train.trainer import train_student

    weights, params = trial_objective(setting)
    res = train_student(StudentRun(name=name, student_path=Path(init_dir), shard_files=labels["train"], weights=weights,
                                   params=params, temperature=float(setting["temperature"]),
                                   train=TrainConfig.model_validate(train), storage_path=storage))
    m = evaluate_folder(res.model_dir, labels["eval"], batch_size=eval_batch_size)
    return {"eval_ppl": m["ppl"], "top1_agreement": m["top1_agreement"], "kl": m["kl"], "step": res.steps,
            "train_loss": res.history[-1]["loss"], "train_s": res.seconds}


def kd_trial(config: dict[str, Any]) -> None:
    """One Tune trial: train the student in segments, report held-out metrics to Tune after each
    (ASHA may stop the trial there). Each segment is a Ray task pinned to this trial's node, where
    the previous segment's checkpoint is."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    setting = config["setting"]
    base = TrainConfig.model_validate(config["train"])
    every, segments = config["eval_every"], config["segments"]
    labels = config["caches"][str(float(setting["temperature"]))]
    name = config.get("name") or tune.get_context().get_trial_id()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # The segment runs inside this trial's CPU reservation (the trial itself only waits), so it
    # reserves none of its own: the CPUs left are Ray Data's, which feeds the training loop.
    segment = ray.remote(train_segment).options(num_cpus=0, scheduling_strategy=here, max_retries=0)
    for seg in range(1, segments + 1):
        train = base.model_copy(update={"max_steps": seg * every, "schedule_steps": segments * every, "num_workers": 0,
                                        "target_k": int(setting["k"]), "checkpoint_every": every,
                                        "log_every": min(base.log_every, every)})
        tune.report(ray.get(segment.remote(name, setting, train.model_dump(), config["init_dir"], labels, config["storage"],
                                           config["eval_batch_size"])))


def _tuner(cfg: KDSearchConfig, trainable, space: dict[str, Any], output_dir: Path, name: str, scheduler=None,
           search_alg=None, num_samples: int = 1):
    from ray import tune

    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": cfg.cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="eval_ppl", mode="min", scheduler=scheduler, search_alg=search_alg,
                                    num_samples=num_samples, max_concurrent_trials=cfg.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=str(output_dir / "tune"), verbose=1),
    )


def _rows(grid) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        hist = r.metrics_dataframe
        curve = [] if hist is None or "eval_ppl" not in hist else [
            {"step": int(s), "eval_ppl": float(p)} for s, p in zip(hist["step"], hist["eval_ppl"], strict=True)]
        rows.append({"trial": Path(r.path).name, **r.config["setting"], "error": None if r.error is None else str(r.error),
                     "steps": curve[-1]["step"] if curve else 0, "eval_ppl": r.metrics.get("eval_ppl"),
                     "top1_agreement": r.metrics.get("top1_agreement"), "kl": r.metrics.get("kl"), "curve": curve})
    return rows


def _search_space(cfg: KDSearchConfig, common: dict[str, Any]):
    """Tune's space (a choice per setting, beside the trials' ``common`` settings) and ASHA's scheduler."""
    from ray import tune  # Ray Tune: not at import time
    from ray.tune.schedulers import ASHAScheduler

    space = {"setting": {"temperature": tune.choice(cfg.space.temperature), "kd_weight": tune.choice(cfg.space.kd_weight),
                         "divergence": tune.choice(cfg.space.divergence), "jsd_beta": tune.choice(cfg.space.jsd_beta),
                         "k": tune.choice(cfg.space.k)}, **common}
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.segments, grace_period=cfg.asha.grace_period,
                              reduction_factor=cfg.asha.reduction_factor)
    return space, scheduler


def _baseline(cfg: KDSearchConfig, caches: dict[float, Any], label_stats: dict[str, Any], common: dict[str, Any],
              output_dir: Path) -> dict[str, Any]:
    """The default setting trained with the full budget (one Tune trial): its row and wall time.

    Raises:
        ConfigError: the default setting's temperature or k was not labeled for the search space.
    """
    default = cfg.default_setting()
    if default["temperature"] not in caches or default["k"] > label_stats["k"]:
        raise ConfigError(f"the baseline setting {default} is outside the search space's caches; add its temperature "
                          "and k to the space, or set baseline: false")
    t_base = time.time()
    base_grid = _tuner(cfg, kd_trial, {"setting": default, **common, "name": "baseline"}, output_dir,
                       f"{cfg.run_name}-baseline").fit()
    return {**_rows(base_grid)[0], "wall_s": round(time.time() - t_base, 1)}


def main_kd_search(cfg: KDSearchConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run the search; write ``results.json``, ``results.md`` and ``kd_search.png`` in ``output_dir``.

    Returns:
        The results: every trial (setting, steps trained, final held-out metrics, curve), the
        best full-budget trial, the baseline, trial counts and the teacher calls of the labeling.

    Raises:
        ConfigError, ValueError, FileNotFoundError: bad input, before any labeling or trial.
        TeacherNotRunningError: as :func:`_label_all`.
    """
    # lazy: keeps ray out of import time
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raykd.students import build_student

    t0 = time.time()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    connect(cfg.ray, recorded=not cfg.distill.teacher.start)  # teacher.start=false: the service's cluster
    caches, label_stats = _label_all(cfg)
    plan = next(iter(caches.values()))["plan"]
    init_dir = build_student(cfg.distill.student, plan.teacher_path, output_dir / "student_init")
    common = {"train": cfg.distill.train.model_dump(), "eval_every": cfg.asha.eval_every, "segments": cfg.segments,
              "init_dir": str(init_dir), "storage": str(output_dir / "trials"), "eval_batch_size": cfg.distill.eval.batch_size,
              "caches": {str(float(t)): {"train": c["train"], "eval": c["eval"]} for t, c in caches.items()}}
    space, scheduler = _search_space(cfg, common)
    t_search = time.time()
    grid = _tuner(cfg, kd_trial, space, output_dir, f"{cfg.run_name}-search", scheduler,
                  # Tune ignores max_concurrent_trials for a BasicVariantGenerator passed in: it is given here
                  BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials), cfg.num_samples).fit()
    search_s = time.time() - t_search
    trials = _rows(grid)
    full = [r for r in trials if r["steps"] == cfg.distill.train.max_steps and r["eval_ppl"] is not None]
    best = min(full, key=lambda r: r["eval_ppl"]) if full else None
    baseline = _baseline(cfg, caches, label_stats, common, output_dir) if cfg.baseline else None
    results = {
        "search": "kd",
        "run_name": cfg.run_name,
        "space": cfg.space.model_dump(),
        "grid_points": cfg.space.size(),
        "budget": {"max_steps": cfg.distill.train.max_steps, "eval_every": cfg.asha.eval_every,
                   "batch_size": cfg.distill.train.batch_size, "seq_len": cfg.distill.data.seq_len},
        "trials_run": len(trials),
        "trials_full_budget": len(full),
        "trials_stopped_early": sum(1 for r in trials if r["error"] is None and r["steps"] < cfg.distill.train.max_steps),
        "trials_failed": [r for r in trials if r["error"] is not None],
        "steps_trained": sum(r["steps"] for r in trials),
        "labels": label_stats,
        "trials": sorted(trials, key=lambda r: (-r["steps"], r["eval_ppl"] if r["eval_ppl"] is not None else float("inf"))),
        "best": best,
        "baseline": baseline,
        "search_s": round(search_s, 1),
        "wall_s": round(time.time() - t0, 1),
    }
    _write(output_dir, results)
    return results


def _setting(r: dict[str, Any]) -> str:
    div = f"jsd(beta={r['jsd_beta']})" if r["divergence"] == "generalized_jsd" else r["divergence"]
    return f"T={r['temperature']:g}, {div} x {r['kd_weight']:g} + ce x {1 - r['kd_weight']:g}, k={r['k']}"


def _write(output_dir: Path, results: dict[str, Any]) -> None:
    """``results.json``, ``results.md`` (printed too) and ``kd_search.png`` (held-out ppl per trial)."""
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# KD search `{results['run_name']}`", "",
             f"{results['trials_run']} trials ({results['trials_full_budget']} trained the whole {results['budget']['max_steps']} "
             f"steps, {results['trials_stopped_early']} stopped early by ASHA) over a grid of {results['grid_points']} points; "
             f"{results['steps_trained']} steps trained in all; labeling: {results['labels']['teacher_calls']} teacher calls "
             f"(temperatures labeled now: {results['labels']['labeled'] or 'none, all cached'}); search {results['search_s']:.0f} s.", "",
             "| trial | setting | steps | held-out ppl | top-1 agreement | KL |", "|---|---|---|---|---|---|"]
    rows = ([{**results["baseline"], "trial": "baseline (the job's default)"}] if results["baseline"] else []) + results["trials"]
    for r in rows:
        if r["eval_ppl"] is None:
            lines.append(f"| {r['trial']} | {_setting(r)} | {r['steps']} | failed | | |")
            continue
        lines.append(f"| {r['trial']} | {_setting(r)} | {r['steps']} | {r['eval_ppl']:.1f} | {r['top1_agreement']:.3f} | {r['kl']:.3f} |")
    if results["best"] and results["baseline"] and results["baseline"]["eval_ppl"] is not None:
        b, d = results["best"], results["baseline"]
        lines += ["", f"Best full-budget trial: {_setting(b)}, held-out ppl {b['eval_ppl']:.1f} against the default's "
                      f"{d['eval_ppl']:.1f} (ratio {b['eval_ppl'] / d['eval_ppl']:.3f})."]
    text = "\n".join(lines) + "\n"
    (output_dir / "results.md").write_text(text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results["trials"]:
            if r["curve"]:
                ax.plot([c["step"] for c in r["curve"]], [c["eval_ppl"] for c in r["curve"]], marker="o", alpha=0.6, lw=1)
        if results["baseline"] and results["baseline"]["curve"]:
            c = results["baseline"]["curve"]
            ax.plot([x["step"] for x in c], [x["eval_ppl"] for x in c], "k--", marker="s", lw=2, label="baseline (default)")
            ax.legend()
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title(f"KD search: {results['trials_run']} trials, ASHA")
        fig.tight_layout()
        fig.savefig(output_dir / "kd_search.png", dpi=120)
        plt.close(fig)
    except ImportError:  # matplotlib is optional: the table and JSON are the results
        log.info("matplotlib not installed: no kd_search.png")
