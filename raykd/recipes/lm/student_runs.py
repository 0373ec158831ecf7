"""The main job's steps between the plan and the report: the soft labels training reads, the
initial student, and one :class:`~raykd.train.run.StudentRun` per ``train.students`` entry.

Every run is built in :func:`student_runs`, from the config, the plan and the student; each method
feature adds its own part there (one small function each): the data (a finished cache, or a live
fill's rows), extra teachers, on-policy steps, a cross-tokenizer student, and the feature terms'
teacher (run in the worker or cached). A vocabulary-compressed student carries its map in its
folder (:func:`initial_student`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd.config import DistillConfig
from raykd.losses import get_loss
from raykd.recipes.lm.multi_teacher import prepare_teachers
from raykd.soft_labels.cache import shard_paths
from raykd.soft_labels.feature_cache import ensure_teacher_features, feature_source
from raykd.soft_labels.live import LiveFill, start_live_fill
from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.students import build_student
from raykd.students.vocab import compress_student_folder
from raykd.train.run import FeaturePart, OnPolicyPart, StudentRun, TeacherMixPart
from raykd.train.features import FeatureTeacher
from raykd.train.trainer import TrainResult, check_room_beside_teacher, train_student

log = logging.getLogger(__name__)


@dataclass
class TrainingLabels:
    """The soft labels the students train on."""

    caches: dict[str, Any] | None
    """``{split: (cache folder, manifest)}``; None until a live fill is finished (:meth:`finish`)."""
    stats: dict[str, Any] | None
    """The labeling statistics of :func:`~raykd.soft_labels.plan.ensure_soft_labels` (same timing)."""
    train_files: list[str] | None
    """The train split's shards (joined over every teacher with extra teachers); None with a live fill."""
    live: LiveFill | None = None
    """The live fill of the train split (``labels.fill=live``), or None."""
    teachers: TeacherMixPart | None = None
    """With extra teachers: how the joined caches' targets mix."""
    teachers_report: dict[str, Any] = field(default_factory=dict)
    """The extra teachers' report entries."""

    def finish(self) -> None:
        """After training: label what a live fill did not reach and write its manifests."""
        if self.live is not None:
            self.caches, self.stats = self.live.finish()


def training_labels(cfg: DistillConfig, plan: Plan, extra_plans: list[Plan], output_dir: Path) -> TrainingLabels:
    """Open or fill every teacher's caches (a hit asks the teacher nothing); with ``labels.fill=live``
    start the live fill instead, whose parts are labeled as training reaches them."""
    live = (start_live_fill(plan, before_teacher=lambda: check_room_beside_teacher(cfg.train, cfg.teacher, "labels.fill=live"))
            if cfg.labels.fill == "live" else None)  # None: nothing to fill
    if live is not None:
        return TrainingLabels(None, None, None, live)
    caches, stats = ensure_soft_labels(plan)
    labels = TrainingLabels(caches, stats, shard_paths(*caches["train"]))
    if extra_plans:
        labels.train_files, settings, labels.teachers_report = prepare_teachers(cfg, plan, caches, extra_plans,
                                                                                output_dir)
        labels.teachers = TeacherMixPart(**settings)
    return labels


def initial_student(cfg: DistillConfig, plan: Plan, labels: TrainingLabels, output_dir: Path) -> Path:
    """Build the student every run starts from; with ``student.vocab_size`` its vocabulary is
    compressed over the train split's tokens (the map is saved in its folder)."""
    init_dir = build_student(cfg.student, plan.teacher_path, output_dir / "student_init")
    if cfg.student.vocab_size is not None:
        compress_student_folder(init_dir, labels.train_files, cfg.student.vocab_size, cfg.student.vocab_map,
                                plan.teacher_path)
    return init_dir


def train_students(cfg: DistillConfig, plan: Plan, labels: TrainingLabels, init_dir: Path, output_dir: Path,
                   feature_caches: dict[str, dict[str, Any]]) -> tuple[dict[str, TrainResult], float]:
    """Train every student in turn; a live fill is finished after them.

    On-policy runs keep the served teacher up while they train; a live fill holds it until the
    caches are finished.

    Returns:
        ``({student: result}, training seconds)``.
    """
    start = time.perf_counter()
    # on-policy runs: the served teacher stays up (else None); a live fill holds it until the caches are finished
    serving = plan.teacher.serving() if cfg.on_policy is not None else contextlib.nullcontext()  # yields the app or None
    with labels.live or contextlib.nullcontext(), serving as teacher_app:
        # one run built at a time: a live fill's rows for the next student skip what this one labeled
        runs = student_runs(cfg, plan, labels, init_dir, output_dir, teacher_app, feature_caches)
        results = {run.name: train_student(run) for run in runs}
        seconds = time.perf_counter() - start
        labels.finish()
    return results, seconds


def student_runs(cfg: DistillConfig, plan: Plan, labels: TrainingLabels, init_dir: Path, output_dir: Path,
                 teacher_app: str | None, feature_caches: dict[str, dict[str, Any]]) -> Iterator[StudentRun]:
    """One run per ``train.students`` entry, each built when the previous one has trained.

    Args:
        teacher_app: the served teacher's application on-policy steps score with (None without).
        feature_caches: per student, its cached teacher features (:func:`feature_caches`).
    """
    for name, weights in cfg.train.students.items():
        yield StudentRun(
            name=name, student_path=init_dir, weights=weights, temperature=cfg.labels.temperature, train=cfg.train,
            storage_path=cfg.train.checkpoint_dir or output_dir / "ray_train",
            mlflow_uri=cfg.tracking.mlflow_uri, mlflow_experiment=cfg.tracking.experiment,
            online_teacher=plan.teacher_path, teachers=labels.teachers, **_data_part(cfg, labels),
            on_policy=_on_policy_part(cfg, teacher_app), teacher_tokenizer=_cross_tokenizer_part(plan),
            features=_feature_part(plan, feature_caches.get(name)),
        )


def _data_part(cfg: DistillConfig, labels: TrainingLabels) -> dict[str, Any]:
    """The cache's shards, or a live fill's rows in training order."""
    if labels.live is not None:
        return {"rows": labels.live.rows(cfg.train.shuffle, cfg.train.seed)}
    return {"shard_files": labels.train_files}


def _on_policy_part(cfg: DistillConfig, teacher_app: str | None) -> OnPolicyPart | None:
    """On-policy steps scored by the served teacher at the cache's top-k, or None."""
    return OnPolicyPart(cfg.on_policy, teacher_app, cfg.labels.k) if cfg.on_policy is not None else None


def _cross_tokenizer_part(plan: Plan) -> Path | None:
    """The teacher's folder when the student's tokenizer differs from it, else None."""
    return plan.teacher_path if plan.cross_tokenizer else None


def _feature_part(plan: Plan, cache: dict[str, Any] | None) -> FeaturePart | None:
    """The feature terms' layer map and teacher: its cached features when given, else the teacher
    run in the worker; None without a layer map (a student with feature terms is then refused)."""
    if plan.layer_map is None:
        return None
    return FeaturePart(layer_map=list(plan.layer_map.pairs), teacher=None if cache else plan.teacher_path, cache=cache)


def feature_caches(cfg: DistillConfig, plan: Plan, labels: TrainingLabels) -> dict[str, dict[str, Any]]:
    """For each student whose feature terms read cached teacher features (``train.feature_teacher``),
    its feature cache over the train split's blocks (filled by the teacher once per key).

    Feature terms refuse ``labels.fill=live``: with a live fill there is none (``{}``)."""
    if labels.live is not None:
        return {}
    train_dir, train_manifest = labels.caches["train"]
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
