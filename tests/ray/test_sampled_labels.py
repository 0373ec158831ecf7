"""Sampled soft labels through the whole job: Serve + Ray Data label a tiny teacher's cache in the
sampled form, a student trains 2 steps on it, and every cached position holds exactly the draws
the engine makes for that block's seed (so a resumed labeling writes the same labels)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from raykd.cli import main_distill
from raykd.soft_labels.cache import open_cache, shard_paths
from raykd.soft_labels.sampled import block_seeds
from raykd.soft_labels.schema import decode_batch
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray


def test_sampled_cache_labels_trains_and_holds_each_blocks_seeded_draws(ray_start, tiny_model, tiny_teacher, corpus_jsonl, tmp_path):
    from raykd.teacher.engines.hf import HFEngine

    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache", max_steps=2, checkpoint_every=2, log_every=1,
                              students={"student_kd": {"forward_kl": 0.5, "ce": 0.5}})
    cfg = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"form": "sampled", "samples": 8, "seed": 3})})
    report = main_distill(cfg, tmp_path / "run")
    assert report["cache"]["form"] == "sampled" and report["cache"]["samples"] == 8 and not report["cache"]["hit"]
    assert report["student_kd"]["steps"] == 2 and np.isfinite(report["student_kd"]["ppl"])
    assert 0.0 <= report["student_kd"]["ece"] <= 1.0

    table = pq.read_table(shard_paths(report["cache"]["path"], open_cache(report["cache"]["path"]))[0])
    out = decode_batch(table, with_ids=True)
    seeds = block_seeds(out["doc_id"], out["block_index"], seed=3)
    engine = HFEngine(tiny_model, num_threads=1)
    draws = engine.score(out["input_ids"], out["attention_mask"], k=8, seeds=seeds)["topk_ids"]
    real = out["attention_mask"].astype(bool)
    for want, ids, lp in zip(draws[real], out["topk_ids"][real], out["topk_logprobs"][real]):
        kept = ids >= 0
        got = dict(zip(ids[kept].tolist(), np.rint(np.exp(lp[kept]) * 8).astype(int).tolist()))
        assert got == dict(zip(*(a.tolist() for a in np.unique(want, return_counts=True))))
