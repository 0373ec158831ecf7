"""``benchmarks/gpu_suite.py --dry``: every arm's CPU form, run as a first GPU run will run it (no
Ray importable, a bare environment), writes the one JSON with every arm ok or skipped with a reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_dry_run_on_cpu_without_ray(tmp_path):
    blocked = tmp_path / "blocked" / "ray"  # any `import ray` in an arm fails the suite
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('the GPU suite must run without Ray')\n")
    out = tmp_path / "dry.json"
    env = {"PYTHONPATH": f"{blocked.parent}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    status = {r["arm"]: r for r in result["arms"]}
    assert list(status) == ["pytest_gpu", "engine_vs_bare", "vllm_vs_offline", "chunked_loss_memory", "kd_200_steps"]
    for r in status.values():
        assert r["status"] in ("ok", "skipped"), r
        assert r["status"] == "ok" or r["reason"]
    assert status["kd_200_steps"]["status"] == "ok" and "raykd_cached" in status["kd_200_steps"]["result"]["arms"]
    assert status["engine_vs_bare"]["status"] == "ok"
