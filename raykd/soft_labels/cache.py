"""The soft-label cache: a folder of Parquet shards plus ``manifest.json``, named by its key.

The key hashes everything that changes the labels: schema version, teacher weights and
tokenizer fingerprints, engine and dtype, ``K``, temperature, the data (a hash of the
documents' ids and text) and how it was cut into blocks. The same labeling asked for twice
finds the finished folder and calls the teacher zero times; any change is a new folder.

A cache is written into ``<key>.partial-<uuid>/`` and renamed to ``<key>/`` only when complete
(manifest last), so a crash never leaves a folder that looks finished, and a finished folder is
never written to again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from raykd.soft_labels.schema import SCHEMA_VERSION, schema_metadata

MANIFEST = "manifest.json"


class CacheError(RuntimeError):
    """A cache folder is incomplete, corrupt, or was made for other settings."""


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
    seq_len: int
    max_blocks_per_doc: int
    min_tokens: int
    logprobs_mode: str = "raw_logprobs"
    """What the logprobs are: ``raw_logprobs`` = log-softmax of the unprocessed logits (at the
    key's temperature); other modes (vLLM's processed logprobs) would give other numbers."""
    schema_version: int = SCHEMA_VERSION

    def digest(self) -> str:
        """Hex SHA-256 of the canonical JSON of the fields (24 characters kept)."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def documents_fingerprint(docs: Iterable[Any]) -> str:
    """Hash of a document list (ids and texts, in id order); order of the input does not matter."""
    h = hashlib.sha256()
    for doc in sorted(docs, key=lambda d: d.doc_id):
        h.update(doc.doc_id.encode())
        h.update(b"\0")
        h.update(doc.text.encode())
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
    label_seconds: float
    created_at: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


def cache_dir_for(root: Path, key: CacheKey) -> Path:
    return Path(root) / key.digest()


def new_partial_dir(final_dir: Path) -> Path:
    """A fresh private folder to write shards into before :func:`commit`."""
    path = final_dir.parent / f"{final_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def _shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


def commit(partial: Path, final_dir: Path, key: CacheKey, teacher: dict[str, Any], label_seconds: float) -> Manifest:
    """Check the shards of ``partial``, write the manifest, and rename it to ``final_dir``.

    The one commit of every cache kind: token-level soft labels (``loss_mask`` counts the
    labeled positions) and class-level labels (:mod:`raykd.soft_labels.class_labels`, no
    ``loss_mask``: one label per row).

    Raises:
        CacheError: no shard was written, a shard is unreadable or carries another key, or
            ``final_dir`` already exists (it is never overwritten).
    """
    shards, rows, tokens, loss_tokens, total = [], 0, 0, 0, 0
    files = _shard_files(partial)
    if not files:
        raise CacheError(f"labeling wrote no shard into {partial}: was the data empty?")
    for path in files:
        meta = pq.read_metadata(path)
        got = schema_metadata(meta.schema.to_arrow_schema()).get("cache_key")
        if got != key.digest():
            raise CacheError(f"shard {path} carries cache key {got}, expected {key.digest()}")
        per_token = "loss_mask" in meta.schema.to_arrow_schema().names
        table = pq.read_table(path, columns=["attention_mask", "loss_mask"] if per_token else ["attention_mask"])
        n_tok = int(table.column("attention_mask").combine_chunks().flatten().to_numpy().sum())
        n_loss = int(table.column("loss_mask").combine_chunks().flatten().to_numpy().sum()) if per_token else meta.num_rows
        size = path.stat().st_size
        shards.append({"file": path.name, "rows": meta.num_rows, "bytes": size, "tokens": n_tok})
        rows, tokens, loss_tokens, total = rows + meta.num_rows, tokens + n_tok, loss_tokens + n_loss, total + size
    manifest = Manifest(
        key=key.digest(),
        key_fields=asdict(key),
        teacher=teacher,
        rows=rows,
        tokens=tokens,
        loss_tokens=loss_tokens,
        bytes=total,
        shards=shards,
        label_seconds=label_seconds,
    )
    tmp = partial / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=2))
    os.replace(tmp, partial / MANIFEST)
    if final_dir.exists():
        raise CacheError(f"{final_dir} already exists; the new labels stay in {partial}")
    os.rename(partial, final_dir)
    return manifest


def open_cache(folder: Path, expect: CacheKey | None = None, *, deep: bool = False) -> Manifest:
    """Open a finished cache folder and check it before any training starts.

    Args:
        folder: the cache folder (holds ``manifest.json`` and shards).
        expect: if given, the cache must have been made with exactly these settings; a
            mismatch names the differing fields (another teacher, tokenizer, K, schema ...).
        deep: also read every shard's footer (catches truncated or corrupt files).

    Raises:
        CacheError: no manifest, another schema version or settings, a shard missing, of
            another size than recorded, or (``deep``) unreadable.
    """
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CacheError(f"{folder} is not a finished soft-label cache (no {MANIFEST}); relabel or point to another folder")
    raw = json.loads(mpath.read_text())
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(
            f"cache {folder} has schema version {raw.get('schema_version')}, this raykd reads version "
            f"{SCHEMA_VERSION}: relabel (the new cache gets its own folder; the old one is left as is)"
        )
    manifest = Manifest(**raw)
    if expect is not None and manifest.key != expect.digest():
        diff = {
            name: (manifest.key_fields.get(name), value)
            for name, value in asdict(expect).items()
            if manifest.key_fields.get(name) != value
        }
        detail = ", ".join(f"{n}: cache has {a!r}, run wants {b!r}" for n, (a, b) in diff.items())
        raise CacheError(f"cache {folder} was made for other settings ({detail}); relabel or use the matching settings")
    for shard in manifest.shards:
        path = folder / shard["file"]
        if not path.is_file():
            raise CacheError(f"shard {path} listed in the manifest is missing; relabel into a new cache")
        if path.stat().st_size != shard["bytes"]:
            raise CacheError(
                f"shard {path} is {path.stat().st_size} bytes, the manifest says {shard['bytes']}: it is "
                "corrupt or was changed; move the cache folder aside and relabel"
            )
        if deep:
            try:
                pq.read_metadata(path)
            except Exception as e:  # noqa: BLE001
                raise CacheError(f"shard {path} is not readable Parquet ({e}); move the cache aside and relabel") from e
    return manifest


def shard_paths(folder: Path, manifest: Manifest) -> list[str]:
    return [str(Path(folder) / s["file"]) for s in manifest.shards]
