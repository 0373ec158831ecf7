"""The Arrow schema of soft-label shards (version 2), its encoder, decoder and token counts.

Two forms share version 2 and every column but the labels': ``topk`` (the teacher's top-k
log-probs and the tail mass, the table below) and ``sampled`` (``S`` ids drawn from the
teacher's distribution, stored as distinct ids and counts; :mod:`raykd.soft_labels.sampled`).
A shard's form follows from its columns; :func:`decode_batch` gives both as the same arrays.

One row is one training block of ``T`` tokens, right-padded, of which the first ``n`` are real.
Only the ``n`` real positions are stored (padding costs nothing); :func:`decode_batch` pads the
arrays back to ``[B, T]`` / ``[B, T, K]``, so readers see the same dense arrays as in version 1.
Per row ``K`` is the length of ``topk_sqrtp`` over ``n``; ``T`` is the width of ``loss_mask``.

===============  ================================  ===============================================
column           Arrow type                        meaning
===============  ================================  ===============================================
doc_id           string                            source document (the split is by document)
block_index      int32                             block number inside the document
input_ids        list<int32>                       the ``n`` real token ids
attention_mask   list<uint8>                       ``n`` ones (kept so readers selecting it work)
loss_mask        fixed_size_list<uint8>[T]         1 = position t has a next-token target; gives T
topk_dict        binary                            the row's distinct top-k ids, ascending, as
                                                   LEB128 varints of their gaps (first: the id)
topk_index       binary                            per position (``n``, in order), its ``K`` top-k
                                                   ids as ascending indices into ``topk_dict``,
                                                   LEB128 varints of their gaps (first: the index)
topk_sqrtp       binary                            ``n * K`` uint8 ``round(127 * sqrt(p))``, in
                                                   ``topk_index`` order (p = teacher probability at
                                                   the soft-label temperature)
top1_rank        binary                            ``n`` uint8: where the teacher's top-1 sits in
                                                   the position's stable descending-``topk_sqrtp``
                                                   order (almost always 0)
tail_sqrtp       binary                            ``n`` uint8 ``round(127 * sqrt(tail mass))``
label_logprobs   binary                            ``n`` little-endian float16: teacher log-prob
                                                   of token t+1 at temperature 1 (0 at the last
                                                   real position)
===============  ================================  ===============================================

Position ``t`` describes token ``t + 1``. What is lossy, and by how much:

- Probabilities are stored as ``q = round(L * sqrt(p))`` with ``L`` = :data:`SQRT_LEVELS` = 127
  (7 of the byte's 8 bits). A uniform step in ``sqrt(p)`` spends the bits where a KL divergence
  looks: to second order ``KL(p || p') = 2 * sum_i (sqrt(p_i) - sqrt(p'_i))^2``, so each of the
  ``K + 1`` buckets (top-k and tail) adds at most ``2 * (1 / 2L)^2`` whatever its probability.
  Bound: ``KL <= (K + 1) / (2 L^2)`` = 1.0e-3 nats at K = 32 (every error at its maximum);
  expected ``(K + 1) / (6 L^2)`` = 3.4e-4. Measured on SmolLM2-135M labels of BBC articles
  (``benchmarks/bench_cache_bytes.py``): mean 3.2e-4, largest single position 6.3e-4. A level
  of 0 (``p < 1.6e-5``) decodes to ``sqrt(p) = 0.3 / L``, never to ``-inf``.
- The top-1 id is exact (``top1_rank``); the other ids come back in descending probability
  order, ties (equal ``q``) in ascending id order, so the order of tied ids may differ from the
  teacher's. The set of ids is exact.
- ``label_logprobs`` are float16 (relative error <= 2^-11).
- A teacher ``tail_logmass`` of ``-inf`` (K = V) decodes to ``2 * log(0.3 / L)`` (about -12.1).

Size, measured by ``benchmarks/bench_cache_bytes.py`` (SmolLM2-135M, 200 BBC articles, T = 256,
K = 32, written with ``compression="zstd"`` and Parquet's default encodings, as the labeling
pipeline writes): 59.2 B per real token for whole articles (v1: 124.9) and 62.4 for headline +
first paragraph (85% padding; v1: 700.5). The ids take 35-37 B, ``topk_sqrtp`` 20 B. The
varint and uint8 streams are ``binary`` columns because Parquet stores a ``list<uint8>`` as
dictionary-coded INT32 whose bit-packing defeats zstd; laid out as bytes, zstd's entropy stage
codes them (no writer option is needed).

Rejected alternatives, measured on the same labels (bytes per real token at K = 32, zstd):
top-k ids as uint16 in rank order 52-56 B; sorted and gap-coded per position 39 B; log-probs
quantised on a log scale relative to the top-1 cost 2-4 B more than ``sqrt(p)`` at the same
mean KL and have no per-position bound.

Padding positions (``attention_mask`` 0) decode to ``input_ids`` = the schema's ``pad_id``
metadata (0 when absent), ``topk_ids`` = ``0 .. K-1``, ``topk_logprobs`` and ``tail_logmass``
= ``-log(K + 1)`` (a uniform distribution over the ``K + 1`` buckets) and ``label_logprobs`` 0:
finite everywhere, so a loss masked there stays finite (and so does its gradient).

The sampled form stores ``sample_dict``, ``sample_index`` and ``sample_counts`` (binary, laid
out as ``topk_dict`` / ``topk_index``; counts as varints) and ``label_logprobs`` in place of the
top-k's label columns; its schema metadata adds ``form: sampled`` and ``samples: S`` (``k`` is
``S``, the decoded width). It decodes to ``topk_ids`` ``[B, T, S]`` (the distinct drawn ids by
descending count, then -1), ``topk_logprobs`` float32 ``log(count / S)`` (``-inf`` after the
distinct ids: fp16 would bias the estimate by up to 0.2%) and ``tail_logmass`` ``-inf``: a
sparse distribution with no tail. Its top-1 is the most drawn id, not necessarily the teacher's.

Bump :data:`SCHEMA_VERSION` on any change: the version is part of the cache key and is checked
when a cache is opened (caches of another version must be relabeled).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd.soft_labels import sampled
from raykd.soft_labels.packing import (
    SchemaError,
    binary_column,
    binary_parts,
    decode_dictionary,
    decode_gaps,
    dictionary_column,
    gaps_column,
    list_column,
    varint_decode,
    varint_encode,
)

__all__ = [
    "BLOCK_COLUMNS", "DECODED_LABELS", "FORMS", "LABEL_COLUMNS", "META_PREFIX", "SCHEMA_VERSION", "SQRT_LEVELS",
    "SchemaError", "count_tokens", "decode_batch", "encode_batch", "form_of", "from_sqrt_levels", "label_columns",
    "schema_metadata", "soft_label_schema", "to_sqrt_levels", "varint_decode", "varint_encode",
]

SCHEMA_VERSION = 2
META_PREFIX = b"raykd."

SQRT_LEVELS = 127
"""``L``: probabilities are stored as ``round(L * sqrt(p))`` (see the module docstring)."""

ZERO_LEVEL = 0.3
"""Level 0 decodes to ``sqrt(p) = ZERO_LEVEL / L`` (inside the bin ``[0, 0.5 / L)``)."""

LabelForm = Literal["topk", "sampled"]
FORMS: tuple[LabelForm, ...] = ("topk", "sampled")
"""The soft-label forms (``labels.form``)."""

BLOCK_COLUMNS = ("doc_id", "block_index", "input_ids", "attention_mask", "loss_mask")
"""Columns describing the block (shared by every teacher of a joined cache)."""

LABEL_COLUMNS = ("topk_dict", "topk_index", "topk_sqrtp", "top1_rank", "tail_sqrtp", "label_logprobs")
"""Stored columns of one teacher's top-k labels."""

SAMPLED_LABEL_COLUMNS = (*sampled.COLUMNS, "label_logprobs")
"""Stored columns of one teacher's sampled labels."""

DECODED_LABELS = ("topk_ids", "topk_logprobs", "tail_logmass", "label_logprobs")
"""Keys of one teacher's labels in :func:`decode_batch`'s output (both forms)."""


def label_columns(form: str) -> tuple[str, ...]:
    """The stored label columns of ``form`` (``topk`` or ``sampled``).

    Raises:
        SchemaError: an unknown form.
    """
    if form not in FORMS:
        raise SchemaError(f"unknown soft-label form {form!r}; valid: {list(FORMS)}")
    return SAMPLED_LABEL_COLUMNS if form == "sampled" else LABEL_COLUMNS


def form_of(column_names: list[str] | tuple[str, ...]) -> LabelForm:
    """The form of a shard with these columns (``sampled`` when it has ``sample_counts``)."""
    return "sampled" if "sample_counts" in column_names else "topk"


def soft_label_schema(seq_len: int, k: int, vocab_size: int, metadata: dict[str, str] | None = None,
                      *, pad_id: int = 0, form: LabelForm = "topk") -> pa.Schema:
    """The Arrow schema for blocks of ``seq_len`` tokens and their labels.

    Args:
        seq_len: ``T``.
        k: ``K`` of the top-k form, ``S`` (draws per position) of the sampled form (recorded in
            the metadata; each row's width also follows from its columns).
        vocab_size: teacher vocabulary size ``V`` (recorded in the metadata).
        metadata: extra ``raykd.*`` key/values stored in the schema (and Parquet footer).
        pad_id: the id :func:`decode_batch` puts at padding positions (metadata ``pad_id``).
        form: ``topk`` or ``sampled`` (metadata ``form`` and ``samples`` for the sampled form).

    Raises:
        SchemaError: an unknown form.
    """
    extra = {"form": form, "samples": k} if form == "sampled" else {}
    meta = {META_PREFIX + b"schema_version": str(SCHEMA_VERSION).encode()}
    for key, value in {"seq_len": seq_len, "k": k, "vocab_size": vocab_size, "pad_id": pad_id, **extra,
                       **(metadata or {})}.items():
        meta[META_PREFIX + key.encode()] = str(value).encode()
    block = [pa.field("doc_id", pa.string()), pa.field("block_index", pa.int32()),
             pa.field("input_ids", pa.list_(pa.int32())), pa.field("attention_mask", pa.list_(pa.uint8())),
             pa.field("loss_mask", pa.list_(pa.uint8(), seq_len))]
    return pa.schema([*block, *(pa.field(name, pa.binary()) for name in label_columns(form))], metadata=meta)


def schema_metadata(schema: pa.Schema) -> dict[str, str]:
    """The ``raykd.*`` metadata of a schema, prefix stripped."""
    out = {}
    for key, value in (schema.metadata or {}).items():
        if key.startswith(META_PREFIX):
            out[key[len(META_PREFIX) :].decode()] = value.decode()
    return out


def to_sqrt_levels(logprobs: np.ndarray) -> np.ndarray:
    """uint8 ``round(L * sqrt(exp(logprobs)))`` (``-inf`` -> 0)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    return np.clip(np.rint(SQRT_LEVELS * np.exp(np.minimum(lp, 0.0) / 2)), 0, SQRT_LEVELS).astype(np.uint8)


def from_sqrt_levels(q: np.ndarray) -> np.ndarray:
    """float32 log-probs of :func:`to_sqrt_levels` levels (level 0 -> ``2 log(ZERO_LEVEL / L)``)."""
    q = np.asarray(q, dtype=np.float64)
    return (2.0 * np.log(np.where(q > 0, q, ZERO_LEVEL) / SQRT_LEVELS)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Encode.

def _real_lengths(attention_mask: np.ndarray) -> np.ndarray:
    """[B] real tokens per row, checking each row is ones then zeros (right padding)."""
    am = np.asarray(attention_mask) != 0
    n = am.sum(1)
    if not np.array_equal(am, np.arange(am.shape[1])[None, :] < n[:, None]):
        row = int(np.flatnonzero((am != (np.arange(am.shape[1])[None, :] < n[:, None])).any(1))[0])
        raise SchemaError(f"row {row}: attention_mask is not right-padded (ones, then zeros); schema v2 stores only the "
                          "leading real positions. Cut blocks with raykd.data.tokenize_to_blocks")
    return n


def _check_shapes(ids: np.ndarray, label_ids: np.ndarray, schema: pa.Schema) -> int:
    """``K`` (or ``S``) of labels ``[B, T, K]`` for blocks ``[B, T]``, checked against the schema."""
    t = ids.shape[1]
    if schema.field("loss_mask").type.list_size != t or label_ids.shape[:2] != ids.shape:
        raise SchemaError(f"block shape {ids.shape} and labels {label_ids.shape} do not fit the schema "
                          f"(T={schema.field('loss_mask').type.list_size})")
    k, meta = label_ids.shape[2], schema_metadata(schema)
    if "k" in meta and int(meta["k"]) != k:
        raise SchemaError(f"K={k} does not match the schema (K={meta['k']})")
    return k


def _block_arrays(block: dict[str, np.ndarray], n: np.ndarray, real: np.ndarray) -> list[pa.Array]:
    """The :data:`BLOCK_COLUMNS` of a batch (only the ``n`` real tokens of each row)."""
    ids = np.asarray(block["input_ids"])
    return [
        pa.array(np.asarray(block["doc_id"]).astype(str), type=pa.string()),
        pa.array(np.asarray(block["block_index"], dtype=np.int32)),
        list_column(ids[real].astype(np.int32), n, pa.int32()),
        list_column(np.ones(int(n.sum()), np.uint8), n, pa.uint8()),
        pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(block["loss_mask"], dtype=np.uint8).reshape(-1)), ids.shape[1]),
    ]


def _topk_arrays(labels: dict[str, np.ndarray], real: np.ndarray, row_of: np.ndarray, n: np.ndarray) -> list[pa.Array]:
    """``topk_dict``, ``topk_index``, ``topk_sqrtp``, ``top1_rank`` and ``tail_sqrtp`` of the real positions."""
    top_ids = np.asarray(labels["topk_ids"])[real].astype(np.int64)  # [N, K], the top-1 first
    lp = np.asarray(labels["topk_logprobs"])[real].astype(np.float32)
    tail = np.asarray(labels["tail_logmass"])[real].astype(np.float32)
    if top_ids.size and top_ids.min() < 0:
        raise SchemaError("topk_ids holds negative ids")
    if np.isnan(lp).any() or np.isnan(tail).any() or (lp > 1e-3).any():
        raise SchemaError("topk_logprobs / tail_logmass hold NaN or positive log-probs")
    n_all, k = top_ids.shape
    dict_col, local = dictionary_column(top_ids.ravel(), np.repeat(row_of, k), len(n))
    order = np.argsort(local.reshape(n_all, k), axis=1, kind="stable")  # each position's ids in dictionary order
    local = np.take_along_axis(local.reshape(n_all, k), order, 1)
    q = np.take_along_axis(to_sqrt_levels(lp), order, 1)  # [N, K] in id order
    desc = np.argsort(-q.astype(np.int16), axis=1, kind="stable")  # what decode will compute
    top1_rank = np.argmax(desc == np.argmax(order == 0, axis=1)[:, None], axis=1).astype(np.uint8)
    return [dict_col, gaps_column(local.ravel(), np.repeat(np.arange(n_all), k), row_of, len(n)),
            binary_column(q.reshape(-1), n * k), binary_column(top1_rank, n), binary_column(to_sqrt_levels(tail), n)]


def encode_batch(block: dict[str, np.ndarray], labels: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Build a shard table from tokenised blocks and the teacher's ``score`` output.

    Args:
        block: ``doc_id`` [B], ``block_index`` [B], ``input_ids`` / ``attention_mask`` /
            ``loss_mask`` [B, T] (right-padded: each mask row is ones, then zeros).
        labels: top-k form: ``topk_ids`` / ``topk_logprobs`` [B, T, K] (``topk_ids[..., 0]`` is
            the top-1), ``tail_logmass`` / ``label_logprobs`` [B, T]. Sampled form (a schema
            with ``form=sampled``): ``topk_ids`` [B, T, S] holds the ``S`` draws (the engine's
            ``score`` with ``seeds``) and ``label_logprobs`` [B, T]. Only real positions are read.
        schema: from :func:`soft_label_schema`.

    Raises:
        SchemaError: shapes disagree with the schema's ``T`` and ``K``, a row is not
            right-padded, an id is negative, or a log-prob is NaN or positive.
    """
    ids = np.asarray(block["input_ids"])
    _check_shapes(ids, np.asarray(labels["topk_ids"]), schema)
    n = _real_lengths(block["attention_mask"])
    real = np.arange(ids.shape[1])[None, :] < n[:, None]
    row_of = np.repeat(np.arange(len(n)), n)  # [N]
    if schema_metadata(schema).get("form") == "sampled":
        label_arrays = sampled.encode_columns(np.asarray(labels["topk_ids"])[real], row_of, len(n))
    else:
        label_arrays = _topk_arrays(labels, real, row_of, n)
    label_lp = np.asarray(labels["label_logprobs"])[real].astype("<f2")
    arrays = [*_block_arrays(block, n, real), *label_arrays, binary_column(label_lp.view(np.uint8), 2 * n)]
    return pa.Table.from_arrays(arrays, schema=schema)


# ---------------------------------------------------------------------------------------------
# Decode.

def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _check_columns(table: pa.Table) -> LabelForm:
    """The table's form, after checking it has every column of it.

    Raises:
        SchemaError: a column is missing (e.g. a cache of schema version 1).
    """
    names = set(table.column_names)
    form = form_of(table.column_names)
    if missing := {"input_ids", "attention_mask", "loss_mask", *label_columns(form)} - names:
        old = " (it has version 1 columns: relabel it)" if "topk_logprobs" in names else ""
        raise SchemaError(f"soft-label table lacks columns {sorted(missing)}; it was not written by raykd schema "
                          f"v{SCHEMA_VERSION}{old}")
    for name, is_type, expected in (("loss_mask", pa.types.is_fixed_size_list, "a fixed-size list"),
                                    ("input_ids", pa.types.is_list, "a list")):
        if not is_type(table.schema.field(name).type):
            raise SchemaError(f"column {name} has type {table.schema.field(name).type}, expected {expected} "
                              f"(schema v{SCHEMA_VERSION}); relabel")
    return form


def _decode_topk(table: pa.Table, n: np.ndarray, row_of: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids [N, K], logprobs [N, K], tail [N])`` of the real positions: the top-1 first, then
    descending probability (ties: ascending id).

    Raises:
        SchemaError: ``topk_sqrtp`` does not hold ``K`` bytes per real position.
    """
    n_all = len(row_of)
    q, q_len = binary_parts(_column(table, "topk_sqrtp"))
    k = len(q) // n_all if n_all else int(schema_metadata(table.schema).get("k", 1))
    if len(q) != n_all * k or not np.array_equal(q_len, n * k):
        raise SchemaError("topk_sqrtp does not hold K bytes per real position; the shard is corrupt")
    q = q.reshape(n_all, k)
    dict_ids, dict_start = decode_dictionary(_column(table, "topk_dict"))
    local = decode_gaps(_column(table, "topk_index"), np.repeat(np.arange(n_all), k)).reshape(n_all, k)
    top_ids = dict_ids[local + dict_start[row_of][:, None]]  # [N, K] ascending ids
    desc = np.argsort(-q.astype(np.int16), axis=1, kind="stable")
    rank1 = binary_parts(_column(table, "top1_rank"))[0].astype(np.int64)
    j = np.arange(k)[None, :]
    order = np.take_along_axis(desc, np.where(j == 0, rank1[:, None], np.where(j <= rank1[:, None], j - 1, j)), 1)
    tail = from_sqrt_levels(binary_parts(_column(table, "tail_sqrtp"))[0])
    return np.take_along_axis(top_ids, order, 1), from_sqrt_levels(np.take_along_axis(q, order, 1)), tail


def _decode_sampled(table: pa.Table, row_of: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids [N, S], logprobs [N, S], tail [N])`` of the real positions (:func:`raykd.soft_labels.sampled.decode_columns`; no tail)."""
    samples = schema_metadata(table.schema).get("samples")
    ids, lp, _ = sampled.decode_columns({c: _column(table, c) for c in sampled.COLUMNS}, row_of,
                                        int(samples) if samples else None)
    return ids, lp, np.full(len(row_of), -math.inf, np.float32)


def _padded(b: int, t: int, k: int, pad_id: int, logprob_dtype: type) -> dict[str, np.ndarray]:
    """Dense ``[B, T]`` / ``[B, T, K]`` arrays holding the padding values of the module docstring."""
    return {
        "input_ids": np.full((b, t), pad_id, np.int64),
        "topk_ids": np.broadcast_to(np.arange(k, dtype=np.int64), (b, t, k)).copy(),
        "topk_logprobs": np.full((b, t, k), -math.log(k + 1), logprob_dtype),
        "tail_logmass": np.full((b, t), -math.log(k + 1), np.float32),
        "label_logprobs": np.zeros((b, t), np.float32),
    }


def decode_batch(table: pa.Table, *, with_ids: bool = False) -> dict[str, np.ndarray]:
    """Turn a shard table (or a batch of it) of either form back into dense numpy arrays, padded to ``T``.

    Returns:
        ``input_ids`` int64 [B, T], ``attention_mask`` / ``loss_mask`` uint8 [B, T],
        ``topk_ids`` int64 [B, T, K] (``[..., 0]`` the top-1, then descending probability),
        ``topk_logprobs`` float16 [B, T, K] (float32 for the sampled form), ``tail_logmass`` /
        ``label_logprobs`` float32 [B, T]; plus ``doc_id`` / ``block_index`` if ``with_ids``.
        Padding positions hold the finite values listed in the module docstring.

    Raises:
        SchemaError: a column is missing or has another type (e.g. a cache of schema version 1:
            relabel it), or a label column is corrupt.
    """
    form = _check_columns(table)
    loss_arr, ids_arr = _column(table, "loss_mask"), _column(table, "input_ids")
    b, t = table.num_rows, loss_arr.type.list_size
    n = ids_arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    real = np.arange(t)[None, :] < n[:, None]
    row_of = np.repeat(np.arange(b), n)
    if form == "sampled":
        top_ids, top_lp, tail = _decode_sampled(table, row_of)
    else:
        top_ids, top_lp, tail = _decode_topk(table, n, row_of)
    pad_id = int(schema_metadata(table.schema).get("pad_id", 0))
    out = _padded(b, t, top_ids.shape[1], pad_id, np.float32 if form == "sampled" else np.float16)
    out["attention_mask"] = real.astype(np.uint8)
    out["loss_mask"] = loss_arr.flatten().to_numpy(zero_copy_only=False).reshape(b, t).astype(np.uint8)
    out["input_ids"][real] = ids_arr.flatten().to_numpy(zero_copy_only=False)
    out["topk_ids"][real], out["topk_logprobs"][real], out["tail_logmass"][real] = top_ids, top_lp, tail
    out["label_logprobs"][real] = binary_parts(_column(table, "label_logprobs"))[0].view("<f2")
    if with_ids:
        out["doc_id"] = np.asarray(table.column("doc_id").to_pylist(), dtype=object)
        out["block_index"] = table.column("block_index").to_numpy()
    return out


# ---------------------------------------------------------------------------------------------
# Counting.

def count_tokens(source: pa.Table | str | os.PathLike) -> tuple[int, int]:
    """``(tokens, loss_tokens)`` of a shard: real tokens (``attention_mask`` ones) and labeled
    positions (``loss_mask`` ones; one per row for shards without ``loss_mask``, such as class
    labels). Reads only those two small columns of a Parquet file.

    Works on schema v1 and v2 token shards and on class-label shards.

    Args:
        source: a table, or the path of a Parquet shard.

    Raises:
        SchemaError: the shard has no ``attention_mask`` column.
    """
    if isinstance(source, pa.Table):
        table = source
    else:
        names = pq.read_schema(Path(source)).names
        table = pq.read_table(Path(source), columns=[c for c in ("attention_mask", "loss_mask") if c in names])
    if "attention_mask" not in table.column_names:
        raise SchemaError(f"{source if not isinstance(source, pa.Table) else 'table'} has no attention_mask column")

    def total(name: str) -> int:
        return int(_column(table, name).flatten().to_numpy(zero_copy_only=False).astype(np.int64).sum())

    tokens = total("attention_mask")
    return tokens, total("loss_mask") if "loss_mask" in table.column_names else table.num_rows
