"""The main job: served teacher -> keyed soft-label cache -> Ray Train students -> report.

Order of work (every check that can fail runs before the first teacher forward or training step):

1. load and split the text by document; resolve the teacher; fingerprint weights and tokenizer;
   check the student's tokenizer; compute the cache keys of the train and eval splits;
2. for each split, open the finished cache for its key (a hit asks the teacher nothing) or start
   (or reuse) the teacher deployment and label the parts the split misses into its cache; with
   ``labels.fill=live`` the train split's missing parts are labeled during step 3 instead, as
   training reaches them (:mod:`raykd.soft_labels.live`), and the caches are finished after it;
3. build the initial student and train one student per ``train.students`` entry on Ray Train;
4. evaluate the teacher (from the cache), the untrained student and each trained student on the
   held-out split; write ``report.json``, ``report.md`` and ``loss_curves.png``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raykd import console
from raykd.cluster import connect
from raykd.config import DistillConfig
from raykd.recipes.lm.multi_teacher import extra_teacher_plans
from raykd.recipes.lm.student_runs import (
    TrainingLabels,
    feature_caches,
    initial_student,
    train_students,
    training_labels,
)
from raykd.report import print_table, write_report
from raykd.soft_labels.cache import shard_paths
from raykd.soft_labels.plan import Plan
from raykd.train.evaluate import evaluate_students
from raykd.train.on_policy import time_split
from raykd.train.trainer import TrainResult, check_room_beside_teacher, check_student_gpus

log = logging.getLogger(__name__)


def run_distill(cfg: DistillConfig, output_dir: Path, prepare: Callable[[Plan], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the main job and write its report into ``output_dir``.

    ``prepare`` (used by recipes built on this one, e.g. sequence-level KD) runs once Ray is
    connected and before the soft labels: it may replace the plan's training documents (through
    :meth:`Plan.set_train_docs`) and returns a dict stored in the report under ``prepare``.

    Returns:
        The report (also written as ``report.json``); see the README for its fields.

    Raises:
        raykd.config.ConfigError, ValueError, FileNotFoundError: bad input, before any compute.
        raykd.soft_labels.cache.CacheError: a cache for this key exists but is corrupt.
    """
    t0 = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    plan = Plan(cfg)  # 1. split, fingerprints, cache keys
    extra_plans = extra_teacher_plans(cfg, plan)  # [] for one teacher; tokenizers checked here
    log.info("%d parts of data, cache keys %s", len(plan.sources["train"][1]), {s: k.digest() for s, k in plan.keys.items()})
    _connect_and_check(cfg)
    prepared = prepare(plan) if prepare is not None else None
    labels = training_labels(cfg, plan, extra_plans, output_dir)  # 2. soft labels (or a live fill)
    init_dir = initial_student(cfg, plan, labels, output_dir)  # 3. students
    features = feature_caches(cfg, plan, labels)  # {student: cached teacher features}
    results, train_s = train_students(cfg, plan, labels, init_dir, output_dir, features)
    t_eval = time.perf_counter()  # 4. evaluation and report
    report = _evaluate(cfg, plan, labels, init_dir, results, features, output_dir)
    if prepared is not None:
        report["prepare"] = prepared
    eval_s = time.perf_counter() - t_eval
    report.update(_summary(cfg, labels))
    report["timings"] = {"label_s": labels.stats["label_s"], "train_s": train_s, "eval_s": eval_s,
                         "total_s": time.perf_counter() - t0}
    write_report(report, output_dir, {name: res.history for name, res in results.items()})
    print_table(report)
    return report


def _connect_and_check(cfg: DistillConfig) -> None:
    """Connect to Ray and refuse, before any teacher starts, what the cluster cannot run."""
    from raykd.teacher.apps import check_teacher_reachable, cluster_node_gpus  # lazy: keeps ray out of import time

    connect(cfg.ray, recorded=not cfg.teacher.start)  # teacher.start=false: the service's cluster
    with console.user_errors(ValueError):
        check_student_gpus(cfg.train, cluster_node_gpus())  # before any teacher starts
    if cfg.on_policy is not None:  # the teacher scores the student's samples: it must be reachable, and fit
        with console.user_errors(ValueError):
            check_teacher_reachable(cfg.teacher, "on-policy training (on_policy)")
        check_room_beside_teacher(cfg.train, cfg.teacher, "on-policy training")


def _evaluate(cfg: DistillConfig, plan: Plan, labels: TrainingLabels, init_dir: Path, results: dict[str, TrainResult],
              features: dict[str, dict[str, Any]], output_dir: Path) -> dict[str, Any]:
    """The teacher (from the cache), the untrained and each trained student on the held-out
    split, with each student's training times, cached features and on-policy time split."""
    report = {"run_name": cfg.run_name, "method": cfg.method,
              **evaluate_students({"model": cfg.teacher.model, "path": plan.teacher_path}, init_dir, results,
                                  shard_paths(*labels.caches["eval"]), output_dir, batch_size=cfg.eval.batch_size,
                                  objectives=cfg.train.students, cross_tokenizer=plan.cross_tokenizer)}
    report.update(labels.teachers_report)
    for name, res in results.items():  # the steps' wait for their data (with labels.fill=live: for the labels too)
        wait = float(sum(r.get("data_s", 0.0) for r in res.history))
        report[name].update(train_s=res.seconds, data_wait_s=wait, data_wait_share=wait / max(res.seconds, 1e-9))
    for name, fc in features.items():
        report[name]["feature_cache"] = fc["stats"]
    if cfg.on_policy is not None:
        for name, res in results.items():
            report[name]["time_split"] = time_split(res.history)
    return report


def _summary(cfg: DistillConfig, labels: TrainingLabels) -> dict[str, Any]:
    """The report's ``cache`` and ``data`` entries."""
    train_manifest, eval_manifest = labels.caches["train"][1], labels.caches["eval"][1]
    return {"cache": _cache_report(cfg, labels.caches["train"], labels.caches["eval"], labels.stats),
            "data": {"train_docs": train_manifest.docs, "eval_docs": eval_manifest.docs, "seq_len": cfg.data.seq_len,
                     "splits": cfg.data.splits, "sample": cfg.data.sample, "parts": len(train_manifest.parts)}}


def _cache_report(cfg: DistillConfig, train: tuple[Path, Any], eval_: tuple[Path, Any], label_stats: dict[str, Any]) -> dict[str, Any]:
    (train_dir, train_manifest), (eval_dir, eval_manifest) = train, eval_
    return {
        "path": str(train_dir),
        "eval_path": str(eval_dir),
        "key": train_manifest.key,
        "rows": train_manifest.rows,
        "tokens": train_manifest.tokens,
        "bytes": train_manifest.bytes,
        "bytes_per_token": train_manifest.bytes_per_token,
        "k": cfg.labels.k,
        "form": cfg.labels.form,
        **({"samples": cfg.labels.samples, "seed": cfg.labels.seed, "draws": cfg.labels.draws}
           if cfg.labels.form == "sampled" else {}),
        "temperature": cfg.labels.temperature,
        "hit": label_stats["hit"],
        "fill": cfg.labels.fill,
        **{k: label_stats[k] for k in ("parts_live", "parts_after") if k in label_stats},
        "teacher_calls": label_stats["teacher_calls"],
        "parts": label_stats.get("parts", {}),
        "teacher": label_stats["teacher"],
        "eval_rows": eval_manifest.rows,
        "eval_tokens": eval_manifest.tokens,
    }
