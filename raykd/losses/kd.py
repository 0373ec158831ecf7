"""Distillation losses, each a small pure function registered by name.

Every loss takes ``student_logits`` [B, T, V], and keyword-only ``targets``
(:class:`TeacherTargets` or None), ``labels`` [B, T] (next-token ids, -100 where ignored) and
``temperature`` tau, plus its own hyper-parameters, and returns the unreduced per-token loss
[B, T] in fp32 (see :mod:`raykd.losses.reduction` for masking and reduction).

Notation: p is the teacher, q the student, both at temperature tau. With dense targets they are
distributions over the V vocabulary entries; with sparse targets over K + 1 buckets (the
teacher's top-k ids plus one tail bucket for the rest of the vocabulary). Every teacher loss is
multiplied by tau**2 so its gradients keep their size as tau changes (Hinton et al. 2015): the
registry applies the factor (:func:`~raykd.losses.registry.times_tau_squared`), the functions
below compute the loss at tau.
Teacher log-probs are floored at log(:data:`~raykd.losses.reduction.TINY`) so that mass the
student puts where the teacher has none costs a large, finite penalty instead of inf.

Common args of the teacher losses:
    student_logits: [B, T, V] student logits, any float dtype (computed in fp32).
    targets: teacher targets, in a form the loss accepts (``LossSpec.forms``).
    labels: [B, T] next-token ids; unused by the teacher losses.
    temperature: softmax temperature tau > 0.

Raises (all teacher losses):
    ValueError: ``targets`` is None, or ``temperature`` or a hyper-parameter is out of range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from raykd.losses.reduction import TINY, student_bucket_log_probs, student_log_probs, tempered
from raykd.losses.registry import Param, define_loss

_SKEW = Param(float, low=0, high=1, high_open=True,
              meaning="DistiLLM's skew: the share of the other distribution mixed in; 0 is the plain KL, 1 makes it vanish")
from raykd.losses.targets import TeacherTargets, teacher_buckets

LOG_FLOOR = math.log(TINY)


def _at_temperature(student_logits: Tensor, targets: TeacherTargets | None, temperature: float):
    """(teacher log_p, student log_q) at temperature tau: the one place tau divides the logits."""
    if targets is None:
        raise ValueError("this loss needs teacher targets, got targets=None")
    ids, log_p = teacher_buckets(targets, temperature)
    log_q = student_log_probs(student_logits, temperature)
    if ids is not None:
        log_q = student_bucket_log_probs(log_q, ids)
    return log_p.clamp(min=LOG_FLOOR), log_q


def kl_divergence(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last axis; entries where a = 0 contribute 0 (no 0 * log 0 NaN)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w * a + (1 - w) * b) for w in [0, 1]."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _check_range(name: str, value: float, high_open: bool) -> None:
    ok = 0.0 <= value < 1.0 if high_open else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, {'1)' if high_open else '1]'}, got {value}")


@define_loss("forward_kl", description="KL(p || q) at temperature tau, times tau^2 (Hinton et al. 2015)")
def forward_kl(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor,
               temperature: float) -> Tensor:
    """Forward KL(p || q), mean-seeking; Hinton, Vinyals & Dean 2015, "Distilling the
    Knowledge in a Neural Network". Args as in the module docstring.

    Returns:
        [B, T] tau**2 * KL(p || q).
    """
    log_p, log_q = _at_temperature(student_logits, targets, temperature)
    return kl_divergence(log_p, log_q)


@define_loss("reverse_kl", description="KL(q || p), mode-seeking (MiniLLM, Gu et al. 2023)")
def reverse_kl(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor,
               temperature: float) -> Tensor:
    """Reverse KL(q || p), mode-seeking; Gu et al. 2023, "MiniLLM: Knowledge Distillation of
    Large Language Models". Args as in the module docstring.

    Returns:
        [B, T] tau**2 * KL(q || p).
    """
    log_p, log_q = _at_temperature(student_logits, targets, temperature)
    return kl_divergence(log_q, log_p)


@define_loss("symmetric_kl", description="KL(p || q) + KL(q || p)")
def symmetric_kl(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor,
                 temperature: float) -> Tensor:
    """Symmetric (Jeffreys) divergence KL(p || q) + KL(q || p). Args as in the module docstring.

    Returns:
        [B, T] tau**2 * (KL(p || q) + KL(q || p)).
    """
    log_p, log_q = _at_temperature(student_logits, targets, temperature)
    return (kl_divergence(log_p, log_q) + kl_divergence(log_q, log_p))


@define_loss("generalized_jsd", params={"beta": Param(float, low=0, high=1, meaning="GKD's interpolation: 0 is forward "
                                                                          "KL, 1 reverse KL")},
               description="JSD(beta); beta=0 forward KL, beta=1 reverse KL (GKD)")
def generalized_jsd(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor,
                    temperature: float, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence; Agarwal et al. 2024, "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes" (GKD).

    For 0 < beta < 1, with m = beta * p + (1 - beta) * q::

        JSD(beta) = beta * KL(p || m) + (1 - beta) * KL(q || m)

    JSD(beta) itself goes to 0 at both ends, but JSD(beta) / beta -> KL(p || q) as beta -> 0
    and JSD(beta) / (1 - beta) -> KL(q || p) as beta -> 1. Following TRL's GKD trainer, the
    endpoints are defined as those limits: beta = 0 is exactly forward KL and beta = 1 exactly
    reverse KL (so the value jumps at the endpoints).

    Args:
        beta: mixture weight of the teacher, in [0, 1]. Other args as in the module docstring.

    Returns:
        [B, T] tau**2 * JSD(beta).
    """
    _check_range("generalized_jsd beta", beta, high_open=False)
    log_p, log_q = _at_temperature(student_logits, targets, temperature)
    if beta == 0.0:
        return kl_divergence(log_p, log_q)
    if beta == 1.0:
        return kl_divergence(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return (beta * kl_divergence(log_p, log_m) + (1.0 - beta) * kl_divergence(log_q, log_m))


@define_loss("skew_kl", params={"alpha": _SKEW}, description="KL(p || alpha p + (1 - alpha) q) (DistiLLM, Ko et al. 2024)")
def skew_kl(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor,
            temperature: float, alpha: float = 0.1) -> Tensor:
    """Skew KL, KL(p || alpha * p + (1 - alpha) * q); Ko et al. 2024, "DistiLLM: Towards
    Streamlined Distillation for Large Language Models". alpha = 0 is forward KL.

    Args:
        alpha: skew, in [0, 1). Other args as in the module docstring.

    Returns:
        [B, T] tau**2 * skew KL.
    """
    _check_range("skew_kl alpha", alpha, high_open=True)
    log_p, log_q = _at_temperature(student_logits, targets, temperature)
    return kl_divergence(log_p, _log_mix(log_p, log_q, alpha))


@define_loss("skew_reverse_kl", params={"alpha": _SKEW}, description="KL(q || alpha q + (1 - alpha) p) (DistiLLM, Ko et al. 2024)")
def skew_reverse_kl(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor,
                    temperature: float, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL, KL(q || alpha * q + (1 - alpha) * p); Ko et al. 2024, "DistiLLM".
    alpha = 0 is reverse KL.

    Args:
        alpha: skew, in [0, 1). Other args as in the module docstring.

    Returns:
        [B, T] tau**2 * skew reverse KL.
    """
    _check_range("skew_reverse_kl alpha", alpha, high_open=True)
    log_p, log_q = _at_temperature(student_logits, targets, temperature)
    return kl_divergence(log_q, _log_mix(log_q, log_p, alpha))


@define_loss("tvd", description="total variation distance 0.5 * sum |p - q|")
def tvd(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor,
        temperature: float) -> Tensor:
    """Total variation distance 0.5 * sum |p - q|, in [0, 1] before the tau**2 factor; as used
    for distillation by Wen et al. 2023, "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation". Args as in the module docstring.

    Returns:
        [B, T] tau**2 * TVD(p, q).
    """
    log_p, log_q = _at_temperature(student_logits, targets, temperature)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


@define_loss("mse_logits", forms=("dense",), tau_squared=False, description="MSE of the logits (Ba & Caruana 2014)")
def mse_logits(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor,
               temperature: float) -> Tensor:
    """Mean squared error between raw student and teacher logits, averaged over V; Ba & Caruana
    2014, "Do Deep Nets Really Need to be Deep?". Dense targets only. The temperature cancels
    out: tau**2 * ||(z_s - z_t) / tau||**2 = ||z_s - z_t||**2. Args as in the module docstring.

    Returns:
        [B, T] mean over V of (z_student - z_teacher)**2.

    Raises:
        ValueError: ``targets`` is None or not dense.
    """
    if targets is None or targets.form != "dense":
        raise ValueError("mse_logits needs dense teacher targets (raw logits)")
    return (student_logits.float() - targets.logits.float()).square().mean(-1)


@define_loss("ce", forms=(), needs_teacher=False, description="cross entropy on the hard next-token labels")
def ce(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor,
       temperature: float) -> Tensor:
    """Cross entropy of the student on the hard labels, at temperature 1 and without the tau**2
    factor (the hard-label term of Hinton et al. 2015).

    Args:
        student_logits: [B, T, V] student logits.
        targets: ignored.
        labels: [B, T] next-token ids; negative ids (-100, ignored positions) are clamped to 0
            so they give a finite value for the mask to drop.
        temperature: ignored.

    Returns:
        [B, T] -log q(labels).
    """
    log_q = student_log_probs(student_logits, 1.0)
    return -log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


@define_loss("uld", description="sorted-probability L1 across vocabularies, no id mapping (ULD, Boizard et al. 2024)")
def uld(student_logits: Tensor, *, targets: TeacherTargets | None, labels: Tensor,
        temperature: float) -> Tensor:
    """Universal Logit Distillation; Boizard et al. 2024, "Towards Cross-Tokenizer Distillation:
    the Universal Logit Distillation Loss for LLMs" (arXiv:2402.12030).

    Both distributions are sorted in decreasing order and compared entry by entry,
    ``sum_i |p_(i) - q_(i)|`` (the paper's closed form of its Wasserstein-1 distance), so the
    two models need not share a vocabulary: token ids are never read.

    Dense targets: the whole teacher vocabulary ``V_t`` against the student's ``V_s``, the
    shorter sorted vector padded with zeros (as the paper does for vocabularies of different
    sizes). Sparse targets (top-k + tail): the teacher side is its ``K`` top probabilities
    (renormalised with the tail, as :func:`~raykd.losses.targets.teacher_buckets` does) plus the
    tail mass as one last entry; the student side is its own ``K`` largest probabilities plus
    ``1 - sum`` of them. The two tails are compared as one entry each: by the triangle
    inequality this is a lower bound of the full-vocabulary term, equal to it when neither
    tail has entries above the other's (e.g. K = V, where it equals the dense form).

    Args: as in the module docstring; the sparse ``topk_ids`` may be ids of another vocabulary
    (or -1): they are not used.

    Returns:
        [B, T] tau**2 * sum_i |p_(i) - q_(i)|, in [0, 2 tau**2].
    """
    if targets is None:
        raise ValueError("uld needs teacher targets, got targets=None")
    q = student_log_probs(student_logits, temperature).exp()
    if targets.form == "dense":
        p = torch.softmax(tempered(targets.logits, temperature), dim=-1).sort(dim=-1, descending=True).values
        q = q.sort(dim=-1, descending=True).values
        width = max(p.shape[-1], q.shape[-1])
        p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
        q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
        return (p - q).abs().sum(-1)
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    masses = torch.cat([targets.topk_logprobs.float(), targets.tail_logmass.float().unsqueeze(-1)], dim=-1)
    p = torch.softmax(masses, dim=-1)
    k = p.shape[-1] - 1
    p_top, p_tail = p[..., :k].sort(dim=-1, descending=True).values, p[..., k]
    q_top = q.topk(min(k, q.shape[-1]), dim=-1).values
    q_top = torch.nn.functional.pad(q_top, (0, k - q_top.shape[-1]))
    q_tail = (1.0 - q_top.sum(-1)).clamp(min=0.0)
    return (p_top - q_top).abs().sum(-1) + (p_tail - q_tail).abs()
