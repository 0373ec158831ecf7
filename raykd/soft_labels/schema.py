"""The Arrow schema of soft-label shards, and its version.

One row is one training block of ``T`` tokens. Every per-position column is a fixed-size list
(no per-token offsets), and the top-k columns are flattened ``[T * K]`` so a batch decodes to
``[B, T, K]`` with one zero-copy reshape:

===============  ================================  ==========================================
column           Arrow type                        meaning
===============  ================================  ==========================================
doc_id           string                            source document (the split is by document)
block_index      int32                             block number inside the document
input_ids        fixed_size_list<int32>[T]         token ids
attention_mask   fixed_size_list<uint8>[T]         1 = real token, 0 = padding
loss_mask        fixed_size_list<uint8>[T]         1 = position t has a next-token target
topk_ids         fixed_size_list<uint16|int32>[TK] teacher top-k ids (uint16 when V <= 65,536)
topk_logprobs    fixed_size_list<float16>[TK]      teacher top-k log-probs at the temperature
tail_logmass     fixed_size_list<float32>[T]       log of the mass outside the top-k
label_logprobs   fixed_size_list<float32>[T]       teacher log-prob of token t+1 at temperature 1
===============  ================================  ==========================================

Position ``t`` describes token ``t + 1``. Bump :data:`SCHEMA_VERSION` on any change: the
version is part of the cache key and is checked when a cache is opened.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
META_PREFIX = b"raykd."


class SchemaError(ValueError):
    """A table or batch does not match the soft-label schema."""


def soft_label_schema(seq_len: int, k: int, vocab_size: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The Arrow schema for blocks of ``seq_len`` tokens and top-``k`` labels.

    Args:
        seq_len: ``T``.
        k: ``K``.
        vocab_size: teacher vocabulary size ``V`` (picks uint16 or int32 ids).
        metadata: extra ``raykd.*`` key/values stored in the schema (and Parquet footer).
    """
    ids_type = pa.uint16() if vocab_size <= 1 << 16 else pa.int32()
    meta = {META_PREFIX + b"schema_version": str(SCHEMA_VERSION).encode()}
    for key, value in (metadata or {}).items():
        meta[META_PREFIX + key.encode()] = str(value).encode()
    return pa.schema(
        [
            pa.field("doc_id", pa.string()),
            pa.field("block_index", pa.int32()),
            pa.field("input_ids", pa.list_(pa.int32(), seq_len)),
            pa.field("attention_mask", pa.list_(pa.uint8(), seq_len)),
            pa.field("loss_mask", pa.list_(pa.uint8(), seq_len)),
            pa.field("topk_ids", pa.list_(ids_type, seq_len * k)),
            pa.field("topk_logprobs", pa.list_(pa.float16(), seq_len * k)),
            pa.field("tail_logmass", pa.list_(pa.float32(), seq_len)),
            pa.field("label_logprobs", pa.list_(pa.float32(), seq_len)),
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


def _fixed(values: np.ndarray, width: int, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=arrow_type), width)


def encode_batch(block: dict[str, np.ndarray], labels: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Build a shard table from tokenised blocks and the teacher's ``score`` output.

    Args:
        block: ``doc_id`` [B], ``block_index`` [B], ``input_ids`` / ``attention_mask`` /
            ``loss_mask`` [B, T].
        labels: ``topk_ids`` / ``topk_logprobs`` [B, T, K], ``tail_logmass`` /
            ``label_logprobs`` [B, T].
        schema: from :func:`soft_label_schema`.

    Raises:
        SchemaError: shapes disagree with the schema's ``T`` and ``K``.
    """
    ids = np.asarray(block["input_ids"])
    b, t = ids.shape
    tk = schema.field("topk_ids").type.list_size
    if schema.field("input_ids").type.list_size != t or labels["topk_ids"].shape[:2] != (b, t):
        raise SchemaError(f"block shape {ids.shape} and labels {labels['topk_ids'].shape} do not fit the schema")
    if labels["topk_ids"].shape[2] * t != tk:
        raise SchemaError(f"K={labels['topk_ids'].shape[2]} does not match the schema (T*K={tk})")
    arrays = [
        pa.array(np.asarray(block["doc_id"]).astype(str), type=pa.string()),
        pa.array(np.asarray(block["block_index"], dtype=np.int32)),
        _fixed(ids.astype(np.int32), t, pa.int32()),
        _fixed(np.asarray(block["attention_mask"], dtype=np.uint8), t, pa.uint8()),
        _fixed(np.asarray(block["loss_mask"], dtype=np.uint8), t, pa.uint8()),
        _fixed(labels["topk_ids"], tk, schema.field("topk_ids").type.value_type),
        _fixed(labels["topk_logprobs"].astype(np.float16), tk, pa.float16()),
        _fixed(labels["tail_logmass"].astype(np.float32), t, pa.float32()),
        _fixed(labels["label_logprobs"].astype(np.float32), t, pa.float32()),
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def decode_batch(table: pa.Table, *, with_ids: bool = False) -> dict[str, np.ndarray]:
    """Turn a shard table (or a batch of it) back into dense numpy arrays.

    Returns:
        ``input_ids`` int64 [B, T], ``attention_mask`` / ``loss_mask`` uint8 [B, T],
        ``topk_ids`` int64 [B, T, K], ``topk_logprobs`` float16 [B, T, K], ``tail_logmass`` /
        ``label_logprobs`` float32 [B, T]; plus ``doc_id`` / ``block_index`` if ``with_ids``.

    Raises:
        SchemaError: a column is missing or has another type (e.g. a cache of another
            schema version).
    """
    names = set(table.column_names)
    needed = {"input_ids", "attention_mask", "loss_mask", "topk_ids", "topk_logprobs", "tail_logmass", "label_logprobs"}
    if missing := needed - names:
        raise SchemaError(f"soft-label table lacks columns {sorted(missing)}; was it written by raykd schema v{SCHEMA_VERSION}?")
    b = table.num_rows

    def col(name: str) -> np.ndarray:
        arr = table.column(name).combine_chunks()
        if not pa.types.is_fixed_size_list(arr.type):
            raise SchemaError(f"column {name} has type {arr.type}, expected a fixed-size list")
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(b, -1)

    input_ids = col("input_ids").astype(np.int64)
    t = input_ids.shape[1]
    out = {
        "input_ids": input_ids,
        "attention_mask": col("attention_mask"),
        "loss_mask": col("loss_mask"),
        "topk_ids": col("topk_ids").astype(np.int64).reshape(b, t, -1),
        "topk_logprobs": col("topk_logprobs").reshape(b, t, -1),
        "tail_logmass": col("tail_logmass"),
        "label_logprobs": col("label_logprobs"),
    }
    if with_ids:
        out["doc_id"] = np.asarray(table.column("doc_id").to_pylist(), dtype=object)
        out["block_index"] = table.column("block_index").to_numpy()
    return out
