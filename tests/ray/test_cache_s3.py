"""The streamed data path on object storage: corpus and soft-label cache on a real S3-compatible
server (moto on loopback), labeled through Serve and read back by training and evaluation."""

from __future__ import annotations

import pytest

from raykd import storage
from raykd.soft_labels.cache import open_cache, shard_paths
from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.students import build_student
from raykd.train.evaluate import iter_cache_batches
from raykd.train.trainer import train_student
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray


def test_label_train_and_hit_with_corpus_and_cache_on_s3(ray_start, s3_server, tiny_model, corpus_jsonl, tmp_path):
    corpus = s3_server.uri("corpus/articles.jsonl")
    storage.write_bytes(corpus, corpus_jsonl.read_bytes())
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path)
    cfg = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"path": corpus, "part_docs": 25}),
        "labels": cfg.labels.model_copy(update={"cache_dir": s3_server.uri("cache")}),
        "teacher": cfg.teacher.model_copy(update={"name": "s3-teacher"}),
    })
    plan = Plan(cfg)
    assert len(plan.sources["train"][1]) == 3  # 60 rows in parts of 25, planned from the object store
    caches, stats = ensure_soft_labels(plan)
    assert not stats["hit"] and stats["parts"]["train"]["labeled"] == 3
    folder, manifest = caches["train"]
    assert folder.startswith(s3_server.uri("cache") + "/")
    assert all(f.startswith("s3://") for f in shard_paths(folder, manifest))
    assert open_cache(folder, expect=plan.keys["train"], deep=True).rows == manifest.rows

    eval_folder, eval_manifest = caches["eval"]
    rows = sum(len(b["input_ids"]) for b in iter_cache_batches(shard_paths(eval_folder, eval_manifest), 8))
    assert rows == eval_manifest.rows > 0

    init = build_student(cfg.student, plan.teacher_path, tmp_path / "init")
    result = train_student("s3", student_path=init, shard_files=shard_paths(folder, manifest), weights={"forward_kl": 1.0},
                           temperature=1.0, cfg=cfg.train.model_copy(update={"max_steps": 2, "checkpoint_every": 2}),
                           storage_path=tmp_path / "runs")
    assert result.steps == 2 and all(r["loss"] > 0 for r in result.history)

    again, stats = ensure_soft_labels(Plan(cfg))
    assert stats["hit"] and stats["teacher_calls"] == 0 and again["train"][0] == folder
