"""One student run as a typed spec: everything :func:`raykd.train.trainer.train_student` needs.

A recipe builds one :class:`StudentRun` per student (the main job in one place:
:func:`raykd.recipes.lm.student_runs.student_runs`). The core is the student, its objective, the
cache's temperature and the train settings; each method feature adds its own optional part:

- the data: a cache's shards (``shard_files``) or, with ``labels.fill=live``, its rows as they are
  labeled (``rows``);
- extra teachers (:class:`TeacherMixPart`): the joined caches' mixing rule;
- on-policy steps (:class:`OnPolicyPart`): the running teacher that scores the student's samples;
- a student of another tokenizer (``teacher_tokenizer``): batches re-tokenised in the worker;
- feature terms (:class:`FeaturePart`): the layer map and the teacher run for its features, or
  its cached features;
- an online teacher (``online_teacher``, with ``train.online_teacher``): dense targets in the worker.

A vocabulary-compressed student needs no part: its map travels in the student's folder
(:mod:`raykd.students.vocab`). No Ray or torch here: the spec is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.config import OnPolicyConfig, TrainConfig


@dataclass(frozen=True)
class TeacherMixPart:
    """Several teachers' targets mixed per step (joined caches, :mod:`raykd.soft_labels.join`)."""

    combine: str
    """The method's rule (:mod:`raykd.losses.multi_teacher`)."""
    num_teachers: int
    """Teachers in the joined cache (the first is the main teacher)."""
    weight_temperature: float = 1.0
    """Temperature of the per-teacher weights (``multi_teacher.weight_temperature``)."""
    policy_lr: float = 0.05
    """Learning rate of a learnt teacher-choice policy (``multi_teacher.policy_lr``)."""


@dataclass(frozen=True)
class OnPolicyPart:
    """On-policy steps (:mod:`raykd.train.on_policy`): the student's samples scored by a served teacher."""

    config: OnPolicyConfig
    teacher_app: str | None
    """The running teacher's Serve application (None fails the run before any work)."""
    teacher_k: int = 32
    """Top-k of the teacher's scores (the cache's ``labels.k``)."""


@dataclass(frozen=True)
class FeaturePart:
    """The feature terms' teacher: run in each worker (``teacher``) or read from the feature cache (``cache``)."""

    layer_map: list[tuple[int, int]] | None
    """Checked ``(student layer, teacher layer)`` pairs (:attr:`raykd.soft_labels.plan.Plan.layer_map`)."""
    teacher: str | Path | None = None
    """The teacher folder each worker runs for its features, or None with ``cache``."""
    cache: dict[str, Any] | None = None
    """Cached teacher features: ``pairs`` (soft-label shard, feature shard) per part, ``layout`` and
    ``shapes`` (:func:`raykd.soft_labels.feature_cache.ensure_teacher_features`)."""


@dataclass(frozen=True)
class StudentRun:
    """One student run on Ray Train.

    Raises (from :meth:`check`, before any work):
        ValueError: a feature's part is missing (an online teacher without its folder, on-policy
            without a running teacher, feature terms without a layer map or teacher).
    """

    name: str
    """Run name; also the Ray Train run folder under ``storage_path`` (the same name and storage
    resume from the last checkpoint)."""
    student_path: Path
    """Initial weights folder (:func:`raykd.students.build_student`)."""
    weights: dict[str, float]
    """The objective ``{loss name: weight}``."""
    temperature: float
    """The soft-label cache's temperature."""
    train: TrainConfig
    """Workers, devices, batch, steps, optimizer."""
    storage_path: str | Path
    """Ray Train storage (checkpoints): a local folder or a URI (``s3://``, ``gs://``) resolved
    through :mod:`raykd.storage`; from object storage the final checkpoint is downloaded into a
    local folder for evaluation and export."""
    shard_files: list[str] | None = None
    """Parquet shards of the cache (None with ``rows``)."""
    rows: Any = None
    """Instead of ``shard_files``, a Ray Dataset of the cache's undecoded rows in training order
    (a cache filled live: :meth:`raykd.soft_labels.live.LiveFill.rows`)."""
    params: dict[str, dict[str, float]] | None = None
    """Loss hyper-parameters on top of ``train.loss_params``."""
    online_teacher: str | Path | None = None
    """With ``train.online_teacher``, the teacher folder each worker loads for dense targets (the
    cache then supplies only the blocks)."""
    teachers: TeacherMixPart | None = None
    on_policy: OnPolicyPart | None = None
    teacher_tokenizer: str | Path | None = None
    """The teacher's folder when the student's tokenizer differs (``student.tokenizer_alignment``):
    every batch is re-tokenised and aligned in the worker."""
    features: FeaturePart | None = None
    mlflow_uri: str | None = None
    """Also log every step's metrics to this MLflow tracking URI (one run per student)."""
    mlflow_experiment: str = "raykd"

    def terms(self) -> list[str]:
        """Every loss any phase of the run uses."""
        return sorted(set(self.weights) | self.train.phase_terms())

    def has_feature_terms(self) -> bool:
        """Whether a term of the objective reads hidden states (a teacher runs or is cached for them)."""
        from raykd.losses import get_loss  # lazy: keeps torch out of this module's import time

        return any(get_loss(n).kind == "features" for n in self.terms())

    def feature_part(self) -> FeaturePart | None:
        """``features`` when a term reads them (a student without feature terms runs no teacher for them)."""
        return self.features if self.has_feature_terms() else None

    def check(self) -> None:
        """Refuse a run whose features lack their part, before any work (see the class)."""
        if self.train.online_teacher and self.online_teacher is None:
            raise ValueError("train.online_teacher is set but no teacher folder was given to train_student")
        if self.on_policy is not None and self.on_policy.teacher_app is None:
            raise ValueError("on_policy training needs a running teacher: pass teacher_app (its Serve application name)")
        f = self.features
        if self.has_feature_terms() and (f is None or f.layer_map is None or (f.teacher is None and f.cache is None)):
            raise ValueError(f"student {self.name!r} has feature terms: pass layer_map and the teacher folder "
                             "(online_teacher) or its cached features (feature_cache)")
