"""Knowledge integration from teachers that each know a subset of the classes (MUKI and its baselines).

Li et al., "From Mimicking to Integrating: Knowledge Integration for Pre-Trained Language
Models", Findings of EMNLP 2022 (MUKI, Model Uncertainty-aware Knowledge Integration); facts
checked against the public code ``lancopku/MUKI`` (``models/uka_multiple_teacher.py``,
``monte_carlo.py``, ``vkd_ka.py``, ``uhc_ka.py``, ``dfa.py``).

Setting: teacher i was trained only on its class block ``blocks[i]`` (indices into the full
label space of ``C`` classes, blocks disjoint, together all ``C``); the student learns all ``C``
classes from the teachers alone (no gold labels in training).

Pure maths on fixed tensors, no Ray:

* :func:`uncertainty_score` ``s_i = 1 - H(p_mean_i) / log C_i`` (1 = certain, 0 = uniform);
* :func:`pad_to_label_space` each teacher's ``[B, C_i]`` probabilities scattered into ``[B, M, C]``;
* :func:`integrate` hard (the most certain teacher) or soft (``softmax(s / 0.2)`` over teachers);
* :func:`margin_weights` the per-example re-weighting ``|s_top1 - s_top2|``;
* :func:`integrated_targets` integrated soft labels (and weights) as dense targets for ``muki_kd``;
* :func:`concat_logits` the teachers' raw logits side by side in the full label space (vanilla
  KD, UHC and DFA).

Registered losses (dense targets ``[B, 1, C]``, one position per example):

* ``muki_kd``: the example's weight times KL(integrated || student) (MUKI);
* ``uhc_kl``: one KL per teacher block, the student renormalised over the block (UHC, Vongkulbhisal
  et al. 2019, "Unifying Heterogeneous Classifiers with Distillation");
* vanilla KD is the existing ``forward_kl`` on :func:`concat_logits` targets at T = 5.

DFA's feature term (Shen et al. 2019, "Customizing Student Networks From Heterogeneous Teachers
via Adaptive Knowledge Amalgamation", as the MUKI code runs it) is :class:`FeatureAmalgamation`,
a small module holding its encoders, attached to the student's logits by :func:`attach_aux_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from raykd.losses.kd import kl_divergence
from raykd.losses.reduction import TINY, student_log_probs, tempered
from raykd.losses.registry import Param, define_loss
from raykd.losses.targets import TeacherTargets

SCORE_TEMPERATURE = 0.2
"""Temperature of the soft integration ``softmax(s / 0.2)`` (the code's ``teacher_score_temperature``)."""
LOG_FLOOR = math.log(TINY)
"""Floor of target log-probabilities, as in :mod:`raykd.losses.kd`."""
MARGIN_EPS = 1e-6
"""Added to ``|s_top1 - s_top2|`` as in the code, so no example's weight is exactly 0."""


def uncertainty_score(probs: Tensor) -> Tensor:
    """Certainty score of a teacher per example, ``1 - H(p) / log C`` (MUKI eq. for ``s_i``).

    Args:
        probs: ``[B, C]`` probabilities of one teacher (the mean of M Monte-Carlo dropout passes,
            or one deterministic pass for the ``no_mc`` ablation), ``C >= 2``.

    Returns:
        ``[B]`` scores in [0, 1]: 1 for a one-hot ``p``, 0 for the uniform one.

    Raises:
        ValueError: ``C < 2`` (a one-class teacher's score is 0 / 0).
    """
    c = probs.shape[-1]
    if c < 2:
        raise ValueError(f"a teacher with {c} class has no uncertainty score (H / log C is 0 / 0); give every teacher at least 2 classes")
    p = probs.float()
    entropy = -torch.where(p > 0, p * p.clamp(min=1e-30).log(), 0.0).sum(-1)
    return 1.0 - entropy / math.log(c)


def _check_blocks(blocks: Sequence[Sequence[int]], num_classes: int) -> None:
    flat = [c for b in blocks for c in b]
    if sorted(flat) != list(range(num_classes)):
        raise ValueError(f"teacher blocks {[list(b) for b in blocks]} must cover classes 0..{num_classes - 1} exactly once")


def pad_to_label_space(probs: Sequence[Tensor], blocks: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """Each teacher's probabilities placed at its classes in the full label space, zeros elsewhere.

    Args:
        probs: M tensors ``[B, C_i]``; teacher i's column j is class ``blocks[i][j]``.
        blocks: M lists of class indices (disjoint, together ``0 .. C-1``).
        num_classes: ``C``.

    Returns:
        ``[B, M, C]``; row i sums to what ``probs[i]`` sums to.

    Raises:
        ValueError: the blocks overlap or miss a class, or a teacher's width differs from its block.
    """
    _check_blocks(blocks, num_classes)
    out = probs[0].new_zeros((probs[0].shape[0], len(probs), num_classes), dtype=torch.float32)
    for i, (p, block) in enumerate(zip(probs, blocks)):
        if p.shape[-1] != len(block):
            raise ValueError(f"teacher {i} gives {p.shape[-1]} classes, its block has {len(block)}")
        out[:, i, list(block)] = p.float()
    return out


def integrate(padded: Tensor, scores: Tensor, mode: str, score_temperature: float = SCORE_TEMPERATURE) -> Tensor:
    """MUKI's integrated soft labels from padded teacher distributions.

    Args:
        padded: ``[B, M, C]`` from :func:`pad_to_label_space`.
        scores: ``[B, M]`` certainty scores (:func:`uncertainty_score` per teacher).
        mode: ``hard``: the teacher with the highest score (ties: the first); ``soft``: the
            teachers mixed with weights ``softmax(scores / score_temperature)``.
        score_temperature: of the soft mode (0.2 in the paper's code).

    Returns:
        ``[B, C]`` distributions (sum to 1 when each teacher's does).

    Raises:
        ValueError: an unknown ``mode``, or ``score_temperature <= 0``.
    """
    if mode == "hard":
        pick = scores.argmax(-1)
        return padded[torch.arange(padded.shape[0]), pick]
    if mode == "soft":
        if not score_temperature > 0:
            raise ValueError(f"score_temperature must be > 0, got {score_temperature}")
        w = torch.softmax(scores.float() / score_temperature, dim=-1)
        return (w.unsqueeze(-1) * padded).sum(1)
    raise ValueError(f"unknown integration mode {mode!r}; use 'hard' or 'soft'")


def margin_weights(scores: Tensor, eps: float = MARGIN_EPS) -> Tensor:
    """Per-example weights ``|s_top1 - s_top2| + eps`` of MUKI's re-weighting: examples where one
    teacher is clearly more certain than the rest count more.

    Args:
        scores: ``[B, M]`` certainty scores, ``M >= 2``.

    Returns:
        ``[B]`` weights in [eps, 1 + eps].
    """
    top = scores.float().topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).abs() + eps


def integrated_targets(integrated: Tensor, weights: Tensor | None = None) -> Tensor:
    """Target logits ``[B, C]`` for ``muki_kd``: ``log(w * p)``, floored at log(tiny) where p = 0.

    The softmax of these logits is ``p`` whatever ``w`` is (so ``forward_kl`` reads them as plain
    soft labels), and their log-sum-exp is ``log w``: ``muki_kd`` reads the example's weight from it.

    Args:
        integrated: ``[B, C]`` distributions (:func:`integrate`).
        weights: ``[B]`` positive example weights (:func:`margin_weights`), or None for 1.
    """
    log_p = integrated.float().clamp(min=0).log()
    if weights is not None:
        log_p = log_p + weights.float().log().unsqueeze(-1)
    return log_p.clamp(min=LOG_FLOOR)


def concat_logits(logits: Sequence[Tensor], blocks: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """The teachers' raw logits side by side in the full label space, ``[B, C]`` (the code's
    ``torch.cat(t_logits)`` when the blocks are contiguous; here each teacher's columns go to its
    class indices, so any partition works).

    Raises:
        ValueError: as :func:`pad_to_label_space`.
    """
    _check_blocks(blocks, num_classes)
    out = logits[0].new_zeros((logits[0].shape[0], num_classes), dtype=torch.float32)
    for i, (z, block) in enumerate(zip(logits, blocks)):
        if z.shape[-1] != len(block):
            raise ValueError(f"teacher {i} gives {z.shape[-1]} logits, its block has {len(block)}")
        out[:, list(block)] = z.float()
    return out


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    # kd.py imports the registry, which imports this module: kd is read at call time
    return kl_divergence(log_p, log_q)


def _dense(targets: TeacherTargets | None, name: str) -> Tensor:
    if targets is None or targets.form != "dense":
        raise ValueError(f"{name} needs dense teacher targets [B, T, C] (class logits), got {None if targets is None else targets.form}")
    return targets.logits.float()


@define_loss("muki_kd", forms=("dense",), description="w * KL(integrated teachers || q), w read from the targets' mass (MUKI, Li et al. 2022)")
def muki_kd(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor, temperature: float) -> Tensor:
    """MUKI's distillation term: each example's KL from the integrated soft labels to the student,
    times the example's weight; Li et al. 2022, "From Mimicking to Integrating".

    The targets are :func:`integrated_targets`: ``log(w * p)``. ``p = softmax(targets)`` is taken
    as is (it was built from teacher probabilities at the KD temperature already); ``w`` is
    ``exp(logsumexp(targets))`` (1 without re-weighting). The student is at ``temperature``;
    the loss is multiplied by ``temperature**2`` like every teacher loss, by the registry (MUKI uses T = 1).

    Args:
        student_logits: ``[B, T, C]`` (``T = 1`` for a classifier).
        targets: dense, ``logits`` ``[B, T, C]`` as above.

    Returns:
        ``[B, T]`` ``w * tau**2 * KL(p || q_tau)``.
    """
    z = _dense(targets, "muki_kd")
    log_w = torch.logsumexp(z, dim=-1)
    log_p = (z - log_w.unsqueeze(-1)).clamp(min=LOG_FLOOR)
    log_q = student_log_probs(student_logits, temperature)
    return log_w.exp() * _kl(log_p, log_q)


@define_loss("uhc_kl", forms=("dense",), params={"blocks": Param(list, meaning="each teacher's class ids, e.g. [[0, 1], [2, 3, 4]]; "
                                                                              "the MUKI recipe fills them in")},
               description="sum over teacher blocks of KL(teacher || student renormalised on the block) (UHC)")
def uhc_kl(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor, temperature: float,
           blocks: Sequence[Sequence[int]] = ()) -> Tensor:
    """UHC: the student's distribution renormalised over each teacher's classes, one KL per
    teacher; Vongkulbhisal, Vinayavekhin & Visentini-Scarzanella 2019, "Unifying Heterogeneous
    Classifiers with Distillation", as the MUKI code's ``uhc_ka.py`` runs it.

    Renormalising ``softmax(s / tau)`` over a block equals ``softmax`` of the block's logits, so
    each term is ``KL(softmax(z_b / tau) || softmax(s_b / tau))``.

    Args:
        targets: dense ``[B, T, C]``, the teachers' raw logits at their classes (:func:`concat_logits`).
        blocks: the class indices of each teacher (hyper-parameter; at least one block).

    Returns:
        ``[B, T]`` ``tau**2 * sum_b KL``.

    Raises:
        ValueError: no blocks, or a block index outside ``C``.
    """
    z = _dense(targets, "uhc_kl")
    if not blocks:
        raise ValueError("uhc_kl needs the teachers' class blocks: params {'uhc_kl': {'blocks': [[0, 1], [2, 3, 4]]}}")
    c = student_logits.shape[-1]
    if any(not 0 <= i < c for b in blocks for i in b):
        raise ValueError(f"uhc_kl blocks {blocks} index outside the {c} classes")
    total = None
    for block in blocks:
        idx = list(block)
        log_p = torch.log_softmax(tempered(z[..., idx], temperature), dim=-1)
        log_q = torch.log_softmax(tempered(student_logits[..., idx], temperature), dim=-1)
        term = _kl(log_p, log_q)
        total = term if total is None else total + term
    return total


class FeatureAmalgamation(nn.Module):
    """DFA's feature term: the concatenated teacher features are encoded to the student's width
    and decoded back (reconstruction MSE), and the student's projected feature is matched to the
    shared code (amalgamation MSE, the code detached); Shen et al. 2019, as the MUKI code's
    ``dfa.py`` (``AmalBlock``) runs it, here on pooled features ``[B, H]``.

    Args:
        student_width: ``H_s``.
        teacher_widths: ``H_i`` of each teacher (their features are concatenated in this order).
    """

    def __init__(self, student_width: int, teacher_widths: Sequence[int]):
        super().__init__()
        self.teacher_widths = [int(w) for w in teacher_widths]
        total = sum(self.teacher_widths)
        self.t_encoder = nn.Linear(total, student_width)
        self.t_decoder = nn.Linear(student_width, total)
        self.s_encoder = nn.Linear(student_width, student_width)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example losses.

        Args:
            student_features: ``[B, H_s]`` (with grad).
            teacher_features: ``[B, sum H_i]`` (constants).

        Returns:
            ``(amalgamation [B], reconstruction [B])``: the MSE (mean over the width) of the
            projected student feature to the code, and the sum over teachers of each teacher's
            reconstruction MSE; batch means of them equal the code's ``F.mse_loss`` terms.
        """
        code = self.t_encoder(teacher_features)
        recon = self.t_decoder(code)
        amal = (self.s_encoder(student_features) - code.detach()).square().mean(-1)
        rec = sum(
            (r - t).square().mean(-1)
            for r, t in zip(recon.split(self.teacher_widths, -1), teacher_features.split(self.teacher_widths, -1))
        )
        return amal, rec


class _AttachLoss(torch.autograd.Function):
    """Identity on ``logits``; in backward also sends gradient ``scale`` into ``aux`` (as
    Megatron-LM's ``MoEAuxLossAutoScaler`` attaches a load-balancing loss to an activation)."""

    @staticmethod
    def forward(ctx, logits: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return logits.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def attach_aux_loss(logits: Tensor, per_example: Tensor) -> Tensor:
    """``logits`` unchanged, with ``per_example.mean()`` added to whatever loss is back-propagated
    through them: the way a term that is not a function of the logits (DFA's feature MSEs) joins
    the shared objective's backward. Assumes the step normalises by the batch's rows (one
    micro-batch per step, one position per row), as :func:`raykd.train.local.train_classifier` does.

    Args:
        logits: ``[B, ...]``.
        per_example: ``[B]`` losses with grad.
    """
    return _AttachLoss.apply(logits, per_example, 1.0 / max(per_example.shape[0], 1))
