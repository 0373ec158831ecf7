"""A trained student labels documents through Ray Data batch inference, on the engine that
serves it as a teacher (:mod:`raykd.teacher.engines`): a classifier folder on the
``classifier`` engine (class log-probs), a causal LM folder on the ``hf`` engine (greedy text).

Used by MCKD: each stage's students relabel the half they did not train on, and the final
students label the test split.

The batches run as Ray Data *tasks*, not an actor pool. A Ray Data actor pool lives for one
dataset, so every relabeling would start a fresh worker process (importing torch and
transformers, ~5 s here) however few rows it labels; MCKD relabels twice per stage. Task
workers stay in Ray's worker pool between datasets, and each keeps the last engine it built
(:func:`_cached_engine`, keyed by the folder's files), so a stage's relabeling reuses a warm
process and loads only the new student.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from raykd import console
from raykd.soft_labels.pseudo_labels import PseudoLabels, first_line
from raykd.teacher.engines import build_engine

RELABEL_CONCURRENCY = 1
"""Relabeling tasks at once: one engine in memory, as the single labeler actor this replaces."""


def folder_stamp(folder: str) -> tuple[tuple[str, int, int], ...]:
    """``(name, size, mtime_ns)`` of every file in ``folder`` but hidden ones (raykd's own
    fingerprint record is written there on first load): changes when a model is saved there
    again, so a cached engine of an older model at the same path is not reused."""
    with os.scandir(folder) as it:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in it
                            if e.is_file() and not e.name.startswith(".")))


@functools.lru_cache(maxsize=1)
def _cached_engine(engine: str, folder: str, num_threads: int, stamp: tuple) -> Any:
    """The engine on ``folder`` built once per worker process (the last one only: a worker
    holds at most one relabeling model). ``stamp`` (:func:`folder_stamp`) is part of the key."""
    return build_engine(engine, folder, num_threads=num_threads, device="cpu")


def label_batch(batch: dict[str, np.ndarray], *, engine: str, folder: str, num_threads: int,
                max_new_tokens: int) -> dict[str, np.ndarray]:
    """One batch labeled by the model in ``folder`` (a Ray Data ``map_batches`` function).

    ``classifier``: rows of ``input_ids`` / ``attention_mask`` -> ``logprobs`` ``[B, C]``;
    ``hf``: rows of ``prompt`` -> ``text`` (greedy, ``max_new_tokens``, its first line).
    """
    model = _cached_engine(engine, folder, num_threads, folder_stamp(folder))
    if engine == "classifier":
        ids, mask = np.stack(batch["input_ids"]), np.stack(batch["attention_mask"])
        logp = model.score(ids, mask)["class_logprobs"]
        return {"doc_id": batch["doc_id"], "logprobs": list(logp.astype(np.float32))}
    outs = model.generate([str(p) for p in batch["prompt"]], max_new_tokens=max_new_tokens, temperature=0.0, k=1)
    return {"doc_id": batch["doc_id"], "text": np.array([first_line(o["text"]) for o in outs], dtype=object)}


def relabel(engine: str, folder: str, rows: list[dict[str, Any]], *, batch_size: int = 32, num_threads: int = 1,
            num_cpus: float = 1.0, max_new_tokens: int = 24) -> PseudoLabels:
    """Labels of ``rows`` by the model in ``folder``, through Ray Data ``map_batches`` tasks
    (:func:`label_batch`, :data:`RELABEL_CONCURRENCY` at once; Ray must be connected).

    Args:
        engine: ``classifier`` (rows carry ``doc_id``, ``input_ids``, ``attention_mask``) or
            ``hf`` (rows carry ``doc_id``, ``prompt``).
        folder: the student's model folder (``save_pretrained``).
        batch_size: rows per forward pass (and per Ray Data block).
        num_cpus: CPUs each task reserves.

    Returns:
        :class:`PseudoLabels` in the order of ``rows``.
    """
    import ray.data

    blocks = max(1, -(-len(rows) // batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        label_batch, fn_kwargs={"engine": engine, "folder": str(folder), "num_threads": num_threads,
                                "max_new_tokens": max_new_tokens},
        batch_size=batch_size, num_cpus=num_cpus, compute=ray.data.TaskPoolStrategy(size=RELABEL_CONCURRENCY), batch_format="numpy")
    with console.core_worker_noise_filtered():  # Ray Data's tasks start here
        got = {r["doc_id"]: r for r in ds.take_all()}
    ids = [str(r["doc_id"]) for r in rows]
    if engine == "classifier":
        return PseudoLabels(ids, np.stack([np.asarray(got[d]["logprobs"], dtype=np.float32) for d in ids]))
    return PseudoLabels(ids, texts=[str(got[d]["text"]) for d in ids])
