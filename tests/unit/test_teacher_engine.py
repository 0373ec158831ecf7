"""The transformers teacher engine on a tiny random Llama (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raykd.teacher.engines import build_engine, ids_dtype, topk_with_tail
from raykd.teacher.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(tiny_model):
    return HFEngine(tiny_model, num_threads=1, device="cpu")  # compared with CPU tensors, also on a GPU machine


def _ids(engine, b=3, t=12, seed=0):
    return np.random.default_rng(seed).integers(3, engine.vocab_size, (b, t))


def test_score_matches_a_plain_forward(engine):
    ids = _ids(engine)
    out = engine.score(ids, k=5)
    with torch.inference_mode():
        logp = torch.log_softmax(engine.model(input_ids=torch.as_tensor(ids)).logits.float(), -1)
    top_lp, top_ids = logp.topk(5, -1)
    np.testing.assert_array_equal(out["topk_ids"].astype(np.int64), top_ids.numpy())
    np.testing.assert_allclose(out["topk_logprobs"].astype(np.float32), top_lp.numpy(), atol=2e-3)
    label = logp[:, :-1].gather(-1, torch.as_tensor(ids)[:, 1:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(out["label_logprobs"][:, :-1], label, rtol=1e-5)
    assert (out["label_logprobs"][:, -1] == 0).all()


def test_topk_plus_tail_is_a_distribution(engine):
    out = engine.score(_ids(engine), k=7, temperature=2.0)
    mass = np.exp(out["topk_logprobs"].astype(np.float64)).sum(-1) + np.exp(out["tail_logmass"])
    np.testing.assert_allclose(mass, 1.0, atol=5e-3)
    assert out["topk_ids"].dtype == ids_dtype(engine.vocab_size) == np.uint16


def test_k_equal_to_vocab_leaves_no_tail():
    logits = torch.randn(2, 3, 11)
    lp, ids, tail = topk_with_tail(logits, 11, 1.0)
    assert torch.isneginf(tail).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 3))


def test_temperature_flattens(engine):
    cold = engine.score(_ids(engine), k=1, temperature=0.5)["topk_logprobs"].astype(np.float32)
    hot = engine.score(_ids(engine), k=1, temperature=4.0)["topk_logprobs"].astype(np.float32)
    assert (hot < cold).all()


def test_padding_does_not_change_real_positions(engine):
    ids = _ids(engine, b=1, t=10)
    padded = np.concatenate([ids, np.zeros((1, 4), ids.dtype)], 1)
    mask = np.concatenate([np.ones((1, 10)), np.zeros((1, 4))], 1)
    a = engine.score(ids, k=4)
    b = engine.score(padded, mask, k=4)
    np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"][:, :10])
    assert (b["label_logprobs"][:, 9:] == 0).all()


@pytest.mark.parametrize(
    "ids,k,match",
    [
        (np.zeros((0, 4), np.int64), 4, "non-empty"),
        (np.array([[1, 2, 100000]]), 4, "token ids must lie"),
        (np.array([[1, -1, 2]]), 4, "token ids must lie"),
        (np.array([[1, 2, 3]]), 0, "k=0"),
        (np.ones((1, 300), np.int64), 4, "exceeds the teacher's context"),
    ],
)
def test_bad_requests_are_refused(engine, ids, k, match):
    with pytest.raises(ValueError, match=match):
        engine.score(ids, k=k)


def test_generate_greedy_is_deterministic_and_returns_topk(engine):
    prompts = ["The market said", [{"role": "user", "content": "hello"}]] if engine.tokenizer.chat_template else ["The market said", "A minister"]
    a = engine.generate(prompts, max_new_tokens=5, k=3)
    b = engine.generate(prompts, max_new_tokens=5, k=3)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    for r in a:
        n = len(r["token_ids"])
        assert 1 <= n <= 5 and r["topk_ids"].shape == (n, 3)
        # greedy: the chosen token is the top-1 of its step
        assert (r["topk_ids"][:, 0] == np.array(r["token_ids"])).all()


def test_info_carries_fingerprints(engine, tiny_model):
    info = engine.info()
    assert len(info.weights_fingerprint) == 16 and len(info.tokenizer_fingerprint) == 16
    assert info.vocab_size == engine.vocab_size and info.engine == "hf"


def test_unknown_engine_lists_valid(tiny_model):
    with pytest.raises(ValueError, match=r"unknown teacher engine 'nope'; valid teacher engines: classifier, hf, vllm"):
        build_engine("nope", tiny_model)


@pytest.mark.parametrize(
    ("fields", "expect"),
    [
        ({"engine": "hf", "num_gpus": 1}, "hf"),  # an explicit engine is kept
        ({"engine": "vllm"}, "vllm"),
        ({"engine": "auto", "device": "cpu"}, "hf"),  # no GPU: transformers
        ({"engine": "auto", "device": "cuda"}, "vllm"),  # GPU + vLLM installed (or hf without it)
    ],
)
def test_auto_engine_picks_by_hardware(fields, expect):
    import importlib.util

    from raykd.config import TeacherConfig
    from raykd.teacher.engines import resolve_engine

    if expect == "vllm" and fields["engine"] == "auto" and importlib.util.find_spec("vllm") is None:
        expect = "hf"
    assert resolve_engine(TeacherConfig(**fields)) == expect


def test_vllm_requests_it_cannot_answer_fail_before_work():
    from raykd.config import TeacherConfig
    from raykd.teacher.engines import check_engine_request

    cfg = TeacherConfig(engine="vllm", max_k=16)
    check_engine_request("vllm", cfg, k=16, temperature=1.0)
    with pytest.raises(ValueError, match="exceeds teacher.max_k=16"):
        check_engine_request("vllm", cfg, k=32, temperature=1.0)
    with pytest.raises(ValueError, match="temperature 1 only"):
        check_engine_request("vllm", cfg, k=8, temperature=2.0)
    check_engine_request("hf", cfg, k=32, temperature=2.0)  # hf serves any k and temperature
