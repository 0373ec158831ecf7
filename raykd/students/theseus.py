"""BERT-of-Theseus: progressive module replacement (Xu et al. 2020, "BERT-of-Theseus: Compressing
BERT by Progressive Module Replacing", EMNLP).

The teacher's blocks are cut into consecutive groups (predecessor modules), one per student block
(successor module). During training each forward replaces each group by its successor with
probability ``p``, independently; the teacher's blocks are frozen, so only the successors (and
whatever else the caller leaves trainable) learn, from the task loss alone. ``p`` follows the
paper's linear curriculum ``p_t = min(1, p_0 + k t)``; at ``p = 1`` the model is the student.
After training :func:`export_student` keeps the successors only.

The hybrid is the teacher's own model object with its block list swapped for a
:class:`TheseusLayers`, so it trains through the shared step (:func:`raykd.train.step.train_step`)
like any student, with any ``logits_fn``.

Unfaithful details: the paper fine-tunes the predecessor first and, after the replacement
stage, fine-tunes the successors alone; here the teacher is taken as fine-tuned and the second
stage is an ordinary training run of :func:`export_student`'s model. Embeddings and the output
head are shared with the teacher and stay trainable unless the caller freezes them (the paper
keeps them from the predecessor).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from raykd.students.build import _decoder_layers, set_layers


class TheseusLayers(nn.Module):
    """Stands in for a model's block list: iterated in training, it yields each group's teacher
    blocks or, with probability ``p``, the group's successor block instead (in eval mode: the
    successors iff ``p >= 1``).

    Args:
        teacher_layers: the teacher's blocks (frozen here).
        successors: one block per group.
        groups: ``[[teacher block indices], ...]``, consecutive and covering every teacher block.
        p: replacement probability in ``[0, 1]``.
        seed: seed of the replacement draws.
    """

    def __init__(self, teacher_layers: nn.ModuleList, successors: nn.ModuleList, groups: Sequence[Sequence[int]],
                 p: float = 0.5, seed: int = 0):
        super().__init__()
        self.teacher_layers = teacher_layers.requires_grad_(False)
        self.successors = successors
        self.groups = [list(g) for g in groups]
        self.p = p
        self.generator = torch.Generator().manual_seed(seed)
        self.last_choice: list[bool] = []

    def sequence(self) -> list[nn.Module]:
        """The blocks of one forward (draws the replacements in training mode)."""
        if self.training:
            choice = (torch.rand(len(self.groups), generator=self.generator) < self.p).tolist()
        else:
            choice = [self.p >= 1.0] * len(self.groups)
        self.last_choice = choice
        out: list[nn.Module] = []
        for replace, group, successor in zip(choice, self.groups, self.successors):
            out += [successor] if replace else [self.teacher_layers[i] for i in group]
        return out

    def __iter__(self):
        return iter(self.sequence())

    def __len__(self) -> int:
        return len(self.teacher_layers)

    def __getitem__(self, idx):
        if isinstance(idx, slice) and idx.indices(len(self)) == (0, len(self), 1):  # a decoder's `layers[:n]`
            return self.sequence()
        return self.teacher_layers[idx]


def theseus_groups(teacher_layers: int, student_layers: int) -> list[list[int]]:
    """Consecutive groups of teacher blocks, one per student block, sizes differing by at most one.

    Raises:
        ValueError: more student blocks than teacher blocks.
    """
    if not 0 < student_layers <= teacher_layers:
        raise ValueError(f"{student_layers} successor blocks cannot replace {teacher_layers} teacher blocks")
    bounds = [round(i * teacher_layers / student_layers) for i in range(student_layers + 1)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def theseus_model(teacher: nn.Module, successors_from: Sequence[int] | None = None, *, student_layers: int | None = None,
                  p: float = 0.5, seed: int = 0) -> nn.Module:
    """The hybrid: a copy of ``teacher`` whose block groups are replaced at random by successors.

    Args:
        teacher: a transformers model (left unchanged).
        successors_from: the teacher block each successor is initialised from (default: the first
            block of its group, the stride of a layer-dropped student).
        student_layers: number of successors (default ``len(successors_from)``).
        p: initial replacement probability (set ``.p`` of :func:`theseus_layers` to schedule it).
        seed: seed of the replacement draws.

    Raises:
        ValueError: no size given, or ``successors_from`` of another length than the groups.
    """
    n = teacher.config.num_hidden_layers
    k = student_layers if student_layers is not None else (len(successors_from) if successors_from is not None else None)
    if k is None:
        raise ValueError("give successors_from or student_layers")
    groups = theseus_groups(n, k)
    init = list(successors_from) if successors_from is not None else [g[0] for g in groups]
    if len(init) != len(groups):
        raise ValueError(f"successors_from={init} has {len(init)} blocks for {len(groups)} groups")
    hybrid = copy.deepcopy(teacher)
    parent, attr, layers = _decoder_layers(hybrid)
    successors = nn.ModuleList([copy.deepcopy(layers[i]) for i in init])
    setattr(parent, attr, TheseusLayers(layers, successors, groups, p, seed))
    return hybrid


def theseus_layers(model: nn.Module) -> TheseusLayers:
    """The :class:`TheseusLayers` of a hybrid from :func:`theseus_model`."""
    for module in model.modules():
        if isinstance(module, TheseusLayers):
            return module
    raise ValueError("not a BERT-of-Theseus hybrid (no TheseusLayers inside); build it with theseus_model")


def replacement_rate(step: int, p0: float, k: float) -> float:
    """The paper's curriculum ``p_t = min(1, p_0 + k t)`` at 0-based step ``t``."""
    return min(1.0, p0 + k * step)


def export_student(model: nn.Module) -> nn.Module:
    """The student of a hybrid: its successors as the block list (a new model; layer indices and
    ``num_hidden_layers`` follow the successors)."""
    student = copy.deepcopy(model)
    parent, attr, theseus = None, None, theseus_layers(student)
    for name, module in student.named_modules():
        for child_name, child in module.named_children():
            if child is theseus:
                parent, attr = module, child_name
    successors = list(theseus.successors)
    for layer in successors:
        layer.requires_grad_(True)
    layer_types = getattr(student.config, "layer_types", None)
    set_layers(student, parent, attr, successors, None if layer_types is None else [layer_types[g[0]] for g in theseus.groups])
    return student
