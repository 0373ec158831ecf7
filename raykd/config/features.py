"""Settings of the method features a run may add: phases, extra teachers, cached generations, on-policy distillation, teacher-assistant chains and agnostic stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raykd.config.base import Strict


class PhaseConfig(Strict):
    """One phase of a training schedule (schedules are data; :func:`raykd.train.schedule.schedule_at`
    applies them). A phase runs from the end of the previous one (or step 0) to ``until``."""

    until: float = Field(gt=0, le=1)
    """Share of ``train.max_steps`` at which the phase ends; the last phase must end at 1."""
    weights: dict[str, float] | None = None
    """Objective ``{loss name: weight}`` during the phase (None: each student's own)."""
    weights_end: dict[str, float] | None = None
    """If given, the weights move linearly from ``weights`` to these over the phase."""
    temperature: float | None = Field(default=None, gt=0, le=100)
    """Distillation temperature at the start of the phase (None: ``labels.temperature``)."""
    temperature_end: float | None = Field(default=None, gt=0, le=100)
    """If given, the temperature moves linearly to this by the end of the phase."""

    @model_validator(mode="after")
    def _ends_need_starts(self) -> PhaseConfig:
        if self.weights_end is not None and self.weights is None:
            raise ValueError("weights_end needs weights (the start of the interpolation)")
        if self.temperature_end is not None and self.temperature is None:
            raise ValueError("temperature_end needs temperature (the start of the interpolation)")
        return self


class MultiTeacherConfig(Strict):
    """Settings of the multi-teacher methods (the method decides how teachers are combined)."""

    weight_temperature: float = Field(default=1.0, gt=0, le=100)
    """Softness of per-example teacher weights (``mt_bert``, ``uncertainty``):
    ``softmax(score / weight_temperature)`` over teachers."""
    policy_lr: float = Field(default=0.05, gt=0, le=10)
    """Learning rate of the teacher-selection policy (``rl_kd``)."""


class GenerationConfig(Strict):
    """Teacher generations that replace the training text (sequence-level KD, Kim & Rush 2016).

    Each training document's first ``prompt_tokens`` tokens are the prompt; the teacher's
    continuation (from ``generate``) follows it, and the prompt + continuation is the student's
    training text (labeled by the teacher like any text, so word-level terms work too)."""

    prompt_tokens: int = Field(default=32, ge=1, le=4096)
    """Tokens of each document given to the teacher as the prompt."""
    max_new_tokens: int = Field(default=96, ge=1, le=4096)
    """Tokens the teacher generates per document (at most; it may stop at EOS)."""
    temperature: float = Field(default=0.0, ge=0, le=10)
    """0: greedy decoding (the mode approximation of Kim & Rush); > 0: sampling."""
    seed: int = 0
    """Sampling seed (with ``temperature > 0``)."""
    batch_size: int = Field(default=8, ge=1)
    """Prompts per teacher ``generate`` call."""


class OnPolicyConfig(Strict):
    """On-policy distillation: the student samples continuations itself and the served teacher
    scores them during training (GKD, Agarwal et al. 2024; DistiLLM, Ko et al. 2024; MiniLLM,
    Gu et al. 2023; see :mod:`raykd.train.on_policy`).

    Each optimizer step is on-policy with probability ``on_policy_share``: its micro-batches are
    then the student's own samples (prompt = the first ``prompt_tokens`` tokens of each cached
    block, continued by ``max_new_tokens`` tokens from the student's ``generate``), scored by the
    running teacher (top-``labels.k`` + tail, at ``labels.temperature``), and the loss runs on
    the sampled positions only. Other steps train on the cache as an off-policy run does."""

    on_policy_share: float = Field(default=0.5, ge=0.0, le=1.0)
    """Share of on-policy steps (GKD's lambda; 0: off-policy only, 1: on-policy only)."""
    prompt_tokens: int = Field(default=32, ge=1, le=4096)
    """Tokens of each cached block used as the prompt (a shorter block is its own prompt)."""
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    """Tokens the student samples per prompt (``prompt_tokens + max_new_tokens`` must fit the
    teacher's and the student's context)."""
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    """Student sampling temperature (GKD's student temperature); 0 is greedy decoding."""
    stop_at_eos: bool = True
    """End a sample at the student's EOS (later positions are masked). ``false`` samples all
    ``max_new_tokens``, so every sample has the same length (MiniLLM's length-normalised form)."""
    teacher_batch: int = Field(default=4, ge=1)
    """Sequences per teacher ``score`` call; a step's calls are all sent before the first answer
    is awaited (several in flight)."""
    replay_size: int = Field(default=0, ge=0)
    """DistiLLM's replay buffer: the student samples (with their teacher targets) kept, the
    oldest dropped first (0: no buffer)."""
    replay_share: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of on-policy steps that reuse samples drawn from the replay buffer (no sampling and
    no teacher call) once it holds a step's worth; needs ``replay_size``."""

    @model_validator(mode="after")
    def _replay(self) -> OnPolicyConfig:
        if self.replay_share > 0 and self.replay_size == 0:
            raise ValueError(f"on_policy.replay_share={self.replay_share} needs a replay buffer: set "
                             "on_policy.replay_size (samples kept), or replay_share=0")
        return self


class AssistantConfig(Strict):
    """One teacher assistant of a TAKD / DGKD chain (a layer-dropped copy of the teacher)."""

    keep_layers: list[int]
    """Teacher layers the assistant keeps (more than the student, fewer than the teacher)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Training steps of this assistant (None: ``train.max_steps``)."""


class ChainConfig(Strict):
    """The teacher assistants between the teacher and the student, in order (largest first)."""

    assistants: list[AssistantConfig] = Field(min_length=1)
    """The assistants, largest first (at least one); each is trained from the one before it."""


class AgnosticStageConfig(Strict):
    """A task-agnostic distillation stage run before the main job's (task) stage, as GLMD's seed
    runs it (Tan et al. 2023: distillation temperature 15, then 1 in the task stage). The stage
    trains the student on the same blocks; the task stage starts from its weights."""

    steps: int = Field(ge=1)
    """Optimizer steps of the stage (the task stage keeps ``train.max_steps``)."""
    temperature: float = Field(default=15.0, gt=0, le=100)
    """Distillation temperature of the stage."""
    teacher: Literal["online", "cache"] = "online"
    """``online``: the teacher runs in the Train workers and gives dense targets (the default: at
    temperature 15 the top-32 cache's buckets give a loss gradient with cosine 0.10 to the dense
    one, ``benchmarks/results/glmd_temperature.json``); ``cache``: the top-k cache re-tempered."""
