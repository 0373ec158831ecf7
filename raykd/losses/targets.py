"""The teacher's side of a distillation loss, in one typed object with two forms.

* ``sparse``: what the soft-label cache stores per token, the teacher's top-k ids and
  log-probs plus the log of the probability mass left outside the top-k (the tail).
* ``dense``: the teacher's raw logits over the whole vocabulary (online teacher).

Each registered loss says which forms it accepts (see :mod:`raykd.losses.registry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from raykd.losses.reduction import tempered

TargetForm = Literal["sparse", "dense"]


@dataclass(frozen=True, eq=False)
class TeacherTargets:
    """Teacher soft labels for a batch, sparse (top-k + tail) or dense (logits).

    Build one with :meth:`sparse` or :meth:`dense` rather than the constructor.

    Attributes:
        topk_ids: [B, T, K] int64 vocabulary ids of the teacher's top-k tokens (sparse form).
        topk_logprobs: [B, T, K] teacher log-probs of those ids, already at the soft-label
            temperature; any float dtype (fp16 from the cache is fine, it is renormalised).
        tail_logmass: [B, T] log of the teacher mass outside the top-k; -inf (or very
            negative) when K = V.
        logits: [B, T, V] raw teacher logits, temperature not applied (dense form).

    Raises:
        ValueError: both or neither form is given, a sparse field is missing, or a shape or
            dtype does not match (the message names the field).
    """

    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    tail_logmass: Tensor | None = None
    logits: Tensor | None = None

    @classmethod
    def sparse(cls, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor) -> TeacherTargets:
        """Sparse targets: [B, T, K] ids (cast to int64), [B, T, K] log-probs, [B, T] tail log-mass."""
        return cls(topk_ids=topk_ids.long(), topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)

    @classmethod
    def dense(cls, logits: Tensor) -> TeacherTargets:
        """Dense targets from raw teacher logits [B, T, V] (temperature not applied)."""
        return cls(logits=logits)

    @property
    def form(self) -> TargetForm:
        """``"sparse"`` or ``"dense"``."""
        return "dense" if self.logits is not None else "sparse"

    @property
    def batch_shape(self) -> tuple[int, int]:
        """(B, T) of the targets."""
        t = self.logits if self.logits is not None else self.topk_ids
        return t.shape[0], t.shape[1]

    def __post_init__(self) -> None:
        names = ("topk_ids", "topk_logprobs", "tail_logmass")
        sparse = {k: getattr(self, k) for k in names}
        given = [k for k, v in sparse.items() if v is not None]
        if self.logits is not None:
            _check(not given, f"TeacherTargets got dense logits and sparse fields {given}; give one form")
            _check_dense(self.logits)
            return
        missing = [k for k, v in sparse.items() if v is None]
        _check(not missing, f"sparse TeacherTargets is missing {missing}; use .sparse(...) or .dense(...)")
        _check_sparse(self.topk_ids, self.topk_logprobs, self.tail_logmass)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_dense(logits: Tensor) -> None:
    _check(logits.dim() == 3, f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    _check(logits.is_floating_point(), f"logits must be a float tensor, got {logits.dtype}")


def _check_sparse(ids: Tensor, logprobs: Tensor, tail: Tensor) -> None:
    shape = tuple(ids.shape)
    _check(ids.dim() == 3 and shape[-1] >= 1, f"topk_ids must be [B, T, K] with K >= 1, got {shape}")
    _check(ids.dtype == torch.long, f"topk_ids must be int64 (.sparse(...) casts it), got {ids.dtype}")
    _check(logprobs.shape == ids.shape, f"topk_logprobs shape {tuple(logprobs.shape)} != topk_ids {shape}")
    _check(logprobs.is_floating_point(), f"topk_logprobs must be a float tensor, got {logprobs.dtype}")
    _check(tail.shape == ids.shape[:2], f"tail_logmass shape {tuple(tail.shape)} != [B, T] = {shape[:2]}")
    _check(tail.is_floating_point(), f"tail_logmass must be a float tensor, got {tail.dtype}")


def teacher_buckets(targets: TeacherTargets, temperature: float) -> tuple[Tensor | None, Tensor]:
    """The teacher distribution a loss compares against, as fp32 log-probs.

    Sparse: K + 1 buckets, the top-k ids plus one tail bucket, renormalised with a
    log_softmax over the K + 1 log-masses. A negative id is a slot the student's vocabulary has
    no place for (padding after merged ids, or a teacher token without a student counterpart
    in a cross-tokenizer run, :mod:`raykd.data.alignment`): its mass moves into the tail bucket
    (the student's tail is everything outside the listed ids too) and the slot gets none. This undoes fp16 rounding of the cache, so the
    buckets sum to one and KL(p, p) = 0. The cached log-probs were taken at the soft-label
    temperature, so ``temperature`` is not applied again; pass the same one to the student.
    Dense: ``log_softmax(logits / temperature)`` over V.

    Args:
        targets: sparse or dense teacher targets.
        temperature: softmax temperature tau > 0 (dense form only).

    Returns:
        ``(topk_ids [B, T, K], log_p [B, T, K + 1])`` for sparse targets, or
        ``(None, log_p [B, T, V])`` for dense ones. The log-probs can be -inf (a tail of zero).

    Raises:
        ValueError: ``temperature`` is not a positive finite number.
    """
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if targets.form == "dense":
        return None, torch.log_softmax(tempered(targets.logits, temperature), dim=-1)
    top, tail = targets.topk_logprobs.float(), targets.tail_logmass.float()
    unmatched = targets.topk_ids < 0
    if bool(unmatched.any()):  # ids with no place in the student's vocabulary: their mass joins the tail
        tail = torch.logaddexp(tail, torch.where(unmatched, top, -math.inf).logsumexp(-1))
        top = torch.where(unmatched, -math.inf, top)
    masses = torch.cat([top, tail.unsqueeze(-1)], dim=-1)
    return targets.topk_ids, torch.log_softmax(masses, dim=-1)


def retemper(targets: TeacherTargets, cached_temperature: float, temperature: float) -> TeacherTargets:
    """Sparse targets cached at ``cached_temperature`` moved to ``temperature`` (Annealing-KD).

    The cached log-probs are ``z / tau_c - log Z``; scaling them by ``tau_c / tau`` and
    renormalising (which :func:`teacher_buckets` does) gives ``softmax(z / tau)`` exactly on the
    top-k ids. The tail is one bucket whose member tokens are unknown, so it is re-tempered as if
    it were one token: at ``tau > tau_c`` this under-states the tail mass (approximation).
    Dense targets are returned unchanged (losses apply the temperature to the logits).

    Args:
        targets: sparse or dense teacher targets.
        cached_temperature: the soft-label temperature of the cache ``tau_c`` > 0.
        temperature: the wanted temperature ``tau`` > 0.

    Raises:
        ValueError: a temperature is not a positive finite number.
    """
    for t in (cached_temperature, temperature):
        if not 0.0 < t < float("inf"):
            raise ValueError(f"temperatures must be positive finite numbers, got {t}")
    if targets.form == "dense" or cached_temperature == temperature:
        return targets
    f = cached_temperature / temperature
    return TeacherTargets.sparse(targets.topk_ids, targets.topk_logprobs.float() * f, targets.tail_logmass.float() * f)


def truncate_topk(targets: TeacherTargets, k: int) -> TeacherTargets:
    """Sparse targets cut to the teacher's ``k`` most probable ids; the dropped ids' mass joins
    the tail bucket, so the result is exactly what a top-``k`` cache of the same teacher holds
    (up to the cache's rounding). The ids need not be sorted (decoded caches give them in
    descending probability, ties in id order); the kept ids come out sorted by probability.

    Args:
        targets: sparse targets ``[B, T, K]``; dense targets are returned unchanged.
        k: ids to keep, ``1 <= k``; ``k >= K`` returns ``targets`` unchanged.

    Returns:
        Sparse targets ``[B, T, k]`` with ``tail = log(exp(tail) + sum of the dropped probs)``.

    Raises:
        ValueError: ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if targets.form == "dense" or k >= targets.topk_ids.shape[-1]:
        return targets
    lp = targets.topk_logprobs.float()
    kept_lp, order = lp.topk(k, dim=-1)
    dropped = lp.scatter(-1, order, float("-inf"))
    tail = torch.logaddexp(targets.tail_logmass.float(), torch.logsumexp(dropped, dim=-1))
    return TeacherTargets.sparse(targets.topk_ids.gather(-1, order), kept_lp, tail)


def merge_duplicate_ids(ids: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the probabilities of equal ids along the last axis; freed slots become padding.

    Args:
        ids: [B, T, N] int64 ids (negative ids are padding and carry no mass).
        probs: [B, T, N] non-negative masses.

    Returns:
        ``(ids [B, T, N], probs [B, T, N])`` with each id at most once per position, merged ids
        first (in increasing order), then padding (id -1, mass 0).
    """
    probs = torch.where(ids >= 0, probs, 0.0)
    ids = torch.where(ids >= 0, ids, torch.iinfo(torch.int64).max)  # padding sorts last
    sorted_ids, order = ids.sort(dim=-1)
    sorted_p = probs.gather(-1, order)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    group = first.long().cumsum(-1) - 1
    out_p = torch.zeros_like(sorted_p).scatter_add_(-1, group, sorted_p)
    out_ids = torch.full_like(sorted_ids, -1).scatter_(-1, group, sorted_ids)
    out_ids = torch.where(out_ids == torch.iinfo(torch.int64).max, -1, out_ids)
    return out_ids, torch.where(out_ids >= 0, out_p, 0.0)
