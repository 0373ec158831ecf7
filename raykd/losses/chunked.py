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


def chunked_head_loss(hidden: Tensor, head: nn.Linear, loss_of: ChunkLoss, chunk_positions: int,
                      positions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """A loss of ``head(hidden)`` computed ``chunk_positions`` rows at a time, never holding the
    logits of all rows at once; its gradient reaches ``hidden`` and the head's weight and bias.

    Args:
        hidden: ``[N, H]`` final hidden states of the positions that count (with grad).
        head: the LM head, an ``nn.Linear`` ``[n, H] -> [n, V]`` (the model's output
            embeddings); its weight ``[V, H]`` and bias, where they require grad, get the loss's
            gradient (the head's own backward is done here: ``g @ W``, ``W``'s gradient summed
            over the chunks in place in fp32).
        loss_of: the loss of one chunk (:data:`ChunkLoss`); its weighted sum must be a sum over
            the chunk's positions (so chunks add up).
        chunk_positions: rows per chunk, >= 1; the last chunk may be shorter.
        positions: ``[N]`` the rows' flat position ids, handed to ``loss_of`` chunk by chunk.

    Returns:
        ``(loss, term_sums)``: the scalar fp32 sum of every chunk's weighted loss (with grad when
        grad is enabled and ``hidden`` or the head needs it) and each term's sum over all rows.

    Raises:
        ValueError: ``chunk_positions < 1``, or the head is not an ``nn.Linear``.
    """
    if chunk_positions < 1:
        raise ValueError(f"chunk_positions must be >= 1, got {chunk_positions}")
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the chunked loss runs the LM head's backward itself: it needs an nn.Linear head, got "
                         f"{type(head).__name__}; set train.loss_chunk_positions=null")
    trains = hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    if torch.is_grad_enabled() and trains:
        sums: dict[str, Tensor] = {}
        loss = _HeadChunks.apply(hidden, head.weight, head.bias, head, loss_of, chunk_positions, positions, sums)
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


def _zeros_if_trained(t: Tensor | None) -> Tensor | None:
    """An fp32 gradient buffer for ``t`` where it requires grad, else None."""
    return torch.zeros_like(t, dtype=torch.float32) if t is not None and t.requires_grad else None


def _add_product(acc: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``acc + a @ b`` in fp32, in place (``addmm_``, no temporary the size of ``acc``) where the
    dtypes agree; in mixed precision the product runs in the autocast dtype, as autograd's
    linear backward would. ``acc`` None: a new fp32 ``a @ b``."""
    if acc is None:
        return torch.mm(a, b).float()
    if a.dtype == b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    return acc.add_(torch.mm(a, b))


class _HeadChunks(torch.autograd.Function):
    """:func:`chunked_head_loss` with gradients. Per chunk: the head's logits (no graph), the
    loss and its gradient ``g`` with respect to those logits (``torch.autograd.grad``), then the
    head's backward by hand: ``g @ W`` into the chunk's rows of the hidden states' gradient,
    ``g^T h`` added in place to the weight's fp32 gradient (:func:`_add_product`), ``g`` summed
    into the bias's. The chunk's tensors are then freed. Backward scales the stored gradients
    by the incoming scalar gradient in place (once: the graph cannot be back-propagated twice)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, head: nn.Linear, loss_of: ChunkLoss,
                chunk: int, positions: Tensor, sums: dict[str, Tensor]) -> Tensor:
        grad_hidden, grad_bias = _zeros_if_trained(hidden), _zeros_if_trained(bias)
        grad_weight = None  # made by the first chunk's product (no zero fill of [V, H])
        total = hidden.new_zeros((), dtype=torch.float32)
        for rows in _chunks(len(hidden), chunk):
            h = hidden[rows]
            logits = head(h).requires_grad_()  # forward runs without grad: a leaf
            with torch.enable_grad():
                value, terms = loss_of(logits, positions[rows])
            _add(sums, terms)
            if value is None:  # every logit term has weight 0 (logged only)
                continue
            total = total + value.detach()
            (g,) = torch.autograd.grad(value, logits)
            if grad_hidden is not None:
                grad_hidden[rows] = torch.mm(g, weight)
            if weight.requires_grad:
                grad_weight = _add_product(grad_weight, g.T, h)
            if grad_bias is not None:
                grad_bias.add_(g.sum(0))
        if grad_weight is None and weight.requires_grad:  # no chunk trained (no position, or weight 0)
            grad_weight = _zeros_if_trained(weight)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        scaled = [None if g is None else g.mul_(grad_out).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*scaled, None, None, None, None, None)
