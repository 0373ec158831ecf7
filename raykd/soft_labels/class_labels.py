"""Soft labels of a classification teacher: one row per document, the teacher's class logits.

The cache reuses the soft-label cache's key, parts, ledger and manifest
(:mod:`raykd.soft_labels.cache`, committed by the same :func:`~raykd.soft_labels.cache.write_part`
and :func:`~raykd.soft_labels.cache.finalize`): a folder named by the
:class:`~raykd.soft_labels.cache.CacheKey` digest whose parts are row ranges of the labeled rows,
so the same labeling asked for twice finds the finished folder and asks the teacher nothing. Class caches
live under their own root (``<cache>/class_labels``) and carry ``engine="classifier"`` and
``k = C`` in their key.

==============  =============================  ==========================================
column          Arrow type                     meaning
==============  =============================  ==========================================
doc_id          string                         source document (splits are by document)
input_ids       fixed_size_list<int32>[T]      token ids (right-padded, truncated to T)
attention_mask  fixed_size_list<uint8>[T]      1 = real token
label           int32                          gold class index (-1 when unknown)
teacher_logits  fixed_size_list<float32>[C]    raw teacher logits (temperature not applied)
==============  =============================  ==========================================
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd import storage
from raykd.soft_labels.cache import (
    CacheError,
    CacheKey,
    Manifest,
    cache_dir_for,
    done_parts,
    finalize,
    fingerprint,
    open_cache,
    write_part,
)
from raykd.soft_labels.schema import META_PREFIX

CLASS_LABEL_COLUMNS = ("doc_id", "input_ids", "attention_mask", "label", "teacher_logits")


def class_label_schema(seq_len: int, num_classes: int, key: CacheKey) -> pa.Schema:
    """Arrow schema for rows of ``T = seq_len`` tokens and ``C = num_classes`` logits."""
    return pa.schema(
        [
            pa.field("doc_id", pa.string()),
            pa.field("input_ids", pa.list_(pa.int32(), seq_len)),
            pa.field("attention_mask", pa.list_(pa.uint8(), seq_len)),
            pa.field("label", pa.int32()),
            pa.field("teacher_logits", pa.list_(pa.float32(), num_classes)),
        ],
        metadata={META_PREFIX + b"cache_key": key.digest().encode(), META_PREFIX + b"kind": b"class_labels"},
    )


def class_cache_key(teacher_fingerprint: str, tokenizer_fingerprint: str, dtype: str, num_classes: int, data_fingerprint: str, seq_len: int) -> CacheKey:
    """The cache key of a classification teacher's labels on one split (no model needs to run)."""
    return CacheKey(
        teacher_fingerprint=teacher_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        engine="classifier",
        dtype=dtype,
        k=num_classes,
        temperature=1.0,
        data_fingerprint=data_fingerprint,
        seq_len=seq_len,
        max_blocks_per_doc=1,
        min_tokens=1,
    )


def _fixed(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=arrow_type), values.shape[1])


def encode_rows(rows: dict[str, np.ndarray], logits: np.ndarray, schema: pa.Schema) -> pa.Table:
    """A shard table from tokenised rows (``doc_id`` [B], ``input_ids`` / ``attention_mask`` [B, T],
    ``label`` [B]) and teacher ``logits`` [B, C]."""
    return pa.Table.from_arrays(
        [
            pa.array(np.asarray(rows["doc_id"]).astype(str)),
            _fixed(np.asarray(rows["input_ids"], dtype=np.int32), pa.int32()),
            _fixed(np.asarray(rows["attention_mask"], dtype=np.uint8), pa.uint8()),
            pa.array(np.asarray(rows["label"], dtype=np.int32)),
            _fixed(np.asarray(logits, dtype=np.float32), pa.float32()),
        ],
        schema=schema,
    )


def find_class_cache(root: Path, key: CacheKey) -> tuple[Path, Manifest | None]:
    """``(folder, manifest)`` of the finished cache for ``key``; manifest None when not labeled yet."""
    folder = cache_dir_for(root, key)
    return Path(folder), (open_cache(folder, key) if storage.is_file(storage.join(folder, "manifest.json")) else None)


def label_rows(handle: Any, rows: dict[str, np.ndarray], root: Path, key: CacheKey, *, num_classes: int,
               batch_size: int = 32, in_flight: int = 2, rows_per_shard: int = 512, teacher: dict[str, Any] | None = None) -> Manifest:
    """Ask the teacher deployment for class logits of every row and commit them as a cache.

    Args:
        handle: Serve deployment handle of a classifier teacher (``score`` returns ``logits`` [B, C]).
        rows: ``doc_id`` [N], ``input_ids`` / ``attention_mask`` [N, T], ``label`` [N].
        root: cache root; the folder is ``root / key.digest()``.
        key: from :func:`class_cache_key`.
        num_classes: ``C``; checked against the teacher's answer.
        batch_size: rows per ``score`` call; in_flight: calls kept outstanding at the teacher.

    Raises:
        CacheError: the teacher returned another number of classes, or the commit failed.
    """
    t0 = time.time()
    folder = cache_dir_for(root, key)
    n, seq_len = rows["input_ids"].shape
    schema = class_label_schema(seq_len, num_classes, key)
    pending: deque = deque()
    logits = np.zeros((n, num_classes), dtype=np.float32)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        pending.append((sl, handle.score.remote(rows["input_ids"][sl], rows["attention_mask"][sl], k=num_classes)))
        while len(pending) >= in_flight or (pending and s + batch_size >= n):
            done_sl, ref = pending.popleft()
            got = np.asarray(ref.result()["logits"])
            if got.shape[1] != num_classes:
                raise CacheError(f"the teacher returned {got.shape[1]} classes, the task has {num_classes}")
            logits[done_sl] = got
    parts, done = [], done_parts(folder)
    for s in range(0, n, rows_per_shard):  # one part per shard of rows
        chunk = {k: np.asarray(v)[s : s + rows_per_shard] for k, v in rows.items()}
        part = fingerprint(["rows", s, [str(d) for d in chunk["doc_id"]]])
        parts.append(part)
        if part not in done:
            write_part(folder, key, part, encode_rows(chunk, logits[s : s + rows_per_shard], schema),
                       part_id=f"rows:{s}-{s + len(chunk['doc_id'])}", doc_ids=chunk["doc_id"])
    return finalize(folder, key, parts, teacher or {}, time.time() - t0)


def read_class_cache(folder: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The rows of a finished class-label cache as numpy arrays.

    Returns:
        ``doc_id`` [N] (object), ``input_ids`` int64 [N, T], ``attention_mask`` int64 [N, T],
        ``label`` int64 [N], ``teacher_logits`` float32 [N, C].
    """
    table = pa.concat_tables([pq.read_table(storage.join(str(folder), s["file"])) for s in manifest.shards])
    missing = set(CLASS_LABEL_COLUMNS) - set(table.column_names)
    if missing:
        raise CacheError(f"{folder} is not a class-label cache (missing columns {sorted(missing)})")
    n = table.num_rows

    def fixed(name: str) -> np.ndarray:
        return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)

    return {
        "doc_id": np.asarray(table.column("doc_id").to_pylist(), dtype=object),
        "input_ids": fixed("input_ids").astype(np.int64),
        "attention_mask": fixed("attention_mask").astype(np.int64),
        "label": table.column("label").to_numpy().astype(np.int64),
        "teacher_logits": fixed("teacher_logits").astype(np.float32),
    }
