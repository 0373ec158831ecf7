"""Ray Data labeling into the keyed Parquet cache: hit on rerun, new key on change, cached == online."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raykd.soft_labels.cache import shard_paths
from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.soft_labels.schema import SQRT_LEVELS
from raykd.teacher.apps import running_teacher
from raykd.teacher.engines.hf import HFEngine
from raykd.soft_labels.cache import iter_cache_batches

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def first_run(tiny_labeled):
    return tiny_labeled


def test_first_run_labels_both_splits(first_run):
    cfg, plan, caches, stats = first_run
    assert not stats["hit"] and stats["teacher_calls"] >= 2
    train_dir, manifest = caches["train"]
    assert manifest.rows == manifest.docs == len(plan.documents("train"))  # one block per short document
    assert manifest.key == plan.keys["train"].digest() and train_dir.endswith(manifest.key)
    assert stats["teacher_calls"] == manifest.teacher_calls + caches["eval"][1].teacher_calls  # counted by the labelers
    assert 0 < manifest.bytes_per_token < 200
    assert stats["teacher"]["started_by_run"] is False  # the shared running teacher (tests/conftest.py) ...
    assert running_teacher(cfg.teacher.name) is not None  # ... left running (test_chains: a run's own is stopped)


def test_second_run_is_a_hit_that_asks_the_teacher_nothing(first_run):
    from pathlib import Path

    cfg, _, caches, _ = first_run
    stale = Path(cfg.labels.cache_dir) / "0123abcd.partial-1a2b3c4d"  # an old interrupted run's folder
    (stale / "parts").mkdir(parents=True)
    again, stats = ensure_soft_labels(Plan(cfg))
    assert not stale.exists()  # cleared on a hit too
    assert stats == {"hit": True, "teacher_calls": 0, "label_s": 0.0, "teacher": None, "parts": {}}  # no teacher involved
    assert {s: str(p) for s, (p, _) in again.items()} == {s: str(p) for s, (p, _) in caches.items()}


def test_changed_k_is_a_new_key(first_run):
    cfg, plan, _, _ = first_run
    changed = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"k": 4})})
    assert Plan(changed).keys["train"].digest() != plan.keys["train"].digest()


def test_cached_labels_equal_the_online_teacher(first_run, tiny_model):
    cfg, _, caches, _ = first_run
    folder, manifest = caches["eval"]
    engine = HFEngine(tiny_model, num_threads=1)
    rows = 0
    for batch in iter_cache_batches(shard_paths(folder, manifest), 8):
        online = engine.score(batch["input_ids"], batch["attention_mask"], k=cfg.labels.k)
        real = batch["attention_mask"].astype(bool)
        cached_ids, online_ids = batch["topk_ids"][real], online["topk_ids"].astype(np.int64)[real]
        np.testing.assert_array_equal(cached_ids[:, 0], online_ids[:, 0])  # the same top-1 everywhere
        by_id_c, by_id_o = np.argsort(cached_ids, -1), np.argsort(online_ids, -1)  # ties may come back reordered
        np.testing.assert_array_equal(np.take_along_axis(cached_ids, by_id_c, -1), np.take_along_axis(online_ids, by_id_o, -1))
        sqrt_p = [np.exp(np.take_along_axis(lp[real].astype(np.float64), o, -1) / 2)
                  for lp, o in ((batch["topk_logprobs"], by_id_c), (online["topk_logprobs"], by_id_o))]
        np.testing.assert_allclose(*sqrt_p, atol=0.5 / SQRT_LEVELS + 1e-3)  # within the 8-bit sqrt(p) quantisation
        rows += len(batch["input_ids"])
    assert rows == manifest.rows


def test_empty_text_column_fails_before_any_teacher_work(tmp_path, tiny_model):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"id": "a", "body": "x"}\n')
    from raykd.config import DistillConfig

    cfg = DistillConfig.model_validate({"data": {"source": "jsonl", "path": str(path)}, "teacher": {"model": str(tiny_model)}})
    with pytest.raises(ValueError, match="body"):
        Plan(cfg)


def test_a_given_cache_of_other_settings_is_refused_naming_the_field(first_run):
    from raykd.soft_labels.cache import CacheError

    cfg, _, caches, _ = first_run
    eval_dir, _ = caches["eval"]
    wrong = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"train_cache": str(eval_dir)})})
    with pytest.raises(CacheError, match="data_fingerprint"):
        ensure_soft_labels(Plan(wrong))
    train_dir, _ = caches["train"]
    right = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"train_cache": str(train_dir)})})
    assert ensure_soft_labels(Plan(right))[1]["hit"]


def test_an_id_repeated_across_files_is_refused_before_any_teacher_call(ray_start, tiny_model, tmp_path, monkeypatch):
    import raykd.data.unique_ids
    from tests.conftest import make_corpus, tiny_distill_config

    docs = make_corpus(30, seed=3)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:20]))
    (folder / "b.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[19:]))  # doc0019 in both files
    cfg = tiny_distill_config(tiny_model, folder, tmp_path / "cache")
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"name": "dup-teacher"})})
    repeated = r"[ab]\.jsonl:0-\d+ and [ab]\.jsonl:0-\d+: document id 'doc0019' appears twice"
    with pytest.raises(ValueError, match=repeated):  # 31 rows: one task reads both files, no actors
        ensure_soft_labels(Plan(cfg))
    monkeypatch.setattr(raykd.data.unique_ids, "IDS_PER_TASK", 1)  # a task per part (file) ...
    monkeypatch.setattr(raykd.data.unique_ids, "IDS_PER_BUCKET", 7)  # ... and 5 bucket actors
    with pytest.raises(ValueError, match=repeated):
        ensure_soft_labels(Plan(cfg))
    assert running_teacher("dup-teacher") is None  # refused before the teacher started


def test_a_null_id_found_in_a_ray_task_is_one_error_line(ray_start, tiny_model, tmp_path, capsys):
    """The ids are checked in Ray tasks before the teacher starts; a null one reaches the console
    as the task's own message, exit 2, without Ray's remote traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from raykd.cli import cli
    from tests.conftest import make_corpus, tiny_distill_config

    docs = make_corpus(12, seed=4)
    ids = [d["id"] for d in docs]
    ids[3] = None
    pq.write_table(pa.table({"uid": ids, "text": [d["text"] for d in docs]}), tmp_path / "a.parquet")
    cfg = tiny_distill_config(tiny_model, tmp_path / "a.parquet", tmp_path / "cache")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "parquet", "id_column": "uid"}),
                                 "teacher": cfg.teacher.model_copy(update={"name": "null-id-teacher"})})
    config_file = tmp_path / "label.yaml"
    config_file.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    assert cli(["label", "--config", str(config_file)]) == 2
    out, err = capsys.readouterr()
    assert err == "error: a.parquet row 3: id column 'uid' is null; every row needs an id\n", err
    assert "Traceback" not in out and running_teacher("null-id-teacher") is None
