"""Distillation through a teacher assistant on a classification task (no Ray).

The building blocks MiniDisc and MaxiDisc share, so both searches train TAs and students the
same way with the same budget:

- :func:`kd_phase`: a few AdamW steps of a student against a teacher's logits (cached or
  computed online), with the objective ``kd_weight * forward_kl + ce_weight * ce`` through the
  training step every student shares (:mod:`raykd.train.local`).
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

import torch
from torch import nn

from raykd.recipes.ta_search.config import KDConfig, SparsifyConfig
from raykd.students.build import count_parameters, layer_drop
from raykd.students.sparsify import Masks, densify, masks_for_sparsity, prunable_params, taylor_importance, unit_params
from raykd.train.local import (
    ClassData,
    TeacherFn,
    accuracy,
    class_batches,
    classifier_loss,
    device_of,
    logits_fn_of,
    train_classifier,
)

def kd_phase(student: nn.Module, teacher: TeacherFn | None, data: ClassData, kd: KDConfig, *,
             steps: int | None = None, seed: int = 0, on_step: Callable[[int], None] | None = None) -> list[float]:
    """One distillation phase of the search's budget: ``kd.objective()`` against the cached
    teacher logits (``teacher`` None) or an online teacher, through the shared training step.

    Returns:
        The loss of every step.
    """
    return train_classifier(student, data, kd.objective(), temperature=kd.temperature, steps=steps or kd.steps,
                            batch_size=kd.batch_size, lr=kd.lr, seed=seed, teacher=teacher,
                            freeze_embeddings=kd.freeze_embeddings,
                            on_step=None if on_step is None else (lambda step, _metrics: on_step(step)))


def importance_of(model: nn.Module, data: ClassData, kd: KDConfig, n_batches: int) -> Masks:
    """Taylor importance of ``model``'s units for the KD objective against the cached teacher logits."""
    return taylor_importance(model, class_batches(data, kd.batch_size, n_batches, seed=kd.seed + 101, device=device_of(model)),
                             classifier_loss(kd.objective(), kd.temperature))


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
        kd_phase(ta, None, train, kd, seed=kd.seed)
    source = ta if ta is not None else teacher
    ta_acc = accuracy(source, dev, kd.eval_batch_size)
    if ta is None:  # direct: the student comes from the teacher and learns from its cached logits
        student = densify(teacher, masks_for_sparsity(teacher_importance, sp.target, *unit_params(teacher))) if sp.student_kind == "sparse" else layer_drop(teacher, sp.keep_layers)
        online = None
    else:
        student = make_student(copy.deepcopy(source), sp.target, base, train, kd, sp)
        online = logits_fn_of(source)
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

    kd_phase(student, online, train, kd, seed=kd.seed + 1, on_step=on_step)
    return result
