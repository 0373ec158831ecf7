"""The vllm engine inside a real Serve replica (vLLM spawns its engine core from the actor).

A served vllm teacher runs vLLM's ``AsyncLLM``: concurrent calls go into its continuous batch
one request per row, and must answer as one merged call would.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from raykd.config import TeacherConfig
from raykd.teacher.apps import start_teacher, stop_teacher
from tests.conftest import require_vllm

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_served_vllm_teacher_batches_continuously_and_answers_as_one_merged_call(ray_start, vllm_tiny_model):
    require_vllm()
    cfg = TeacherConfig(name="vllm-test", model=str(vllm_tiny_model), engine="vllm", max_k=8, num_cpus=0.5)
    handle, started = start_teacher(cfg, str(vllm_tiny_model))
    try:
        assert started
        info = handle.info.remote().result()
        assert info["engine"] == "vllm" and info["max_k"] == 8
        ids = np.random.default_rng(1).integers(3, 300, (16, 24))
        served = handle.score.remote(ids, k=8).result()  # parity with the hf engine: tests/slow/test_vllm_parity.py
        assert served["topk_ids"].shape == (16, 24, 8) and np.isfinite(served["tail_logmass"]).all()

        # 16 concurrent one-row calls (two callers, one of them interactive) equal the 16-row call
        with ThreadPoolExecutor(16) as pool:
            rows = list(pool.map(lambda i: handle.score.remote(ids[i : i + 1], k=8, caller=f"c{i % 2}",
                                                               priority=i % 2).result(), range(16)))
        np.testing.assert_array_equal(np.concatenate([r["topk_ids"] for r in rows]), served["topk_ids"])
        for name in ("topk_logprobs", "tail_logmass", "label_logprobs"):
            np.testing.assert_allclose(np.concatenate([r[name] for r in rows]).astype(np.float32),
                                       served[name].astype(np.float32), atol=1e-5, err_msg=name)
        with pytest.raises(Exception, match="temperature 1 only"):
            handle.score.remote(ids, k=8, temperature=2.0).result()

        prompts = ["the market", "a long day of", "shares fell", "the bank said"]
        together = handle.generate.remote(prompts, max_new_tokens=6, k=2).result()
        with ThreadPoolExecutor(4) as pool:
            alone = list(pool.map(lambda p: handle.generate.remote([p], max_new_tokens=6, k=2).result()[0], prompts))
        assert [o["token_ids"] for o in alone] == [o["token_ids"] for o in together]  # greedy: same tokens
        assert all(1 <= len(o["token_ids"]) <= 6 and o["topk_ids"].shape[1] == 2 for o in together)
        bare = handle.generate.remote(prompts[:1], max_new_tokens=6, k=0).result()[0]  # no logprobs asked for
        assert bare["token_ids"] == together[0]["token_ids"] and bare["topk_ids"].shape == (len(bare["token_ids"]), 0)
        assert np.isnan(bare["logprobs"]).all()  # vLLM computed none
        counts = handle.info.remote().result()
        assert counts["calls"]["score"] >= 17 and counts["calls_by_caller"]["c1"]["score"] == 8
    finally:
        stop_teacher(cfg.name)
