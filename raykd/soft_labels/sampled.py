"""Sampled soft labels (``labels.form: sampled``): per position, ``S`` token ids drawn from the
teacher's distribution, stored as the distinct ids and their counts.

The estimator (Anshumann et al., ACL 2025, "Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs", Random Sampling KD). At each position the teacher's distribution at the
soft-label temperature, ``p = softmax(z / tau)`` over the whole vocabulary, is sampled ``S``
times with replacement; the target is the empirical distribution ``p_hat_i = c_i / S`` of the
counts ``c_i``. The paper draws from a proposal ``q`` (a tempered teacher) and weights each
drawn id by ``p_i / q_i``; we use the simplest unbiased member of that family, ``q = p``, where
every weight is 1 and nothing but the counts needs storing. Then
``E[c_i] = S p_i``, so ``E[p_hat] = p`` exactly, and for any loss linear in the teacher's
probabilities the expected gradient is the full-vocabulary one. Forward KL is:
``KL(p_hat || q_s) = sum_i p_hat_i log p_hat_i - sum_i p_hat_i log q_s_i``, whose gradient in the
student's logits is ``(q_s - p_hat) / tau`` (over the whole vocabulary: the student's softmax is
computed over all ``V`` ids), with expectation ``(q_s - p) / tau``, the gradient of
``KL(p || q_s)``. (The loss *value* is not unbiased: its first term is the entropy of
``p_hat``, a constant for the student.) A self-normalised ``q != p`` would be biased by
``O(1 / S)``; ``q = p`` has no such bias. The variance per id is ``p_i (1 - p_i) / S``.

Which losses accept it: the sampled target is a sparse distribution with no tail mass
(``tail_logmass = -inf``). A teacher-logit term is unbiased on it only when its gradient is
linear in ``p``: :data:`UNBIASED_TERMS`. Every other term that reads the teacher's distribution
(reverse, symmetric and skewed KL, JSD, TVD, ULD, ...) depends on ``p_hat`` non-linearly (and
reverse-KL terms put the student's mass on ids ``p_hat`` gives 0), so a run that combines them
with ``labels.form=sampled`` is refused when its config loads
(:func:`raykd.methods.validate.validate`).

Determinism: the draws of a block depend only on its logits and on a seed made from
``labels.seed``, its document id and its block index (:func:`block_seeds`), never on how blocks
are batched, so a resumed labeling run writes the same labels (up to fp32 rounding of the
teacher's logits moving a draw that falls within rounding of a cumulative-probability boundary).

Storage (columns of the sampled form, :mod:`raykd.soft_labels.schema`): ``sample_dict`` (the
row's distinct drawn ids), ``sample_index`` (per position, its distinct ids as ascending indices
into the dictionary), ``sample_counts`` (per position, the count of each, as LEB128 varints: one
byte for counts below 128, like uint8; two up to 16,383). Each position's counts sum to ``S``,
which marks where a position ends, so no per-position length is stored. On the demo (SmolLM2-135M,
BBC, ``S = 32``): 14.7 distinct ids per position, 30.6 B per token on disk against 60.8 for
top-32 (``benchmarks/bench_sampled_labels.py``, ``docs/soft-label-cache.md``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from raykd.soft_labels.packing import (
    SchemaError,
    binary_parts,
    decode_dictionary,
    decode_gaps,
    dictionary_column,
    gaps_column,
    position_starts,
    varint_column,
    varint_decode,
)

COLUMNS = ("sample_dict", "sample_index", "sample_counts")
"""Stored columns of the sampled form besides ``label_logprobs``."""

UNBIASED_TERMS = frozenset({"forward_kl"})
"""The teacher-logit loss terms whose gradient is linear in the teacher's probabilities, hence
unbiased on sampled soft labels (see the module docstring)."""


def block_seeds(doc_ids: Iterable[str], block_index: Iterable[int], seed: int) -> np.ndarray:
    """One sampling seed per block: 63 bits of ``sha256(seed, doc id, block index)``.

    Args:
        doc_ids: ``[B]`` document ids.
        block_index: ``[B]`` block numbers inside their documents.
        seed: ``labels.seed``.

    Returns:
        int64 ``[B]``, each in ``[0, 2^63)``.
    """
    out = [int.from_bytes(hashlib.sha256(f"{seed}\0{d}\0{int(i)}".encode()).digest()[:8], "little") >> 1
           for d, i in zip(doc_ids, block_index)]
    return np.asarray(out, dtype=np.int64)


def distinct_counts(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ids of each position's draws and how often each was drawn.

    Args:
        draws: int ``[N, S]`` ids drawn at ``N`` positions.

    Returns:
        ``(pos [M], ids [M], counts [M])``: a ragged array sorted by position, then id; each
        position's counts sum to ``S``.
    """
    n, s = draws.shape
    d = np.sort(np.asarray(draws, dtype=np.int64), axis=1)
    new = np.ones_like(d, dtype=bool)
    new[:, 1:] = d[:, 1:] != d[:, :-1]
    pos, col = np.nonzero(new)  # row-major: by position, then id
    starts = pos * s + col  # every position starts a run at column 0, so runs end at the next start
    return pos, d[pos, col], np.diff(np.append(starts, n * s))


def encode_columns(draws: np.ndarray, row_of_pos: np.ndarray, rows: int) -> list[pa.BinaryArray]:
    """The ``sample_dict``, ``sample_index`` and ``sample_counts`` columns of ``rows`` rows.

    Args:
        draws: int ``[N, S]`` the draws of the ``N`` real positions, row by row.
        row_of_pos: int ``[N]`` the row of each position (non-decreasing).
        rows: ``B``.

    Raises:
        SchemaError: a negative id.
    """
    if draws.size and draws.min() < 0:
        raise SchemaError("sampled soft labels hold negative ids")
    pos, ids, counts = distinct_counts(draws)
    dict_col, local = dictionary_column(ids, row_of_pos[pos], rows)
    return [dict_col, gaps_column(local, pos, row_of_pos, rows), varint_column(counts, row_of_pos[pos], rows)]


def decode_columns(columns: dict[str, pa.Array], row_of_pos: np.ndarray, samples: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Inverse of :func:`encode_columns` as a dense target: per position its distinct ids in
    descending count (ties: ascending id), padded with id -1.

    Args:
        columns: the three :data:`COLUMNS` by name.
        row_of_pos: int ``[N]`` the row of each real position.
        samples: ``S`` from the schema's metadata, used only when there are no positions
            (otherwise it follows from the counts).

    Returns:
        ``(ids int64 [N, S], logprobs float32 [N, S], S)``: ``log(count / S)``, ``-inf`` at padding.

    Raises:
        SchemaError: the counts do not sum to ``S`` per position or disagree with the ids.
    """
    n = len(row_of_pos)
    counts = varint_decode(binary_parts(columns["sample_counts"])[0])
    if n == 0:
        s = int(samples or 1)
        return np.zeros((0, s), np.int64), np.zeros((0, s), np.float32), s
    s, rest = divmod(int(counts.sum()), n)
    if rest or s < 1 or (counts < 1).any():
        raise SchemaError(f"sample_counts sum to {int(counts.sum())} over {n} positions, not S per position; the shard is corrupt")
    ends = np.cumsum(counts)
    if not np.isin(np.arange(1, n + 1) * s, ends).all():
        raise SchemaError(f"sample_counts of some position do not sum to S={s}; the shard is corrupt")
    pos = (ends - 1) // s  # a position's counts end exactly at a multiple of S
    dict_ids, dict_start = decode_dictionary(columns["sample_dict"])
    ids = dict_ids[decode_gaps(columns["sample_index"], pos) + dict_start[row_of_pos[pos]]]
    order = np.lexsort((ids, -counts, pos))  # by position, count descending, id
    first = np.flatnonzero(position_starts(pos[order]))
    slot = np.arange(len(pos)) - np.repeat(first, np.diff(np.append(first, len(pos))))
    out_ids = np.full((n, s), -1, np.int64)
    out_lp = np.full((n, s), -math.inf, np.float32)
    out_ids[pos[order], slot] = ids[order]
    out_lp[pos[order], slot] = np.log(counts[order] / s)
    return out_ids, out_lp, s
