"""Distillation through a teacher assistant on a classification task (no Ray).

The building blocks MiniDisc and MaxiDisc share, so both searches train TAs and students the
same way with the same budget:

- :func:`kd_phase`: a few AdamW steps of a student against a teacher's logits (cached or
  computed online), with the objective ``kd_weight * forward_kl + ce_weight * ce`` through the
  training step every student shares (:mod:`raykd.train.local`).
- :func:`prune_to`: a teacher (or TA) pruned to a sparsity relative to the original teacher.
- :class:`ClassifierChain`: the classifier's :class:`~raykd.recipes.ta_search.chain.ChainTask`
  (hops are sparsities; the student's is the target).
- :func:`distill_chain`: teacher -> TA -> student (Mirzadeh et al. 2020, "Improved Knowledge
  Distillation via Teacher Assistant") on the one chain walk
  (:func:`~raykd.recipes.ta_search.chain.walk_chain`), with a callback for Tune reports.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from raykd.recipes.ta_search.chain import walk_chain
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


@dataclass
class ClassifierChain:
    """The classifier's hops: a hop is a sparsity of the teacher's prunable parameters, the
    student's is ``sp.target`` (pruned to it, or layer-dropped with ``sp.student_kind="layer_drop"``).

    From the teacher a model is pruned by ``teacher_importance``, scored once; from a TA by the
    TA's own importance on ``train`` (:func:`importance_of`, :func:`prune_to`). Every phase is
    :func:`kd_phase` on ``train``.
    """

    teacher: nn.Module
    teacher_importance: Masks
    train: ClassData
    kd: KDConfig
    sp: SparsifyConfig

    def __post_init__(self) -> None:
        self.base_prunable = prunable_params(self.teacher)

    def shrink(self, model: nn.Module, prev: float, hop: float) -> nn.Module:
        """A copy of ``model`` (the teacher, or a TA at sparsity ``prev``) pruned to sparsity ``hop``
        of the teacher's prunable parameters, or layer-dropped to ``sp.keep_layers`` when ``hop``
        is the student's and ``sp.student_kind`` is ``layer_drop``."""
        if hop == self.sp.target and self.sp.student_kind == "layer_drop":
            return layer_drop(model, self.sp.keep_layers)
        if model is self.teacher:
            return densify(model, masks_for_sparsity(self.teacher_importance, hop, *unit_params(model)))
        source = copy.deepcopy(model)  # scoring its units leaves gradients on it
        return prune_to(source, hop, self.base_prunable, importance_of(source, self.train, self.kd, self.sp.importance_batches))

    def phase(self, model: nn.Module, teacher: nn.Module | None, seed: int, on_step: Callable[[int], None] | None) -> None:
        """:func:`kd_phase` of ``model``: from ``teacher``'s logits online, or the cached teacher logits."""
        kd_phase(model, None if teacher is None else logits_fn_of(teacher), self.train, self.kd, seed=seed, on_step=on_step)


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
    online. ``ta_sparsity = 0`` is the direct baseline (teacher -> student). The TA is hop 0 and
    the student hop 1 of the walk (:func:`~raykd.recipes.ta_search.chain.walk_chain`), with or
    without a TA before it: the student draws its batches with seed ``kd.seed + 1``.

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
    dev, nan = splits["dev"], float("nan")
    result = ChainResult(ta_sparsity, count_parameters(ta if ta is not None else teacher), nan, 0, nan, nan)

    def on_report(student: nn.Module, step: int) -> None:
        result.student_params = count_parameters(student)
        result.student_dev_acc = accuracy(student, dev, kd.eval_batch_size)
        if step == kd.steps:
            result.student_test_acc = accuracy(student, splits["test"], kd.eval_batch_size)
        if report is not None:
            report({**result.as_dict(), "step": step})

    task = ClassifierChain(teacher, teacher_importance, splits["train"], kd, sp)
    if ta is None and ta_sparsity > 0:  # the TA from the teacher's cached logits, then the student from it
        start, hops, first_hop = (teacher, 0.0), [ta_sparsity, sp.target], 0
    else:  # only the student (still hop 1): from the given TA online, or direct from the cached logits
        start, hops, first_hop = ((teacher, 0.0) if ta is None else (ta, ta_sparsity)), [sp.target], 1
        result.ta_dev_acc = accuracy(start[0], dev, kd.eval_batch_size)
    for hop, model in walk_chain(task, start, hops, seed=kd.seed, first_hop=first_hop, online=ta is not None,
                                 steps=kd.steps, reports=kd.reports, on_report=on_report):
        if hop != sp.target:  # the TA, before the student is made from it
            result.ta_params, result.ta_dev_acc = count_parameters(model), accuracy(model, dev, kd.eval_batch_size)
    return result
