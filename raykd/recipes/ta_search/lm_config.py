"""Config of the teacher-assistant schedule search for decoder language models
(``raykd tune minidisc|maxidisc`` with ``task: lm``).

The teacher, data and soft labels are the main LM job's own sections (:class:`DataConfig`,
:class:`TeacherConfig`, :class:`SoftLabelConfig`), so the search labels through the same
Serve teacher into the same keyed soft-label cache as ``raykd distill`` (a run of either finds
the other's cache). Plain data: loading it starts nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raykd.config import (
    DataConfig,
    DistillConfig,
    RayConfig,
    SoftLabelConfig,
    Strict,
    TeacherConfig,
)
from raykd.recipes.ta_search.paths import Hop, PathError, parse_hop, parse_path


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


class LMKDConfig(Strict):
    """One distillation phase (teacher -> TA, TA -> student, sandwich); the same budget everywhere."""

    steps: int = Field(default=40, ge=1)
    """Optimizer steps per phase."""
    batch_size: int = Field(default=4, ge=1)
    """Sequences per step (``T`` = ``data.seq_len`` tokens each)."""
    lr: float = Field(default=1e-4, gt=0)
    """AdamW learning rate of every phase (> 0; constant)."""
    temperature: float = Field(default=1.0, gt=0, le=100)
    """KD temperature; the cached targets are re-tempered from ``labels.temperature``."""
    kd_weight: float = Field(default=1.0, ge=0)
    """Weight of the divergence term."""
    ce_weight: float = Field(default=0.0, ge=0)
    """Weight of the next-token cross entropy."""
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
    seed: int = 0
    """Seed of the phases' initialisation and batch order (each hop and the importance scoring derive
    their own from it), so a hop sees the same data whichever search builds it."""
    torch_threads: int = Field(default=1, ge=1)
    """Torch threads per trial (>= 1; one CPU each)."""

    def objective(self) -> dict[str, float]:
        """``{loss name: weight}`` of a phase (zero weights left out)."""
        return {n: w for n, w in ((self.divergence, self.kd_weight), ("ce", self.ce_weight)) if w}

    def objective_params(self) -> dict[str, dict[str, float]]:
        """Loss hyper-parameters of the objective (``generalized_jsd``'s beta)."""
        return {"generalized_jsd": {"beta": self.beta}} if self.divergence == "generalized_jsd" and self.kd_weight else {}

    @model_validator(mode="after")
    def _some_loss(self) -> LMKDConfig:
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd.kd_weight and kd.ce_weight are both 0: nothing to train on")
        return self


class LMMiniDiscConfig(Strict):
    """MiniDisc (Zhang et al. 2022, arXiv:2205.14570) on held-out perplexity.

    Sign convention: perplexity is lower-is-better, so the metric MiniDisc maximises is the
    negative held-out log-perplexity (``-log ppl``, the negative mean next-token NLL in nats), and
    ``lambda-tradeoff = -log(ppl) + lambda * sparsity``: higher is better, a larger lambda prefers
    a sparser TA. (On a log scale one lambda means the same at ppl 20 and at ppl 2,000.)"""

    lambda_tradeoff: float = Field(default=0.5, ge=0)
    """The lambda of ``-log(ppl) + lambda * sparsity`` (>= 0); larger prefers sparser TAs."""
    lambda_sweep: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    """Lambdas (each >= 0) whose picks are reported (and compared with MaxiDisc by ``raykd tune sweep``)."""
    iterations: int = Field(default=2, ge=2, le=5)
    """Hops of the path MiniDisc builds: 2 = teacher -> TA -> student; 3 = two TAs, each picked
    by a sandwich trained from the TA before it."""
    sandwich_steps: int = Field(default=20, ge=1)
    """Optimizer steps of each sandwich student (all candidate widths trained at once; >= 1)."""
    sandwich_random: int = Field(default=1, ge=0)
    """Random grid sparsities per step besides the smallest and the target (the sandwich rule; >= 0)."""

    @field_validator("lambda_sweep")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v):
            raise ValueError(f"minidisc.lambda_sweep must hold lambdas >= 0, got {v}")
        return v


class LMMaxiDiscConfig(Strict):
    """MaxiDisc: every TA path up to ``max_path_length`` hops as one Ray Tune trial."""

    max_path_length: int = Field(default=2, ge=1, le=4)
    """Longest path (hops, the student included): 1 = direct only, 2 = direct + one TA each."""
    paths: list[str] | None = None
    """Explicit paths instead of the enumeration, e.g. ``["0.9", "0.5 > 0.9"]``; each must end at the student."""
    max_concurrent_trials: int = Field(default=2, ge=1)
    """Tune trials run at once (>= 1)."""
    cpus_per_trial: float = Field(default=1.0, gt=0)
    """Logical CPUs each Tune trial reserves (> 0)."""
    early_stopping: bool = True
    """ASHA (Li et al. 2020) on the student's held-out perplexity."""
    grace_period: int = Field(default=1, ge=1)
    """Reports a trial makes before ASHA may stop it (>= 1)."""
    reduction_factor: int = Field(default=2, ge=2)
    """ASHA keeps about ``1 / reduction_factor`` of the trials at each rung (>= 2)."""
    max_failures: int = Field(default=0, ge=0)
    """Retries of a failed trial (>= 0; a failure is reported, never fatal to the search)."""

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


class LMScheduleConfig(Strict):
    """TA schedule search for a decoder LM: MiniDisc (one trial) against MaxiDisc (one trial per path)."""

    task: Literal["lm"] = "lm"
    """Selects this config in ``raykd tune``; the classifier search has ``task: classifier``."""
    run_name: str = "lm_schedule"
    """Name of the search (its Tune experiments are ``<run_name>-minidisc`` / ``-maxidisc``) and in the results JSON."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """How to reach Ray (the teacher and the Tune trials run on it)."""
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
