"""``labels.fill=live`` on the tiny teacher: half of the cache's parts committed, a run over all of
them labels the other half through the served teacher while it trains, and trains the student a
run on the full cache trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raykd.config import DistillConfig
from raykd.recipes.lm.distill import run_distill
from raykd.soft_labels.cache import (
    MANIFEST,
    done_parts,
    ledger_file,
    open_cache,
    part_file,
    read_entry,
)
from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.train.trainer import in_order
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray

PART_DOCS = 10  # the 60-article fixture corpus in 6 parts


def _config(model: Path, corpus: Path, cache: Path, *, steps: int = 12, **sections) -> DistillConfig:
    cfg = tiny_distill_config(model, corpus, cache, students={"student": {"forward_kl": 0.5, "ce": 0.5}}, shuffle=False,
                              max_steps=steps, checkpoint_every=steps, log_every=steps).model_dump()
    cfg["data"]["part_docs"] = PART_DOCS
    for section, fields in sections.items():
        cfg[section].update(fields)
    return DistillConfig.model_validate(cfg)


def _weights(report: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(report["student"]["model_dir"]) / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(ray_start, tiny_model, corpus_jsonl, tmp_path_factory):
    """The reference: every part labeled before training (``fill=before``), then one epoch."""
    root = tmp_path_factory.mktemp("live_full")
    plan = Plan(_config(tiny_model, corpus_jsonl, root / "cache"))
    caches, _ = ensure_soft_labels(plan)
    steps = caches["train"][1].rows // 4  # one epoch of batches of 4, so training reaches every part
    report = run_distill(_config(tiny_model, corpus_jsonl, root / "cache", steps=steps), root / "out")
    assert report["cache"]["hit"]
    return plan, steps, report


def _history(report: dict) -> list[dict]:
    return json.loads((Path(report["student"]["checkpoint"]) / "history.json").read_text())


def _half_cache(plan: Plan, cache_root: Path) -> tuple[list[str], int, set[str]]:
    """Copy the full caches under ``cache_root``, dropping every other part (its ledger entry and
    shard) and the manifests; returns the dropped parts, their teacher calls and documents."""
    dropped = [p.digest() for p in plan.sources["train"][1]][1::2]
    calls, docs = 0, set()
    for t in plan.targets().values():
        copy = str(cache_root / Path(t.cache_dir).name)
        shutil.copytree(t.cache_dir, copy)
        Path(copy, MANIFEST).unlink()
        for part in dropped:
            entry = read_entry(copy, part, t.key)
            calls, docs = calls + entry["teacher_calls"], docs | set(entry["doc_ids"])
            Path(ledger_file(copy, part)).unlink()
            Path(part_file(copy, part)).unlink(missing_ok=True)
    return dropped, calls, docs


def test_live_run_labels_only_the_missing_half_while_training_and_trains_the_same_student(full_run, tiny_model,
                                                                                        corpus_jsonl, tmp_path):
    from raykd.teacher.deployment import running_teacher, stop_teacher

    plan, steps, reference = full_run
    dropped, calls, docs = _half_cache(plan, tmp_path / "cache")
    assert len(dropped) == 3 and calls > 0
    cfg = _config(tiny_model, corpus_jsonl, tmp_path / "cache", steps=steps, labels={"fill": "live"},
                  teacher={"name": "tiny-live", "keep_alive": True})
    targets = Plan(cfg).targets()
    kept = {s: {p: read_entry(t.cache_dir, p)["created_at"] for p in done_parts(t.cache_dir)} for s, t in targets.items()}
    try:
        report = run_distill(cfg, tmp_path / "out")
        served = running_teacher("tiny-live").info.remote().result()["calls"]["score"]
    finally:
        stop_teacher("tiny-live")

    cache = report["cache"]
    assert served == calls == cache["teacher_calls"]  # the service answered exactly the missing parts' calls
    assert cache["parts_live"] == {"train": 3, "eval": 3} and cache["parts_after"] == {"train": 0, "eval": 0}
    scored = set()
    for split, t in targets.items():
        manifest = open_cache(t.cache_dir, expect=t.key, deep=True)  # complete: the next run is a hit
        assert sorted(manifest.parts) == sorted(Plan(cfg).planned_parts()[split])
        assert set(done_parts(t.cache_dir)) - set(kept[split]) == set(dropped)
        scored |= {d for p in dropped for d in read_entry(t.cache_dir, p)["doc_ids"]}
        for part, created in kept[split].items():  # finished parts were never rewritten
            assert read_entry(t.cache_dir, part)["created_at"] == created
    assert scored == docs  # the teacher saw exactly the missing documents

    live, full = report["student"], reference["student"]
    assert live["steps"] == full["steps"] == steps
    assert [r["loss"] for r in _history(report)] == pytest.approx([r["loss"] for r in _history(reference)], rel=1e-5)
    a, b = _weights(report), _weights(reference)
    assert a.keys() == b.keys()
    for name in a:  # the same rows in the same order: the same student
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert live["ppl"] == pytest.approx(full["ppl"], rel=1e-4)

    again = run_distill(_config(tiny_model, corpus_jsonl, tmp_path / "cache", steps=1, labels={"fill": "live"},
                                teacher={"name": "no-teacher-here", "start": False}), tmp_path / "again")
    assert again["cache"]["hit"] and again["cache"]["teacher_calls"] == 0  # no teacher runs: none was asked


def test_live_fill_with_start_false_and_no_running_teacher_fails_before_any_work(ray_start, tiny_model, corpus_jsonl,
                                                                                tmp_path):
    from raykd.teacher.deployment import TeacherNotRunningError

    cfg = _config(tiny_model, corpus_jsonl, tmp_path / "cache", labels={"fill": "live"},
                  teacher={"name": "no-such-teacher", "start": False})
    with pytest.raises(TeacherNotRunningError, match=r"labels\.fill=live.*'no-such-teacher', which is not running"):
        run_distill(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "student_init").exists()  # no student built, nothing trained
    assert all(not done_parts(t.cache_dir) for t in Plan(cfg).targets().values())  # nothing labeled


def test_a_stream_stopped_midway_keeps_the_parts_it_committed(full_run, tmp_path):
    """A live run killed in the middle: the parts it committed stay committed (no manifest yet),
    and the next run labels only parts it had not committed."""
    from raykd.soft_labels.live import start_live_fill

    plan, _, _ = full_run
    dropped, _, _ = _half_cache(plan, tmp_path / "cache")
    rows = {p: read_entry(plan.targets()["train"].cache_dir, p)["rows"] for p in done_parts(plan.targets()["train"].cache_dir)}
    first_two = sum(rows[p.digest()] for p in plan.sources["train"][1][:2])  # part 0 (kept) and part 1 (dropped)
    cfg = plan.cfg.model_copy(update={"labels": plan.cfg.labels.model_copy(
        update={"fill": "live", "cache_dir": str(tmp_path / "cache"), "num_labelers": 1})})
    first = Plan(cfg)
    with start_live_fill(first) as live:
        stream = iter(in_order(live.rows()).iter_rows())  # as training reads it
        for _ in range(first_two):  # the rows of the first missing part came from its committed shard
            next(stream)
        stream.close()  # killed here: no finish, no manifest
    train = first.targets()["train"].cache_dir
    assert not Path(train, MANIFEST).exists() and dropped[0] in done_parts(train)
    second = Plan(cfg)
    with start_live_fill(second) as live:
        assert dropped[0] not in live.todo and set(live.todo) <= set(dropped)
