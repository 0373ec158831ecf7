"""Config of the teacher-assistant schedule search (``raykd tune minidisc|maxidisc``).

One :class:`ScheduleConfig` drives both searches, so MiniDisc and MaxiDisc see the same
teacher, data, sparsity grid and distillation budget. Plain data: loading it starts nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raykd.config import ClassifierTeacherConfig, RayConfig, Strict


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


class KDConfig(Strict):
    """One distillation phase (teacher -> TA, TA -> student, sandwich); same budget everywhere."""

    steps: int = Field(default=40, ge=1)
    """Optimizer steps per phase."""
    batch_size: int = Field(default=16, ge=1)
    """Articles per optimizer step of every phase (>= 1)."""
    lr: float = Field(default=1e-4, gt=0)
    """AdamW learning rate of every phase (> 0; constant)."""
    temperature: float = Field(default=2.0, gt=0, le=100)
    """Softmax temperature of the KD term (Hinton et al. 2015)."""
    kd_weight: float = Field(default=1.0, ge=0)
    """Weight of ``forward_kl`` (teacher || student)."""
    ce_weight: float = Field(default=0.0, ge=0)
    """Weight of the cross entropy on the gold topic."""
    reports: int = Field(default=3, ge=1)
    """Dev evaluations (Tune reports) during the TA -> student phase; early stopping acts on them."""
    eval_batch_size: int = Field(default=50, ge=1)
    """Articles per forward pass of the dev and test accuracy (>= 1; memory, not results)."""
    freeze_embeddings: bool = True
    """Keep word embeddings fixed while distilling (they are not pruned)."""
    seed: int = 0
    """Seed of the phases' initialisation and batch order (each phase and the importance scoring derive
    their own from it), so every trial sees the same data."""
    torch_threads: int = Field(default=1, ge=1)
    """Torch threads per trial (one CPU each)."""

    def objective(self) -> dict[str, float]:
        """The phase's objective ``{loss name: weight}`` (zero weights left out)."""
        return {n: w for n, w in (("forward_kl", self.kd_weight), ("ce", self.ce_weight)) if w}

    @model_validator(mode="after")
    def _some_loss(self) -> KDConfig:
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd.kd_weight and kd.ce_weight are both 0: nothing to train on")
        return self


class MiniDiscConfig(Strict):
    """MiniDisc (Zhang et al. 2022, arXiv:2205.14570): pick the TA in one trial."""

    lambda_tradeoff: float = Field(default=0.2, ge=0)
    """The lambda of ``dev metric + lambda * sparsity``; larger prefers sparser TAs."""
    lambda_sweep: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    """Lambdas whose picks are reported (and compared with MaxiDisc by ``raykd tune sweep``)."""
    iterations: int = Field(default=2, ge=2, le=5)
    """Teacher -> ... -> student hops; 2 means one TA."""
    sandwich_steps: int = Field(default=40, ge=1)
    """Optimizer steps of the sandwich student (all candidate sparsities trained at once)."""
    sandwich_random: int = Field(default=1, ge=0)
    """Random grid sparsities per step besides the smallest and the target (the sandwich rule)."""
    sandwich_weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay of the sandwich student: 0.01 (torch's default), as the sandwich had
    before it moved onto the shared step; the KD phases use none."""

    @field_validator("lambda_sweep")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v):
            raise ValueError(f"minidisc.lambda_sweep must hold lambdas >= 0, got {v}")
        return v


class MaxiDiscConfig(Strict):
    """MaxiDisc: every candidate TA as a Ray Tune trial (teacher -> TA -> student)."""

    include_direct: bool = True
    """Also run teacher -> student without a TA (TA sparsity 0) as a trial: the baseline."""
    max_concurrent_trials: int = Field(default=2, ge=1)
    """Tune trials run at once (>= 1)."""
    cpus_per_trial: float = Field(default=1.0, gt=0)
    """Logical CPUs each Tune trial reserves (> 0)."""
    early_stopping: bool = True
    """ASHA (Li et al. 2020) on the student's dev accuracy: hopeless trials stop at a rung."""
    grace_period: int = Field(default=1, ge=1)
    """Reports a trial makes before ASHA may stop it."""
    reduction_factor: int = Field(default=2, ge=2)
    """ASHA keeps about ``1 / reduction_factor`` of the trials at each rung (>= 2)."""
    max_failures: int = Field(default=0, ge=0)
    """Retries of a failed trial (a failure is reported, never fatal to the search)."""


class ScheduleConfig(Strict):
    """Teacher-assistant schedule search: MiniDisc (one trial) against MaxiDisc (all trials)."""

    task: Literal["classifier"] = "classifier"
    """Selects this config in ``raykd tune``; ``task: lm`` is the decoder-LM search
    (:class:`~raykd.recipes.ta_search.lm_config.LMScheduleConfig`)."""
    run_name: str = "ta_schedule"
    """Name of the search (its Tune experiments are ``<run_name>-minidisc`` / ``-maxidisc``) and in the results JSON."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """How to reach Ray (the teacher and the Tune trials run on it)."""
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
