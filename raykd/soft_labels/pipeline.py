"""Labeling: text -> blocks -> teacher ``score`` (Ray Serve) -> Parquet shards (Ray Data).

The pipeline is one Ray Data plan: a pool of labeler actors tokenises batches of documents
into blocks, sends them to the teacher deployment (several requests in flight, so the teacher
never waits for the next batch), encodes each answer into the soft-label Arrow schema, and Ray
Data writes the shards. Each labeler counts its documents and tokens into the driver's progress
bar (:func:`raykd.console.progress`).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raykd import console
from raykd.config import DataConfig, SoftLabelConfig
from raykd.data import Document, tokenize_to_blocks
from raykd.soft_labels.cache import CacheKey, Manifest, cache_dir_for, commit, new_partial_dir, open_cache
from raykd.soft_labels.schema import encode_batch, soft_label_schema

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from raykd.models import load_tokenizer

    return load_tokenizer(Path(path))


def _tokenize(batch: dict[str, np.ndarray], *, tokenizer_path: str, seq_len: int, max_blocks_per_doc: int, min_tokens: int):
    return tokenize_to_blocks(
        batch,
        _tokenizer(tokenizer_path),
        seq_len=seq_len,
        max_blocks_per_doc=max_blocks_per_doc,
        min_tokens=min_tokens,
    )


class _Labeler:
    """Ray Data actor: documents -> blocks -> teacher ``score`` calls -> one Arrow table.

    Tokenising here rather than in a stage of its own saves a Ray Data operator (its tasks and
    worker processes), which on a small machine competes with the teacher for the cores.
    """

    def __init__(self, app_name: str, k: int, temperature: float, schema: pa.Schema, tokenizer_path: str,
                 seq_len: int, max_blocks_per_doc: int, min_tokens: int, batch_size: int, progress: console.ProgressSink):
        from ray import serve

        from raykd.teacher.deployment import DEPLOYMENT_NAME

        self.handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)
        self.k, self.temperature, self.schema, self.batch_size, self.progress = k, temperature, schema, batch_size, progress
        self.block_args = {"tokenizer_path": tokenizer_path, "seq_len": seq_len,
                           "max_blocks_per_doc": max_blocks_per_doc, "min_tokens": min_tokens}

    def __call__(self, docs: dict[str, np.ndarray]) -> pa.Table:
        blocks = _tokenize(docs, **self.block_args)
        n = len(blocks["input_ids"])
        starts = range(0, n, self.batch_size)
        pending = [  # every chunk in flight at once; the replica queues them
            self.handle.score.remote(blocks["input_ids"][s : s + self.batch_size],
                                     blocks["attention_mask"][s : s + self.batch_size],
                                     k=self.k, temperature=self.temperature)
            for s in starts
        ]
        tables = [
            encode_batch({name: col[s : s + self.batch_size] for name, col in blocks.items()}, resp.result(), self.schema)
            for s, resp in zip(starts, pending)
        ]
        self.progress.add(len(docs["doc_id"]), tokens=int(np.sum(blocks["attention_mask"])) if n else 0)
        return pa.concat_tables(tables) if tables else self.schema.empty_table()


def write_soft_labels(
    docs: list[Document],
    *,
    key: CacheKey,
    cache_root: Path,
    app_name: str,
    tokenizer_path: str,
    vocab_size: int,
    data: DataConfig,
    labels: SoftLabelConfig,
    teacher_meta: dict[str, Any],
) -> tuple[Path, Manifest]:
    """Label ``docs`` with the running teacher ``app_name`` and commit a cache for ``key``.

    Args:
        docs: documents of one split.
        key: the cache key (see :class:`raykd.soft_labels.cache.CacheKey`).
        cache_root: folder that holds caches by key.
        app_name: Serve application name of the teacher.
        tokenizer_path: folder of the tokenizer the key was made with.
        vocab_size: teacher vocabulary ``V`` (picks the id dtype).
        data: block settings (``seq_len``, ``max_blocks_per_doc``, ``min_tokens``).
        labels: ``k``, ``temperature``, ``batch_size``, ``num_labelers``, ``rows_per_shard``.
        teacher_meta: teacher identity recorded in the manifest.

    Returns:
        ``(cache folder, manifest)``.

    Raises:
        CacheError: nothing was written, or a finished cache for ``key`` appeared meanwhile.
    """
    import ray

    final_dir = cache_dir_for(cache_root, key)
    partial = new_partial_dir(final_dir)
    schema = soft_label_schema(
        data.seq_len,
        labels.k,
        vocab_size,
        {"cache_key": key.digest(), "k": labels.k, "temperature": labels.temperature, "seq_len": data.seq_len},
    )
    start = time.perf_counter()
    items = [{"doc_id": d.doc_id, "text": d.text} for d in docs]
    n_blocks = max(1, min(len(items) // 32, 64))
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    n_batches = -(-len(items) // labels.batch_size)
    # More labelers than input blocks or batches would idle (and Ray Data warns about it).
    labelers = max(1, min(labels.num_labelers, n_batches, n_blocks))
    with console.progress("labeling", total=len(items), unit="doc", rate_of="tokens") as progress:
        ds = ds.map_batches(
            _Labeler,
            batch_format="numpy",
            batch_size=labels.batch_size,
            compute=ray.data.ActorPoolStrategy(size=labelers),
            num_cpus=0.1,
            fn_constructor_kwargs={
                "app_name": app_name,
                "k": labels.k,
                "temperature": labels.temperature,
                "schema": schema,
                "tokenizer_path": tokenizer_path,
                "seq_len": data.seq_len,
                "max_blocks_per_doc": data.max_blocks_per_doc,
                "min_tokens": data.min_tokens,
                "batch_size": labels.batch_size,
                "progress": progress,
            },
        )
        ds.write_parquet(
            str(partial),
            schema=schema,
            min_rows_per_file=labels.rows_per_shard,
            ray_remote_args={"num_cpus": 0.1},
            compression="zstd",
        )
    seconds = time.perf_counter() - start
    manifest = commit(partial, final_dir, key, teacher_meta, seconds)
    return final_dir, manifest


def find_cache(cache_root: Path, key: CacheKey) -> tuple[Path, Manifest] | None:
    """The finished cache for ``key``, checked (sizes and footers), or None if there is none.

    Raises:
        CacheError: a folder for ``key`` exists but is corrupt (the error names the shard).
    """
    folder = cache_dir_for(cache_root, key)
    if not folder.exists():
        return None
    return folder, open_cache(folder, expect=key, deep=True)
