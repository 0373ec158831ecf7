"""The main job end to end on a tiny random teacher: report fields, files, cache hit on rerun."""

from __future__ import annotations

import json

import pytest

from raykd.cli import main_distill
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray

REQUIRED = [
    "teacher.ppl", "student_kd.ppl", "student_kd.top1_agreement", "student_ce.ppl", "student_ce.top1_agreement",
    "cache.path", "cache.rows", "cache.tokens", "cache.bytes", "cache.bytes_per_token", "cache.k", "cache.hit",
    "timings.label_s", "timings.train_s",
]


def _get(report, dotted):
    node = report
    for key in dotted.split("."):
        node = node[key]
    return node


def test_distill_twice(ray_start, tiny_model, corpus_jsonl, tmp_path):
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache", num_workers=1)  # students on Ray Train workers
    first = main_distill(cfg, tmp_path / "run1")
    on_disk = json.loads((tmp_path / "run1" / "report.json").read_text())
    for key in REQUIRED:
        assert _get(on_disk, key) is not None, key
    assert on_disk["cache"]["hit"] is False and on_disk["cache"]["teacher_calls"] > 0
    assert on_disk["cache"]["k"] == 8
    assert (tmp_path / "run1" / "report.md").read_text().startswith("# raykd distill")
    assert (tmp_path / "run1" / "loss_curves.png").stat().st_size > 1000
    assert first["student_kd"]["ppl"] < first["student_init"]["ppl"]
    assert 0.0 <= first["student_kd"]["top1_agreement"] <= 1.0

    second = main_distill(cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 0})}),
                          tmp_path / "run2")  # the workers do not change the cache key
    assert second["cache"]["hit"] is True and second["cache"]["teacher_calls"] == 0
    assert second["timings"]["label_s"] == 0.0
    assert second["cache"]["path"] == first["cache"]["path"]
    assert second["teacher"]["ppl"] == pytest.approx(first["teacher"]["ppl"])
