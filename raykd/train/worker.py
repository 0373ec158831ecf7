"""The per-worker training loop run by Ray Train's ``TorchTrainer`` for language-model students:
:func:`train_loop_per_worker` sets the worker up, resumes it from its checkpoint and runs its steps.

Each optimizer step takes ``grad_accum`` micro-batches from this worker's shard of the
soft-label dataset (``ray.train.get_dataset_shard``) and runs :func:`raykd.train.step.train_step`
(the step every student kind shares): the valid tokens are counted and all-reduced, and each
micro-batch back-propagates ``loss_sum * W / N_global`` (DDP averages gradients over the ``W``
workers). Every valid token then weighs ``1 / N_global``, so a step gives the same gradient for
any split over workers and accumulation steps (see :mod:`raykd.losses.objective`).

The loop's settings are one typed :class:`~raykd.train.loop.LoopConfig`. Every step's history
row holds ``data_s``, the time the step waited for its micro-batches (reading and decoding the
cache; with ``labels.fill=live`` also the wait for a part the teacher is still labeling).

Checkpoints (model, optimizer, scheduler, step, loss history, position in the data) are
reported to Ray Train every ``checkpoint_every`` steps and at the end. A run restarted after a
worker failure (``train.max_failures``, Ray Train's ``FailureConfig``) or rerun under the same
name continues from the latest one: the history keeps the checkpoint's steps and appends the
steps trained after it, so steps that ran between the checkpoint and the failure appear once,
as retrained; the data resumes at the checkpoint's group of micro-batches, so with one worker
the resumed timeline trains exactly as a run that never failed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from raykd.losses import TeacherTargets
from raykd.students.vocab import VocabMap
from raykd.train.cross_tokenizer import TokenizerAlignment
from raykd.train.features import FeatureTerms
from raykd.train.loop import (
    HISTORY_FILE,
    RESUMES_FILE,
    STATE_FILE,
    LoopConfig,
    all_reduce_sum,
    autocast_for,
    micro_batch_groups,
    online_teacher,
    student_batch,
)
from raykd.train.on_policy import OnPolicySampler, served_score
from raykd.train.parallel import (
    SHARDED_DIR,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    load_sharded,
    prepare_student,
    save_sharded,
    unwrapped,
)
from raykd.train.step import StudentBatch, build_optimizer, check_head_input, run_steps
from raykd.train.teachers import TeacherMix

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``config`` is a :class:`LoopConfig` as a dict.

    Three parts: the setup (the student at its checkpoint, its optimizer and each feature's
    helper), the resume (the helpers' and the data's state from the checkpoint) and the steps."""
    worker = _setup(LoopConfig.model_validate(config))
    worker.steps()


@dataclass
class _Worker:
    """One worker's run: the student, its optimizer and scheduler, where it stands (step, history,
    data position, restarts) and each method feature's helper (None when the run has not that feature)."""

    cfg: LoopConfig
    world: int
    rank: int
    device: torch.device
    model: torch.nn.Module
    optim: torch.optim.Optimizer
    sched: Any
    history: list[dict[str, Any]]
    step: int
    position: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "group": 0})
    """Where the data stands (:func:`~raykd.train.loop.micro_batch_groups`)."""
    resumed_from: list[int] = field(default_factory=list)
    mix: TeacherMix | None = None
    features: FeatureTerms | None = None
    teacher: Callable[[StudentBatch], TeacherTargets] | None = None
    sampler: Any = None
    tracker: Any = None
    to_student: Callable[[dict[str, torch.Tensor], float], StudentBatch] | None = None
    clock: dict[str, float] = field(default_factory=dict)
    """Step timing: the data wait, the update, tokens per second between log lines."""
    raw: Any = None
    """The shard's groups of decoded micro-batches (set when the steps start)."""

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's ``state``: the data position, the restarts and the
        helpers' state (teacher mix, feature projections, on-policy sampler)."""
        # checkpoints older than the data field held one group per step from epoch 0
        self.position = dict(state.get("data") or {"epoch": 0, "group": self.step})
        self.resumed_from = [*state.get("resumed_from", []), self.step]
        for helper, key in ((self.mix, "mix"), (self.features, "features"), (self.sampler, "on_policy")):
            if helper is not None and state.get(key):
                helper.load_state_dict(state[key])

    def steps(self) -> None:
        """Train from the step it stands at to ``train.max_steps``."""
        import ray.train

        train = self.cfg.train
        self.raw = micro_batch_groups(ray.train.get_dataset_shard("train"), train.batch_size // self.world, train,
                                  self.device, self.position)
        self.clock = {"t": time.perf_counter(), "positions": 0.0, "data_s": 0.0, "ready": 0.0}
        mix = self.mix
        remember = None  # only a learned teacher choice (rl_kd) reads the student's logits
        if mix is not None and mix.policy is not None:
            remember = lambda b, logits: mix.remember(  # noqa: E731
                (b.inputs["input_ids"], b.inputs["attention_mask"], b.labels, b.mask), logits)
        run_steps(self.model, self.optim, self.next_group, partial(self.cfg.objective_at, features=self.features),
                  max_steps=train.max_steps, start=self.step, on_step=self.on_step, scheduler=self.sched,
                  max_grad_norm=train.max_grad_norm, world=self.world,
                  all_reduce=partial(all_reduce_sum, world=self.world, device=self.device),
                  autocast=partial(autocast_for, train.autocast, self.device), teacher=self.teacher,
                  feature_teacher=self.features.teacher if self.features is not None else None,
                  chunk_positions=train.loss_chunk_positions, on_logits=remember)
        if self.tracker is not None:
            self.tracker.end_run()

    def next_group(self, tau: float) -> list[StudentBatch]:
        """The step's micro-batches, decoded for its temperature (``data_s``: the wait for them)."""
        start = time.perf_counter()
        batches = next(self.raw)
        group = [self.to_student(b, tau) for b in batches]
        if self.features is not None:  # cached teacher features ride on the rows (``f.*`` columns)
            group = [self.features.attach(sb, b) for sb, b in zip(group, batches, strict=True)]
        self.clock["data_s"] = time.perf_counter() - start
        if self.sampler is not None:
            group = self.sampler(group, tau)
        self.clock["ready"] = time.perf_counter()
        return group

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After each step: the history row, the log line, MLflow, and a checkpoint or a metrics report."""
        import ray.train

        train, clock = self.cfg.train, self.clock
        if self.features is not None:
            self.features.step(step, metrics)
        extra = self.mix.after_step(self.model) if self.mix is not None else {}
        if self.sampler is not None:  # the step's time split (the update: from the group being ready to here)
            extra.update(self.sampler.last, data_s=clock["data_s"], update_s=time.perf_counter() - clock["ready"])
        positions = metrics.pop("positions")
        row = {"step": step, **metrics, "lr": self.sched.get_last_lr()[0], "data_s": clock["data_s"], **extra}
        self.history.append(row)
        clock["positions"] += positions
        last = step == train.max_steps
        if step % train.log_every == 0 or last:
            self._log(step, row)
        if self.tracker is not None:
            self.tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
        if step % train.checkpoint_every == 0 or last:
            self._checkpoint(step, row)
        elif step % train.log_every == 0:  # metrics only (every worker reports: Ray Train counts reports)
            ray.train.report(row)

    def _log(self, step: int, row: dict[str, float]) -> None:
        clock = self.clock
        if self.rank == 0:
            tok_s = clock["positions"] / max(time.perf_counter() - clock["t"], 1e-9)
            terms = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("step", "lr", "temperature"))
            log.info("[%s] step %d/%d %s tok/s=%.0f", self.cfg.run_label, step, self.cfg.train.max_steps, terms, tok_s)
        clock["t"], clock["positions"] = time.perf_counter(), 0.0

    def _checkpoint(self, step: int, row: dict[str, float]) -> None:
        """Report ``row`` with a checkpoint of the student, optimizer, scheduler, data position and helpers."""
        state = {"sched": self.sched.state_dict(), "step": step, "mix": self.mix.state_dict() if self.mix else None,
                 "data": dict(self.position), "resumed_from": self.resumed_from,
                 "on_policy": self.sampler.state_dict() if self.sampler is not None else None,
                 "features": self.features.state_dict() if self.features is not None else None}
        if self.cfg.train.checkpoint_format == "sharded":
            _report_sharded(self.model, self.optim, state, self.history, self.rank, row)
        else:
            _report_checkpoint(unwrapped(self.model), full_model_state(self.model),
                               {"optim": full_optimizer_state(self.model, self.optim), **state}, self.history,
                               self.rank, row, self.cfg.checkpoint_root)


def _setup(cfg: LoopConfig) -> _Worker:
    """The worker's student at its checkpoint (or initial weights), its optimizer and each feature's
    helper, in the order their random initialisations draw from the seeded torch generator."""
    import ray.train
    import ray.train.torch

    train = cfg.train
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    torch.set_num_threads(train.torch_threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    torch.manual_seed(train.seed)
    device = ray.train.torch.get_device()
    model, optim, sched, state, history, step = _student(cfg, rank, world, device)
    core = unwrapped(model)
    if train.loss_chunk_positions:
        check_head_input(core)
    w = _Worker(cfg, world, rank, device, model, optim, sched, history, step)
    w.mix = TeacherMix(cfg.combine, cfg.num_teachers, cfg.weight_temperature, cfg.policy_lr, train.seed + rank) \
        if cfg.combine else None
    vmap = VocabMap.load(cfg.student_path)
    vocab_table = vmap.to_compressed() if vmap is not None else None
    w.tracker = _mlflow(cfg, rank)
    sharded = train.strategy == "fsdp" and world > 1
    w.features = FeatureTerms.for_run(cfg.layer_map, cfg.terms, core, device, teacher_path=cfg.feature_teacher,
                                      layout=cfg.feature_layout, shapes=cfg.feature_shapes,
                                      dense_logits=bool(cfg.online_teacher), lr=train.lr, params=cfg.loss_params,
                                      total_steps=train.total_steps)
    w.teacher = online_teacher(cfg.online_teacher, device, world if sharded else 1) \
        if cfg.online_teacher and (w.features is None or w.features.teacher is None) else None
    w.sampler = _on_policy_sampler(cfg, core, rank)
    w.to_student = _to_student(cfg, w.mix, vocab_table)
    if state is not None:
        w.resume(state)
    return w


def _student(cfg: LoopConfig, rank: int, world: int, device: torch.device):
    """The student prepared for the strategy (DDP or FSDP) with its optimizer and scheduler, at the
    last checkpoint's weights and optimizer state when the run restarts.

    Returns:
        ``(model, optimizer, scheduler, state, history, step)`` (:func:`_load_student`).
    """
    train = cfg.train
    with ExitStack() as stack:  # a sharded checkpoint's folder stays available until its state is loaded
        model, state, history, step, sharded_from = _load_student(cfg, rank, stack)
        bf16 = train.autocast == "bf16" or (train.autocast == "auto" and device.type == "cuda")
        model = prepare_student(model, train.strategy, world, device, bf16=bf16,
                                gradient_checkpointing=train.gradient_checkpointing)
        optim, sched = build_optimizer(list(model.parameters()), lr=train.lr, weight_decay=train.weight_decay,
                                       schedule="cosine", warmup=train.warmup_steps, total=train.total_steps)
        if sharded_from is not None:
            load_sharded(model, optim, sharded_from)
        elif state is not None:
            load_optimizer_state(model, optim, state["optim"])
    if state is not None:
        sched.load_state_dict(state["sched"])
    return model, optim, sched, state, history, step


def _to_student(cfg: LoopConfig, mix: TeacherMix | None, vocab_table: torch.Tensor | None):
    """A decoded cache batch and the step's temperature -> the student's micro-batch: re-tokenised
    and aligned for a student of another tokenizer, else :func:`student_batch`."""
    if cfg.teacher_tokenizer is not None:
        aligner = TokenizerAlignment(cfg.teacher_tokenizer, cfg.student_path)
        return lambda b, tau: aligner.student_batch(b, cfg.temperature, tau)
    return lambda b, tau: student_batch(b, cfg.temperature, tau, mix, vocab_table, cfg.train.target_k)


def _load_student(cfg: LoopConfig, rank: int, stack: ExitStack):
    """The student to train: the initial weights, or the last checkpoint of a restarted run.

    Returns:
        ``(model, state, history, step, sharded)``; ``state`` (optimizer, scheduler, teacher mix,
        data position, ``resumed_from``) is None for a fresh run. ``sharded`` is the DCP folder of
        a sharded checkpoint (kept available until ``stack`` closes): the model then holds the
        initial weights, and the checkpoint's weights and optimizer state are loaded after the
        model is prepared (:func:`raykd.train.parallel.load_sharded`).
    """
    import ray.train
    from transformers import AutoModelForCausalLM

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.checkpoint_root is not None:  # local mode keeps its checkpoints itself
        found = checkpoint_folders(Path(cfg.checkpoint_root))
        checkpoint = ray.train.Checkpoint.from_directory(found[-1]) if found else None
    if checkpoint is None:
        return AutoModelForCausalLM.from_pretrained(cfg.student_path, dtype=torch.float32), None, [], 0, None
    d = Path(stack.enter_context(checkpoint.as_directory()))  # resume: weights, optimizer, scheduler, step, history
    sharded = d / SHARDED_DIR if (d / SHARDED_DIR).is_dir() else None
    model = AutoModelForCausalLM.from_pretrained(cfg.student_path if sharded else d, dtype=torch.float32)
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)
    history = json.loads((d / HISTORY_FILE).read_text())
    if rank == 0:
        log.info("[%s] resuming from %s checkpoint at step %d", cfg.run_label, "sharded" if sharded else "full",
                 state["step"])
    return model, state, history, state["step"], sharded


def _on_policy_sampler(cfg: LoopConfig, core, rank: int):
    """The on-policy sampler of ``cfg.on_policy`` calling the served teacher, or None."""
    if cfg.on_policy is None:
        return None
    if cfg.teacher_app is None:
        raise ValueError("on_policy training needs the running teacher's application name (teacher_app)")
    score = served_score(cfg.teacher_app, cfg.teacher_k, cfg.temperature)
    return OnPolicySampler(cfg.on_policy, core, score, cached_temperature=cfg.temperature, seed=cfg.train.seed, rank=rank)


def _mlflow(cfg: LoopConfig, rank: int):
    """Ray's MLflow integration on rank 0 (``ray.air.integrations.mlflow.setup_mlflow``), or None."""
    if cfg.mlflow_uri is None or rank != 0:
        return None
    from ray.air.integrations.mlflow import setup_mlflow

    if cfg.mlflow_uri.startswith("file:"):  # a file store asked for by name (MLflow 3 wants an explicit opt-in)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return setup_mlflow(config={"weights": cfg.weights, **cfg.train.model_dump(include={"lr", "batch_size", "max_steps"})},
                        tracking_uri=cfg.mlflow_uri, experiment_name=cfg.mlflow_experiment, run_name=cfg.run_label,
                        rank_zero_only=True, create_experiment_if_not_exists=True)


def checkpoint_folders(root: Path) -> list[Path]:
    """The checkpoints under a local-mode run's folder (``train.num_workers=0``), oldest first.

    Local mode's own (``checkpoint_000008``) and those Ray Train wrote for an earlier run of the
    same name on workers (``checkpoint_<date>_<time>``) alike, ordered by when their training
    state was saved; not Ray Train's ``checkpoint_manager_snapshot.json`` beside them, nor a
    folder whose save did not finish (no state file)."""
    found = [p for p in root.glob("checkpoint_*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: ((p / STATE_FILE).stat().st_mtime_ns, p.name))


def _save(core, weights: dict[str, torch.Tensor], state: dict[str, Any], history: list[dict], folder: Path) -> None:
    core.save_pretrained(folder, state_dict=weights)
    torch.save(state, folder / STATE_FILE)
    (folder / HISTORY_FILE).write_text(json.dumps(history))
    (folder / RESUMES_FILE).write_text(json.dumps(state.get("resumed_from", [])))


def _report_sharded(model, optim, state: dict[str, Any], history: list[dict], rank: int, metrics: dict) -> None:
    """Report ``metrics`` with a sharded checkpoint: every worker writes its DCP shards into its
    own folder and reports it (Ray Train merges them); rank 0 adds the model config, the
    scheduler/data state and the history."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_sharded(model, optim, Path(tmp) / SHARDED_DIR)
        if rank == 0:
            unwrapped(model).config.save_pretrained(tmp)
            torch.save(state, Path(tmp) / STATE_FILE)
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
            (Path(tmp) / RESUMES_FILE).write_text(json.dumps(state.get("resumed_from", [])))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _report_checkpoint(core, weights: dict[str, torch.Tensor], state: dict[str, Any], history: list[dict], rank: int,
                       metrics: dict, checkpoint_root: str | None = None) -> None:
    """Report ``metrics`` with a checkpoint (the whole ``weights``, optimizer state, history) from rank 0.

    Ray Train persists the reported folder into the run's storage; in local mode
    (``checkpoint_root`` set) the folder itself is the persistent checkpoint.
    """
    import shutil

    import ray.train

    if checkpoint_root is not None:
        root = Path(checkpoint_root)
        folder = root / f"checkpoint_{state['step']:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        _save(core, weights, state, history, folder)
        for old in [p for p in checkpoint_folders(root) if p.name[len("checkpoint_"):].isdigit()][:-2]:
            shutil.rmtree(old, ignore_errors=True)  # local mode's own, never a folder Ray Train wrote
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            _save(core, weights, state, history, Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
