"""The soft-label cache: committed *parts* plus a ledger, named by the cache key.

The key hashes everything that changes the labels: schema version, teacher weights and
tokenizer fingerprints, engine and dtype, the form (``K``, or the draws ``S`` and their seed),
temperature, the data (the source's identity
and the selection of documents: split, fractions, seed, sample) and how it is cut into blocks.

A cache folder (a local path or a URI, through :mod:`raykd.storage`) holds::

    <root>/<key digest>/
        parts/<part>.parquet     the shard of one part (absent when the part had no rows)
        ledger/<part>.json       the part's commit record: key, part id, document ids, a
                                 fingerprint of its input, rows, tokens, bytes, teacher calls
        manifest.json            the index of the parts a finished labeling planned

A part commits on its own: its shard is written first (locally to a temporary name, then
renamed; on an object store as one object, which becomes visible all at once), then its ledger
entry, last and atomically. A part is done iff its ledger entry exists, so a run that is killed
anywhere and started again labels only the parts without one, and a finished part is never
written again. New documents become new parts. ``manifest.json`` is written when every planned
part is in the ledger; it is what training opens.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raykd import storage
from raykd.soft_labels.schema import SCHEMA_VERSION, count_tokens, decode_batch

MANIFEST = "manifest.json"
PARTS = "parts"
LEDGER = "ledger"
_TMP = ".tmp"


class CacheError(RuntimeError):
    """A cache folder is incomplete, corrupt, or was made for other settings."""


def repair_advice(cache_dir: str) -> str:
    """The way out of a damaged part, for error messages: ``raykd cache repair`` on the folder."""
    return (f"run `raykd cache repair {cache_dir}` (it moves the damaged part aside, deleting nothing), then the "
            "same command again: it relabels only that part")


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the content of a soft-label cache."""

    teacher_fingerprint: str
    tokenizer_fingerprint: str
    engine: str
    dtype: str
    k: int
    temperature: float
    data_fingerprint: str
    """The data's identity: for a streamed source, a hash of the source (kind, location,
    columns) and the selection (split, fractions, seed, sample, perturbation); for an
    in-memory list, a hash of its documents (:func:`documents_fingerprint`)."""
    seq_len: int
    max_blocks_per_doc: int
    min_tokens: int
    logprobs_mode: str = "raw_logprobs"
    """What the logprobs are: ``raw_logprobs`` = log-softmax of the unprocessed logits (at the
    key's temperature); other modes (vLLM's processed logprobs) would give other numbers."""
    schema_version: int = SCHEMA_VERSION
    form: str = "topk"
    """``topk`` or ``sampled`` (:mod:`raykd.soft_labels.sampled`; ``k`` is then the draws ``S``)."""
    samples: int = 0
    """Draws per position of the sampled form (0 for top-k)."""
    sample_seed: int = 0
    """``labels.seed`` of the sampled form's draws (0 for top-k)."""
    sample_draws: str = "independent"
    """``labels.draws`` of the sampled form (left out of the digest when ``independent``, so the
    sampled caches written before the field existed keep their keys)."""

    def digest(self) -> str:
        """Hex SHA-256 of the canonical JSON of the fields (24 characters kept). A top-k key leaves
        out the sampled form's fields, so it is the digest top-k caches had before they existed."""
        fields = asdict(self)
        if self.form == "topk":
            for name in ("form", "samples", "sample_seed"):
                fields.pop(name)
        if self.form == "topk" or self.sample_draws == "independent":
            fields.pop("sample_draws")
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def fingerprint(value: Any) -> str:
    """16 hex characters of the SHA-256 of ``value``'s canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def documents_fingerprint(docs: Iterable[Any]) -> str:
    """Hash of a document list (ids and texts, in id order); order of the input does not matter."""
    return rows_fingerprint([d.doc_id for d in docs], [d.text for d in docs])


def rows_fingerprint(doc_ids, texts) -> str:
    """Hash of ``(id, text)`` pairs in id order: the content fingerprint of a part's input."""
    h = hashlib.sha256()
    for doc_id, text in sorted(zip(map(str, doc_ids), map(str, texts))):
        h.update(doc_id.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


@dataclass
class Manifest:
    """What a finished cache holds; written as ``manifest.json``."""

    key: str
    key_fields: dict[str, Any]
    teacher: dict[str, Any]
    rows: int
    tokens: int
    loss_tokens: int
    bytes: int
    shards: list[dict[str, Any]]
    """One entry per non-empty part: ``file`` (relative to the cache folder), ``rows``,
    ``bytes``, ``tokens``, ``part`` (the part id)."""
    label_seconds: float
    parts: list[str] = field(default_factory=list)
    """Digests of every planned part (empty parts included)."""
    docs: int = 0
    teacher_calls: int = 0
    """``score`` calls over every part, counted by the labelers (survives replica restarts)."""
    created_at: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


def cache_dir_for(root: Any, key: CacheKey) -> str:
    """The cache folder of ``key`` under ``root`` (a path or URI)."""
    return storage.join(str(root), key.digest())


def part_file(cache_dir: str, part: str) -> str:
    """Location of part ``part``'s shard (``<cache>/parts/<part>.parquet``)."""
    return storage.join(cache_dir, PARTS, f"{part}.parquet")


def ledger_file(cache_dir: str, part: str) -> str:
    """Location of part ``part``'s ledger entry (``<cache>/ledger/<part>.json``); it exists iff the part is committed."""
    return storage.join(cache_dir, LEDGER, f"{part}.json")


def write_part(cache_dir: str, key: CacheKey, part: str, table: pa.Table | None, *, part_id: str,
               doc_ids: Iterable[str] = (), input_fingerprint: str = "", teacher_calls: int = 0,
               seconds: float = 0.0) -> dict[str, Any]:
    """Commit one part: its shard (if it has rows), then its ledger entry, atomically and last.

    The one commit of every cache kind: token-level soft labels and class-level labels
    (:mod:`raykd.soft_labels.class_labels`).

    Args:
        cache_dir: the cache folder (path or URI).
        key: the cache key; recorded in the entry, checked when the cache is resumed or opened.
        part: the part's digest (names its files).
        table: the part's rows in the cache's schema, or None / empty for a part with none.
        part_id: readable part identity (``file:start-stop``).
        doc_ids: the ids of the documents the part labeled.
        input_fingerprint: :func:`rows_fingerprint` of the part's input documents.
        teacher_calls: ``score`` calls this part made.
        seconds: wall time of the part.

    Returns:
        The ledger entry.

    Raises:
        CacheError: the part is already committed (a finished part is never rewritten).
    """
    ledger = ledger_file(cache_dir, part)
    if storage.exists(ledger):
        raise CacheError(f"part {part_id} is already committed in {cache_dir}; a finished part is never rewritten")
    entry: dict[str, Any] = {"key": key.digest(), "part": part, "part_id": part_id, "doc_ids": [str(d) for d in doc_ids],
                             "input_fingerprint": input_fingerprint, "teacher_calls": int(teacher_calls),
                             "seconds": round(seconds, 3), "rows": 0, "tokens": 0, "loss_tokens": 0, "bytes": 0,
                             "file": None, "schema_version": SCHEMA_VERSION, "created_at": time.time()}
    if table is not None and table.num_rows:
        target = part_file(cache_dir, part)
        fs, path = storage.resolve(target)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if storage.is_uri(target):  # one PUT: the object appears whole or not at all
            pq.write_table(table, path, filesystem=fs, compression="zstd")
        else:
            tmp = f"{path}.{uuid.uuid4().hex[:8]}{_TMP}"
            pq.write_table(table, tmp, filesystem=fs, compression="zstd")
            fs.move(tmp, path)
        tokens, loss_tokens = count_tokens(table)
        entry.update(rows=table.num_rows, tokens=tokens, loss_tokens=loss_tokens, bytes=fs.get_file_info(path).size,
                     file=f"{PARTS}/{part}.parquet")
    storage.write_json(ledger, entry, indent=None)
    return entry


def done_parts(cache_dir: str) -> set[str]:
    """Digests of the parts committed in ``cache_dir`` (by listing the ledger; no entry is read)."""
    return {f.rsplit("/", 1)[-1][: -len(".json")] for f in storage.list_files(storage.join(cache_dir, LEDGER), ".json")}


def read_entry(cache_dir: str, part: str, key: CacheKey | None = None) -> dict[str, Any]:
    """A part's ledger entry, checked against ``key`` and its shard.

    Raises:
        CacheError: the entry is unreadable, was written for another cache key, or its shard is
            missing or of another size (a corrupt part). The message says how to relabel just
            that part; nothing is deleted.
    """
    where = ledger_file(cache_dir, part)
    try:
        entry = storage.read_json(where)
    except Exception as e:  # noqa: BLE001
        raise CacheError(f"the ledger entry {where} is unreadable ({e}); {repair_advice(cache_dir)}") from None
    if key is not None and entry.get("key") != key.digest():
        raise CacheError(f"the ledger entry {where} was written for cache key {entry.get('key')}, not {key.digest()} "
                         f"(a part ledger from another cache); {repair_advice(cache_dir)}")
    if entry.get("file"):
        shard = storage.join(cache_dir, entry["file"])
        info = storage.file_info(shard)
        if not info.is_file or info.size != entry["bytes"]:
            got = f"{info.size} bytes" if info.is_file else "missing"
            raise CacheError(f"part {entry['part_id']} is corrupt: its shard {shard} is {got}, its ledger entry says "
                             f"{entry['bytes']} bytes; {repair_advice(cache_dir)}")
    return entry


def remove_partials(cache_dir: str) -> int:
    """Delete the temporary shard files an interrupted run left in ``cache_dir``; returns how many.

    A temporary file is one whose part has no ledger entry yet, so no finished part is touched.
    (Two runs labeling the same cache at once are not supported.)
    """
    removed = 0
    for f in storage.list_files(storage.join(cache_dir, PARTS), _TMP):
        storage.delete_file(f)
        removed += 1
    return removed


def finalize(cache_dir: str, key: CacheKey, parts: list[str], teacher: dict[str, Any], label_seconds: float) -> Manifest:
    """Write ``manifest.json`` for the planned ``parts`` once every one is in the ledger.

    Entries are read one at a time (the driver never holds every part's ids).

    Raises:
        CacheError: a planned part has no ledger entry, or an entry fails :func:`read_entry`.
    """
    missing = sorted(set(parts) - done_parts(cache_dir))
    if missing:
        raise CacheError(f"{len(missing)} of {len(parts)} parts of {cache_dir} are not labeled yet (e.g. {missing[0]})")
    shards, rows, tokens, loss_tokens, total, docs, calls = [], 0, 0, 0, 0, 0, 0
    for part in parts:
        e = read_entry(cache_dir, part, key)
        if e["file"]:
            shards.append({"file": e["file"], "rows": e["rows"], "bytes": e["bytes"], "tokens": e["tokens"], "part": e["part_id"]})
        rows, tokens, loss_tokens, total = rows + e["rows"], tokens + e["tokens"], loss_tokens + e["loss_tokens"], total + e["bytes"]
        docs, calls = docs + len(e["doc_ids"]), calls + e["teacher_calls"]
    if not rows:
        raise CacheError(f"labeling wrote no rows into {cache_dir}: was the data (or this split of it) empty?")
    manifest = Manifest(key=key.digest(), key_fields=asdict(key), teacher=teacher, rows=rows, tokens=tokens,
                        loss_tokens=loss_tokens, bytes=total, shards=shards, label_seconds=label_seconds,
                        parts=list(parts), docs=docs, teacher_calls=calls)
    storage.write_json(storage.join(cache_dir, MANIFEST), asdict(manifest))  # atomic: the cache is finished or not
    return manifest


def open_cache(folder: Any, expect: CacheKey | None = None, *, deep: bool = False, parts: list[str] | None = None) -> Manifest:
    """Open a finished cache folder and check it before any training starts.

    Args:
        folder: the cache folder (path or URI).
        expect: if given, the cache must have been made with exactly these settings; a
            mismatch names the differing fields (another teacher, tokenizer, K, schema ...).
        deep: also read every shard's footer (catches truncated or corrupt files).
        parts: if given, the manifest must cover exactly these part digests.

    Raises:
        CacheError: no manifest, another schema version or settings, a shard missing, of
            another size than recorded, or (``deep``) unreadable.
    """
    folder = str(folder)
    mpath = storage.join(folder, MANIFEST)
    if not storage.is_file(mpath):
        raise CacheError(f"{folder} is not a finished soft-label cache (no {MANIFEST}); relabel or point to another folder")
    raw = storage.read_json(mpath)
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(
            f"cache {folder} has schema version {raw.get('schema_version')}, this raykd reads version "
            f"{SCHEMA_VERSION}: relabel (the new cache gets its own folder; the old one is left as is)"
        )
    manifest = Manifest(**raw)
    if expect is not None and manifest.key != expect.digest():
        diff = {name: (manifest.key_fields.get(name), value) for name, value in asdict(expect).items()
                if manifest.key_fields.get(name) != value}
        detail = ", ".join(f"{n}: cache has {a!r}, run wants {b!r}" for n, (a, b) in diff.items())
        raise CacheError(f"cache {folder} was made for other settings ({detail}); relabel or use the matching settings")
    if parts is not None and sorted(manifest.parts) != sorted(parts):
        raise CacheError(f"cache {folder} covers {len(manifest.parts)} parts, the data now has {len(parts)}")
    for shard in manifest.shards:
        path = storage.join(folder, shard["file"])
        info = storage.file_info(path)
        if not info.is_file:
            raise CacheError(f"shard {path} listed in {storage.join(folder, MANIFEST)} is missing; {repair_advice(folder)}")
        if info.size != shard["bytes"]:
            raise CacheError(f"shard {path} is {info.size} bytes, {storage.join(folder, MANIFEST)} says {shard['bytes']}: "
                             f"it is corrupt or was changed; {repair_advice(folder)}")
        if deep:
            try:
                with storage.open_input(path) as f:
                    pq.read_metadata(f)
            except Exception as e:
                raise CacheError(f"shard {path} is not readable Parquet ({e}); {repair_advice(folder)}") from e
    return manifest


def shard_paths(folder: Any, manifest: Manifest) -> list[str]:
    """Locations of a cache's shards (paths or URIs, as the folder is)."""
    return [storage.join(str(folder), s["file"]) for s in manifest.shards]


def iter_cache_batches(shard_files: list[str], batch_size: int) -> Iterable[dict[str, Any]]:
    """Decoded batches (:func:`raykd.soft_labels.schema.decode_batch`) of at most ``batch_size``
    rows of committed shards, in shard order; local paths or URIs, no Ray needed."""
    for path in shard_files:
        with storage.open_input(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                yield decode_batch(pa.Table.from_batches([rb]))
