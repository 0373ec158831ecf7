"""The streamed data path on object storage: corpus and soft-label cache on a real S3-compatible
server (moto on loopback), labeled through Serve and read back by training and evaluation."""

from __future__ import annotations

import pytest

from raykd import storage
from raykd.soft_labels.cache import open_cache, shard_paths
from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.students import build_student
from raykd.soft_labels.cache import iter_cache_batches
from raykd.train.run import StudentRun
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
    result = train_student(StudentRun(name="s3", student_path=init, shard_files=shard_paths(folder, manifest),
                                      weights={"forward_kl": 1.0}, temperature=1.0,
                                      train=cfg.train.model_copy(update={"max_steps": 2, "checkpoint_every": 2}),
                                      storage_path=tmp_path / "runs"))
    assert result.steps == 2 and all(r["loss"] > 0 for r in result.history)

    again, stats = ensure_soft_labels(Plan(cfg))
    assert stats["hit"] and stats["teacher_calls"] == 0 and again["train"][0] == folder


def test_distill_with_output_dir_and_checkpoints_on_s3(ray_start, s3_server, tiny_model, corpus_jsonl, tmp_path, monkeypatch):
    """`raykd distill --output-dir s3://...`: the run is staged locally and uploaded; checkpoints go
    straight to `train.checkpoint_dir` on the store (Ray Train storage with the resolved filesystem)."""
    import json

    import yaml

    from raykd.cli import cli

    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "user_cache"))  # where the staging folder goes
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "labels", num_workers=1, max_steps=2,
                              checkpoint_every=2, checkpoint_dir=s3_server.uri("ckpt"))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"students": {"student_kd": {"forward_kl": 1.0}}})})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    out = s3_server.uri("runs/tiny")
    assert cli(["distill", "--config", str(path), "--output-dir", out]) == 0
    report = json.loads(storage.read_bytes(storage.join(out, "report.json")))
    assert report["student_kd"]["steps"] == 2
    assert storage.list_files(storage.join(out, "logs"), ".log")  # the run's logs came along
    assert any(f.endswith("model.safetensors") for f in storage.list_files(s3_server.uri("ckpt"), recursive=True))
