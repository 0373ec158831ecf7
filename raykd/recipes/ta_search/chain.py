"""Distillation through a teacher assistant on a classification task (no Ray).

The building blocks MiniDisc and MaxiDisc share, so both searches train TAs and students the
same way with the same budget:

- :func:`kd_loss`: ``kd_weight * forward_kl + ce_weight * ce`` from the loss registry, on class
  logits ``[B, C]`` (seen as one position, ``[B, 1, C]``).
- :func:`distill_phase`: a few AdamW steps of a student against a teacher's logits (cached or
  computed online).
- :func:`prune_to`: a teacher (or TA) pruned to a sparsity relative to the original teacher.
- :func:`distill_chain`: teacher -> TA -> student (Mirzadeh et al. 2020, "Improved Knowledge
  Distillation via Teacher Assistant"), with a callback for Tune reports.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raykd.losses.kd import ce, forward_kl
from raykd.losses.targets import TeacherTargets
from raykd.recipes.ta_search.config import KDConfig, SparsifyConfig
from raykd.students.build import count_parameters, layer_drop
from raykd.students.sparsify import Masks, densify, masks_for_sparsity, prunable_params, taylor_importance, unit_params

ClassData = dict[str, np.ndarray]
"""``input_ids`` / ``attention_mask`` [N, T], ``label`` [N], ``teacher_logits`` [N, C]."""


def kd_loss(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, kd: KDConfig) -> Tensor:
    """Mean over the batch of ``kd_weight * forward_kl + ce_weight * ce``.

    Args:
        student_logits: [B, C]; teacher_logits: [B, C] raw (temperature not applied) or None
            when ``kd_weight`` is 0; labels: [B] gold class ids.
    """
    total = student_logits.new_zeros(())
    if kd.kd_weight:
        targets = TeacherTargets.dense(teacher_logits[:, None, :].float())
        total = total + kd.kd_weight * forward_kl(student_logits[:, None, :], targets=targets, labels=labels[:, None], temperature=kd.temperature).mean()
    if kd.ce_weight:
        total = total + kd.ce_weight * ce(student_logits[:, None, :], targets=None, labels=labels[:, None], temperature=1.0).mean()
    return total


def batch_of(data: ClassData, idx: np.ndarray, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Tensors of rows ``idx`` on ``device``: ``input_ids``, ``attention_mask`` [B, T]; ``label`` [B]; ``teacher_logits`` [B, C]."""
    keys = ("input_ids", "attention_mask", "label", "teacher_logits")
    return {k: torch.as_tensor(data[k][idx]).to(device) for k in keys if k in data}


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


def batches(data: ClassData, batch_size: int, steps: int, seed: int, device: torch.device | str = "cpu"):
    """``steps`` random batches (epochs of a seeded permutation) on ``device``."""
    rng = np.random.default_rng(seed)
    n, order = len(data["label"]), np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:batch_size], order[batch_size:]
        yield batch_of(data, idx, device)


def logits_of(model: nn.Module, b: dict[str, Tensor]) -> Tensor:
    """Class logits [B, C] of a model on a batch."""
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


@torch.no_grad()
def accuracy(model: nn.Module, data: ClassData, batch_size: int = 50) -> float:
    """Share of rows whose arg-max class equals the gold label."""
    model.eval()
    correct = 0
    for s in range(0, len(data["label"]), batch_size):
        b = batch_of(data, np.arange(s, min(s + batch_size, len(data["label"]))), device_of(model))
        correct += int((logits_of(model, b).argmax(-1) == b["label"]).sum())
    return correct / max(len(data["label"]), 1)


def trainable_parameters(model: nn.Module, freeze_embeddings: bool) -> list[nn.Parameter]:
    """Parameters to optimise (word embeddings left out when frozen)."""
    frozen = set()
    if freeze_embeddings:
        frozen = {id(p) for p in model.get_input_embeddings().parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]


def distill_phase(
    student: nn.Module,
    teacher: Callable[[dict[str, Tensor]], Tensor] | None,
    data: ClassData,
    kd: KDConfig,
    *,
    steps: int | None = None,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``student`` on ``data`` against ``teacher`` logits with AdamW (constant lr).

    Args:
        student: model to train (changed in place).
        teacher: batch -> teacher logits [B, C]; None uses the cached ``teacher_logits``.
        data: train rows. kd: budget and loss weights. steps: default ``kd.steps``.
        on_step: called with the 1-based step after each update (evaluation, reports).

    Returns:
        The loss of every step.
    """
    params = trainable_parameters(student, kd.freeze_embeddings)
    opt = torch.optim.AdamW(params, lr=kd.lr, weight_decay=0.0)
    losses = []
    for step, b in enumerate(batches(data, kd.batch_size, steps or kd.steps, seed, device_of(student)), start=1):
        target = b.get("teacher_logits")
        if teacher is not None:
            with torch.no_grad():
                target = teacher(b)
        student.train()
        loss = kd_loss(logits_of(student, b), target, b["label"], kd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
    student.eval()
    return losses


def importance_of(model: nn.Module, data: ClassData, kd: KDConfig, n_batches: int) -> Masks:
    """Taylor importance of ``model``'s units for the KD loss against the cached teacher logits."""
    return taylor_importance(
        model,
        batches(data, kd.batch_size, n_batches, seed=kd.seed + 101, device=device_of(model)),
        lambda m, b: kd_loss(logits_of(m, b), b["teacher_logits"], b["label"], kd),
    )


def prune_to(model: nn.Module, sparsity: float, base_prunable: int, importance: Masks) -> nn.Module:
    """Densified copy of ``model`` with ``sparsity`` of the *original teacher's* prunable params removed.

    ``model`` may already be pruned (a TA); the share still to remove is taken from what it has.

    Raises:
        ValueError: ``model`` already has fewer parameters than ``sparsity`` asks for.
    """
    have = prunable_params(model)
    to_remove = sparsity * base_prunable - (base_prunable - have)
    if to_remove < -0.5 * unit_params(model)[0]:
        raise ValueError(f"cannot prune to sparsity {sparsity}: the model is already sparser ({1 - have / base_prunable:.3f})")
    relative = min(max(to_remove / max(have, 1), 0.0), 1.0)
    return densify(model, masks_for_sparsity(importance, relative, *unit_params(model)))


@dataclass
class ChainResult:
    """What one teacher -> TA -> student chain measured (accuracies are shares in [0, 1])."""

    ta_sparsity: float
    ta_params: int
    ta_dev_acc: float
    student_params: int
    student_dev_acc: float
    student_test_acc: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def make_student(source: nn.Module, target: float, base_prunable: int, train: ClassData, kd: KDConfig, sp: SparsifyConfig) -> nn.Module:
    """The student built from its teacher (or TA): pruned to ``target`` or layer-dropped."""
    if sp.student_kind == "layer_drop":
        return layer_drop(source, sp.keep_layers)
    return prune_to(source, target, base_prunable, importance_of(source, train, kd, sp.importance_batches))


def distill_chain(
    teacher: nn.Module,
    ta_sparsity: float,
    teacher_importance: Masks,
    splits: dict[str, ClassData],
    kd: KDConfig,
    sp: SparsifyConfig,
    *,
    report: Callable[[dict[str, Any]], None] | None = None,
    ta: nn.Module | None = None,
) -> ChainResult:
    """Teacher -> TA (at ``ta_sparsity``) -> student (at ``sp.target``), on the same budget each hop.

    The TA is the teacher pruned to ``ta_sparsity`` and distilled from the teacher's cached
    logits; the student is the TA pruned further (or layer-dropped) and distilled from the TA
    online. ``ta_sparsity = 0`` is the direct baseline (teacher -> student).

    Args:
        teacher: the dense classification teacher (not changed).
        ta_sparsity: TA sparsity in [0, target).
        teacher_importance: the teacher's unit scores (:func:`importance_of`).
        splits: ``train`` / ``dev`` / ``test`` rows with the teacher's cached logits.
        kd: phase budget; sp: grid and target.
        report: called ``kd.reports`` times during the TA -> student phase with
            ``student_dev_acc`` (and the TA's numbers); the last call adds ``student_test_acc``.
        ta: an already trained TA to start from (skips the teacher -> TA phase).

    Raises:
        ValueError: ``ta_sparsity`` not below the target.
    """
    if not 0 <= ta_sparsity < sp.target:
        raise ValueError(f"TA sparsity {ta_sparsity} must lie in [0, target={sp.target})")
    torch.manual_seed(kd.seed)
    base = prunable_params(teacher)
    train, dev = splits["train"], splits["dev"]
    if ta is None and ta_sparsity > 0:
        ta = densify(teacher, masks_for_sparsity(teacher_importance, ta_sparsity, *unit_params(teacher)))
        distill_phase(ta, None, train, kd, seed=kd.seed)
    source = ta if ta is not None else teacher
    ta_acc = accuracy(source, dev, kd.eval_batch_size)
    if ta is None:  # direct: the student comes from the teacher and learns from its cached logits
        student = densify(teacher, masks_for_sparsity(teacher_importance, sp.target, *unit_params(teacher))) if sp.student_kind == "sparse" else layer_drop(teacher, sp.keep_layers)
        online = None
    else:
        student = make_student(copy.deepcopy(source), sp.target, base, train, kd, sp)
        online = lambda b: logits_of(source, b)  # noqa: E731
    every = max(1, math.ceil(kd.steps / kd.reports))
    result = ChainResult(ta_sparsity, count_parameters(source), ta_acc, count_parameters(student), float("nan"), float("nan"))

    def on_step(step: int) -> None:
        if step % every and step != kd.steps:
            return
        result.student_dev_acc = accuracy(student, dev, kd.eval_batch_size)
        if step == kd.steps:
            result.student_test_acc = accuracy(student, splits["test"], kd.eval_batch_size)
        if report is not None:
            report({**result.as_dict(), "step": step})

    distill_phase(student, online, train, kd, seed=kd.seed + 1, on_step=on_step)
    return result
