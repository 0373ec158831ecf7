"""The check that a source's document ids are unique across its parts (files), made before any
teacher call: a distributed hash check on Ray (tasks read the parts, bucket actors keep the ids).
Within a part :func:`raykd.data.sources.read_part` checks them.
"""

from __future__ import annotations

import hashlib

from raykd import storage
from raykd.config import DataConfig
from raykd.data.sources import PartSpec, duplicate_id_error, read_part


IDS_PER_BUCKET = 1_000_000
"""Document ids one :class:`_IdBucket` actor holds at most (about 100 MB of Python strings)."""
IDS_PER_TASK = 250_000
"""Planned rows one reading task takes (consecutive whole parts until it holds at least this):
reading a part's ids takes milliseconds, and a task per small part makes Ray start a worker
process for each queued task, most of which find no work left (a 30-part source started 9)."""


def check_unique_ids(cfg: DataConfig, parts: list[PartSpec], max_buckets: int = 64) -> None:
    """Refuse a source whose id column repeats an id across parts (files), before any teacher call.

    Within a part :func:`read_part` checks it. Across parts it is a distributed hash check: Ray
    tasks read the parts (consecutive parts grouped to :data:`IDS_PER_TASK` planned rows a task)
    and send their ids, split by a stable hash, straight to bucket actors (one per
    :data:`IDS_PER_BUCKET` planned rows, at most ``max_buckets``); each bucket keeps the first part
    of every id it saw. A source that fits one task is checked in that task, with no actors. The
    ids never go through the driver (a small task result would be stored in the driver's memory,
    its owner); only a repeated id, if any, comes back. Sources without ``data.id_column`` number
    rows per file and cannot repeat.

    Raises:
        ValueError: an id appears in two parts; the message names it, both parts and the fix.
    """
    if cfg.id_column is None or not parts:  # one part too: its rows are checked (null ids) before the teacher starts
        return
    import ray

    groups = part_groups(parts, IDS_PER_TASK)
    remote = {"num_cpus": 0.25, **storage.remote_args()}
    if len(groups) == 1:
        found = [ray.get(ray.remote(**remote)(_first_repeat).remote(groups[0], cfg))]
    else:
        n = max(1, min(max_buckets, -(-sum(p.rows for p in parts) // IDS_PER_BUCKET)))
        bucket = ray.remote(num_cpus=0)(_IdBucket)  # holds ids, computes little
        buckets = [bucket.remote() for _ in range(n)]
        try:
            send = ray.remote(**remote)(_send_ids)
            ray.get([send.remote(group, cfg, buckets) for group in groups])
            found = ray.get([b.first_repeat.remote() for b in buckets])
        finally:
            for b in buckets:
                ray.kill(b)
    if repeats := [r for r in found if r]:
        doc_id, first, second = repeats[0]
        raise duplicate_id_error(doc_id, cfg, f"{first} and {second}")


def part_groups(parts: list[PartSpec], rows_per_group: int) -> list[list[PartSpec]]:
    """``parts`` in order, cut into runs of consecutive parts of at least ``rows_per_group``
    planned rows each (the last run may hold fewer)."""
    groups: list[list[PartSpec]] = [[]]
    rows = 0
    for part in parts:
        if rows >= rows_per_group:
            groups.append([])
            rows = 0
        groups[-1].append(part)
        rows += part.rows
    return groups


def _first_repeat(parts: list[PartSpec], cfg: DataConfig) -> tuple[str, str, str] | None:
    """The first id of ``parts`` that an earlier part already held, as ``(id, first part, part)``."""
    bucket = _IdBucket()
    for spec in parts:
        bucket.add(spec.part_id, [str(doc_id) for doc_id in read_part(spec, cfg)["doc_id"]])
    return bucket.first_repeat()


def _send_ids(parts: list[PartSpec], cfg: DataConfig, buckets: list) -> None:
    """Send each part's ids to the bucket actors, split by a stable hash (blake2b of the id)."""
    import ray

    for spec in parts:
        out: list[list[str]] = [[] for _ in buckets]
        for doc_id in read_part(spec, cfg)["doc_id"]:
            out[int.from_bytes(hashlib.blake2b(str(doc_id).encode(), digest_size=4).digest(), "big") % len(buckets)].append(str(doc_id))
        ray.get([b.add.remote(spec.part_id, ids) for b, ids in zip(buckets, out) if ids])


class _IdBucket:
    """Ids of one hash bucket with the part that first held each; remembers the first repeat."""

    def __init__(self) -> None:
        self.first_part: dict[str, str] = {}
        self.repeat: tuple[str, str, str] | None = None

    def add(self, part_id: str, ids: list[str]) -> None:
        if self.repeat is not None:
            return
        for doc_id in ids:
            first = self.first_part.setdefault(doc_id, part_id)
            if first != part_id:  # a part's own ids are unique (read_part checks them)
                self.repeat = (doc_id, first, part_id)
                return

    def first_repeat(self) -> tuple[str, str, str] | None:
        return self.repeat
