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
            gradient (the head's backward is done here: ``g @ W``, and ``W``'s gradient summed
            over the chunks in place, in fp32).
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
        loss = _HeadChunks.apply(hidden, head.weight, head.bias, loss_of, chunk_positions, positions, sums)
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


def _add_product(acc: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``acc + a @ b`` in fp32, in place (``addmm_``, no temporary the size of ``acc``) where the
    dtypes agree, else with the product in the lower precision of the two (mixed precision, as
    autograd's linear backward runs it). ``acc`` None: a new fp32 ``a @ b``."""
    if a.dtype != b.dtype:
        low = a.dtype if a.element_size() < b.element_size() else b.dtype
        a, b = a.to(low), b.to(low)
    if acc is None:
        return torch.mm(a, b).float()
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    return acc.add_(torch.mm(a, b))


class _Head(torch.autograd.Function):
    """``h W^T + b`` of ``h`` ``[n, H]``, whose backward adds the weight's and bias's gradients
    into the fp32 buffers ``grads`` (a list ``[weight, bias]``, None until the first chunk) in
    place instead of returning them, so the chunks' ``[V, H]`` gradients are summed without a
    temporary each. Under autocast the forward's matmul runs in the autocast dtype, and so do
    the backward's."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, grads: list[Tensor | None]) -> Tensor:
        ctx.save_for_backward(h, weight)
        ctx.grads, ctx.trains = grads, (weight.requires_grad, bias is not None and bias.requires_grad)
        return torch.nn.functional.linear(h, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # g: [n, V], h: [n, H]
        h, weight = ctx.saved_tensors
        if ctx.trains[0]:
            ctx.grads[0] = _add_product(ctx.grads[0], g.T, h)
        if ctx.trains[1]:
            total = g.float().sum(0)
            ctx.grads[1] = total if ctx.grads[1] is None else ctx.grads[1].add_(total)
        return g.mm(weight.to(g.dtype)), None, None, None


class _HeadChunks(torch.autograd.Function):
    """:func:`chunked_head_loss` with gradients. Per chunk, under grad: the head's logits
    (:class:`_Head`, which sums the head's gradients into shared buffers in place), the loss, and
    its gradient with respect to the chunk's hidden rows (``torch.autograd.grad``, nothing
    accumulates in ``.grad``), written into those rows; the chunk's graph and logits are then
    freed. Backward scales the stored gradients by the incoming scalar gradient in place (once:
    the graph cannot be back-propagated twice)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, loss_of: ChunkLoss, chunk: int,
                positions: Tensor, sums: dict[str, Tensor]) -> Tensor:
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        head_grads: list[Tensor | None] = [None, None]
        total = hidden.new_zeros((), dtype=torch.float32)
        for rows in _chunks(len(hidden), chunk):
            h = hidden[rows].detach().requires_grad_()
            with torch.enable_grad():  # the logits are not bound to a name: the loss frees them when done
                value, terms = loss_of(_Head.apply(h, weight, bias, head_grads), positions[rows])
            _add(sums, terms)
            if value is None:  # every logit term has weight 0 (logged only)
                continue
            total = total + value.detach()
            (g,) = torch.autograd.grad(value, h)
            if grad_hidden is not None:
                grad_hidden[rows] = g
        for i, p in enumerate((weight, bias)):  # a trained parameter no chunk reached (no position, or weight 0)
            if head_grads[i] is None and p is not None and p.requires_grad:
                head_grads[i] = torch.zeros_like(p, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, *head_grads)
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        scaled = [None if g is None else g.mul_(grad_out).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*scaled, None, None, None, None)
