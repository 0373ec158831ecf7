"""The byte-level layout shared by the soft-label forms of :mod:`raykd.soft_labels.schema`:
LEB128 varints, ``binary`` columns of per-row bytes, per-row dictionaries of distinct token ids
and per-position lists of ascending indices into them, stored as gaps. Vectorised over a batch;
numpy and pyarrow only.

A *ragged* array here is a flat array of entries ``[M]`` with the position each entry belongs to
(``pos [M]``, non-decreasing): a position of the top-k form has ``K`` entries, one of the sampled
form as many as it drew distinct ids.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


class SchemaError(ValueError):
    """A table or batch does not match the soft-label schema."""


def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 bytes of non-negative integers: 7 bits per byte, high bit set on all but the last.

    Args:
        values: int array ``[N]``, each in ``[0, 2^35)``.

    Returns:
        uint8 ``[sum of byte lengths]``; values below 128 take one byte, below 16,384 two.

    Raises:
        SchemaError: a value outside ``[0, 2^35)``.
    """
    v = np.asarray(values, dtype=np.int64).ravel()
    if v.size and (v.min() < 0 or v.max() >= 1 << 35):
        raise SchemaError(f"varint values must be in [0, 2^35), got [{v.min()}, {v.max()}]")
    nbytes = varint_lengths(v)
    starts = np.cumsum(nbytes) - nbytes
    owner = np.repeat(np.arange(v.size), nbytes)
    j = np.arange(int(nbytes.sum())) - starts[owner]
    more = (j < nbytes[owner] - 1).astype(np.int64) << 7
    return (((v[owner] >> (7 * j)) & 0x7F) | more).astype(np.uint8)


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of each value's LEB128 encoding (int64, the shape of ``values``)."""
    v = np.asarray(values, dtype=np.int64)
    return 1 + sum((v >= 1 << (7 * j)).astype(np.int64) for j in range(1, 5))


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


def binary_column(data: np.ndarray, lengths: np.ndarray) -> pa.BinaryArray:
    """A binary array of ``len(lengths)`` rows, row ``r`` holding the next ``lengths[r]`` bytes of ``data``."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.Array.from_buffers(pa.binary(), len(lengths), [None, pa.py_buffer(offsets),
                                                             pa.py_buffer(np.ascontiguousarray(data, np.uint8))])


def binary_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(bytes, per-row byte lengths)`` of a (possibly sliced) binary array.

    Raises:
        SchemaError: ``arr`` is not a binary array.
    """
    if not pa.types.is_binary(arr.type):
        raise SchemaError(f"expected a binary column, got {arr.type}")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return data[offsets[0] : offsets[-1]], np.diff(offsets)


def list_column(values: np.ndarray, lengths: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    """A list array of ``len(lengths)`` rows, row ``r`` holding the next ``lengths[r]`` values."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(values), type=arrow_type))


def varint_column(values: np.ndarray, row_of: np.ndarray, rows: int) -> pa.BinaryArray:
    """``values [M]`` as LEB128 varints, one binary row per table row (``row_of [M]``, non-decreasing)."""
    return binary_column(varint_encode(values), np.bincount(row_of, weights=varint_lengths(values), minlength=rows).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Per-row dictionaries of distinct ids, and per-position ascending indices into them.

def dictionary_column(ids: np.ndarray, row_of: np.ndarray, rows: int) -> tuple[pa.BinaryArray, np.ndarray]:
    """Each row's distinct ids, ascending, as varint gaps (the first gap is the id itself).

    Args:
        ids: int ``[M]`` token ids (non-negative).
        row_of: int ``[M]`` the row of each id (non-decreasing).
        rows: ``B``.

    Returns:
        ``(column of B rows, local [M])``: ``local`` is each id's index in its row's dictionary.
    """
    width = int(ids.max()) + 1 if ids.size else 1
    uniq, inverse = np.unique(row_of * width + ids, return_inverse=True)  # sorted by row, then id
    dict_row, dict_id = uniq // width, uniq % width
    dict_len = np.bincount(dict_row, minlength=rows)
    dict_start = np.cumsum(dict_len) - dict_len
    firsts = dict_start[dict_len > 0]
    gaps = np.diff(dict_id, prepend=0)
    gaps[firsts] = dict_id[firsts]
    return varint_column(gaps, dict_row, rows), inverse.ravel() - dict_start[row_of]


def decode_dictionary(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`dictionary_column`: ``(ids [sum of dictionary lengths], start of each row [B])``."""
    data, byte_len = binary_parts(column)
    gaps = varint_decode(data)
    terminators = np.concatenate([[0], np.cumsum(data < 0x80)])
    byte_end = np.cumsum(byte_len)
    dict_len = terminators[byte_end] - terminators[byte_end - byte_len]  # values per row
    dict_start = np.cumsum(dict_len) - dict_len
    running = np.cumsum(gaps)  # a running sum over all rows, restarted at each row's first id
    nonempty = dict_len > 0
    before = np.zeros(len(byte_len), np.int64)
    before[nonempty] = running[dict_start[nonempty]] - gaps[dict_start[nonempty]]
    return running - np.repeat(before, dict_len), dict_start


def position_starts(pos: np.ndarray) -> np.ndarray:
    """bool ``[M]``: True at the first entry of each position of a ragged array (``pos`` non-decreasing)."""
    first = np.ones(len(pos), dtype=bool)
    first[1:] = pos[1:] != pos[:-1]
    return first


def gaps_column(local: np.ndarray, pos: np.ndarray, row_of_pos: np.ndarray, rows: int) -> pa.BinaryArray:
    """Per position, its ascending dictionary indices as varint gaps (the first gap: the index).

    Args:
        local: int ``[M]`` indices, ascending within each position.
        pos: int ``[M]`` the position of each entry (non-decreasing).
        row_of_pos: int ``[N]`` the row of each position.
        rows: ``B``.
    """
    first = position_starts(pos)
    gaps = np.diff(local, prepend=0)
    gaps[first] = local[first]
    return varint_column(gaps, row_of_pos[pos], rows)


def decode_gaps(column: pa.Array, pos: np.ndarray) -> np.ndarray:
    """Inverse of :func:`gaps_column`: the indices ``[M]`` of positions ``pos [M]``.

    Raises:
        SchemaError: the column holds another number of values than ``pos``.
    """
    gaps = varint_decode(binary_parts(column)[0])
    if len(gaps) != len(pos):
        raise SchemaError(f"an index column holds {len(gaps)} values for {len(pos)} entries; the shard is corrupt")
    running = np.cumsum(gaps)
    first = np.flatnonzero(position_starts(pos))
    return running - np.repeat(running[first] - gaps[first], np.diff(np.append(first, len(pos))))
