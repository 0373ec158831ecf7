"""Methods with recipes of their own on the tiny teacher: sequence-level KD (teacher
generations as training text) and TAKD / DGKD chains (a trained TA served as a teacher)."""

from __future__ import annotations

import json

import pytest

from raykd.cli import main_distill
from tests.ray.test_methods import method_config

pytestmark = pytest.mark.ray


def test_seqkd_trains_on_cached_teacher_generations(ray_start, tiny_model, corpus_jsonl, tmp_path):
    gen = {"prompt_tokens": 6, "max_new_tokens": 8, "temperature": 0.0, "batch_size": 4}
    cfg = method_config("seqkd", tiny_model, corpus_jsonl, tmp_path / "cache", generation=gen,
                        teacher={"name": "seqkd-teacher"})  # its own, not the shared tiny teacher: the run starts and stops it
    first = main_distill(cfg, tmp_path / "a")
    g = first["prepare"]["generations"]
    assert g["hit"] is False and g["rows"] == first["data"]["train_docs"] and g["new_tokens"] > 0
    assert first["prepare"]["example"]  # prompt + continuation
    assert first["seqkd"]["steps"] == 2 and first["cache"]["teacher_calls"] > 0
    # the teacher started to generate was owned by the run: labeling stopped it before training
    from ray import serve

    assert first["cache"]["teacher"]["started_by_run"] is True and cfg.teacher.name not in serve.status().applications

    second = main_distill(cfg, tmp_path / "b")  # generations and soft labels both come from the caches
    assert second["prepare"]["generations"]["hit"] is True and second["cache"]["hit"] is True
    assert second["cache"]["teacher_calls"] == 0 and second["cache"]["key"] == first["cache"]["key"]

    plain = method_config("kd", tiny_model, corpus_jsonl, tmp_path / "cache")
    from raykd.soft_labels.plan import Plan

    assert Plan(plain).keys["train"].digest() != first["cache"]["key"]  # generated text: another cache


CHAINS = ["dgkd"]
SAME_PATH_AS = {"takd": "dgkd"}
"""Chains without a run of their own: TAKD runs DGKD's stages with the last teacher only."""


def test_teacher_assistant_chain(ray_start, tiny_model, corpus_jsonl, tmp_path):
    """DGKD end to end: a TA is trained, served, and teaches the student with the original teacher.
    TAKD runs the same stages with the last teacher only (its stage configs:
    tests/unit/test_chain_configs.py)."""
    from ray import serve

    method = "dgkd"

    cfg = method_config(method, tiny_model, corpus_jsonl, tmp_path / "cache",
                        chain={"assistants": [{"keep_layers": [0, 1, 3]}]})
    report = main_distill(cfg, tmp_path / "run")
    ta, student = report["stages"]
    assert ta["stage"] == "ta1" and ta["teachers"] == [str(tiny_model)] and ta["keep_layers"] == [0, 1, 3]
    ta_dir = ta["ta1"]["model_dir"]
    assert student["teachers"] == [str(tiny_model), ta_dir]  # the trained TA was served as a teacher
    assert ta["ta1"]["params"] > student[method]["params"]
    final = report["final_vs_original_teacher"][method]
    assert final["ppl"] > 0 and 0.0 <= final["top1_agreement"] <= 1.0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["method"] == method
    assert not [a for a in serve.status().applications if a.endswith("-ta1")]  # stage teachers were stopped
