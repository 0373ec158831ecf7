"""Join the soft-label caches of several teachers by row (multi-teacher distillation).

Each teacher labels the same blocks into its own cache, keyed by its own fingerprint. Ray Data
may write rows in any order, so every cache is sorted by ``(doc_id, block_index)`` and then the
rows must match one for one: the same document, block and ``input_ids``. The first row that
does not is named in the error, before any training starts. The joined shards keep teacher 0's
columns under their usual names and add each further teacher ``i``'s stored label columns
(:data:`~raykd.soft_labels.schema.LABEL_COLUMNS`) as ``t<i>.<name>``; :func:`decode_joined` gives
teacher ``i``'s decoded arrays as ``t<i>.topk_ids``, ``t<i>.topk_logprobs``, ``t<i>.tail_logmass``,
``t<i>.label_logprobs``. Every cache must be of the current schema version.

The join reads the caches on the driver (pyarrow); a cache that does not fit in memory would
need a distributed join (left for later).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raykd.soft_labels.schema import (
    DECODED_LABELS,
    LABEL_COLUMNS,
    SCHEMA_VERSION,
    SchemaError,
    decode_batch,
)

__all__ = ["LABEL_COLUMNS", "CacheJoinError", "decode_joined", "join_caches", "teacher_column"]


class CacheJoinError(ValueError):
    """The teachers' caches do not hold the same rows; the message names the first mismatch."""


def teacher_column(i: int, name: str) -> str:
    """Column name of teacher ``i``'s label column ``name`` in a joined table (teacher 0: ``name``)."""
    return name if i == 0 else f"t{i}.{name}"


def _sorted_table(shard_files: list[str]) -> pa.Table:
    table = pa.concat_tables([pq.read_table(f) for f in shard_files]).combine_chunks()
    if missing := set(LABEL_COLUMNS) - set(table.column_names):
        raise SchemaError(f"shards {shard_files[:1]}... lack columns {sorted(missing)}: not a soft-label cache of schema "
                          f"v{SCHEMA_VERSION}; relabel it")
    return table.take(pc.sort_indices(table, sort_keys=[("doc_id", "ascending"), ("block_index", "ascending")]))


def _first_mismatch(a: pa.Table, b: pa.Table) -> int | None:
    """Index of the first row where doc_id, block_index or input_ids differ (None: all equal)."""
    n = min(a.num_rows, b.num_rows)
    bad = np.zeros(n, dtype=bool)
    for col in ("doc_id", "block_index"):
        bad |= np.asarray(a.column(col).to_pylist()[:n], dtype=object) != np.asarray(b.column(col).to_pylist()[:n], dtype=object)
    bad |= _lists_differ(a.column("input_ids").combine_chunks()[:n], b.column("input_ids").combine_chunks()[:n])
    if bad.any():
        return int(bad.argmax())
    return None if a.num_rows == b.num_rows else n


def _lists_differ(a: pa.Array, b: pa.Array) -> np.ndarray:
    """[n] bool: row ``r`` of the two list arrays (same length ``n``) differs in length or values."""
    len_a = a.value_lengths().to_numpy(zero_copy_only=False)
    len_b = b.value_lengths().to_numpy(zero_copy_only=False)
    bad = len_a != len_b
    same = np.flatnonzero(~bad)
    if same.size:
        lengths = len_a[same]
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        start_a = (np.cumsum(len_a) - len_a)[same]
        start_b = (np.cumsum(len_b) - len_b)[same]
        va, vb = a.flatten().to_numpy(zero_copy_only=False), b.flatten().to_numpy(zero_copy_only=False)
        diff = va[np.repeat(start_a, lengths) + within] != vb[np.repeat(start_b, lengths) + within]
        bad[same] = np.bincount(np.repeat(np.arange(same.size), lengths), weights=diff, minlength=same.size) > 0
    return bad


def join_caches(shard_lists: list[list[str]], names: list[str], out_dir: Path, rows_per_shard: int = 256) -> list[str]:
    """Join M teachers' caches of the same split by row into Parquet shards under ``out_dir``.

    Args:
        shard_lists: per teacher, the shard files of its cache (teacher 0 first).
        names: teacher names, for error messages.
        out_dir: folder for the joined shards (created; existing shards are replaced).
        rows_per_shard: rows per written shard.

    Returns:
        The joined shard files.

    Raises:
        CacheJoinError: the caches differ in their rows; the message gives the first mismatching
            row's index (in ``(doc_id, block_index)`` order), its document and block in both caches.
        SchemaError: a cache is not of the current schema version (relabel it).
    """
    tables = [_sorted_table(files) for files in shard_lists]
    base = tables[0]
    for i, other in enumerate(tables[1:], start=1):
        row = _first_mismatch(base, other)
        if row is not None:
            def where(t: pa.Table, row: int = row) -> str:
                return f"doc {t['doc_id'][row].as_py()!r} block {t['block_index'][row].as_py()}" if row < t.num_rows else "no row"
            raise CacheJoinError(
                f"the caches of teachers {names[0]!r} ({base.num_rows} rows) and {names[i]!r} ({other.num_rows} rows) "
                f"do not line up: first mismatching row {row}: {where(base)} vs {where(other)} (document, block or "
                "input_ids differ). Label the same data with the same data.* and tokenizer for every teacher")
        for name in LABEL_COLUMNS:
            base = base.append_column(teacher_column(i, name), other.column(name))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.parquet"):
        old.unlink()
    files = []
    for k, start in enumerate(range(0, base.num_rows, rows_per_shard)):
        path = out_dir / f"joined-{k:05d}.parquet"
        pq.write_table(base.slice(start, rows_per_shard), path)
        files.append(str(path))
    return files


def decode_joined(table: pa.Table, num_teachers: int) -> dict[str, np.ndarray]:
    """:func:`~raykd.soft_labels.schema.decode_batch` of a joined table: teacher 0's columns under
    their names, teacher ``i``'s label columns under ``t<i>.<name>`` (same shapes)."""
    out = decode_batch(table)
    base = [c for c in table.column_names if "." not in c and c not in LABEL_COLUMNS]
    for i in range(1, num_teachers):
        view = table.select(base + [teacher_column(i, n) for n in LABEL_COLUMNS]).rename_columns(base + list(LABEL_COLUMNS))
        decoded = decode_batch(view)
        out.update({teacher_column(i, n): decoded[n] for n in DECODED_LABELS})
    return out
