"""Labeling: parts of a source -> documents -> blocks -> teacher ``score`` (Ray Serve) -> committed parts.

One Ray Data plan over the parts still missing from the caches: each row is one
:class:`~raykd.data.sources.PartSpec` (the driver holds nothing bigger). A labeling task
(``labels.num_labelers`` run at once) reads a part where it runs, keeps the documents of each
split that still needs it (by document-id hash), tokenises them into blocks, sends every chunk
to the teacher deployment at once (the replicas queue them, so the teacher never waits for the
next batch), encodes the answers into the soft-label schema and commits the part into each
split's cache (:func:`raykd.soft_labels.cache.write_part`: shard, then ledger entry). Each task
counts its documents and tokens into the driver's progress bar (:func:`raykd.console.progress`).

A part is the unit of work, of commit and of resume: Ray Data's readers would mix rows of
several parts in one block and one batch, and a part can only be committed whole.

The labelers are Ray Data *tasks*, each building its :class:`_PartLabeler` (teacher handle,
tokenizer, schemas) once per worker process and run (:func:`_worker_labeler`), not an actor
pool: an actor pool lives for one dataset, so every labeling run started fresh processes that
import torch and transformers (~5 s each here) before the first part, while task workers stay in
Ray's worker pool between runs. A task whose worker dies is retried (Ray Data retries its tasks
without limit, as it restarted its actors); a part is committed whole or not at all, and a
retried part skips the targets it already committed.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raykd import console, storage
from raykd.config import DataConfig, SoftLabelConfig
from raykd.data import tokenize_to_blocks
from raykd.data.blocks import pad_id
from raykd.data.documents import Document
from raykd.data.perturb import perturb_documents
from raykd.data.sources import PartSpec, read_part
from raykd.data.splits import select_split
from raykd.models import load_tokenizer
from raykd.soft_labels.cache import (
    CacheKey,
    ledger_file,
    read_entry,
    rows_fingerprint,
    write_part,
)
from raykd.soft_labels.sampled import block_seeds
from raykd.soft_labels.schema import encode_batch, soft_label_schema

log = logging.getLogger(__name__)

LABELER_MEMORY = 600 * 2**20
"""Bytes of memory each labeling task reserves from Ray's scheduler: measured about 460 MiB on
BBC with 1,000-document parts (the process, its tokenizer and one part's blocks and labels);
Ray Data warns, and a node could be over-committed, without a reservation."""


@dataclass(frozen=True)
class Selection:
    """Which documents of a part a cache holds: one split of the id hash within the sample, or
    every document (``split=None``, e.g. generated documents that are all training data)."""

    split: str | None
    splits: tuple[tuple[str, float], ...] = ()
    seed: int = 0
    sample: float = 1.0
    perturb_share: float = 0.0
    perturb_seed: int = 0

    @classmethod
    def of(cls, split: str, data: DataConfig) -> Selection:
        """Split ``split`` of ``data``'s hash split and sample; train documents perturbed as
        ``data.perturb_share`` says (the held-out split never is)."""
        share = data.perturb_share if split == "train" else 0.0
        return cls(split, tuple(sorted(data.splits.items())), data.split_seed, data.sample, share, data.perturb_seed)

    def identity(self) -> dict[str, Any]:
        """What goes into the cache key."""
        if self.split is None:
            return {"split": "all", "perturb": [self.perturb_share, self.perturb_seed] if self.perturb_share else None}
        return {"split": self.split, "splits": dict(self.splits), "seed": self.seed, "sample": self.sample,
                "perturb": [self.perturb_share, self.perturb_seed] if self.perturb_share else None}

    def expected_share(self) -> float:
        """The share of a part's documents this selection is expected to keep (the hash split's
        fraction times the sample; 1 for every document)."""
        return 1.0 if self.split is None else dict(self.splits).get(self.split, 0.0) * self.sample

    def mask(self, doc_ids: np.ndarray) -> np.ndarray:
        if self.split is None:
            return np.ones(len(doc_ids), dtype=bool)
        return select_split(doc_ids, self.split, dict(self.splits), self.sample, self.seed)


@dataclass(frozen=True)
class Target:
    """One cache a labeling run fills: its key, folder and selection."""

    key: CacheKey
    cache_dir: str
    selection: Selection


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    return load_tokenizer(Path(path))


class _PartLabeler:
    """One part -> documents per target -> blocks -> ``score`` calls -> committed parts (built
    once per worker process and labeling run by :func:`_worker_labeler`)."""

    def __init__(self, app_name: str, targets: dict[str, Target], data: DataConfig, labels: SoftLabelConfig,
                 vocab_size: int, tokenizer_path: str, batch_size: int, progress: console.ProgressSink):
        # lazy: keeps ray out of import time
        from raykd.teacher.apps import teacher_handle

        self.handle = teacher_handle(app_name)
        self.targets, self.data, self.labels = targets, data, labels
        self.tokenizer_path, self.batch_size, self.progress = tokenizer_path, batch_size, progress

        self.schemas = {
            name: soft_label_schema(data.seq_len, labels.width, vocab_size,
                                    {"cache_key": t.key.digest(), "temperature": labels.temperature},
                                    pad_id=pad_id(_tokenizer(tokenizer_path)), form=labels.form)
            for name, t in targets.items()
        }

    def _blocks(self, rows: dict[str, np.ndarray], selection: Selection) -> tuple[dict[str, np.ndarray], np.ndarray]:
        keep = selection.mask(rows["doc_id"])
        ids, texts = rows["doc_id"][keep], rows["text"][keep]
        tokenizer = _tokenizer(self.tokenizer_path)
        if selection.perturb_share > 0:
            docs = perturb_documents([Document(str(i), str(t)) for i, t in zip(ids, texts)], tokenizer,
                                     selection.perturb_share, selection.perturb_seed)
            texts = np.array([d.text for d in docs], dtype=object)
        d = self.data
        blocks = tokenize_to_blocks({"doc_id": ids, "text": texts}, tokenizer, seq_len=d.seq_len,
                                    max_blocks_per_doc=d.max_blocks_per_doc, min_tokens=d.min_tokens)
        return blocks, ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"part": [], "target": [], "docs": [], "rows": [], "tokens": [], "calls": []}
        for i in range(len(batch["name"])):
            spec = PartSpec.from_row({k: v[i] for k, v in batch.items() if k != "targets"})
            for name, stats in self._label(spec, str(batch["targets"][i]).split(",")).items():
                for field, value in (("part", spec.part_id), ("target", name), *stats.items()):
                    out[field].append(value)
        return {k: np.asarray(v) for k, v in out.items()}

    def _seeds(self, blocks: dict[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
        """``{"seeds": [b], "draws": scheme}`` of the chunk of blocks from ``start`` for sampled labels
        (one seed per block, :func:`raykd.soft_labels.sampled.block_seeds`), else nothing."""
        if self.labels.form != "sampled":
            return {}
        rows = slice(start, start + self.batch_size)
        return {"seeds": block_seeds(blocks["doc_id"][rows], blocks["block_index"][rows], self.labels.seed),
                "draws": self.labels.draws}

    def _label(self, spec: PartSpec, names: list[str]) -> dict[str, dict[str, int]]:
        start = time.perf_counter()
        digest = spec.digest()
        # a retried part skips the targets it already committed (its ledger entry exists)
        names = [n for n in names if not storage.exists(ledger_file(self.targets[n].cache_dir, digest))]
        rows = read_part(spec, self.data)
        input_fp = rows_fingerprint(rows["doc_id"], rows["text"])
        work = {n: self._blocks(rows, self.targets[n].selection) for n in names}
        # lazy: keeps ray out of import time
        from raykd.teacher.deployment import ResentCall

        pending = {  # every chunk of every target in flight at once; the replicas queue them; resent if a replica dies
            n: [ResentCall(self.handle.score, b["input_ids"][s : s + self.batch_size], b["attention_mask"][s : s + self.batch_size],
                           k=self.labels.width, temperature=self.labels.temperature, **self._seeds(b, s))
                for s in range(0, len(b["input_ids"]), self.batch_size)]
            for n, (b, _) in work.items()
        }
        stats, tokens = {}, 0
        for n, (blocks, ids) in work.items():
            tables = [encode_batch({c: col[j * self.batch_size : (j + 1) * self.batch_size] for c, col in blocks.items()},
                                   resp.result(), self.schemas[n])
                      for j, resp in enumerate(pending[n])]
            table = pa.concat_tables(tables) if tables else None
            t = self.targets[n]
            entry = write_part(t.cache_dir, t.key, digest, table, part_id=spec.part_id, doc_ids=ids,
                               input_fingerprint=input_fp, teacher_calls=len(pending[n]),
                               seconds=time.perf_counter() - start)
            stats[n] = {"docs": len(ids), "rows": entry["rows"], "tokens": entry["tokens"], "calls": len(pending[n])}
            tokens += entry["tokens"]
        self.progress.add(sum(s["docs"] for s in stats.values()), tokens=tokens)  # the documents labeled
        return stats


_WORKER_LABELERS: dict[str, _PartLabeler] = {}
"""The labeler of the latest labeling run in this worker process, by run id."""


def _worker_labeler(run_id: str, kind: type[_PartLabeler], kwargs: dict[str, Any]) -> _PartLabeler:
    """This process's ``kind(**kwargs)`` for labeling run ``run_id``, built on its first part.
    A process keeps one run's labeler: a new run id drops the older one (its teacher handle,
    tokenizer and schemas)."""
    labeler = _WORKER_LABELERS.get(run_id)
    if labeler is None:
        _WORKER_LABELERS.clear()
        labeler = _WORKER_LABELERS[run_id] = kind(**kwargs)
    return labeler


def _label_part_batch(batch: dict[str, np.ndarray], *, run_id: str, labeler: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data task of :func:`label_parts`: one part labeled and committed (:class:`_PartLabeler`)."""
    return _worker_labeler(run_id, _PartLabeler, labeler)(batch)


def _read_live_part_batch(batch: dict[str, np.ndarray], *, run_id: str, labeler: dict[str, Any]) -> pa.Table:
    """Ray Data task of :func:`live_label_rows`: one part's rows, labeled first if missing (:class:`_LivePartReader`)."""
    return _worker_labeler(run_id, _LivePartReader, labeler)(batch)


def label_parts(parts: list[PartSpec], todo: dict[str, list[str]], targets: dict[str, Target], *, app_name: str,
                tokenizer_path: str, vocab_size: int, data: DataConfig, labels: SoftLabelConfig) -> dict[str, dict[str, int]]:
    """Label the parts ``todo`` names through the running teacher and commit each into its targets' caches.

    Args:
        parts: the source's parts (:func:`raykd.data.sources.plan_parts`).
        todo: for each part digest to label, the names of the targets that miss it.
        targets: the caches to fill, by name (e.g. ``train``, ``eval``).
        app_name: Serve application name of the teacher.
        tokenizer_path: folder of the tokenizer the keys were made with.
        vocab_size: teacher vocabulary ``V`` (picks the id dtype).
        data: block settings (``seq_len``, ``max_blocks_per_doc``, ``min_tokens``) and columns.
        labels: the form and its ``k`` (or ``samples`` and ``seed``), ``temperature``, ``batch_size``
            (sequences per ``score`` call), ``num_labelers``.

    Returns:
        Per target: ``parts``, ``docs``, ``rows``, ``tokens`` and ``calls`` (``score`` calls,
        counted by the labelers, so a teacher replica that restarts loses none of the count).

    Raises:
        ray.exceptions.RayTaskError: a part failed after Ray Data's retries (the parts committed
            before stay committed; a rerun labels the rest).
    """
    import ray

    rows = [spec.to_row() | {"targets": ",".join(todo[spec.digest()])} for spec in parts if spec.digest() in todo]
    totals = {name: {"parts": 0, "docs": 0, "rows": 0, "tokens": 0, "calls": 0} for name in targets}
    if not rows:
        return totals
    labelers = max(1, min(labels.num_labelers, len(rows)))
    expected = sum(spec.rows * sum(targets[n].selection.expected_share() for n in todo[spec.digest()])
                   for spec in parts if spec.digest() in todo)  # the documents to label (the bar ends at the count)
    with console.progress("labeling", total=round(expected), unit="doc", rate_of="tokens", estimate=True) as progress:
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _label_part_batch,
            batch_size=1,
            compute=ray.data.TaskPoolStrategy(size=labelers),
            num_cpus=0.1,
            memory=LABELER_MEMORY,
            **storage.remote_args(),  # runtime_env: the labelers read parts and write shards by location
            fn_kwargs={"run_id": uuid.uuid4().hex, "labeler": {
                "app_name": app_name, "targets": targets, "data": data, "labels": labels,
                "vocab_size": vocab_size, "tokenizer_path": tokenizer_path, "batch_size": labels.batch_size,
                "progress": progress,
            }},
        )
        with console.core_worker_noise_filtered():  # Ray Data's labeling tasks start here
            rows_out = list(ds.iter_rows())
        for row in rows_out:
            t = totals[row["target"]]
            t["parts"] += 1
            for field in ("docs", "rows", "tokens", "calls"):
                t[field] += int(row[field])
    return totals


class _LivePartReader(_PartLabeler):
    """The labeler of a training dataset filled live: one part -> its rows in the ``train``
    target's cache, labeled and committed first (:meth:`_PartLabeler._label`, for every target
    that misses the part) when its ledger entry is missing, then read back from the committed shard."""

    def __init__(self, *, train: str, columns: list[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.train, self.columns = train, columns

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import pyarrow.parquet as pq

        (row,) = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["name"]))]  # batch_size=1: one part
        spec = PartSpec.from_row({k: v for k, v in row.items() if k != "targets"})
        if names := [n for n in str(row["targets"]).split(",") if n]:
            self._label(spec, names)  # skips the targets already committed (e.g. by a retried task)
        t = self.targets[self.train]
        entry = read_entry(t.cache_dir, spec.digest(), t.key)
        if not entry["file"]:  # a part without rows of this split
            return self.schemas[self.train].empty_table().select(self.columns)
        fs, path = storage.resolve(storage.join(t.cache_dir, entry["file"]))
        return pq.read_table(path, columns=self.columns, filesystem=fs)


def live_label_rows(parts: list[PartSpec], todo: dict[str, list[str]], targets: dict[str, Target], *, train: str,
                    columns: list[str], app_name: str, tokenizer_path: str, vocab_size: int, data: DataConfig,
                    labels: SoftLabelConfig, shuffle: bool = False, seed: int = 0):
    """A Ray Dataset of the ``train`` target's cache rows, part by part, that labels the parts
    ``todo`` names as the stream reaches them.

    The committed parts are read as they are; a missing part is labeled by the labeler code of
    :func:`label_parts` (every chunk sent to the teacher deployment at once, answers encoded into
    the cache schema, the part committed through :func:`~raykd.soft_labels.cache.write_part` into
    every target that misses it) and then read back from its committed shard, so its rows are
    byte for byte what a later run reads from the cache. ``labels.num_labelers`` tasks work on
    consecutive parts at once while training consumes the earlier ones.

    The order is the order of ``parts`` (a seeded permutation of it with ``shuffle``): the
    dataset is to be executed with Ray Data's ``preserve_order``, so a part still being labeled
    holds back the parts after it instead of being overtaken.

    Args:
        parts: the source's parts in their planned order.
        todo: for each part digest still to label, the targets that miss it.
        targets: every cache the labelers may commit into, by name.
        train: the target whose rows the dataset yields.
        columns: the cache columns to read.
        shuffle, seed: randomize the order of the parts (before any is labeled).
        app_name, tokenizer_path, vocab_size, data, labels: as :func:`label_parts`.

    Returns:
        A lazy ``ray.data.Dataset`` of undecoded cache rows (nothing runs before it is iterated).
    """
    import ray

    rows = [spec.to_row() | {"targets": ",".join(todo.get(spec.digest(), []))} for spec in parts]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    if shuffle:
        ds = ds.randomize_block_order(seed=seed)
    return ds.map_batches(
        _read_live_part_batch,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=max(1, min(labels.num_labelers, len(todo) or 1))),
        num_cpus=0.1,
        memory=LABELER_MEMORY,
        **storage.remote_args(),
        fn_kwargs={"run_id": uuid.uuid4().hex, "labeler": {
            "train": train, "columns": columns,
            "app_name": app_name, "targets": targets, "data": data, "labels": labels,
            "vocab_size": vocab_size, "tokenizer_path": tokenizer_path, "batch_size": labels.batch_size,
            "progress": console.ProgressSink(None, "live"),
        }},
    )
