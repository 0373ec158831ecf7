"""One running teacher shared by two student runs, one of them a separate process.

The teacher is started once (as `raykd teacher up` would); both runs find it by name, label
their (different) data through its one replica and start no teacher of their own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from raykd.cli import main_distill
from raykd.teacher.apps import start_teacher, stop_teacher
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray


def test_two_student_runs_share_one_running_teacher(ray_start, tiny_model, corpus_jsonl, tmp_path):
    from ray import serve

    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache", max_steps=2,
                              students={"student_kd": {"forward_kl": 1.0}})
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"name": "shared-by-two-runs"})})  # started here
    handle, started = start_teacher(cfg.teacher, str(tiny_model))
    try:
        assert started
        replica = handle.info.remote().result()["replica"]

        first = main_distill(cfg, tmp_path / "run_a")

        # the second run: another process joining this cluster, over other documents
        other = cfg.model_dump(mode="json")
        other["data"]["split_seed"] = 1
        other["ray"]["address"] = ray_start.get_runtime_context().gcs_address
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(other))
        proc = subprocess.run([sys.executable, "-m", "raykd.cli", "distill", "--config", str(tmp_path / "b.yaml"),
                               "--output-dir", str(tmp_path / "run_b")], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        second = json.loads((tmp_path / "run_b" / "report.json").read_text())

        for report in (first, second):
            assert report["cache"]["hit"] is False and report["cache"]["teacher_calls"] > 0
            teacher = dict(report["cache"]["teacher"])
            assert teacher.pop("check_ppl") > 1.0 and teacher.pop("check_calls") >= 1  # scored on the run's own documents first
            assert teacher == {"name": cfg.teacher.name, "started_by_run": False, "engine": "hf", "replica": replica}
        assert first["cache"]["key"] != second["cache"]["key"]
        status = serve.status().applications
        assert cfg.teacher.name in status  # the runs did not stop the teacher they did not start
        assert status[cfg.teacher.name].deployments["Teacher"].replica_states == {"RUNNING": 1}
    finally:
        stop_teacher(cfg.teacher.name)
