"""``benchmarks/gpu_suite.py``: its arms in the issue's order, and skips and failures that name
their reason (its ``--dry`` run: ``tests/slow/test_gpu_suite_dry.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_arms_in_order_within_the_budget(suite):
    arms = suite.arms(sys.executable)
    assert [a.name for a in arms] == ["pytest_gpu", "engine_vs_bare", "vllm_vs_offline", "chunked_loss_memory", "kd_200_steps"]
    assert sum(a.cap_s for a in arms) <= 600  # caps; the suite's own budget (480 s) cuts the rest
    kd = arms[-1].command(Path("kd.json"), False)
    assert "--steps" in kd and kd[kd.index("--steps") + 1] == "200" and "--device" in kd


def test_an_arm_whose_package_is_missing_is_skipped_with_the_reason(suite, tmp_path):
    arm = suite.Arm("needs_nothing_here", 10, suite.needs("no_such_package_raykd"), lambda out, dry: ["false"])
    record = suite.run_arm(arm, tmp_path, dry=True, left_s=100, env={})
    assert record["status"] == "skipped" and "no_such_package_raykd" in record["reason"]
    late = suite.Arm("late", 10, lambda: None, lambda out, dry: ["false"])
    assert "budget" in suite.run_arm(late, tmp_path, dry=True, left_s=5, env={})["reason"]


def test_a_failing_arm_is_recorded_not_raised(suite, tmp_path):
    arm = suite.Arm("fails", 10, lambda: None, lambda out, dry: [sys.executable, "-c", "raise SystemExit(3)"])
    record = suite.run_arm(arm, tmp_path, dry=True, left_s=100, env={})
    assert record["status"] == "failed" and record["returncode"] == 3


def test_chunked_loss_arm_says_why_until_item_2_lands(suite):
    reason = suite.chunked_loss_missing()
    built = (ROOT / "benchmarks" / "bench_chunked_loss.py").is_file()
    assert (reason is None) == built or reason == suite.CHUNKED_MISSING
