"""``raykd.soft_labels.relabel``: the per-process engine of the relabeling tasks is reused for
the same model and rebuilt when a model is saved at the same path again."""

from __future__ import annotations

import os

import numpy as np

from raykd.soft_labels import relabel as rl
from tests.conftest import build_tiny_model


def test_a_task_worker_reuses_its_engine_until_the_folder_holds_another_model(tmp_path):
    folder = build_tiny_model(tmp_path / "student", num_layers=2, seed=0)
    rl._cached_engine.cache_clear()
    batch = {"doc_id": np.array(["a", "b"], dtype=object), "prompt": np.array(["The market", "A minister"], dtype=object)}
    kwargs = {"engine": "hf", "folder": str(folder), "num_threads": 1, "max_new_tokens": 4}

    first = rl.label_batch(batch, **kwargs)
    again = rl.label_batch(batch, **kwargs)
    info = rl._cached_engine.cache_info()
    assert (info.hits, info.misses) == (1, 1)  # built once for two batches
    assert list(first["text"]) == list(again["text"]) and list(first["doc_id"]) == ["a", "b"]

    stamp = rl.folder_stamp(str(folder))
    build_tiny_model(folder, num_layers=2, seed=1)  # another student saved where the last one was
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # a coarse clock cannot hide it
    assert rl.folder_stamp(str(folder)) != stamp
    rl.label_batch(batch, **kwargs)
    assert rl._cached_engine.cache_info().misses == 2  # the new model is loaded, not the cached one
