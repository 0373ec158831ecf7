"""``labels.fill=live`` on the tiny teacher: half of the cache's parts committed, a run over all of
them labels the other half through the served teacher while it trains, and trains the student a
run on the full cache trains."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from raykd.config import DistillConfig
from raykd.data.sources import read_part
from raykd.recipes.lm.distill import run_distill
from raykd.soft_labels.cache import MANIFEST, done_parts, open_cache, read_entry
from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.train.datasets import in_order
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray

PART_DOCS = 10  # the 60-article fixture corpus in 6 parts
TEACHER = "tiny-live"


def _config(model: Path, corpus: Path, cache: Path, *, steps: int = 12, **sections) -> DistillConfig:
    cfg = tiny_distill_config(model, corpus, cache, students={"student": {"forward_kl": 0.5, "ce": 0.5}}, shuffle=False,
                              max_steps=steps, checkpoint_every=steps, log_every=steps).model_dump()
    cfg["data"]["part_docs"] = PART_DOCS
    cfg["teacher"]["name"] = TEACHER
    for section, fields in sections.items():
        cfg[section].update(fields)
    return DistillConfig.model_validate(cfg)


def _docs(plan: Plan, split: str, parts) -> set[str]:
    """The documents of ``split`` in ``parts``, read from the source."""
    data, selection = plan.sources[split][0], plan.selections[split]
    out = set()
    for spec in parts:
        ids = read_part(spec, data)["doc_id"]
        out |= {str(i) for i in ids[selection.mask(ids)]}
    return out


def _served_calls() -> int:
    from raykd.teacher.apps import running_teacher

    return running_teacher(TEACHER).info.remote().result()["calls"]["score"]


@pytest.fixture(scope="module")
def half_labeled(ray_start, tiny_model, corpus_jsonl, tmp_path_factory):
    """A cache of half of the parts (0, 2, 4) of both splits, labeled through the teacher
    ``tiny-live``, which stays up for the module (so runs reuse it: its call counter counts them)."""
    from raykd.soft_labels.pipeline import label_parts
    from raykd.teacher.apps import start_teacher, stop_teacher

    cache = tmp_path_factory.mktemp("live_half") / "cache"
    plan = Plan(_config(tiny_model, corpus_jsonl, cache))
    cfg, parts = plan.cfg, plan.sources["train"][1]
    start_teacher(cfg.teacher, str(plan.teacher_path))
    try:
        label_parts(parts, {p.digest(): ["train", "eval"] for p in parts[0::2]}, plan.targets(), app_name=TEACHER,
                    tokenizer_path=str(plan.teacher_path), vocab_size=plan.vocab_size, data=cfg.data, labels=cfg.labels)
        yield cache
    finally:
        stop_teacher(TEACHER)


def test_live_run_labels_only_the_missing_half_while_training_and_trains_the_same_student(half_labeled, tiny_model,
                                                                                        corpus_jsonl, tmp_path):
    shutil.copytree(half_labeled, tmp_path / "cache")
    plan = Plan(_config(tiny_model, corpus_jsonl, tmp_path / "cache"))
    parts, targets = plan.sources["train"][1], plan.targets()
    missing = [p.digest() for p in parts[1::2]]
    steps = len(_docs(plan, "train", parts)) // 4  # one block per article: one epoch, so training reaches every part
    kept = {s: {p: read_entry(t.cache_dir, p)["created_at"] for p in done_parts(t.cache_dir)} for s, t in targets.items()}
    assert len(parts) == 6 and all(set(kept[s]) == {p.digest() for p in parts[0::2]} for s in kept)

    cfg = _config(tiny_model, corpus_jsonl, tmp_path / "cache", steps=steps, labels={"fill": "live"})
    at_start = _served_calls()
    report = run_distill(cfg, tmp_path / "live")
    served = _served_calls() - at_start

    cache, calls = report["cache"], 0
    assert cache["parts_live"] == {"train": 3, "eval": 3} and cache["parts_after"] == {"train": 0, "eval": 0}
    for split, t in targets.items():
        open_cache(t.cache_dir, expect=t.key, deep=True, parts=[p.digest() for p in parts])  # complete: a hit next time
        new = [read_entry(t.cache_dir, p, t.key) for p in missing]
        assert {d for e in new for d in e["doc_ids"]} == _docs(plan, split, parts[1::2])  # exactly the missing documents
        calls += sum(e["teacher_calls"] for e in new)
        assert all(e["teacher_calls"] == math.ceil(e["rows"] / cfg.labels.batch_size) for e in new)
        for part, created in kept[split].items():  # finished parts were never rewritten
            assert read_entry(t.cache_dir, part)["created_at"] == created
    # the service answered exactly the missing half's calls, and the perplexity check's before them
    assert served - cache["teacher"]["check_calls"] == calls == cache["teacher_calls"] > 0

    reference = run_distill(cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"fill": "before"})}),
                            tmp_path / "full")  # the finished cache, read as every run reads one
    assert reference["cache"]["hit"] and reference["cache"]["teacher_calls"] == 0
    live, full = (json.loads((Path(r["student"]["checkpoint"]) / "history.json").read_text()) for r in (report, reference))
    assert len(live) == len(full) == steps
    assert [r["loss"] for r in live] == pytest.approx([r["loss"] for r in full], rel=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(r["student"]["model_dir"]) / "model.safetensors")) for r in (report, reference))
    assert a.keys() == b.keys()
    for name in a:  # the same rows in the same order: the same student
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)

    rerun = Plan(_config(tiny_model, corpus_jsonl, tmp_path / "cache", labels={"fill": "live"},
                         teacher={"name": "no-teacher-here", "start": False}))
    from raykd.soft_labels.live import start_live_fill

    assert start_live_fill(rerun) is None  # nothing to fill: no teacher wanted
    _, stats = ensure_soft_labels(rerun)
    assert stats["hit"] and stats["teacher_calls"] == 0 and _served_calls() == at_start + served  # no call since


def test_live_fill_with_start_false_and_no_running_teacher_fails_before_any_work(ray_start, tiny_model, corpus_jsonl,
                                                                                tmp_path):
    from raykd.teacher.apps import TeacherNotRunningError

    cfg = _config(tiny_model, corpus_jsonl, tmp_path / "cache", labels={"fill": "live"},
                  teacher={"name": "no-such-teacher", "start": False})
    with pytest.raises(TeacherNotRunningError, match=r"labels\.fill=live.*'no-such-teacher', which is not running"):
        run_distill(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "student_init").exists()  # no student built, nothing trained
    assert all(not done_parts(t.cache_dir) for t in Plan(cfg).targets().values())  # nothing labeled


def test_a_teacher_that_leaves_no_room_for_the_workers_is_refused_before_it_starts(ray_start, tiny_model, corpus_jsonl,
                                                                                   tmp_path):
    """Issue 28: `labels.fill=live` on a cluster where the teacher's replica and the Train worker
    cannot both fit is refused with the overrides that fit, before the teacher starts (it used to
    start the teacher, then refuse)."""
    import ray

    from raykd.teacher.apps import running_teacher
    from raykd.train.trainer import InsufficientResourcesError

    total = ray.cluster_resources()["CPU"]
    cfg = _config(tiny_model, corpus_jsonl, tmp_path / "cache", labels={"fill": "live"},
                  teacher={"name": "too-big-teacher", "num_cpus": total - 0.5}, train={"num_workers": 1})
    with pytest.raises(InsufficientResourcesError, match=r"labels\.fill=live: the teacher serves during training .* "
                       r"It fits with .*`ray\.num_cpus=\d+` \(a local Ray\).* Nothing was started"):
        run_distill(cfg, tmp_path / "out")
    assert running_teacher("too-big-teacher") is None
    assert all(not done_parts(t.cache_dir) for t in Plan(cfg).targets().values())  # nothing labeled


def test_a_stream_stopped_midway_keeps_the_parts_it_committed(half_labeled, tiny_model, corpus_jsonl, tmp_path):
    """A live run killed in the middle: the parts it committed stay committed, with no manifest,
    and every committed part is whole (its key and shard size check out)."""
    from raykd.soft_labels.live import start_live_fill

    shutil.copytree(half_labeled, tmp_path / "cache")
    plan = Plan(_config(tiny_model, corpus_jsonl, tmp_path / "cache", labels={"fill": "live", "num_labelers": 1}))
    parts, train = plan.sources["train"][1], plan.targets()["train"]
    first_two = len(_docs(plan, "train", parts[:2]))  # part 0 (committed) and part 1 (missing)
    with start_live_fill(plan) as live:
        stream = iter(in_order(live.rows()).iter_rows())  # as training reads it
        for _ in range(first_two):  # the rows of part 1 came from its committed shard
            next(stream)
        stream.close()  # killed here: no finish, no manifest
    assert not Path(train.cache_dir, MANIFEST).exists()
    committed = done_parts(train.cache_dir)
    assert parts[1].digest() in committed
    for part in committed:
        read_entry(train.cache_dir, part, train.key)
