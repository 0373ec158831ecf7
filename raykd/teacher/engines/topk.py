"""Sparse soft labels from logits on the logits' own device: top-k, tail mass, label log-prob
(or, for sampled soft labels, seeded draws from the whole distribution: :func:`sample_and_mass`),
and the packing of the four :data:`~raykd.teacher.engines.base.ScoreResult` arrays into one
byte buffer, so a chunk reaches the host in a single copy.

The maths is the log-softmax's, without materialising the ``[N, V]`` log-probabilities:

- the top-k of ``log_softmax(z)`` is the top-k of ``z`` (the softmax is monotone), so the top-k
  runs on the raw logits in their own dtype;
- the normaliser is one ``log(sum(exp(z - max)))`` (``max`` is the top-1 logit) and
  ``logprob = (z - max) - log_norm``, the same formula as torch's log-softmax;
- the tail is a sum of positive terms over the tokens outside the top-k (no ``total - top``
  cancellation, so a peaked teacher's tiny tail keeps its digits).

For a large vocabulary the top-k first narrows the row to a few groups: the row is cut into
``G`` groups of ``group_size`` tokens; one pass computes each group's max and
``sum(exp(z - group max))``; the ``K`` groups with the largest maxima hold a valid top-k of the
row (if a top-k token sat in another group, that group's max would beat ``K`` group maxima,
each a distinct token at least as large: ``K`` tokens above it, a contradiction). The exact
top-k then runs over ``K * group_size`` candidates instead of ``V`` tokens, and the groups left
out add their sums to the normaliser and to the tail. The one pass over the logits is a Triton
kernel on CUDA when Triton is installed, plain torch otherwise (same numbers up to fp32
rounding). All sums are in fp32.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import NamedTuple

import numpy as np
import torch

from raykd.teacher.engines.base import ids_dtype

log = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 128
"""Tokens per group of the grouped top-k (49,152 = 384 groups of 128)."""

MIN_GROUPS_PER_K = 4
"""The grouped top-k runs when the vocabulary holds at least this many groups per top-k slot
(``V // group_size >= 4 * K``): fewer would leave too little to skip."""


class SoftLabels(NamedTuple):
    """Device tensors of one scored chunk of ``R`` rows of ``T`` tokens."""

    topk_ids: object  # [R, T, K] int64
    topk_logprobs: object  # [R, T, K] float32
    tail_logmass: object  # [R, T] float32
    label_logprobs: object  # [R, T] float32, 0 at the last position and before padding


class TopK(NamedTuple):
    """:func:`topk_and_tail` of ``N`` rows."""

    logprobs: object  # [N, K] float32, descending
    ids: object  # [N, K] int64
    tail_logmass: object  # [N] float32
    max_logit: object  # [N] float32
    log_norm: object  # [N] float32: log sum exp(z - max_logit)


def num_groups(vocab_size: int, k: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Groups of the grouped top-k for a row of ``vocab_size`` tokens, or 0 for the plain
    top-k over the whole row (too small a vocabulary for ``k``, or ``group_size`` < 1)."""
    if group_size < 1:
        return 0
    g = vocab_size // group_size
    return g if g >= MIN_GROUPS_PER_K * k else 0


# ---------------------------------------------------------------------------------------------
# The one pass over the logits: per-group max and sum of exp.

try:  # optional: the fused pass on CUDA; plain torch without it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _group_stats_kernel(z_ptr, gmax_ptr, gsum_ptr, row_stride, num_groups,
                            GROUP: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr):
        """Program (row, block): max and sum of exp of ``GROUPS_PER_PROGRAM`` groups of a row."""
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
        in_row = g < num_groups
        offs = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        z = tl.load(z_ptr + row * row_stride + offs, mask=in_row[:, None], other=0.0).to(tl.float32)
        gmax = tl.max(z, axis=1)
        gsum = tl.sum(tl.exp(z - gmax[:, None]), axis=1)
        tl.store(gmax_ptr + row * num_groups + g, gmax, mask=in_row)
        tl.store(gsum_ptr + row * num_groups + g, gsum, mask=in_row)


_TRITON_FAILED: list[str] = []  # the error of a failed first launch: torch from then on


def triton_available() -> bool:
    """Whether :func:`group_stats` can use its Triton kernel (Triton installed,
    ``RAYKD_NO_TRITON`` not set to 1, and no launch of it has failed in this process)."""
    return triton is not None and os.environ.get("RAYKD_NO_TRITON") != "1" and not _TRITON_FAILED


def _group_stats_triton(z, group_size: int):
    n, width = z.shape
    g = width // group_size
    gmax = torch.empty((n, g), dtype=torch.float32, device=z.device)
    gsum = torch.empty_like(gmax)
    per_program = max(1, min(16, 2048 // group_size))
    grid = (n, -(-g // per_program))
    _group_stats_kernel[grid](z, gmax, gsum, z.stride(0), g, GROUP=group_size, GROUPS_PER_PROGRAM=per_program, num_warps=4)
    return gmax, gsum


def _group_stats_torch(z, group_size: int):
    width = z.shape[1]
    x = z.unflatten(1, (width // group_size, group_size))
    gmax = x.amax(-1).float()
    gsum = (x - gmax.unsqueeze(-1)).exp_().sum(-1)  # one fp32 temporary [N, V]
    return gmax, gsum


def group_stats(z, group_size: int, backend: str = "auto"):
    """Per-group max and sum of exp of logits, in one pass.

    Args:
        z: float tensor ``[N, G * group_size]`` (any float dtype; unit stride along the row).
        group_size: tokens per group; must divide the row length.
        backend: ``auto`` (Triton for a CUDA tensor when Triton is installed and
            ``group_size`` is a power of 2, else torch; a Triton launch that fails logs a
            warning and switches the process to torch), ``triton`` (also on CPU tensors under
            ``TRITON_INTERPRET=1``; errors propagate) or ``torch``.

    Returns:
        ``(gmax [N, G] fp32, gsum [N, G] fp32)`` with ``gsum = sum(exp(z - gmax))`` per group.

    Raises:
        ValueError: ``group_size`` does not divide the row, a non-unit stride along the row,
            an unknown ``backend``, or ``backend="triton"`` without Triton or with a
            ``group_size`` that is not a power of 2.
    """
    if group_size < 1 or z.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} must divide the row length {z.shape[1]}")
    if z.stride(1) != 1:
        raise ValueError("group_stats needs rows with unit stride; pass z.contiguous()")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; valid: ['auto', 'torch', 'triton']")
    fusable = triton_available() and group_size & (group_size - 1) == 0
    if backend == "triton" and not fusable:
        raise ValueError("backend='triton' needs Triton installed (pip install triton), RAYKD_NO_TRITON unset "
                         f"and a power-of-2 group_size (got {group_size})")
    if backend == "triton":
        return _group_stats_triton(z, group_size)
    if backend == "auto" and z.is_cuda and fusable:
        try:
            return _group_stats_triton(z, group_size)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot build here: same numbers in torch
            _TRITON_FAILED.append(f"{type(e).__name__}: {e}")
            log.warning("the Triton pass of the teacher's top-k failed (%s); using plain torch from now on",
                        _TRITON_FAILED[-1][:500])
    return _group_stats_torch(z, group_size)


# ---------------------------------------------------------------------------------------------
# Top-k and tail.

def _grouped_candidates(z, k: int, group_size: int, g: int, backend: str):
    """The grouped top-k's candidates ``[N, K * group_size (+ V mod group_size)]`` in ``z``'s
    dtype, the selected groups ``[N, K]``, and every group's max and sum of exp ``[N, G]``."""
    n, v = z.shape
    gmax, gsum = group_stats(z[:, : g * group_size], group_size, backend)
    sel = gmax.topk(k, dim=-1, sorted=False).indices  # [N, K] group indices
    grouped = z[:, : g * group_size].unflatten(1, (g, group_size))
    cand = grouped.gather(1, sel.unsqueeze(-1).expand(n, k, group_size)).flatten(1)  # [N, K * gs]
    if g * group_size < v:  # the last partial group is always a candidate
        cand = torch.cat([cand, z[:, g * group_size :]], dim=1)
    return cand, sel, gmax, gsum


def _candidate_ids(pos, sel, k: int, group_size: int, g: int):
    """Vocabulary ids of candidate positions ``pos`` [N, K] of :func:`_grouped_candidates`."""
    in_groups = pos < k * group_size
    slot = torch.where(in_groups, pos // group_size, 0)
    grouped_id = sel.gather(1, slot) * group_size + pos % group_size
    return torch.where(in_groups, grouped_id, g * group_size + pos - k * group_size)


def topk_and_tail(z, k: int, group_size: int = DEFAULT_GROUP_SIZE, backend: str = "auto") -> TopK:
    """Top-k log-probabilities and the log tail mass of ``softmax(z)``, without the ``[N, V]``
    log-probabilities.

    Args:
        z: float tensor ``[N, V]`` of logits (already divided by the temperature; any float
            dtype, the sums are fp32).
        k: ``K``, 1 <= K <= V.
        group_size: tokens per group of the grouped top-k (see the module docstring); the
            plain top-k over the row runs when :func:`num_groups` is 0.
        backend: the pass over the logits (:func:`group_stats`).

    Returns:
        :class:`TopK`: ``logprobs`` ``[N, K]`` descending, ``ids`` ``[N, K]``, ``tail_logmass``
        ``[N]`` (the exact log of the mass outside the top-k; ``-inf`` when K = V), and the
        ``max_logit`` and ``log_norm`` ``[N]`` with ``log_softmax(z) = z - max_logit - log_norm``.
        Among tied logits (frequent in bf16), which tokens enter the top-k and in which order
        is unspecified, as for ``torch.topk``; the tail always holds exactly the rest.

    Raises:
        ValueError: ``k`` outside ``[1, V]``.
    """
    v = z.shape[1]
    if not 1 <= k <= v:
        raise ValueError(f"k={k} must lie in [1, {v}]")
    g = num_groups(v, k, group_size)
    if g:
        cand, sel, gmax, gsum = _grouped_candidates(z, k, group_size, g, backend)
    else:
        cand = z
    top_vals, pos = cand.topk(k, dim=-1)
    top_vals = top_vals.float()
    m = top_vals[:, :1]
    e = (cand - m).exp_()  # fp32 [N, C] (a new tensor: z is never written)
    total = e.sum(-1)
    tail = e.scatter_(1, pos, 0.0).sum(-1)
    del e
    if g:
        ids = _candidate_ids(pos, sel, k, group_size, g)
        rest = (gsum * torch.exp(gmax - m)).scatter_(1, sel, 0.0).sum(-1)  # groups left out
        total, tail = total + rest, tail + rest
    else:
        ids = pos
    log_norm = torch.log(total)
    return TopK((top_vals - m) - log_norm[:, None], ids, torch.log(tail) - log_norm, m.squeeze(1), log_norm)


# ---------------------------------------------------------------------------------------------
# Sampled soft labels: draws from the whole distribution.

DRAW_SCHEMES = ("independent", "systematic")
"""How the ``S`` uniforms of a position are made (:func:`row_uniforms`)."""


def row_uniforms(seeds, positions: int, draws: int, scheme: str = "independent"):
    """Uniforms in ``[0, 1)`` for the draws of ``R`` rows, each row's from its own seed, on the CPU
    (so they do not depend on the device, the batch or the other rows).

    ``independent``: ``S`` independent uniforms per position (multinomial draws, as in Anshumann et
    al. 2025). ``systematic``: one uniform ``U`` per position and the ``S`` points ``(i + U) / S``
    (systematic resampling, Kitagawa 1996): an id of probability ``p`` is still drawn ``S p`` times
    in expectation, but its count is ``floor(S p)`` or ``ceil(S p)``, so the target's variance is
    the least any unbiased scheme of ``S`` draws gives.

    Args:
        seeds: ``R`` integer seeds in ``[0, 2^63)``.
        positions: ``T``.
        draws: ``S``.
        scheme: one of :data:`DRAW_SCHEMES`.

    Returns:
        fp32 tensor ``[R * T, S]``.

    Raises:
        ValueError: an unknown ``scheme``.
    """
    if scheme not in DRAW_SCHEMES:
        raise ValueError(f"draws must be one of {DRAW_SCHEMES}, got {scheme!r}")
    width = draws if scheme == "independent" else 1
    u = torch.cat([torch.rand((positions, width), generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])
    if scheme == "systematic":
        u = (torch.arange(draws, dtype=torch.float32) + u) / draws
    return u


def sample_and_mass(z, k: int, seeds, draws: str = "independent") -> TopK:
    """``K`` draws with replacement per row of ``softmax(z)``, by inverting its cumulative sum
    (Anshumann et al. 2025, "Sparse Logit Sampling": the sampled form of soft labels,
    :mod:`raykd.soft_labels.sampled`). The sum is fp32, so an id with probability below about
    1e-7 of the row's total is drawn with that much error.

    Args:
        z: float tensor ``[R * T, V]`` of logits (already divided by the temperature).
        k: draws per position ``S``.
        seeds: ``R`` seeds, one per row of ``T`` positions (:func:`row_uniforms`).
        draws: ``independent`` or ``systematic`` (:func:`row_uniforms`).

    Returns:
        :class:`TopK` with ``ids`` ``[N, S]`` the draws in ascending id order (repeats kept),
        ``logprobs`` ``[N, S]`` their log-probabilities, ``tail_logmass`` ``[N]`` the log of the
        mass outside the distinct drawn ids (``log(1 - sum)``, ``-inf`` when they hold it all),
        and ``max_logit`` / ``log_norm`` as :func:`topk_and_tail` gives them.

    Raises:
        ValueError: ``z``'s rows do not split into ``len(seeds)`` rows of positions, or ``k < 1``.
    """
    n, v = z.shape
    if k < 1 or not len(seeds) or n % len(seeds):
        raise ValueError(f"need k >= 1 draws and {n} positions that split into {len(seeds)} rows, got k={k}")
    m = z.amax(-1, keepdim=True).float()
    cdf = (z.float() - m).exp_().cumsum_(-1)  # fp32 [N, V], the one temporary of the row's size
    total = cdf[:, -1:]
    u = row_uniforms(seeds, n // len(seeds), k, draws).to(z.device)
    ids = torch.searchsorted(cdf, (u * total).contiguous(), right=True).clamp_(max=v - 1).sort(-1).values
    del cdf
    log_norm = total.squeeze(1).log()
    logprobs = (z.gather(1, ids).float() - m) - log_norm[:, None]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    covered = torch.where(first, logprobs.exp(), 0.0).sum(-1)
    return TopK(logprobs, ids, torch.log1p(-covered.clamp(max=1.0)), m.squeeze(1), log_norm)


def soft_labels_of_logits(logits, input_ids, attention_mask=None, *, k: int, temperature: float = 1.0,
                          group_size: int = DEFAULT_GROUP_SIZE, backend: str = "auto", seeds=None,
                          draws: str = "independent") -> SoftLabels:
    """The :data:`~raykd.teacher.engines.base.ScoreResult` quantities of a chunk, on the
    logits' device.

    Args:
        logits: ``[R, T, V]`` next-token logits (any float dtype).
        input_ids: long ``[R, T]`` (the next token of position ``t`` is ``input_ids[:, t + 1]``).
        attention_mask: 0/1 ``[R, T]`` or None (all real tokens).
        k: ``K`` (``S`` draws with ``seeds``).
        temperature: softmax temperature > 0 of ``topk_logprobs`` and ``tail_logmass``; the
            label log-prob is always at temperature 1.
        group_size, backend: see :func:`topk_and_tail`.
        seeds: None for the top-k; ``R`` seeds for ``k`` draws per position instead
            (:func:`sample_and_mass`: the draws in ascending order, their log-probs and the mass
            outside the distinct ones).
        draws: how the draws' uniforms are made (:func:`row_uniforms`).

    Returns:
        :class:`SoftLabels` (``topk_ids`` int64, the rest fp32), ``label_logprobs`` 0 at the
        last position and where the next token is padding.

    Raises:
        ValueError: ``k`` outside ``[1, V]`` (top-k), or seeds that do not match the rows.
    """
    r, t, v = logits.shape
    flat = logits.reshape(r * t, v)
    z = flat if temperature == 1.0 else flat.float() / temperature
    top = topk_and_tail(z, k, group_size, backend) if seeds is None else sample_and_mass(z, k, seeds, draws)
    del z
    if temperature == 1.0:
        m1, norm1 = top.max_logit, top.log_norm
    else:
        one = topk_and_tail(flat, 1, group_size, backend)
        m1, norm1 = one.max_logit, one.log_norm
    next_logit = logits[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1).float()
    label = (next_logit - m1.view(r, t)[:, :-1]) - norm1.view(r, t)[:, :-1]
    if attention_mask is not None:
        label = label * attention_mask[:, 1:]
    label = torch.nn.functional.pad(label, (0, 1))
    return SoftLabels(top.ids.view(r, t, k), top.logprobs.view(r, t, k), top.tail_logmass.view(r, t), label)


# ---------------------------------------------------------------------------------------------
# One byte buffer per chunk: [tail f32 | label f32 | ids u16 or i32 | logprobs f16].

def pack_soft_labels(labels: SoftLabels, vocab_size: int):
    """The chunk's four arrays in their :data:`ScoreResult` dtypes, as one uint8 tensor on the
    same device (ids as 16 bits when ``vocab_size`` <= 65,536, else 32; log-probs fp16).

    Returns:
        uint8 tensor ``[R * T * (8 + K * (id bytes + 2))]``; :func:`unpack_soft_labels` reads it.
    """
    id_dtype = torch.int16 if vocab_size <= 1 << 16 else torch.int32  # int16 bits are the uint16 ids
    parts = [labels.tail_logmass.float(), labels.label_logprobs.float(),
             labels.topk_ids.to(id_dtype), labels.topk_logprobs.to(torch.float16)]
    return torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in parts])


def unpack_soft_labels(raw: np.ndarray, rows: int, seq_len: int, k: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Views of a :func:`pack_soft_labels` buffer as ``ScoreResult`` arrays of ``rows`` rows.

    Args:
        raw: uint8 array ``[R * T * (8 + K * (id bytes + 2))]`` on the host.

    Returns:
        ``topk_ids`` ``[R, T, K]`` uint16 or int32, ``topk_logprobs`` ``[R, T, K]`` float16,
        ``tail_logmass`` and ``label_logprobs`` ``[R, T]`` float32 (views of ``raw``).

    Raises:
        ValueError: ``raw`` has the wrong size for the shape.
    """
    n, id_dt = rows * seq_len, ids_dtype(vocab_size)
    sizes = [4 * n, 4 * n, n * k * id_dt.itemsize, 2 * n * k]
    if raw.size != sum(sizes):
        raise ValueError(f"packed soft labels hold {raw.size} bytes, expected {sum(sizes)} for [{rows}, {seq_len}, {k}]")
    cuts = np.cumsum([0] + sizes)
    seg = [raw[a:b] for a, b in itertools.pairwise(cuts)]
    return {
        "topk_ids": seg[2].view(id_dt).reshape(rows, seq_len, k),
        "topk_logprobs": seg[3].view(np.float16).reshape(rows, seq_len, k),
        "tail_logmass": seg[0].view(np.float32).reshape(rows, seq_len),
        "label_logprobs": seg[1].view(np.float32).reshape(rows, seq_len),
    }
