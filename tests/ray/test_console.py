"""`raykd distill` through the command line: a short console (progress bars, the table, where
the files are) while Ray's own output and raykd's log go to ``<output-dir>/logs/``."""

from __future__ import annotations

import pytest
import yaml

from raykd.cli import cli
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray

MAX_LINES = 30


def test_distill_console_is_short_and_logs_go_to_the_output_dir(ray_start, tiny_model, corpus_jsonl, tmp_path, capsys):
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache", max_steps=2, checkpoint_every=1,
                              students={"student_kd": {"forward_kl": 0.5, "ce": 0.5}})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out_dir = tmp_path / "run"

    assert cli(["distill", "--config", str(path), "--output-dir", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    console = (out + err).replace("\r", "\n")  # every redraw of a bar counted as a line
    lines = [line for line in console.splitlines() if line.strip()]
    assert len((out + err).splitlines()) <= MAX_LINES, out + err
    assert any(line.startswith("labeling: 100%") for line in lines), console
    assert any(line.startswith("student_kd: 100%") and "2/2" in line for line in lines), console
    assert "raykd distill: tiny" in out and f"{out_dir / 'logs'}/" in out
    assert "Traceback" not in console and "(RayTrainWorker" not in console and "INFO" not in console
    assert "deprecated" not in console.lower()  # Ray Data's ray_remote_args, Ray Train's exclude_resources

    log = (out_dir / "logs" / "raykd.log").read_text()
    assert "INFO raykd." in log and "labeling 1 of 1 parts for" in log
    sessions = list((out_dir / "logs" / "ray").iterdir())  # a link to this (shared) Ray's session logs
    assert len(sessions) == 1 and sessions[0].name.startswith("session_")
    assert any(p.name.startswith("worker-") for p in sessions[0].iterdir())
