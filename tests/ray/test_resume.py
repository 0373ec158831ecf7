"""Resumable labeling: a labeling driver killed with SIGKILL mid-run, then the same command again.

The rerun must label only the parts the ledger lacks, and the finished cache must equal an
uninterrupted labeling of the same data: identical token and top-k ids, log-probs equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from raykd.soft_labels.cache import cache_dir_for, done_parts, shard_paths
from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.soft_labels.schema import decode_batch
from raykd.teacher.apps import running_teacher, stop_teacher
from tests.conftest import make_corpus, tiny_distill_config
from tests.faults import running_task_pids, wait_for

pytestmark = pytest.mark.ray

LABELING_TASK = "_label_part_batch"
"""The function of the labeling tasks (Ray Data titles their workers ``ray::...MapBatches(fn)``)."""


def _config(tiny_model, corpus, cache_dir, name):
    cfg = tiny_distill_config(tiny_model, corpus, cache_dir)
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"part_docs": 8}),
        "teacher": cfg.teacher.model_copy(update={"name": name}),
        "labels": cfg.labels.model_copy(update={"batch_size": 2}),
    })


def _rows(folder, manifest) -> pa.Table:
    table = pa.concat_tables([pq.read_table(f) for f in shard_paths(folder, manifest)])
    return table.take(pc.sort_indices(table, sort_keys=[("doc_id", "ascending"), ("block_index", "ascending")]))


def test_killed_labeling_resumes_with_only_the_missing_parts(ray_start, tiny_model, tmp_path):
    import ray

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in make_corpus(72, seed=5)) + "\n")
    cfg = _config(tiny_model, corpus, tmp_path / "cache", "resume-teacher")
    plan = Plan(cfg)
    n_parts = len(plan.sources["train"][1])
    assert n_parts >= 8
    train_dir = cache_dir_for(plan.cache_root, plan.keys["train"])

    # the same `raykd label` a user runs, as a driver joined to this Ray, killed once 3 parts are committed
    config_file = tmp_path / "label.yaml"
    config_file.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": os.getcwd()}
    driver = subprocess.Popen([sys.executable, "-c", "import sys; from raykd.cli import cli; sys.exit(cli(sys.argv[1:]))",
                               "label", "--config", str(config_file)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while len(done_parts(train_dir)) < 3:
            assert driver.poll() is None, "the labeling driver ended before it could be killed"
            assert time.monotonic() < deadline, "no part was committed within 5 minutes"
            time.sleep(0.2)  # polling the ledger on disk: there is no event to wait on
        # a labeler is between two parts for milliseconds at most: found within seconds, or misnamed
        wait_for(lambda: running_task_pids(LABELING_TASK), timeout_s=10, what="a running labeling task")
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    # the killed driver's labeling tasks end when Ray notices their owner is gone; until then one may commit a part
    wait_for(lambda: not running_task_pids(LABELING_TASK), timeout_s=60, what="the killed run's labeling tasks to end")
    before = done_parts(train_dir)
    assert 3 <= len(before) < n_parts

    try:  # the killed run's teacher outlives its driver: the rerun and the uninterrupted labeling use it
        caches, stats = ensure_soft_labels(Plan(cfg))
        assert stats["parts"]["train"]["done_before"] == len(before)
        assert stats["parts"]["train"]["labeled"] == n_parts - len(before)
        resumed = {split: _rows(*caches[split]) for split in caches}
        fresh_cfg = _config(tiny_model, corpus, tmp_path / "fresh", "resume-teacher")
        fresh, fresh_stats = ensure_soft_labels(Plan(fresh_cfg))
    finally:
        if running_teacher(cfg.teacher.name) is not None:
            stop_teacher(cfg.teacher.name)
    assert fresh_stats["teacher_calls"] > stats["teacher_calls"]  # the rerun asked for less than a full run
    for split, table in resumed.items():
        got, want = decode_batch(table, with_ids=True), decode_batch(_rows(*fresh[split]), with_ids=True)
        assert len(got["doc_id"]) == len(want["doc_id"]) == len(set(got["doc_id"]))  # nothing lost or duplicated
        assert list(got["doc_id"]) == list(want["doc_id"])
        real = got["attention_mask"].astype(bool)
        for column in ("input_ids", "attention_mask", "loss_mask"):
            np.testing.assert_array_equal(got[column], want[column])
        np.testing.assert_array_equal(got["topk_ids"][real], want["topk_ids"][real])
        np.testing.assert_allclose(got["topk_logprobs"][real].astype(np.float32), want["topk_logprobs"][real].astype(np.float32),
                                   rtol=2 ** -10, atol=1e-6)  # one fp16 ulp


def test_following_the_corrupt_shard_advice_relabels_only_that_part(tiny_labeled, tmp_path, capsys):
    """A truncated shard in a finished cache (a copy of the shared tiny one): the error names
    `raykd cache repair DIR`; running it and then the same command again relabels that one part
    (the other split's part is not touched), and the cache is whole again."""
    import re
    import shutil
    from pathlib import Path

    from raykd.cli import cli

    cfg, _, caches, _ = tiny_labeled
    shutil.copytree(Path(caches["train"][0]).parent, tmp_path / "cache")
    cfg = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"cache_dir": str(tmp_path / "cache")})})
    config_file = tmp_path / "label.yaml"
    config_file.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    train_dir = tmp_path / "cache" / Path(caches["train"][0]).name
    ledgers = {p: p.read_bytes() for p in (tmp_path / "cache").glob("*/ledger/*.json")}  # both splits
    rows_before = json.loads((train_dir / "manifest.json").read_text())["rows"]
    (shard,) = train_dir.glob("parts/*.parquet")
    shard.write_bytes(shard.read_bytes()[:-100])

    assert cli(["label", "--config", str(config_file)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: shard {shard} is ") and "Traceback" not in out + err
    advice = re.search(r"run `(raykd cache repair [^`]+)`", err).group(1).split()
    assert cli(advice[1:]) == 0
    assert cli(["label", "--config", str(config_file)]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out[out.index("{\n"):])
    assert report["parts"] == {"train": {"planned": 1, "done_before": 0, "labeled": 1}}, report
    assert json.loads((train_dir / "manifest.json").read_text())["rows"] == rows_before  # nothing lost
    bad_ledger = train_dir / "ledger" / f"{shard.stem}.json"
    assert {p: b for p, b in ledgers.items() if p != bad_ledger} == {p: p.read_bytes() for p in ledgers if p != bad_ledger}
    assert bad_ledger.read_bytes() != ledgers[bad_ledger]  # only the damaged part was written again
    assert any((train_dir / "damaged").glob("*/parts/*.parquet"))  # the damaged shard was kept
