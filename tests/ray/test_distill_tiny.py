"""The main job end to end on a tiny random teacher, through the command line: a short console
(progress bars, the table, where the files are) while Ray's own output and raykd's log go to
``<output-dir>/logs/``; report fields and files; a cache hit on the rerun."""

from __future__ import annotations

import json

import pytest
import yaml

from raykd.cli import cli, main_distill
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray

MAX_LINES = 30
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


def test_distill_on_a_train_worker_with_a_short_console_then_a_cache_hit(ray_start, tiny_model, tiny_teacher, corpus_jsonl, tmp_path,
                                                                         capsys):
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache", num_workers=1)  # students on Ray Train workers
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run1 = tmp_path / "run1"
    assert cli(["distill", "--config", str(path), "--output-dir", str(run1)]) == 0
    _assert_short_console(capsys.readouterr(), run1, steps=cfg.train.max_steps)

    first = json.loads((run1 / "report.json").read_text())
    for key in REQUIRED:
        assert _get(first, key) is not None, key
    assert first["cache"]["hit"] is False and first["cache"]["teacher_calls"] > 0
    assert first["cache"]["k"] == 8
    assert (run1 / "report.md").read_text().startswith("# raykd distill")
    assert (run1 / "loss_curves.png").stat().st_size > 1000
    assert first["student_kd"]["ppl"] < first["student_init"]["ppl"]
    assert 0.0 <= first["student_kd"]["top1_agreement"] <= 1.0

    second = main_distill(cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 0})}),
                          tmp_path / "run2")  # the workers do not change the cache key
    assert second["cache"]["hit"] is True and second["cache"]["teacher_calls"] == 0
    assert second["timings"]["label_s"] == 0.0
    assert second["cache"]["path"] == first["cache"]["path"]
    assert second["teacher"]["ppl"] == pytest.approx(first["teacher"]["ppl"])


def _assert_short_console(captured, out_dir, steps: int) -> None:
    out, err = captured
    console = (out + err).replace("\r", "\n")  # every redraw of a bar counted as a line
    lines = [line for line in console.splitlines() if line.strip()]
    assert len((out + err).splitlines()) <= MAX_LINES, out + err
    assert any(line.startswith("labeling: 100%") for line in lines), console
    assert any(line.startswith("student_kd: 100%") and f"{steps}/{steps}" in line for line in lines), console
    assert "raykd distill: tiny" in out and f"{out_dir / 'logs'}/" in out
    assert "Traceback" not in console and "(RayTrainWorker" not in console and "INFO" not in console
    assert "deprecated" not in console.lower()  # Ray Data's ray_remote_args, Ray Train's exclude_resources

    log = (out_dir / "logs" / "raykd.log").read_text()
    assert "INFO raykd." in log and "labeling 1 of 1 parts for" in log
    sessions = list((out_dir / "logs" / "ray").iterdir())  # a link to this (shared) Ray's session logs
    assert len(sessions) == 1 and sessions[0].name.startswith("session_")
    assert any(p.name.startswith("worker-") for p in sessions[0].iterdir())
