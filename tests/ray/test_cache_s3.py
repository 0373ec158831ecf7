"""The streamed data path on object storage: corpus and soft-label cache on a real S3-compatible
server (moto on loopback), labeled through Serve, then `raykd distill --output-dir s3://...` on a
Ray Train worker reads the cache back from the store (a hit: the teacher is asked nothing)."""

from __future__ import annotations

import json

import pytest
import yaml

from raykd import storage
from raykd.cli import cli
from raykd.soft_labels.cache import iter_cache_batches, open_cache, shard_paths
from raykd.soft_labels.plan import Plan, ensure_soft_labels
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray


def test_label_on_s3_then_distill_from_the_s3_cache_into_an_s3_output_dir(ray_start, s3_server, tiny_model, corpus_jsonl,
                                                                          tmp_path, monkeypatch):
    corpus = s3_server.uri("corpus/articles.jsonl")
    storage.write_bytes(corpus, corpus_jsonl.read_bytes())
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path, num_workers=1, max_steps=2, checkpoint_every=2,
                              checkpoint_dir=s3_server.uri("ckpt"), students={"student_kd": {"forward_kl": 1.0}})
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

    # the run is staged locally and uploaded; checkpoints go straight to train.checkpoint_dir on the store
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "user_cache"))  # where the staging folder goes
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    out = s3_server.uri("runs/tiny")
    assert cli(["distill", "--config", str(path), "--output-dir", out]) == 0
    report = json.loads(storage.read_bytes(storage.join(out, "report.json")))
    assert report["student_kd"]["steps"] == 2 and report["student_kd"]["ppl"] > 0
    assert report["cache"]["hit"] and report["cache"]["teacher_calls"] == 0 and report["cache"]["path"] == folder
    assert storage.list_files(storage.join(out, "logs"), ".log")  # the run's logs came along
    assert any(f.endswith("model.safetensors") for f in storage.list_files(s3_server.uri("ckpt"), recursive=True))
