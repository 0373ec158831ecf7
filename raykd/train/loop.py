"""The per-worker training loop run by Ray Train's ``TorchTrainer``.

Each optimizer step takes ``grad_accum`` micro-batches from this worker's shard of the
soft-label dataset (``ray.train.get_dataset_shard``), counts their valid tokens, all-reduces the
count, and back-propagates ``loss_sum * W / N_global`` per micro-batch (DDP averages gradients
over the ``W`` workers). Every valid token then weighs ``1 / N_global``, so a step gives the same
gradient for any split over workers and accumulation steps (see :mod:`raykd.losses.objective`).

Checkpoints (model, optimizer, scheduler, step, loss history) are reported to Ray Train every
``checkpoint_every`` steps and at the end; a restarted run continues from the latest one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from raykd.losses import Objective, TeacherTargets
from raykd.losses.targets import retemper
from raykd.train.schedule import schedule_at
from raykd.students.vocab import VocabMap, map_ids, map_targets
from raykd.train.teachers import TeacherMix

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


def batch_to_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, TeacherTargets]:
    """Split a decoded soft-label batch into model inputs, labels, mask and teacher targets.

    Args:
        batch: ``input_ids`` / ``attention_mask`` / ``loss_mask`` ``[B, T]``, ``topk_ids`` /
            ``topk_logprobs`` ``[B, T, K]``, ``tail_logmass`` ``[B, T]``.

    Returns:
        ``(input_ids [B, T] long, attention_mask [B, T] long, labels [B, T] long (-100 where
        masked), loss_mask [B, T] bool, targets)``.
    """
    ids = batch["input_ids"].long()
    mask = batch["loss_mask"].bool()
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, :-1], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    targets = TeacherTargets.sparse(batch["topk_ids"].long(), batch["topk_logprobs"].float(), batch["tail_logmass"].float())
    return ids, batch["attention_mask"].long(), labels, mask, targets


def step_inputs(batch: dict[str, torch.Tensor], cached_temperature: float, temperature: float,
                mix: TeacherMix | None = None, vocab_table: torch.Tensor | None = None):
    """:func:`batch_to_inputs`, with the targets of several teachers mixed into one (``mix``),
    ids, labels and targets mapped into a compressed student vocabulary (``vocab_table``, see
    :mod:`raykd.students.vocab`), and the targets moved from the cache's temperature to the
    step's (:func:`~raykd.losses.targets.retemper`)."""
    ids, am, labels, mask, targets = batch_to_inputs(batch)
    if mix is not None:
        targets = mix(batch, mask)
    if vocab_table is not None:
        ids, labels, targets = map_ids(ids, vocab_table), map_ids(labels, vocab_table), map_targets(targets, vocab_table)
    return ids, am, labels, mask, retemper(targets, cached_temperature, temperature)


def objective_at(config: dict[str, Any], step: int) -> tuple[Objective, float]:
    """The objective and temperature of 0-based ``step``, from the schedule in ``config``
    (``phases``, ``weights``, ``terms``, ``loss_params``, ``temperature``, ``max_steps``)."""
    weights, tau = schedule_at(config.get("phases") or [], step, config["max_steps"], config["weights"],
                               config["temperature"], config.get("terms") or ())
    params = {n: p for n, p in (config.get("loss_params") or {}).items() if n in weights}
    return Objective(weights, params), tau


def _lr_lambda(warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def _autocast(mode: str, device: torch.device):
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _micro_batches(shard, per_worker: int, grad_accum: int, cfg: dict[str, Any], device):
    """Endless iterator over lists of ``grad_accum`` micro-batches (epochs repeat the shard)."""
    micro = per_worker // grad_accum
    epoch = 0
    while True:
        group = []
        kwargs = {"local_shuffle_buffer_size": 4 * micro, "local_shuffle_seed": cfg["seed"] + epoch} if cfg["shuffle"] else {}
        for batch in shard.iter_torch_batches(batch_size=micro, drop_last=True, device=device, **kwargs):
            group.append(batch)
            if len(group) == grad_accum:
                yield group
                group = []
        epoch += 1


def _load_student(config: dict[str, Any], rank: int):
    """The student to train: the initial weights, or the last checkpoint of a restarted run.

    Returns:
        ``(model, state, history, step)``; ``state`` (optimizer, scheduler, teacher mix) is None
        for a fresh run.
    """
    import ray.train
    from transformers import AutoModelForCausalLM

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return AutoModelForCausalLM.from_pretrained(config["student_path"], dtype=torch.float32), None, [], 0
    with checkpoint.as_directory() as d:  # resume: weights, optimizer, scheduler, step and loss history
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        history = json.loads((Path(d) / HISTORY_FILE).read_text())
    if rank == 0:
        print(f"[{config['run_label']}] resuming from checkpoint at step {state['step']}", flush=True)
    return model, state, history, state["step"]


def _backward_group(model, group, objective: Objective, tau: float, config: dict[str, Any], world: int,
                    n_global: float, device, mix: TeacherMix | None, vocab_table) -> dict[str, float]:
    """Forward and backward every micro-batch of one optimizer step; returns the term sums."""
    sums: dict[str, float] = {}
    for i, batch in enumerate(group):
        ids, am, labels, mask, targets = step_inputs(batch, config["temperature"], tau, mix, vocab_table)
        sync = nullcontext() if (world == 1 or i == len(group) - 1) else model.no_sync()
        with sync:
            with _autocast(config["autocast"], device):
                logits = model(input_ids=ids, attention_mask=am).logits
            out = objective(logits.float(), labels, mask, targets, tau)
            (out.loss_sum * world / n_global).backward()
        if mix is not None:
            mix.remember((ids, am, labels, mask), logits)
        for name, value in out.term_sums.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        sums["loss"] = sums.get("loss", 0.0) + float(out.loss_sum.detach())
    return sums


def _all_reduce(values: list[float], world: int, device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point.

    ``config`` keys: ``student_path`` (initial weights folder), ``weights`` / ``terms`` /
    ``loss_params`` (the objective), ``temperature`` (the cache's), the fields of
    :class:`raykd.config.TrainConfig` (``phases`` among them), and for several teachers
    ``combine`` / ``num_teachers`` / ``weight_temperature`` / ``policy_lr``.
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    threads = config["torch_threads"] or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size()))
    torch.set_num_threads(threads)
    torch.manual_seed(config["seed"])

    model, state, history, step = _load_student(config, rank)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    core = model.module if hasattr(model, "module") else model
    optim = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(config["warmup_steps"], config["max_steps"]))
    mix = None
    if config.get("combine"):
        mix = TeacherMix(config["combine"], config["num_teachers"], config["weight_temperature"], config["policy_lr"],
                         config["seed"] + rank)
    vmap = VocabMap.load(config["student_path"])
    vocab_table = vmap.to_compressed() if vmap is not None else None
    if state is not None:
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        if mix is not None and state.get("mix"):
            mix.load_state_dict(state["mix"])

    per_worker = config["batch_size"] // world
    groups = _micro_batches(ray.train.get_dataset_shard("train"), per_worker, config["grad_accum"], config, device)
    model.train()
    t_log, tok_log = time.perf_counter(), 0
    while step < config["max_steps"]:
        group = next(groups)
        n_local = sum(int(b["loss_mask"].sum()) for b in group)
        n_global = max(_all_reduce([float(n_local)], world, device)[0], 1.0)
        objective, tau = objective_at(config, step)
        sums = _backward_group(model, group, objective, tau, config, world, n_global, device, mix, vocab_table)
        if config["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["max_grad_norm"])
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        step += 1
        extra = mix.after_step(model) if mix is not None else {}
        tok_log += n_local

        totals = _all_reduce(list(sums.values()), world, device)
        row = {"step": step, **{k: v / n_global for k, v in zip(sums, totals)}, "lr": sched.get_last_lr()[0],
               "temperature": tau, **extra}
        history.append(row)
        last = step == config["max_steps"]
        if (step % config["log_every"] == 0 or last) and rank == 0:
            tok_s = tok_log * world / max(time.perf_counter() - t_log, 1e-9)
            terms = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("step", "lr", "temperature"))
            print(f"[{config['run_label']}] step {step}/{config['max_steps']} {terms} tok/s={tok_s:.0f}", flush=True)
        if step % config["log_every"] == 0 or last:
            t_log, tok_log = time.perf_counter(), 0
        if step % config["checkpoint_every"] == 0 or last:
            _report_checkpoint(core, {"optim": optim.state_dict(), "sched": sched.state_dict(), "step": step,
                                      "mix": mix.state_dict() if mix else None}, history, rank, row)
    ray.train.report({"step": step, "done": True})


def _report_checkpoint(core, state: dict[str, Any], history: list[dict], rank: int, metrics: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            core.save_pretrained(tmp)
            torch.save(state, Path(tmp) / STATE_FILE)
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
