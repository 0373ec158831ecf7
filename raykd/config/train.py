"""Ray Train settings, metrics tracking and evaluation (``train:``, ``tracking:``, ``eval:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raykd.config.base import Strict, check_custom_resources
from raykd.config.features import PhaseConfig


class TrainConfig(Strict):
    """Ray Train settings shared by every student of a run."""

    students: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "student_kd": {"forward_kl": 0.5, "ce": 0.5},
            "student_ce": {"ce": 1.0},
        }
    )
    """One student per entry: name -> objective as ``{loss name: weight}`` (a weighted sum of
    registry losses; see ``raykd methods``). Weight 0 logs a term without training on it."""
    loss_params: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Hyper-parameters of loss terms, e.g. ``{generalized_jsd: {beta: 0.9}}``."""
    phases: list[PhaseConfig] = Field(default_factory=list)
    """Schedule of the objective and temperature over training (empty: constant). Used by
    PD, Annealing-KD and Continuation-KD; see ``raykd methods``."""
    num_workers: int = Field(default=1, ge=0)
    """Ray Train workers (DDP over them). 0 is Ray Train's local mode: the same loop runs in the
    driver process, with no worker actors to start (fastest for small runs and tests) and no
    recovery from worker failures (``max_failures`` does not apply)."""
    use_gpu: bool = False
    """One GPU per Ray Train worker (refused before any work when the cluster has none; ignored with
    ``num_workers=0``, where the loop runs in the driver)."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """Logical CPUs Ray reserves per worker (leave room for Ray Data's read tasks)."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each worker reserves besides ``cpus_per_worker`` (and a GPU with
    ``use_gpu``), to place the workers on chosen nodes: ``{train_node: 1}`` runs them only on nodes
    started with ``ray start --resources='{"train_node": 4}'``. Not used with ``num_workers=0``
    (the loop runs in the driver)."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Torch intra-op threads per worker (None: the node's cores divided by the workers)."""
    shuffle: bool = True
    """Shuffle block order each epoch (a local shuffle buffer plus random block order)."""
    batch_size: int = Field(default=8, ge=1)
    """Global batch (sequences per optimizer step, summed over workers)."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (>= 1); each worker's share of ``batch_size`` is split into this
    many, so the step's batch stays ``batch_size``."""
    max_steps: int = Field(default=150, ge=1)
    """Optimizer steps to train (>= 1); a resumed run continues up to this step."""
    schedule_steps: int | None = Field(default=None, ge=1)
    """Steps the learning-rate schedule and ``phases`` span (None: ``max_steps``). A run that is
    trained in segments (a Tune trial evaluated between them, resumed by name each time) sets it
    to the whole budget, so stopping at ``max_steps`` does not end the schedule early."""
    target_k: int | None = Field(default=None, ge=1)
    """Train on the teacher's top ``target_k`` of the cached top-k only (the rest joins the tail
    bucket, exactly: :func:`raykd.losses.targets.truncate_topk`); None: all of them. Lets runs with
    several k read one cache labeled at the largest."""
    lr: float = Field(default=3e-4, gt=0)
    """Peak AdamW learning rate (> 0), reached after ``warmup_steps`` and decayed by a cosine to 0.1 of
    it at ``schedule_steps``."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay (>= 0; 0: none)."""
    warmup_steps: int = Field(default=10, ge=0)
    """Optimizer steps of linear learning-rate warm-up (>= 0; 0: start at ``lr``)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this (> 0) before each step; None: no clipping."""
    autocast: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """Mixed precision: ``auto`` uses bf16 autocast on GPU and none on CPU."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Optimizer steps between checkpoints (>= 1; the last step is always checkpointed). A resumed run
    restarts from the latest one."""
    log_every: int = Field(default=10, ge=1)
    """Optimizer steps between logged (and reported) metric lines (>= 1; the last step is always logged)."""
    seed: int = 0
    """Seed of torch (student initialisation, dropout, sampling), of the shuffle order and of the
    multi-teacher rules; the same seed and data give the same run."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker failures Ray Train recovers from (from the last checkpoint); -1: unlimited. Shipped
    at 0 on purpose: on one machine a worker fails mostly for a reason a restart repeats (out of
    memory, a bug, bad data), so the run stops at once with one ``error:`` line naming the worker's
    error and the last checkpoint's step, and the same command resumes from it. On a cluster with
    preemptible or flaky nodes set 1-3 (Ray Train counts node preemptions apart, without limit)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """``ddp``: each worker holds the whole student; ``fsdp``: parameters, gradients and optimizer
    state are sharded over the workers (FSDP2, :mod:`raykd.train.parallel`); with one worker FSDP
    has nothing to shard and runs as DDP (a warning)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (less memory, about a
    third more compute)."""
    loss_chunk_positions: int | None = Field(default=None, ge=0)
    """Positions per chunk of the loss (>= 1): the LM head and every logit term (the divergences
    and CE) run on this many valid positions at a time, gradients taken chunk by chunk
    (:mod:`raykd.losses.chunked`), so neither the logits ``[B, T, V]`` nor their log-softmax is
    ever held for a whole micro-batch: at V = 262,144 and T = 2,048 one KD step of a tiny student
    peaks at 1.4 GB of RSS with 256 positions per chunk instead of 8.7 GB, the same as a CE step
    (``benchmarks/results/chunked_loss.json``; a chunk of N holds about two fp32 ``[N, V]`` at once).
    Values and gradients equal the unchunked step's; feature terms run as before; an online
    teacher's dense targets are still its whole logits. None or 0: the whole micro-batch at
    once (the default; at the demo's shape both take the same time).
    Refused with ``strategy=fsdp`` on more than one worker (the sharded head is gathered only
    inside the model's forward) and with ``rl_kd`` (its teacher policy reads each micro-batch's
    whole logits); a student that transforms its logits after the head (logit soft-capping) is
    refused when training starts."""
    online_teacher: bool = False
    """The teacher runs inside every Train worker (frozen, no gradients) and gives dense targets
    ``[B, T, V]`` over its whole vocabulary; the soft-label cache then supplies only the blocks.
    For objectives a top-k cache cannot carry, e.g. GLMD's temperature-15 stage, where the top 32
    ids hold 0.2% of SmolLM2's mass (``benchmarks/results/glmd_temperature.json``). Costs a teacher
    forward per micro-batch and the teacher's memory in every worker."""
    checkpoint_format: Literal["full", "sharded"] = "full"
    """``full``: rank 0 gathers the whole student and its optimizer state into one Hugging Face
    folder per checkpoint. ``sharded``: every worker writes only its own shards with PyTorch
    Distributed Checkpoint (DCP), no gather and no single host holding the state; a run resumes
    from it on any number of workers and either strategy, and the last checkpoint is turned into
    a Hugging Face folder on the driver for evaluation and export. Needs ``num_workers >= 1``."""
    layer_map: list[tuple[int, int]] | None = None
    """The ``[student layer, teacher layer]`` pairs the feature terms match (0-based blocks,
    increasing on both sides). None: the stride the layer-dropped student was built from,
    student layer ``i`` <-> teacher layer ``student.keep_layers[i]``; a ``pretrained`` student has
    no stride and must give it. Checked against both models before any work starts."""
    feature_teacher: Literal["auto", "online", "cached"] = "auto"
    """Where the feature terms' teacher features come from. ``online``: the teacher runs in every
    Train worker (one no-grad forward per micro-batch). ``cached``: the teacher runs once over the
    train split's blocks into the keyed feature cache (only the blocks the terms read, fp16; a
    rerun asks it nothing) and the workers read it beside the soft labels. ``auto``: the faster
    of the two for the terms, as measured (each loss's ``measured_faster``, :class:`raykd.losses.LossSpec`)."""
    checkpoint_dir: str | None = None
    """Ray Train storage for checkpoints: a path or an ``s3://``/``gs://`` URI every node reaches
    (None: ``<output-dir>/ray_train``). Object storage needs ``num_workers >= 1`` (local mode
    checkpoints into a local folder)."""

    @property
    def total_steps(self) -> int:
        """Steps the schedule spans: ``schedule_steps``, or ``max_steps``."""
        return self.schedule_steps or self.max_steps

    @model_validator(mode="after")
    def _schedule_covers_training(self) -> TrainConfig:
        if self.schedule_steps is not None and self.schedule_steps < self.max_steps:
            raise ValueError(f"train.schedule_steps={self.schedule_steps} is below train.max_steps={self.max_steps}: "
                             "the schedule must span every step trained")
        return self

    @model_validator(mode="after")
    def _chunked_loss_needs_the_whole_head(self) -> TrainConfig:
        if self.loss_chunk_positions and self.strategy == "fsdp" and self.num_workers > 1:
            raise ValueError(f"train.loss_chunk_positions={self.loss_chunk_positions} runs the LM head outside the "
                             "model's forward, where FSDP keeps its weight sharded: use train.strategy=ddp, or set "
                             "train.loss_chunk_positions=null")
        return self

    @model_validator(mode="after")
    def _remote_checkpoints_need_workers(self) -> TrainConfig:
        if self.checkpoint_format == "sharded" and self.num_workers == 0:
            raise ValueError("train.checkpoint_format=sharded needs Ray Train workers (train.num_workers >= 1); "
                             "local mode (train.num_workers=0) writes full checkpoints")
        if self.checkpoint_dir and "://" in self.checkpoint_dir and not self.checkpoint_dir.startswith("file://") \
                and self.num_workers == 0:
            raise ValueError(f"train.checkpoint_dir={self.checkpoint_dir!r} is on object storage, which Ray Train's local "
                             "mode (train.num_workers=0) cannot write; set train.num_workers >= 1 or use a local folder")
        return self

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(v, "train.cpus_per_worker / train.use_gpu")

    @field_validator("phases")
    @classmethod
    def _phases_cover_training(cls, v: list[PhaseConfig]) -> list[PhaseConfig]:
        ends = [p.until for p in v]
        if v and (ends != sorted(set(ends)) or ends[-1] != 1.0):
            raise ValueError(f"train.phases must end at strictly increasing `until` shares, the last at 1.0; got {ends}")
        return v

    def phase_terms(self) -> set[str]:
        """Every loss name a phase of the schedule uses."""
        return {n for p in self.phases for n in (*(p.weights or {}), *(p.weights_end or {}))}

    def objective_terms(self) -> list[str]:
        """Every loss name any student or phase uses (the terms logged at every step)."""
        return sorted({n for w in self.students.values() for n in w} | self.phase_terms())


class TrackingConfig(Strict):
    """Where training metrics go besides the report (the ``mlflow`` extra: ``pip install raykd[tracking]``)."""

    mlflow_uri: str | None = None
    """MLflow tracking URI (``http://...``, ``sqlite:///...``, or ``file:///...`` for a local file
    store); every student's step metrics are logged there through Ray's MLflow integration, one
    MLflow run per student. None: no MLflow."""
    experiment: str = "raykd"
    """MLflow experiment name (created if missing)."""

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_installed(cls, v: str | None) -> str | None:
        import importlib.util

        if v is not None and importlib.util.find_spec("mlflow") is None:
            raise ValueError("tracking.mlflow_uri is set but MLflow is not installed: pip install 'raykd[tracking]'")
        return v


class EvalConfig(Strict):
    batch_size: int = Field(default=16, ge=1)
    """Sequences per forward pass of the held-out evaluation (>= 1; memory, not results)."""
