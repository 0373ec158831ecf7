"""The Arrow schema of soft-label shards (version 2), its encoder, decoder and token counts.

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

Bump :data:`SCHEMA_VERSION` on any change: the version is part of the cache key and is checked
when a cache is opened (caches of another version must be relabeled).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2
META_PREFIX = b"raykd."

SQRT_LEVELS = 127
"""``L``: probabilities are stored as ``round(L * sqrt(p))`` (see the module docstring)."""

ZERO_LEVEL = 0.3
"""Level 0 decodes to ``sqrt(p) = ZERO_LEVEL / L`` (inside the bin ``[0, 0.5 / L)``)."""

BLOCK_COLUMNS = ("doc_id", "block_index", "input_ids", "attention_mask", "loss_mask")
"""Columns describing the block (shared by every teacher of a joined cache)."""

LABEL_COLUMNS = ("topk_dict", "topk_index", "topk_sqrtp", "top1_rank", "tail_sqrtp", "label_logprobs")
"""Stored columns of one teacher's labels."""

DECODED_LABELS = ("topk_ids", "topk_logprobs", "tail_logmass", "label_logprobs")
"""Keys of one teacher's labels in :func:`decode_batch`'s output."""


class SchemaError(ValueError):
    """A table or batch does not match the soft-label schema."""


def soft_label_schema(seq_len: int, k: int, vocab_size: int, metadata: dict[str, str] | None = None,
                      *, pad_id: int = 0) -> pa.Schema:
    """The Arrow schema for blocks of ``seq_len`` tokens and top-``k`` labels.

    Args:
        seq_len: ``T``.
        k: ``K`` (recorded in the metadata; each row's ``K`` also follows from its columns).
        vocab_size: teacher vocabulary size ``V`` (recorded in the metadata).
        metadata: extra ``raykd.*`` key/values stored in the schema (and Parquet footer).
        pad_id: the id :func:`decode_batch` puts at padding positions (metadata ``pad_id``).
    """
    meta = {META_PREFIX + b"schema_version": str(SCHEMA_VERSION).encode()}
    for key, value in {"seq_len": seq_len, "k": k, "vocab_size": vocab_size, "pad_id": pad_id, **(metadata or {})}.items():
        meta[META_PREFIX + key.encode()] = str(value).encode()
    return pa.schema(
        [
            pa.field("doc_id", pa.string()),
            pa.field("block_index", pa.int32()),
            pa.field("input_ids", pa.list_(pa.int32())),
            pa.field("attention_mask", pa.list_(pa.uint8())),
            pa.field("loss_mask", pa.list_(pa.uint8(), seq_len)),
            pa.field("topk_dict", pa.binary()),
            pa.field("topk_index", pa.binary()),
            pa.field("topk_sqrtp", pa.binary()),
            pa.field("top1_rank", pa.binary()),
            pa.field("tail_sqrtp", pa.binary()),
            pa.field("label_logprobs", pa.binary()),
        ],
        metadata=meta,
    )


def schema_metadata(schema: pa.Schema) -> dict[str, str]:
    """The ``raykd.*`` metadata of a schema, prefix stripped."""
    out = {}
    for key, value in (schema.metadata or {}).items():
        if key.startswith(META_PREFIX):
            out[key[len(META_PREFIX) :].decode()] = value.decode()
    return out


# ---------------------------------------------------------------------------------------------
# Byte-level helpers (vectorised over a whole batch).

def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 bytes of non-negative integers: 7 bits per byte, high bit set on all but the last.

    Args:
        values: int array ``[N]``, each in ``[0, 2^35)``.

    Returns:
        uint8 ``[sum of byte lengths]``; values below 128 take one byte, below 16,384 two.
    """
    v = np.asarray(values, dtype=np.int64).ravel()
    if v.size and (v.min() < 0 or v.max() >= 1 << 35):
        raise SchemaError(f"varint values must be in [0, 2^35), got [{v.min()}, {v.max()}]")
    nbytes = 1 + sum((v >= 1 << (7 * j)).astype(np.int64) for j in range(1, 5))
    starts = np.cumsum(nbytes) - nbytes
    owner = np.repeat(np.arange(v.size), nbytes)
    j = np.arange(int(nbytes.sum())) - starts[owner]
    more = (j < nbytes[owner] - 1).astype(np.int64) << 7
    return (((v[owner] >> (7 * j)) & 0x7F) | more).astype(np.uint8)


def varint_decode(buf: np.ndarray) -> np.ndarray:
    """Inverse of :func:`varint_encode`: int64 ``[number of values]`` of uint8 ``buf``.

    Raises:
        SchemaError: ``buf`` ends inside a value (a truncated or foreign column).
    """
    buf = np.asarray(buf, dtype=np.uint8)
    if buf.size == 0:
        return np.zeros(0, np.int64)
    last = buf < 0x80
    if not last[-1]:
        raise SchemaError("a varint column ends inside a value: the shard is corrupt or not raykd schema v2")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    owner = np.cumsum(np.concatenate([[0], last[:-1]]))
    j = np.arange(buf.size) - starts[owner]
    return np.add.reduceat((buf & 0x7F).astype(np.int64) << (7 * j), starts)


def _binary(data: np.ndarray, lengths: np.ndarray) -> pa.BinaryArray:
    """A binary array of ``len(lengths)`` rows, row ``r`` holding the next ``lengths[r]`` bytes."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.Array.from_buffers(pa.binary(), len(lengths), [None, pa.py_buffer(offsets),
                                                             pa.py_buffer(np.ascontiguousarray(data, np.uint8))])


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(bytes, per-row byte lengths)`` of a (possibly sliced) binary array."""
    if not pa.types.is_binary(arr.type):
        raise SchemaError(f"expected a binary column, got {arr.type}")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return data[offsets[0] : offsets[-1]], np.diff(offsets)


def _list(values: np.ndarray, lengths: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(values), type=arrow_type))


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


def encode_batch(block: dict[str, np.ndarray], labels: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Build a shard table from tokenised blocks and the teacher's ``score`` output.

    Args:
        block: ``doc_id`` [B], ``block_index`` [B], ``input_ids`` / ``attention_mask`` /
            ``loss_mask`` [B, T] (right-padded: each mask row is ones, then zeros).
        labels: ``topk_ids`` / ``topk_logprobs`` [B, T, K] (``topk_ids[..., 0]`` is the top-1),
            ``tail_logmass`` / ``label_logprobs`` [B, T]; only real positions are read.
        schema: from :func:`soft_label_schema`.

    Raises:
        SchemaError: shapes disagree with the schema's ``T`` and ``K``, a row is not
            right-padded, an id is negative, or a log-prob is NaN or positive.
    """
    ids = np.asarray(block["input_ids"])
    b, t = ids.shape
    meta = schema_metadata(schema)
    top_ids = np.asarray(labels["topk_ids"])
    if schema.field("loss_mask").type.list_size != t or top_ids.shape[:2] != (b, t):
        raise SchemaError(f"block shape {ids.shape} and labels {top_ids.shape} do not fit the schema "
                          f"(T={schema.field('loss_mask').type.list_size})")
    k = top_ids.shape[2]
    if "k" in meta and int(meta["k"]) != k:
        raise SchemaError(f"K={k} does not match the schema (K={meta['k']})")
    n = _real_lengths(block["attention_mask"])
    real = np.arange(t)[None, :] < n[:, None]
    top_ids = top_ids[real].astype(np.int64)  # [N, K]
    lp = np.asarray(labels["topk_logprobs"])[real].astype(np.float32)
    tail = np.asarray(labels["tail_logmass"])[real].astype(np.float32)
    if top_ids.size and top_ids.min() < 0:
        raise SchemaError("topk_ids holds negative ids")
    if np.isnan(lp).any() or np.isnan(tail).any() or (lp > 1e-3).any():
        raise SchemaError("topk_logprobs / tail_logmass hold NaN or positive log-probs")
    n_all = len(top_ids)
    row_of = np.repeat(np.arange(b), n)  # [N]

    # The row's dictionary of distinct ids, and each position's ids as sorted indices into it.
    width = int(top_ids.max()) + 1 if top_ids.size else 1
    keys = row_of[:, None] * width + top_ids  # unique per (row, id), sorted by row then id
    uniq, inverse = np.unique(keys, return_inverse=True)
    dict_row, dict_id = uniq // width, uniq % width
    dict_len = np.bincount(dict_row, minlength=b)
    dict_start = np.cumsum(dict_len) - dict_len
    dict_gaps = np.diff(dict_id, prepend=0)
    dict_gaps[dict_start[dict_len > 0]] = dict_id[dict_start[dict_len > 0]]
    local = inverse.reshape(top_ids.shape) - dict_start[row_of][:, None]  # [N, K]
    order = np.argsort(local, axis=1, kind="stable")
    local = np.take_along_axis(local, order, 1)
    index_gaps = np.diff(local, axis=1, prepend=0)

    q = np.take_along_axis(to_sqrt_levels(lp), order, 1)  # [N, K] in id order
    desc = np.argsort(-q.astype(np.int16), axis=1, kind="stable")  # what decode will compute
    slot0 = np.argmax(order == 0, axis=1)  # where the teacher's top-1 went
    top1_rank = np.argmax(desc == slot0[:, None], axis=1).astype(np.uint8)

    dict_bytes = varint_encode(dict_gaps)
    dict_byte_len = np.bincount(np.repeat(dict_row, _varint_lengths(dict_gaps)), minlength=b)
    index_bytes = varint_encode(index_gaps.ravel())
    index_byte_len = np.bincount(np.repeat(row_of, _varint_lengths(index_gaps).sum(1)), minlength=b)
    label_lp = np.asarray(labels["label_logprobs"])[real].astype("<f2")
    arrays = [
        pa.array(np.asarray(block["doc_id"]).astype(str), type=pa.string()),
        pa.array(np.asarray(block["block_index"], dtype=np.int32)),
        _list(ids[real].astype(np.int32), n, pa.int32()),
        _list(np.ones(n_all, np.uint8), n, pa.uint8()),
        pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(block["loss_mask"], dtype=np.uint8).reshape(-1)), t),
        _binary(dict_bytes, dict_byte_len),
        _binary(index_bytes, index_byte_len),
        _binary(q.reshape(-1), n * k),
        _binary(top1_rank, n),
        _binary(to_sqrt_levels(tail), n),
        _binary(label_lp.view(np.uint8), 2 * n),
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.int64)
    return 1 + sum((v >= 1 << (7 * j)).astype(np.int64) for j in range(1, 5))


# ---------------------------------------------------------------------------------------------
# Decode.

def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def decode_batch(table: pa.Table, *, with_ids: bool = False) -> dict[str, np.ndarray]:
    """Turn a shard table (or a batch of it) back into dense numpy arrays, padded to ``T``.

    Returns:
        ``input_ids`` int64 [B, T], ``attention_mask`` / ``loss_mask`` uint8 [B, T],
        ``topk_ids`` int64 [B, T, K] (``[..., 0]`` the top-1, then descending probability),
        ``topk_logprobs`` float16 [B, T, K], ``tail_logmass`` / ``label_logprobs`` float32
        [B, T]; plus ``doc_id`` / ``block_index`` if ``with_ids``. Padding positions hold the
        finite values listed in the module docstring.

    Raises:
        SchemaError: a column is missing or has another type (e.g. a cache of schema version 1:
            relabel it).
    """
    names = set(table.column_names)
    needed = {"input_ids", "attention_mask", "loss_mask", *LABEL_COLUMNS}
    if missing := needed - names:
        old = " (it has version 1 columns: relabel it)" if "topk_logprobs" in names else ""
        raise SchemaError(f"soft-label table lacks columns {sorted(missing)}; it was not written by raykd schema "
                          f"v{SCHEMA_VERSION}{old}")
    b = table.num_rows
    loss_arr = _column(table, "loss_mask")
    if not pa.types.is_fixed_size_list(loss_arr.type):
        raise SchemaError(f"column loss_mask has type {loss_arr.type}, expected a fixed-size list (schema v{SCHEMA_VERSION})")
    t = loss_arr.type.list_size
    ids_arr = _column(table, "input_ids")
    if not pa.types.is_list(ids_arr.type):
        raise SchemaError(f"column input_ids has type {ids_arr.type}, expected a list (schema v{SCHEMA_VERSION}); relabel")
    n = ids_arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    n_all = int(n.sum())
    real = np.arange(t)[None, :] < n[:, None]
    row_of = np.repeat(np.arange(b), n)

    q, q_len = _binary_parts(_column(table, "topk_sqrtp"))
    k = len(q) // n_all if n_all else int(schema_metadata(table.schema).get("k", 1))
    if len(q) != n_all * k or not np.array_equal(q_len, n * k):
        raise SchemaError("topk_sqrtp does not hold K bytes per real position; the shard is corrupt")
    q = q.reshape(n_all, k)

    dict_bytes, dict_byte_len = _binary_parts(_column(table, "topk_dict"))
    gaps = varint_decode(dict_bytes)
    terminators = np.concatenate([[0], np.cumsum(dict_bytes < 0x80)])
    byte_end = np.cumsum(dict_byte_len)
    dict_len = terminators[byte_end] - terminators[byte_end - dict_byte_len]  # values per row
    dict_start = np.cumsum(dict_len) - dict_len
    running = np.cumsum(gaps)  # a running sum over all rows, restarted at each row's first id
    nonempty = dict_len > 0
    before = np.zeros(b, np.int64)
    before[nonempty] = running[dict_start[nonempty]] - gaps[dict_start[nonempty]]
    dict_ids = running - np.repeat(before, dict_len)
    local = np.cumsum(varint_decode(_binary_parts(_column(table, "topk_index"))[0]).reshape(n_all, k), axis=1)
    top_ids = dict_ids[local + dict_start[row_of][:, None]]  # [N, K] ascending ids

    desc = np.argsort(-q.astype(np.int16), axis=1, kind="stable")
    rank1 = _binary_parts(_column(table, "top1_rank"))[0].astype(np.int64)
    j = np.arange(k)[None, :]
    src = np.where(j == 0, rank1[:, None], np.where(j <= rank1[:, None], j - 1, j))  # move rank1 to the front
    order = np.take_along_axis(desc, src, 1)

    out = {
        "input_ids": np.full((b, t), int(schema_metadata(table.schema).get("pad_id", 0)), np.int64),
        "attention_mask": real.astype(np.uint8),
        "loss_mask": loss_arr.flatten().to_numpy(zero_copy_only=False).reshape(b, t).astype(np.uint8),
        "topk_ids": np.broadcast_to(np.arange(k, dtype=np.int64), (b, t, k)).copy(),
        "topk_logprobs": np.full((b, t, k), -math.log(k + 1), np.float16),
        "tail_logmass": np.full((b, t), -math.log(k + 1), np.float32),
        "label_logprobs": np.zeros((b, t), np.float32),
    }
    out["input_ids"][real] = ids_arr.flatten().to_numpy(zero_copy_only=False)
    out["topk_ids"][real] = np.take_along_axis(top_ids, order, 1)
    out["topk_logprobs"][real] = from_sqrt_levels(np.take_along_axis(q, order, 1))
    out["tail_logmass"][real] = from_sqrt_levels(_binary_parts(_column(table, "tail_sqrtp"))[0])
    out["label_logprobs"][real] = _binary_parts(_column(table, "label_logprobs"))[0].view("<f2")
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
