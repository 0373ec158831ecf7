"""Config of the teacher-assistant schedule search (``raykd tune minidisc|maxidisc``).

One search, two tasks, told apart by ``task``: ``classifier`` (the default; a BERT-like classifier
on BBC News, :class:`ClassifierScheduleConfig`) and ``lm`` (a decoder LM whose teacher, data and
soft labels are the main job's own sections, :class:`LMScheduleConfig`, so the search labels
through the same Serve teacher into the same keyed soft-label cache as ``raykd distill``).
:data:`TAScheduleConfig` is their union, discriminated by ``task``; :func:`load_schedule_config`
loads a file into it. The settings both tasks share (the Ray connection, one distillation
phase's budget, MiniDisc's lambdas and sandwich, MaxiDisc's trials and ASHA) are declared once in
the ``_*Base`` models; a task redeclares a shared field only where its default differs.
Plain data: loading it starts nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, RootModel, field_validator, model_validator

from raykd.config import (
    ClassifierTeacherConfig,
    DataConfig,
    DistillConfig,
    RayConfig,
    SoftLabelConfig,
    Strict,
    TeacherConfig,
    load_config,
)
from raykd.recipes.ta_search.paths import Hop, PathError, parse_hop, parse_path


class _KDBase(Strict):
    """What every distillation phase (teacher -> TA, TA -> student, sandwich) shares, in both tasks."""

    steps: int = Field(default=40, ge=1)
    """Optimizer steps per phase (>= 1)."""
    lr: float = Field(default=1e-4, gt=0)
    """AdamW learning rate of every phase (> 0; constant)."""
    kd_weight: float = Field(default=1.0, ge=0)
    """Weight of the KD (divergence) term (>= 0)."""
    ce_weight: float = Field(default=0.0, ge=0)
    """Weight of the cross entropy on the gold labels (next token, or topic; >= 0)."""
    seed: int = 0
    """Seed of the phases' initialisation and batch order (each phase and the importance scoring derive
    their own from it), so every trial sees the same data."""
    torch_threads: int = Field(default=1, ge=1)
    """Torch threads per trial (>= 1; one CPU each)."""

    @model_validator(mode="after")
    def _some_loss(self) -> _KDBase:
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd.kd_weight and kd.ce_weight are both 0: nothing to train on")
        return self


class _MiniDiscBase(Strict):
    """MiniDisc (Zhang et al. 2022, arXiv:2205.14570): the settings of both tasks."""

    iterations: int = Field(default=2, ge=2, le=5)
    """Hops of the path MiniDisc builds: 2 = teacher -> TA -> student (one TA); 3 = two TAs, each
    picked by a sandwich trained from the TA before it."""
    sandwich_random: int = Field(default=1, ge=0)
    """Random grid sparsities per step besides the smallest and the target (the sandwich rule; >= 0)."""

    @field_validator("lambda_sweep", check_fields=False)
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v):
            raise ValueError(f"minidisc.lambda_sweep must hold lambdas >= 0, got {v}")
        return v


class _MaxiDiscBase(Strict):
    """MaxiDisc: the Tune trials and ASHA early stopping, in both tasks."""

    max_concurrent_trials: int = Field(default=2, ge=1)
    """Tune trials run at once (>= 1)."""
    cpus_per_trial: float = Field(default=1.0, gt=0)
    """Logical CPUs each Tune trial reserves (> 0)."""
    early_stopping: bool = True
    """ASHA (Li et al. 2020) on the student's dev metric: hopeless trials stop at a rung."""
    grace_period: int = Field(default=1, ge=1)
    """Reports a trial makes before ASHA may stop it (>= 1)."""
    reduction_factor: int = Field(default=2, ge=2)
    """ASHA keeps about ``1 / reduction_factor`` of the trials at each rung (>= 2)."""
    max_failures: int = Field(default=0, ge=0)
    """Retries of a failed trial (>= 0; a failure is reported, never fatal to the search)."""


class _ScheduleBase(Strict):
    """What both tasks' searches share at the top level."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """How to reach Ray (the teacher and the Tune trials run on it)."""

class ScheduleDataConfig(Strict):
    """The BBC News topic task, split by article."""

    max_docs: int | None = Field(default=1500, ge=3)
    """Articles kept in all (after a seeded shuffle); None keeps all 2,225."""
    test_docs: int = Field(default=300, ge=1)
    """Held-out test articles (the student's final metric)."""
    dev_docs: int = Field(default=200, ge=1)
    """Dev articles (TA selection, early stopping), taken from what is left after the test set."""
    split_seed: int = 0
    """Seed of both document shuffles."""
    seq_len: int = Field(default=128, ge=8, le=512)
    """Tokens per article ``T`` (headline and body, truncated)."""


class SoftLabelsConfig(Strict):
    """Where the teacher's class logits are cached."""

    cache_dir: str | None = None
    """Cache root (None: ``<user cache>/soft_labels``); class caches go to ``<root>/class_labels``."""
    batch_size: int = Field(default=32, ge=1)
    """Articles per teacher call."""


class SparsifyConfig(Strict):
    """The sparsity grid, the target student and how units are ranked."""

    grid: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    """Candidate sparsities (share of prunable parameters removed), increasing, in (0, 1)."""
    target: float = 0.9
    """Sparsity of the final student; must be a grid point. Candidate TAs are the grid points below it."""
    importance_batches: int = Field(default=4, ge=1)
    """Batches of the train split used for the first-order Taylor importance."""
    student_kind: Literal["sparse", "layer_drop"] = "sparse"
    """``sparse``: the student is its teacher (or TA) pruned to the target sparsity;
    ``layer_drop``: it keeps ``keep_layers`` of its teacher's layers instead."""
    keep_layers: list[int] = Field(default_factory=lambda: [0, 5])
    """Layers a ``layer_drop`` student keeps."""
    importance_file: str | None = None
    """Teacher unit scores saved by an earlier run (``teacher_importance.json``) to reuse; checked
    against the teacher before any trial. None computes them."""

    @field_validator("grid")
    @classmethod
    def _grid_ok(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("sparsify.grid is empty")
        if any(not 0 < s < 1 for s in v):
            raise ValueError(f"sparsify.grid values must lie in (0, 1), got {v}")
        if sorted(set(v)) != v:
            raise ValueError(f"sparsify.grid must be increasing without repeats, got {v}")
        return v

    @model_validator(mode="after")
    def _target_in_grid(self) -> SparsifyConfig:
        if not any(abs(self.target - s) < 1e-9 for s in self.grid):
            raise ValueError(f"sparsify.target={self.target} is not in sparsify.grid={self.grid}; pick a grid point")
        if not any(s < self.target for s in self.grid):
            raise ValueError(f"sparsify.grid={self.grid} has no candidate TA sparsity below target={self.target}")
        return self

    @property
    def candidates(self) -> list[float]:
        """Candidate TA sparsities: the grid points below the target."""
        return [s for s in self.grid if s < self.target - 1e-9]


class KDConfig(_KDBase):
    """One distillation phase (teacher -> TA, TA -> student, sandwich); same budget everywhere."""

    batch_size: int = Field(default=16, ge=1)
    """Articles per optimizer step of every phase (>= 1)."""
    temperature: float = Field(default=2.0, gt=0, le=100)
    """Softmax temperature of the KD term (Hinton et al. 2015)."""
    reports: int = Field(default=3, ge=1)
    """Dev evaluations (Tune reports) during the TA -> student phase; early stopping acts on them."""
    eval_batch_size: int = Field(default=50, ge=1)
    """Articles per forward pass of the dev and test accuracy (>= 1; memory, not results)."""
    freeze_embeddings: bool = True
    """Keep word embeddings fixed while distilling (they are not pruned)."""

    def objective(self) -> dict[str, float]:
        """The phase's objective ``{loss name: weight}`` (zero weights left out)."""
        return {n: w for n, w in (("forward_kl", self.kd_weight), ("ce", self.ce_weight)) if w}


class MiniDiscConfig(_MiniDiscBase):
    """MiniDisc (Zhang et al. 2022, arXiv:2205.14570): pick the TA in one trial."""

    lambda_tradeoff: float = Field(default=0.2, ge=0)
    """The lambda of ``dev metric + lambda * sparsity``; larger prefers sparser TAs."""
    lambda_sweep: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    """Lambdas whose picks are reported (and compared with MaxiDisc by ``raykd tune sweep``)."""
    sandwich_steps: int = Field(default=40, ge=1)
    """Optimizer steps of the sandwich student (all candidate sparsities trained at once)."""
    sandwich_weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay of the sandwich student: 0.01 (torch's default), as the sandwich had
    before it moved onto the shared step; the KD phases use none."""


class MaxiDiscConfig(_MaxiDiscBase):
    """MaxiDisc: every candidate TA as a Ray Tune trial (teacher -> TA -> student)."""

    include_direct: bool = True
    """Also run teacher -> student without a TA (TA sparsity 0) as a trial: the baseline."""


class ClassifierScheduleConfig(_ScheduleBase):
    """Teacher-assistant schedule search: MiniDisc (one trial) against MaxiDisc (all trials)."""

    trial_metric: ClassVar[tuple[str, str]] = ("student_dev_acc", "max")
    """What each Tune trial reports and optimises: the student's dev accuracy, higher is better."""

    task: Literal["classifier"] = "classifier"
    """Selects this task (the default when a file names none); ``task: lm`` is the decoder-LM search
    (:class:`LMScheduleConfig`)."""
    run_name: str = "ta_schedule"
    """Name of the search (its Tune experiments are ``<run_name>-minidisc`` / ``-maxidisc``) and in the results JSON."""
    data: ScheduleDataConfig = Field(default_factory=ScheduleDataConfig)
    """The classification task's articles and their train / dev / test split."""
    teacher: ClassifierTeacherConfig = Field(default_factory=ClassifierTeacherConfig)
    """The classification teacher: its fine-tuning and its Serve settings."""
    labels: SoftLabelsConfig = Field(default_factory=SoftLabelsConfig)
    """Where and how the teacher's class soft labels are cached."""
    sparsify: SparsifyConfig = Field(default_factory=SparsifyConfig)
    """The student's target sparsity and the candidate TA sparsities."""
    kd: KDConfig = Field(default_factory=KDConfig)
    """One distillation phase's budget and objective (the same for every hop)."""
    minidisc: MiniDiscConfig = Field(default_factory=MiniDiscConfig)
    """MiniDisc: the lambda-tradeoff and the sandwich student."""
    maxidisc: MaxiDiscConfig = Field(default_factory=MaxiDiscConfig)
    """MaxiDisc: the Tune trials and ASHA early stopping."""


class LMSparsifyConfig(Strict):
    """The student, the candidate TAs and how units are ranked."""

    student: str = "0.9"
    """The student as a hop (:mod:`raykd.recipes.ta_search.paths`): ``0.9`` (90% of the prunable
    parameters removed), ``4L`` (4 layers kept) or ``4L+0.5``."""
    grid: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    """Sparsities of the sandwich student and of the candidate TAs (share of prunable parameters
    removed), increasing, in (0, 1)."""
    layer_candidates: list[int] = Field(default_factory=list)
    """Depths of layer-dropped candidate TAs (MaxiDisc paths), e.g. ``[15, 8]``."""
    units: list[Literal["heads", "neurons"]] = Field(default_factory=lambda: ["heads", "neurons"])
    """What is pruned: ``heads`` = GQA head groups (a KV head and its query heads), ``neurons`` = FFN neurons."""
    tolerance: float = Field(default=0.005, gt=0, lt=0.5)
    """Largest gap between a grid sparsity and what whole units reach (else an error names the nearest)."""
    importance_batches: int = Field(default=2, ge=1)
    """Train batches of the first-order Taylor importance."""

    @field_validator("grid")
    @classmethod
    def _grid_ok(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < s < 1 for s in v) or sorted(set(v)) != v:
            raise ValueError(f"sparsify.grid must be increasing sparsities in (0, 1) without repeats, got {v}")
        return v

    @field_validator("student", mode="before")
    @classmethod
    def _number_as_text(cls, v: object) -> object:
        return repr(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("student")
    @classmethod
    def _student_hop(cls, v: str) -> str:
        try:
            parse_hop(v)
        except PathError as e:
            raise ValueError(f"sparsify.student: {e}") from None
        return v

    @property
    def student_hop(self) -> Hop:
        return parse_hop(self.student)

    def candidates(self) -> list[Hop]:
        """Candidate TA hops: the layer-drop depths (deepest first), then the grid sparsities."""
        return [Hop(n, None) for n in sorted(set(self.layer_candidates), reverse=True)] + [Hop(None, s) for s in self.grid]


class LMKDConfig(_KDBase):
    """One distillation phase (teacher -> TA, TA -> student, sandwich); the same budget everywhere."""

    batch_size: int = Field(default=4, ge=1)
    """Sequences per step (``T`` = ``data.seq_len`` tokens each)."""
    temperature: float = Field(default=1.0, gt=0, le=100)
    """KD temperature; the cached targets are re-tempered from ``labels.temperature``."""
    divergence: Literal["forward_kl", "reverse_kl", "generalized_jsd"] = "forward_kl"
    """The KD term: ``forward_kl`` (Hinton et al. 2015), ``reverse_kl`` (MiniLLM) or ``generalized_jsd`` (GKD)."""
    beta: float = Field(default=0.5, ge=0, le=1)
    """``generalized_jsd``'s beta (0: forward KL, 1: reverse KL; Agarwal et al. 2024)."""
    k: int | None = Field(default=None, ge=1)
    """Top-k of the teacher's soft labels the student sees (None: all the cache holds); at most the cache's ``labels.k``."""
    reports: int = Field(default=2, ge=1)
    """Held-out evaluations (Tune reports) during the last phase; ASHA acts on them."""
    eval_rows: int = Field(default=32, ge=1)
    """Held-out (``eval`` split) rows the perplexity is measured on."""
    eval_batch_size: int = Field(default=8, ge=1)
    """Rows per forward pass of the held-out perplexity (>= 1; memory, not results)."""

    def objective(self) -> dict[str, float]:
        """``{loss name: weight}`` of a phase (zero weights left out)."""
        return {n: w for n, w in ((self.divergence, self.kd_weight), ("ce", self.ce_weight)) if w}

    def objective_params(self) -> dict[str, dict[str, float]]:
        """Loss hyper-parameters of the objective (``generalized_jsd``'s beta)."""
        return {"generalized_jsd": {"beta": self.beta}} if self.divergence == "generalized_jsd" and self.kd_weight else {}


class LMMiniDiscConfig(_MiniDiscBase):
    """MiniDisc (Zhang et al. 2022, arXiv:2205.14570) on held-out perplexity.

    Sign convention: perplexity is lower-is-better, so the metric MiniDisc maximises is the
    negative held-out log-perplexity (``-log ppl``, the negative mean next-token NLL in nats), and
    ``lambda-tradeoff = -log(ppl) + lambda * sparsity``: higher is better, a larger lambda prefers
    a sparser TA. (On a log scale one lambda means the same at ppl 20 and at ppl 2,000.)"""

    lambda_tradeoff: float = Field(default=0.5, ge=0)
    """The lambda of ``-log(ppl) + lambda * sparsity`` (>= 0); larger prefers sparser TAs."""
    lambda_sweep: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    """Lambdas (each >= 0) whose picks are reported (and compared with MaxiDisc by ``raykd tune sweep``)."""
    sandwich_steps: int = Field(default=20, ge=1)
    """Optimizer steps of each sandwich student (all candidate widths trained at once; >= 1)."""


class LMMaxiDiscConfig(_MaxiDiscBase):
    """MaxiDisc: every TA path up to ``max_path_length`` hops as one Ray Tune trial."""

    max_path_length: int = Field(default=2, ge=1, le=4)
    """Longest path (hops, the student included): 1 = direct only, 2 = direct + one TA each."""
    paths: list[str] | None = None
    """Explicit paths instead of the enumeration, e.g. ``["0.9", "0.5 > 0.9"]``; each must end at the student."""

    @field_validator("paths", mode="before")
    @classmethod
    def _numbers_as_text(cls, v: object) -> object:
        if isinstance(v, list):
            return [repr(float(p)) if isinstance(p, (int, float)) and not isinstance(p, bool) else p for p in v]
        return v

    @field_validator("paths")
    @classmethod
    def _paths_parse(cls, v: list[str] | None) -> list[str] | None:
        for p in v or []:
            try:
                parse_path(p)
            except PathError as e:
                raise ValueError(f"maxidisc.paths: {e}") from None
        return v


class LMScheduleConfig(_ScheduleBase):
    """TA schedule search for a decoder LM: MiniDisc (one trial) against MaxiDisc (one trial per path)."""

    trial_metric: ClassVar[tuple[str, str]] = ("student_ppl", "min")
    """What each Tune trial reports and optimises: the student's held-out perplexity, lower is better."""

    task: Literal["lm"] = "lm"
    """Selects this task; the classifier search has ``task: classifier`` (the default)."""
    run_name: str = "lm_schedule"
    """Name of the search (its Tune experiments are ``<run_name>-minidisc`` / ``-maxidisc``) and in the results JSON."""
    data: DataConfig = Field(default_factory=DataConfig)
    """The text and its blocks, as in the main job (the same settings share its soft-label cache)."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    """The teacher LM and its Serve deployment, as in the main job."""
    labels: SoftLabelConfig = Field(default_factory=SoftLabelConfig)
    """The teacher's top-k soft labels and their cache, as in the main job."""
    sparsify: LMSparsifyConfig = Field(default_factory=LMSparsifyConfig)
    """The student and the candidate TAs (layer-drop depths and sparsities)."""
    kd: LMKDConfig = Field(default_factory=LMKDConfig)
    """One distillation phase's budget and objective (the same for every hop)."""
    minidisc: LMMiniDiscConfig = Field(default_factory=LMMiniDiscConfig)
    """MiniDisc: the lambda-tradeoff, the path length and the sandwich students."""
    maxidisc: LMMaxiDiscConfig = Field(default_factory=LMMaxiDiscConfig)
    """MaxiDisc: the TA paths tried as Tune trials and ASHA early stopping."""

    def distill_config(self) -> DistillConfig:
        """The main job's config for the same teacher, data and labels (what keys the cache)."""
        return DistillConfig.model_validate({"run_name": self.run_name, "ray": self.ray.model_dump(), "data": self.data.model_dump(),
                                             "teacher": self.teacher.model_dump(), "labels": self.labels.model_dump(),
                                             "student": {"keep_layers": [0]}, "train": {"students": {"student": self.kd.objective()}}})


TASKS = ("classifier", "lm")
"""The values of ``task``, one per :data:`TAScheduleConfig` member."""


def _with_task(data: Any) -> Any:
    """A file without ``task`` is a classifier search (as before the two tasks shared a loader)."""
    return {"task": "classifier", **data} if isinstance(data, dict) else data


class TAScheduleConfig(RootModel):
    """A TA schedule-search config of either task; ``task`` (default ``classifier``) picks the model."""

    root: Annotated[Union[ClassifierScheduleConfig, LMScheduleConfig], Field(  # noqa: UP007
        discriminator="task", description="The search of the task ``task`` names: ``classifier`` (default) or ``lm``.")]

    @model_validator(mode="before")
    @classmethod
    def _default_task(cls, data: Any) -> Any:
        return _with_task(data)


ScheduleSearchConfig = Union[ClassifierScheduleConfig, LMScheduleConfig]  # noqa: UP007
"""Either task's config (the type of :func:`load_schedule_config`'s result)."""


def load_schedule_config(path: str | PathLike | None = None, overrides: Sequence[str] = ()) -> ScheduleSearchConfig:
    """A TA schedule-search config from YAML plus dotted ``key=value`` overrides; ``task`` decides the model.

    Raises:
        ConfigError: as :func:`raykd.config.load_config` (a bad ``task`` lists the valid ones).
    """
    return load_config(TAScheduleConfig, path, list(overrides)).root
