"""The shared helper every loss relies on: tempered student log-probs, the K + 1 bucket view of
a distribution, masking and reduction. No loss masks or reduces by itself.
"""

from __future__ import annotations

import contextlib
import math
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

TINY = torch.finfo(torch.float32).tiny
"""Smallest positive normal fp32; probabilities are clamped to it before a log."""


def tempered(logits: Tensor, temperature: float) -> Tensor:
    """fp32 ``logits / temperature`` (any shape); at ``temperature == 1`` the fp32 logits
    themselves, without the division's pass over ``[B, T, V]`` and its backward (on the demo's
    ``[4, 128, 49152]`` logits the log-softmax's forward and backward take 0.65x the time without
    them: ``benchmarks/bench_optimizer.py``)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def student_log_probs(student_logits: Tensor, temperature: float) -> Tensor:
    """fp32 ``log_softmax(student_logits / temperature)`` over the vocabulary.

    Args:
        student_logits: [B, T, V] logits, any float dtype.
        temperature: softmax temperature tau > 0.

    Returns:
        [B, T, V] fp32 log-probs.

    Raises:
        ValueError: ``temperature`` is not a positive finite number.
    """
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    memo = _SHARED.get()
    key = (student_logits.data_ptr(), tuple(student_logits.shape), temperature, torch.is_grad_enabled())
    if memo is not None and key in memo:
        return memo[key]
    out = torch.log_softmax(tempered(student_logits, temperature), dim=-1)
    if memo is not None:
        memo[key] = out
    return out


_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("raykd_shared_log_probs", default=None)


@contextlib.contextmanager
def shared_log_probs() -> Iterator[None]:
    """Inside this block, :func:`student_log_probs` computes each (logits, temperature, grad
    mode) once and hands the same tensor to every loss term (one ``[B, T, V]`` log-softmax
    instead of one per term). :class:`raykd.losses.Objective` opens it around its terms."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def student_bucket_log_probs(student_log_probs: Tensor, topk_ids: Tensor) -> Tensor:
    """The student distribution over the teacher's K + 1 buckets (top-k ids plus a tail).

    The tail bucket is ``log(1 - sum_k q_k)``, computed as ``log(-expm1(logsumexp))`` and
    clamped to :data:`TINY`, so it stays finite (and so do its gradients) when the top-k holds
    all the mass, e.g. K = V.

    Args:
        student_log_probs: [B, T, V] fp32 log-probs (from :func:`student_log_probs`).
        topk_ids: [B, T, K] int64 teacher top-k ids; negative ids are padding (slots freed by
            merging duplicate ids, e.g. a multi-teacher mixture or a compressed vocabulary):
            they get log-prob log(:data:`TINY`), the floor teacher log-probs get too, so the two
            sides agree there and the slot adds nothing to any divergence.

    Returns:
        [B, T, K + 1] log-probs, the tail last.
    """
    top = student_log_probs.gather(-1, topk_ids.clamp(min=0))
    return with_tail_bucket(torch.where(topk_ids >= 0, top, math.log(TINY)))


def with_tail_bucket(top_log_probs: Tensor) -> Tensor:
    """[..., K] log-probs of K distinct ids -> [..., K + 1] with the tail ``log(1 - sum_k q_k)``
    last (clamped to :data:`TINY`, so it stays finite when the K ids hold all the mass)."""
    tail_mass = -torch.expm1(torch.logsumexp(top_log_probs, dim=-1, keepdim=True))
    return torch.cat([top_log_probs, tail_mass.clamp(min=TINY).log()], dim=-1)


def masked_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Sum of a per-token loss over the valid positions.

    Masked positions are selected out (not multiplied by zero), so a NaN or inf there cannot
    leak into the sum.

    Args:
        per_token: [B, T] unreduced loss.
        mask: [B, T] bool (or 0/1) mask, True where the token counts.

    Returns:
        Scalar tensor, the sum over valid positions.

    Raises:
        ValueError: the shapes differ.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per-token loss shape {tuple(per_token.shape)} != mask shape {tuple(mask.shape)}")
    return torch.where(mask.bool(), per_token, 0.0).sum()


def count_tokens(mask: Tensor) -> Tensor:
    """Number of valid positions in a [B, T] mask, as a scalar int64 tensor."""
    return mask.bool().sum()
