"""The vocabulary terms of an objective on chunks of positions, with the LM head inside the chunk.

A causal LM's logits are ``lm_head(h)`` ``[B, T, V]`` of its final hidden states ``h``
``[B, T, H]``. At V = 262,144 and T = 4,096 one fp32 copy for a batch of 8 is 34 GB, and a loss
holds several (logits, log-softmax, their gradients). :func:`chunked_head_loss` runs the head
and the loss on ``N`` positions at a time and, in the same pass, takes the chunk's gradients with
respect to its hidden states and the head's parameters, then frees the chunk; backward only
scales the stored gradients by the incoming one. Peak memory holds one chunk's ``[N, V]``
tensors, the hidden states' gradient ``[B * T, H]`` and the head's ``[V, H]``; the head's matmul
runs once forward and twice backward, as it does unchunked.

The idea follows Liger Kernel's fused linear losses (``LigerFusedLinearJSDFunction``, gradients
taken chunk by chunk in the forward) and TRL's chunked generalized JSD (its
``DistillationTrainer``), written here for every registered logit loss: the chunk's loss is
the objective's own weighted sum of terms on the chunk.

The rule that makes this exact: a logit loss reads each position's logits and targets alone
(:mod:`raykd.losses.registry`), so the sum over the chunks equals the sum over all positions.
Every registered logit loss keeps it (``tests/unit/test_chunked_loss.py`` checks each one against
the unchunked objective, values and gradients). Feature terms read intermediate layers, not the
logits, and run unchunked (:meth:`raykd.losses.Objective.from_hidden`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from raykd.losses.targets import TeacherTargets

ChunkLoss = Callable[[Tensor, Tensor], tuple[Tensor | None, dict[str, Tensor]]]
"""``(logits [n, V] of a chunk, its flat position ids [n]) -> (weighted loss sum with grad, or
None when no term trains; each term's sum over the chunk, detached)``."""


def at_positions(targets: TeacherTargets | None, index: Tensor) -> TeacherTargets | None:
    """The teacher targets at flat positions ``index`` of their ``[B, T]``, as a batch of one row.

    Every tensor field of :class:`~raykd.losses.targets.TeacherTargets` is ``[B, T, ...]``, so
    this holds for any form (sparse ``[B, T, K]``, dense ``[B, T, V]``).

    Args:
        targets: targets over ``[B, T]``, or None.
        index: ``[n]`` int64 positions into the flattened ``B * T``.

    Returns:
        Targets over ``[1, n]`` (None for None).
    """
    if targets is None:
        return None
    fields = {f.name: getattr(targets, f.name) for f in dataclasses.fields(targets)}
    return dataclasses.replace(targets, **{name: t.flatten(0, 1)[index].unsqueeze(0)
                                            for name, t in fields.items() if t is not None})


def chunked_head_loss(hidden: Tensor, head: nn.Module, loss_of: ChunkLoss, chunk_positions: int,
                      positions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """A loss of ``head(hidden)`` computed ``chunk_positions`` rows at a time, never holding the
    logits of all rows at once; its gradient reaches ``hidden`` and the head's parameters.

    Args:
        hidden: ``[N, H]`` final hidden states of the positions that count (with grad).
        head: the LM head, ``[n, H] -> [n, V]`` logits (``nn.Linear``, the model's output
            embeddings); its parameters that require grad get the loss's gradient.
        loss_of: the loss of one chunk (:data:`ChunkLoss`); its weighted sum must be a sum over
            the chunk's positions (so chunks add up).
        chunk_positions: rows per chunk, >= 1; the last chunk may be shorter.
        positions: ``[N]`` the rows' flat position ids, handed to ``loss_of`` chunk by chunk.

    Returns:
        ``(loss, term_sums)``: the scalar fp32 sum of every chunk's weighted loss (with grad when
        grad is enabled and ``hidden`` or the head needs it) and each term's sum over all rows.

    Raises:
        ValueError: ``chunk_positions < 1``.
    """
    if chunk_positions < 1:
        raise ValueError(f"chunk_positions must be >= 1, got {chunk_positions}")
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        sums: dict[str, Tensor] = {}
        loss = _HeadChunks.apply(hidden, head, loss_of, chunk_positions, positions, sums, *params)
        return loss, sums
    total, sums = hidden.new_zeros((), dtype=torch.float32), {}
    for rows in _chunks(len(hidden), chunk_positions):
        value, terms = loss_of(head(hidden[rows]), positions[rows])
        total = total if value is None else total + value
        _add(sums, terms)
    return total, sums


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _add(sums: dict[str, Tensor], terms: dict[str, Tensor]) -> None:
    for name, value in terms.items():
        sums[name] = sums[name] + value if name in sums else value


class _HeadChunks(torch.autograd.Function):
    """:func:`chunked_head_loss` with gradients: each chunk's head and loss run under grad, its
    gradients with respect to the chunk's hidden rows and the head's parameters are taken at
    once (``torch.autograd.grad``, nothing accumulates in ``.grad``) and summed (fp32), and the
    chunk's graph is freed. Backward scales the sums by the incoming scalar gradient in place
    (once: the graph cannot be back-propagated twice)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head: nn.Module, loss_of: ChunkLoss, chunk: int, positions: Tensor,
                sums: dict[str, Tensor], *params: Tensor) -> Tensor:
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_params: list[Tensor | None] = [None] * len(params)
        total = hidden.new_zeros((), dtype=torch.float32)
        for rows in _chunks(len(hidden), chunk):
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(hidden.requires_grad)
                value, terms = loss_of(head(h), positions[rows])
            _add(sums, terms)
            if value is None:  # every logit term has weight 0 (logged only)
                continue
            total = total + value.detach()
            grads = list(torch.autograd.grad(value, [h, *params] if grad_hidden is not None else list(params),
                                             allow_unused=True))
            if grad_hidden is not None and (g := grads.pop(0)) is not None:
                grad_hidden[rows] = g
            for i, g in enumerate(grads):  # the first chunk's gradient is kept, the others are added to it
                if g is not None:
                    g = g.float()
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        grad_params = [torch.zeros_like(p, dtype=torch.float32) if g is None else g for g, p in zip(grad_params, params)]
        ctx.save_for_backward(*([] if grad_hidden is None else [grad_hidden]), *grad_params)
        ctx.has_hidden, ctx.dtypes = grad_hidden is not None, [p.dtype for p in params]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        saved = [g.mul_(grad_out) for g in ctx.saved_tensors]
        grad_hidden = saved.pop(0) if ctx.has_hidden else None
        grad_params = [g.to(dtype) for g, dtype in zip(saved, ctx.dtypes)]
        return (grad_hidden, None, None, None, None, None, *grad_params)
