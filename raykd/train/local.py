"""Classification students trained in-process (inside a Tune trial, or once for a teacher).

Teacher assistants, MiniDisc's sandwich student and the fine-tuned classification teacher train
through the same :class:`~raykd.losses.Objective` and the same step loop
(:func:`raykd.train.step.run_steps`) as the language-model students on Ray Train. A classifier
has one position per sequence: its class logits ``[B, C]`` are read as ``[B, 1, C]``
(:func:`~raykd.train.step.classifier_logits`), its gold class is the label ``[B, 1]``, and a
teacher's class logits are dense targets ``[B, 1, C]``. A mean over the batch is then the
Objective's sum divided by the batch's valid positions, as for tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from raykd.losses import Objective, TeacherTargets
from raykd.train.step import StudentBatch, build_optimizer, classifier_logits, objective_loss, run_steps

ClassData = dict[str, np.ndarray]
"""``input_ids`` / ``attention_mask`` [N, T], ``label`` [N], optionally ``teacher_logits`` [N, C]."""

TeacherFn = Callable[[StudentBatch], Tensor]
"""A batch -> the teacher's class logits ``[B, C]`` (an online teacher)."""


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


def class_batch(data: ClassData, idx: np.ndarray, device: torch.device | str = "cpu") -> StudentBatch:
    """Rows ``idx`` as a :class:`~raykd.train.step.StudentBatch` of one position per row.

    Returns:
        ``inputs`` ``input_ids`` / ``attention_mask`` [B, T]; ``labels`` [B, 1] (-100 for an
        unknown class, masked out); ``targets`` dense ``[B, 1, C]`` from the cached
        ``teacher_logits`` when present.
    """
    inputs = {k: torch.as_tensor(data[k][idx]).to(device) for k in ("input_ids", "attention_mask")}
    labels = torch.as_tensor(data["label"][idx]).to(device).long()[:, None]
    mask = labels >= 0
    labels = labels.masked_fill(~mask, -100)
    targets = None
    if "teacher_logits" in data:
        targets = TeacherTargets.dense(torch.as_tensor(data["teacher_logits"][idx]).to(device).float()[:, None, :])
    return StudentBatch(inputs, labels, mask, targets)


def class_batches(data: ClassData, batch_size: int, steps: int, seed: int,
                  device: torch.device | str = "cpu", balanced: bool = False) -> Iterator[StudentBatch]:
    """``steps`` random batches on ``device``: epochs of a seeded permutation, or with
    ``balanced`` rows drawn so that every class is equally likely (:func:`balanced_indices`)."""
    indices = balanced_indices(data["label"], batch_size, steps, seed) if balanced else batch_indices(len(data["label"]), batch_size, steps, seed)
    for idx in indices:
        yield class_batch(data, idx, device)


def epoch_budget(n_rows: int, batch_size: int, epochs: float | None, evals_per_epoch: int | None,
                 steps: int, eval_every: int) -> tuple[int, int]:
    """``(steps, eval_every)`` of a training on ``n_rows`` rows: ``ceil(epochs * N / batch_size)``
    steps with ``evals_per_epoch`` checks per epoch, or (``epochs`` None) the fixed ``steps``
    and ``eval_every``."""
    if epochs is None:
        return steps, eval_every
    per_epoch = -(-n_rows // batch_size)
    every = max(1, round(per_epoch / evals_per_epoch)) if evals_per_epoch else eval_every
    return max(1, int(np.ceil(epochs * per_epoch))), every


def balanced_indices(labels: np.ndarray, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` index arrays ``[batch_size]`` drawn class-balanced: each "epoch" of ``N`` rows
    takes ``N / C`` rows of each of the ``C`` classes present (a seeded permutation of the class,
    repeated as often as needed: a small class is oversampled, a large one undersampled in that
    epoch), shuffled together.

    Args:
        labels: the class of every row ``[N]`` (rows below 0 are never drawn).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])]
    per_class = -(-int((labels >= 0).sum()) // len(members))
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = [np.resize(rng.permutation(m), per_class) for m in members]
            order = np.concatenate([order, rng.permutation(np.concatenate(epoch))])
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` index arrays ``[batch_size]`` over ``n`` rows: epochs of a seeded permutation."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


@torch.no_grad()
def accuracy(model: nn.Module, data: ClassData, batch_size: int = 50) -> float:
    """Share of rows whose arg-max class equals the gold label (in [0, 1])."""
    model.eval()
    correct = 0
    for s in range(0, len(data["label"]), batch_size):
        b = class_batch(data, np.arange(s, min(s + batch_size, len(data["label"]))), device_of(model))
        correct += int((classifier_logits(model, b.inputs).argmax(-1) == b.labels).sum())
    return correct / max(len(data["label"]), 1)


def trainable_parameters(model: nn.Module, freeze_embeddings: bool) -> list[nn.Parameter]:
    """Parameters to optimise (word embeddings left out when frozen)."""
    frozen = {id(p) for p in model.get_input_embeddings().parameters()} if freeze_embeddings else set()
    return [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]


def online_teacher(teacher: TeacherFn | None) -> Callable[[StudentBatch], TeacherTargets] | None:
    """Dense targets ``[B, 1, C]`` from an online teacher's logits (computed without gradients)."""
    if teacher is None:
        return None

    def targets(batch: StudentBatch) -> TeacherTargets:
        with torch.no_grad():
            return TeacherTargets.dense(teacher(batch).float()[:, None, :])

    return targets


def train_classifier(
    student: nn.Module, data: ClassData, weights: Mapping[str, float], *, temperature: float = 1.0, steps: int,
    batch_size: int, lr: float, weight_decay: float = 0.0, seed: int = 0, teacher: TeacherFn | None = None,
    freeze_embeddings: bool = False, max_grad_norm: float | None = 1.0,
    groups: Iterator[list[StudentBatch]] | None = None, on_step: Callable[[int, dict[str, float]], None] | None = None,
    objective: Objective | None = None,
    feature_teacher: Callable[[StudentBatch], tuple[TeacherTargets | None, Any]] | None = None,
    schedule: Literal["cosine", "linear", "constant"] = "constant", warmup: int = 0, balanced: bool = False,
) -> list[float]:
    """Train a classification student with AdamW (constant learning rate unless ``schedule``).

    Args:
        student: a sequence classifier (changed in place; left in eval mode).
        data: train rows (:data:`ClassData`); ``teacher_logits`` are the cached teacher.
        weights: the objective ``{loss name: weight}``, e.g. ``{"forward_kl": 1.0}`` (Hinton
            et al. 2015) or ``{"ce": 1.0}`` (fine-tuning); zero weights are dropped.
        temperature: tau of the teacher terms.
        steps, batch_size, lr, seed: the budget, the seeded batch order and the learning rate.
        weight_decay: AdamW's decoupled weight decay (0: none; torch's own default is 0.01).
        teacher: an online teacher (batch -> class logits ``[B, C]``) instead of the cached one.
        freeze_embeddings: leave the word embeddings out of the optimizer.
        max_grad_norm: gradient clipping (None: none).
        groups: the micro-batch groups of every step instead of ``data``'s seeded batches (e.g.
            MiniDisc's sandwich: one batch under several masks).
        on_step: called with the 1-based step and its metrics after every update.
        objective: a ready objective instead of ``weights`` (e.g. with feature terms, a layer map
            and projections; its projections train with the student).
        feature_teacher: an online teacher giving logits and features in one forward
            (:class:`raykd.train.features.FeatureTeacher`).
        schedule, warmup: the learning-rate schedule over ``steps`` (:func:`~raykd.train.step.lr_multiplier`).
        balanced: draw ``data``'s batches class-balanced by ``label`` (:func:`balanced_indices`).

    Returns:
        The loss of every step (per-row mean).

    Raises:
        KeyError, ValueError: an unknown loss or bad weights (see :class:`~raykd.losses.Objective`);
            a teacher term with neither cached nor online teacher logits.
    """
    objective = objective or Objective({n: w for n, w in weights.items() if w})
    params = trainable_parameters(student, freeze_embeddings) + list(objective.parameters())
    optimizer, scheduler = build_optimizer(params, lr=lr, weight_decay=weight_decay, schedule=schedule, warmup=warmup, total=steps)
    if groups is None:
        groups = ([b] for b in class_batches(data, batch_size, steps, seed, device_of(student), balanced))
    history = run_steps(student, optimizer, lambda _tau: next(groups), lambda step: (objective, temperature), max_steps=steps,
                        on_step=on_step, logits_fn=classifier_logits, max_grad_norm=max_grad_norm, scheduler=scheduler,
                        teacher=online_teacher(teacher), feature_teacher=feature_teacher)
    return [h["loss"] for h in history]


def classifier_loss(weights: Mapping[str, float], temperature: float) -> Callable[[nn.Module, StudentBatch], Tensor]:
    """``(model, batch) -> mean objective`` of a classifier against its batch's targets (e.g. the
    loss of a Taylor importance score)."""
    objective = Objective({n: w for n, w in weights.items() if w})
    return lambda model, batch: objective_loss(model, batch, objective, temperature, classifier_logits)


def logits_fn_of(model: nn.Module) -> TeacherFn:
    """An online teacher from a classifier: batch -> its class logits ``[B, C]``."""
    return lambda batch: classifier_logits(model, batch.inputs)[:, 0, :]

