"""Checking a soft-label cache folder, and the one way out of a damaged one.

``raykd cache verify DIR`` reads every ledger entry of the cache (or of every cache under a
cache root), checks its key, that its shard is there with the recorded size and that the shard's
Parquet footer reads, and checks ``manifest.json`` against the ledger. ``raykd cache repair DIR``
moves what is bad aside into ``<cache>/damaged/<time>/`` (nothing is deleted): a damaged part's
ledger entry and shard, shards no ledger entry claims, temporary files, and ``manifest.json``
when the cache it describes lost a part. A part without a ledger entry is a part not labeled, so
the next run of the same command relabels exactly the parts moved aside and writes a new manifest
(the resume path of :mod:`raykd.soft_labels.cache`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from raykd import storage
from raykd.soft_labels.cache import LEDGER, MANIFEST, PARTS, CacheError, done_parts, ledger_file, part_file, read_entry

DAMAGED = "damaged"
"""Sub-folder of a cache where :func:`repair_cache` moves what it takes out."""


@dataclass
class CacheCheck:
    """What :func:`verify_cache` found in one cache folder.

    Attributes:
        cache_dir: the cache folder (path or URI).
        parts: ledger entries (committed parts).
        finished: whether ``manifest.json`` exists.
        damaged: ``{part digest: why}`` for committed parts that cannot be used.
        stray: files to move aside that belong to no committed part (temporary files, shards
            without a ledger entry).
        manifest: what is wrong with ``manifest.json`` (empty when it agrees with the ledger).
    """

    cache_dir: str
    parts: int = 0
    finished: bool = False
    damaged: dict[str, str] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)
    manifest: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing to repair."""
        return not (self.damaged or self.stray or self.manifest)


def cache_folders(location: str) -> list[str]:
    """The cache folders at ``location``: itself when it is one (it has ``ledger/`` or
    ``manifest.json``), else the cache folders directly under it (a ``labels.cache_dir`` root).

    Raises:
        CacheError: no cache there.
    """
    def is_cache(folder: str) -> bool:
        return storage.is_file(storage.join(folder, MANIFEST)) or storage.is_dir(storage.join(folder, LEDGER))

    if is_cache(location):
        return [location]
    fs, root = storage.resolve(location)
    from pyarrow.fs import FileSelector, FileType

    subs = sorted(i.base_name for i in fs.get_file_info(FileSelector(root, allow_not_found=True)) if i.type == FileType.Directory)
    found = [storage.join(location, s) for s in subs if is_cache(storage.join(location, s))]
    if not found:
        raise CacheError(f"{location} holds no soft-label cache (no {LEDGER}/ or {MANIFEST}, here or one level down)")
    return found


def verify_cache(cache_dir: str) -> CacheCheck:
    """Check every committed part of one cache folder and its manifest; reads every shard's footer.

    Returns:
        A :class:`CacheCheck` (``ok`` when nothing needs repair).
    """
    check = CacheCheck(cache_dir, finished=storage.is_file(storage.join(cache_dir, MANIFEST)))
    manifest = storage.read_json(storage.join(cache_dir, MANIFEST)) if check.finished else {}
    parts = sorted(done_parts(cache_dir))
    check.parts = len(parts)
    keys: dict[str, str | None] = {}
    for part in parts:
        try:
            entry = read_entry(cache_dir, part)
        except CacheError as e:
            check.damaged[part] = str(e).split("; run `raykd cache repair")[0]
            continue
        keys[part] = entry.get("key")
        if entry.get("file"):
            try:
                with storage.open_input(storage.join(cache_dir, entry["file"])) as f:
                    pq.read_metadata(f)
            except Exception as e:  # noqa: BLE001 - any unreadable footer is damage
                check.damaged[part] = f"part {entry['part_id']}: its shard is not readable Parquet ({e})"
    key = manifest.get("key") or (Counter(keys.values()).most_common(1)[0][0] if keys else None)
    for part, k in keys.items():
        if k != key:
            check.damaged[part] = f"part {part}: its ledger entry was written for cache key {k}, not {key}"
    committed = set(parts)
    for f in storage.list_files(storage.join(cache_dir, PARTS)):
        name = f.rsplit("/", 1)[-1]
        if not name.endswith(".parquet") or name[: -len(".parquet")] not in committed:
            check.stray.append(f)
    if check.finished:
        if unlisted := sorted(set(manifest.get("parts", [])) - committed):
            check.manifest.append(f"{MANIFEST} lists {len(unlisted)} part(s) without a ledger entry (e.g. {unlisted[0]})")
        if check.damaged:
            check.manifest.append(f"{MANIFEST} describes a cache with {len(check.damaged)} damaged part(s)")
    return check


def repair_cache(check: CacheCheck) -> list[tuple[str, str]]:
    """Move aside what :func:`verify_cache` found, into ``<cache>/damaged/<UTC time>/`` (same
    relative paths); nothing is deleted. The next labeling run relabels only those parts.

    Returns:
        ``[(from, to)]`` for every file moved (empty when ``check.ok``).
    """
    if check.ok:
        return []
    d = check.cache_dir
    aside = storage.join(d, DAMAGED, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    files = {f: (PARTS, f.rsplit("/", 1)[-1].split("?")[0]) for f in check.stray}
    for part in check.damaged:
        files.update({f: rel for f, rel in ((ledger_file(d, part), (LEDGER, f"{part}.json")),
                                            (part_file(d, part), (PARTS, f"{part}.parquet"))) if storage.exists(f)})
    if check.finished and (check.damaged or check.manifest):
        files[storage.join(d, MANIFEST)] = (MANIFEST,)
    moved = []
    for f, relative in files.items():
        target = storage.join(aside, *relative)
        storage.move(f, target)
        moved.append((f, target))
    return moved
