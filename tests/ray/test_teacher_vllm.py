"""The vllm engine inside a real Serve replica (vLLM spawns its engine core from the actor)."""

from __future__ import annotations

import numpy as np
import pytest

from raykd.config import TeacherConfig
from raykd.teacher.deployment import start_teacher, stop_teacher
from raykd.teacher.engines.hf import HFEngine
from tests.conftest import require_vllm

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_served_vllm_teacher_scores_like_the_transformers_engine(ray_start, vllm_tiny_model):
    require_vllm()
    cfg = TeacherConfig(name="vllm-test", model=str(vllm_tiny_model), engine="vllm", max_k=8, num_cpus=0.5)
    handle, started = start_teacher(cfg, str(vllm_tiny_model))
    try:
        assert started
        info = handle.info.remote().result()
        assert info["engine"] == "vllm" and info["max_k"] == 8
        ids = np.random.default_rng(1).integers(3, 300, (3, 24))
        served = handle.score.remote(ids, k=8).result()
        local = HFEngine(vllm_tiny_model, num_threads=1).score(ids, k=8)
        np.testing.assert_array_equal(served["topk_ids"], local["topk_ids"])
        np.testing.assert_allclose(served["topk_logprobs"].astype(np.float32), local["topk_logprobs"].astype(np.float32), atol=2e-3)
        with pytest.raises(Exception, match="temperature 1 only"):
            handle.score.remote(ids, k=8, temperature=2.0).result()
        out = handle.generate.remote(["the market"], max_new_tokens=4, k=2).result()
        assert 1 <= len(out[0]["token_ids"]) <= 4 and out[0]["topk_ids"].shape[1] == 2
    finally:
        stop_teacher(cfg.name)
