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

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raykd import console
from raykd.cluster import connect
from raykd.config import DistillConfig
from raykd.losses import get_loss
from raykd.recipes.lm.multi_teacher import extra_teacher_plans, prepare_teachers
from raykd.report import print_table, write_report
from raykd.soft_labels.cache import shard_paths
from raykd.soft_labels.feature_cache import ensure_teacher_features, feature_source
from raykd.soft_labels.live import start_live_fill
from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.students import build_student
from raykd.students.vocab import compress_student_folder
from raykd.train.evaluate import evaluate_students
from raykd.train.features import FeatureTeacher
from raykd.train.on_policy import time_split
from raykd.train.trainer import check_room_beside_teacher, check_student_gpus, train_student

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
    plan = Plan(cfg)
    extra_plans = extra_teacher_plans(cfg, plan)  # [] for one teacher; tokenizers checked here
    log.info("%d parts of data, cache keys %s", len(plan.sources["train"][1]), {s: k.digest() for s, k in plan.keys.items()})
    connect(cfg.ray, recorded=not cfg.teacher.start)  # teacher.start=false: the service's cluster
    # lazy: keeps ray out of import time
    from raykd.teacher.deployment import cluster_node_gpus

    with console.user_errors(ValueError):
        check_student_gpus(cfg.train, cluster_node_gpus())  # before any teacher starts
    if cfg.on_policy is not None:  # the teacher scores the student's samples: it must be reachable
        from raykd.teacher.deployment import check_teacher_reachable

        with console.user_errors(ValueError):
            check_teacher_reachable(cfg.teacher, "on-policy training (on_policy)")
    if cfg.on_policy is not None:  # the teacher serves beside the workers: both must fit, checked before it starts
        check_room_beside_teacher(cfg.train, cfg.teacher, "on-policy training")
    prepared = prepare(plan) if prepare is not None else None
    live = (start_live_fill(plan, before_teacher=lambda: check_room_beside_teacher(cfg.train, cfg.teacher, "labels.fill=live"))
            if cfg.labels.fill == "live" else None)  # None: nothing to fill
    train_files, teachers, teachers_report = None, None, {}
    if live is None:
        caches, label_stats = ensure_soft_labels(plan)
        train_files = shard_paths(*caches["train"])
    if extra_plans:
        train_files, teachers, teachers_report = prepare_teachers(cfg, plan, caches, extra_plans, output_dir)

    init_dir = build_student(cfg.student, plan.teacher_path, output_dir / "student_init")
    if cfg.student.vocab_size is not None:
        compress_student_folder(init_dir, train_files, cfg.student.vocab_size, cfg.student.vocab_map, plan.teacher_path)
    # {student: cached teacher features}; feature terms refuse labels.fill=live, so the train cache is whole here
    feature_caches = _feature_caches(cfg, plan, *caches["train"]) if live is None else {}
    t_train = time.perf_counter()
    # on-policy runs: the served teacher stays up (else None); a live fill holds it until the caches are finished
    serving = plan.teacher.serving() if cfg.on_policy is not None else contextlib.nullcontext()  # yields the app or None
    with live or contextlib.nullcontext(), serving as teacher_app:
        results = {name: train_student(name, student_path=init_dir, shard_files=train_files, weights=weights,
                                       temperature=cfg.labels.temperature, cfg=cfg.train,
                                       storage_path=cfg.train.checkpoint_dir or output_dir / "ray_train",
                                       teachers=teachers, mlflow_uri=cfg.tracking.mlflow_uri,
                                       mlflow_experiment=cfg.tracking.experiment, online_teacher=plan.teacher_path,
                                       on_policy=cfg.on_policy, teacher_app=teacher_app, teacher_k=cfg.labels.k,
                                       rows=live.rows(cfg.train.shuffle, cfg.train.seed) if live else None,
                                       teacher_tokenizer=plan.teacher_path if plan.cross_tokenizer else None,
                                       layer_map=list(plan.layer_map.pairs) if plan.layer_map is not None else None,
                                       feature_cache=feature_caches.get(name))
                   for name, weights in cfg.train.students.items()}
        train_s = time.perf_counter() - t_train
        if live is not None:
            caches, label_stats = live.finish()
    train_dir, train_manifest = caches["train"]
    eval_dir, eval_manifest = caches["eval"]
    eval_files = shard_paths(eval_dir, eval_manifest)

    t_eval = time.perf_counter()
    report = {"run_name": cfg.run_name, "method": cfg.method,
              **evaluate_students({"model": cfg.teacher.model, "path": plan.teacher_path}, init_dir, results, eval_files,
                                  output_dir, batch_size=cfg.eval.batch_size, objectives=cfg.train.students,
                                  cross_tokenizer=plan.cross_tokenizer)}
    report.update(teachers_report)
    for name, res in results.items():  # the steps' wait for their data (with labels.fill=live: for the labels too)
        wait = float(sum(r.get("data_s", 0.0) for r in res.history))
        report[name].update(train_s=res.seconds, data_wait_s=wait, data_wait_share=wait / max(res.seconds, 1e-9))
    for name, fc in feature_caches.items():
        report[name]["feature_cache"] = fc["stats"]
    if cfg.on_policy is not None:
        for name, res in results.items():
            report[name]["time_split"] = time_split(res.history)
    if prepared is not None:
        report["prepare"] = prepared
    eval_s = time.perf_counter() - t_eval
    report["cache"] = _cache_report(cfg, (train_dir, train_manifest), (eval_dir, eval_manifest), label_stats)
    report["data"] = {"train_docs": train_manifest.docs, "eval_docs": eval_manifest.docs, "seq_len": cfg.data.seq_len,
                      "splits": cfg.data.splits, "sample": cfg.data.sample, "parts": len(train_manifest.parts)}
    report["timings"] = {"label_s": label_stats["label_s"], "train_s": train_s, "eval_s": eval_s, "total_s": time.perf_counter() - t0}
    write_report(report, output_dir, {name: res.history for name, res in results.items()})
    print_table(report)
    return report


def _feature_caches(cfg: DistillConfig, plan: Plan, train_dir, train_manifest) -> dict[str, dict[str, Any]]:
    """For each student whose feature terms read cached teacher features (``train.feature_teacher``),
    its feature cache over the train split's blocks (filled by the teacher once per key)."""
    out = {}
    for name, weights in cfg.train.students.items():
        terms = sorted(n for n in set(weights) | cfg.train.phase_terms() if get_loss(n).kind == "features")
        if not terms or feature_source(terms, cfg.train.feature_teacher) != "cached":
            continue
        params = {t: cfg.train.loss_params.get(t, {}) for t in terms}
        pairs, layout, stats = ensure_teacher_features(plan, train_dir, train_manifest, params, plan.layer_map,
                                                       FeatureTeacher.load)
        log.info("student %s: teacher features %s (%s, %.0f B/token)", name, "cache hit" if stats["hit"] else "labeled",
                 stats["path"], stats["bytes_per_token"])
        out[name] = {"pairs": pairs, "layout": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(layout).items()},
                     "shapes": stats["shapes"], "stats": {k: v for k, v in stats.items() if k != "shapes"}}
    return out


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
