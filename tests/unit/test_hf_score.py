"""``HFEngine.score``'s device-side soft labels (:mod:`raykd.teacher.engines.topk`) against a
plain float64 reference, chunked against unchunked, the packing, and the memory-based chunk size."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raykd.teacher.engines import ids_dtype
from raykd.teacher.engines.hf import HFEngine, chunk_rows, score_bytes_per_token
from raykd.teacher.engines.topk import (
    SoftLabels,
    group_stats,
    num_groups,
    pack_soft_labels,
    topk_and_tail,
    unpack_soft_labels,
)
from tests.conftest import build_tiny_model


def reference(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, k: int, temperature: float):
    """log_softmax + topk + the tail as a logsumexp over the rest, in float64."""
    logp = torch.log_softmax(logits.double() / temperature, -1)
    top_lp, top_ids = logp.topk(k, -1)
    tail = logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    logp1 = torch.log_softmax(logits.double(), -1)
    label = logp1[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    if mask is not None:
        label = label * mask[:, 1:]
    return top_lp.numpy(), top_ids.numpy(), tail.numpy(), torch.nn.functional.pad(label, (0, 1)).numpy()


def _fp16_close(out: np.ndarray, ref: np.ndarray) -> None:
    """``out`` (fp16) is ``ref`` rounded to fp16, give or take one fp16 step."""
    step = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
    assert (np.abs(out.astype(np.float64) - ref) <= step).all()


def _wide_model(folder: Path, vocab_size: int) -> Path:
    """The tiny teacher with a ``vocab_size``-way head (the tokenizer keeps its few hundred
    tokens; scores take any id below ``vocab_size``), peaked enough for small tails."""
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_model(folder)
    config = LlamaConfig.from_pretrained(folder)
    config.vocab_size, config.initializer_range = vocab_size, 0.3
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    """The tiny teacher (V = 320: plain top-k) and a 4,100-way one (grouped top-k with a
    partial last group for K <= 8)."""
    wide = _wide_model(tmp_path_factory.mktemp("wide_teacher"), 4100)
    return {"plain": HFEngine(tiny_model, device="cpu", num_threads=1),
            "grouped": HFEngine(wide, device="cpu", num_threads=1)}


def _batch(engine, b=3, t=24, seed=0):
    ids = np.random.default_rng(seed).integers(3, engine.vocab_size, (b, t))
    mask = np.ones_like(ids)
    mask[1, t - 5 :] = 0
    return ids, mask


@pytest.mark.parametrize("which", ["plain", "grouped"])
@pytest.mark.parametrize(("k", "temperature", "masked"), [(5, 1.0, False), (8, 1.0, True), (3, 2.0, True), (1, 0.5, False)])
def test_score_equals_the_reference(engines, which, k, temperature, masked):
    engine = engines[which]
    assert (num_groups(engine.vocab_size, k) > 0) == (which == "grouped")
    ids, mask = _batch(engine)
    mask = mask if masked else None
    out = engine.score(ids, mask, k=k, temperature=temperature)
    ids_t, mask_t = torch.as_tensor(ids), None if mask is None else torch.as_tensor(mask)
    with torch.inference_mode():
        logits = engine.model(input_ids=ids_t, attention_mask=mask_t).logits
    top_lp, top_ids, tail, label = reference(logits, ids_t, mask_t, k, temperature)
    np.testing.assert_array_equal(out["topk_ids"].astype(np.int64), top_ids)
    _fp16_close(out["topk_logprobs"], top_lp)
    np.testing.assert_allclose(out["tail_logmass"], tail, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["label_logprobs"], label, atol=1e-4, rtol=0)
    assert (out["label_logprobs"][:, -1] == 0).all()
    if masked:
        assert (out["label_logprobs"][1, -6:] == 0).all()
    assert [out[n].dtype for n in ("topk_ids", "topk_logprobs", "tail_logmass", "label_logprobs")] == [
        ids_dtype(engine.vocab_size), np.float16, np.float32, np.float32]


@pytest.mark.parametrize("which", ["plain", "grouped"])
def test_several_chunks_equal_one(engines, which):
    engine = engines[which]
    ids, mask = _batch(engine, b=5, t=16)
    whole = engine.score(ids, mask, k=6, temperature=1.5)
    assert engine.rows_per_chunk(5, 16, 6) >= 5
    engine.max_tokens_per_forward = 32  # 2 rows per forward: chunks of 2, 2, 1
    try:
        assert engine.rows_per_chunk(5, 16, 6) == 2
        chunked = engine.score(ids, mask, k=6, temperature=1.5)
    finally:
        engine.max_tokens_per_forward = None
    for name in whole:
        np.testing.assert_array_equal(chunked[name], whole[name], err_msg=name)


def test_an_all_ones_mask_is_no_mask(engines):
    engine = engines["grouped"]
    ids, _ = _batch(engine)
    a, b = engine.score(ids, k=4), engine.score(ids, np.ones_like(ids), k=4)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize(("v", "group_size"), [(4096, 64), (4100, 64), (8192, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_topk_equals_plain_topk(v, group_size, dtype):
    """Values are exact; among tied logits (frequent in bf16) any valid top-k will do, so the ids
    are checked to point at their values; the sums agree to fp32 rounding."""
    torch.manual_seed(v)
    z = (torch.randn(40, v) * 3).to(dtype)
    z[0, :50] = z[0].max()  # more ties at the top than K
    k = 8
    assert num_groups(v, k, group_size) > 0
    got, ref = topk_and_tail(z, k, group_size), topk_and_tail(z, k, group_size=0)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(z.gather(1, got.ids).float(), z.gather(1, ref.ids).float(), atol=0, rtol=0)
    assert (got.ids.sort(1).values.diff(dim=1) != 0).all()  # no id twice in a row
    torch.testing.assert_close(got.tail_logmass, ref.tail_logmass, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.log_norm, ref.log_norm, atol=1e-5, rtol=0)


def test_k_equal_to_vocab_leaves_no_tail_and_a_peaked_tail_keeps_its_digits():
    z = torch.randn(3, 7)
    full = topk_and_tail(z, 7)
    assert torch.isneginf(full.tail_logmass).all()
    torch.testing.assert_close(full.logprobs.exp().sum(-1), torch.ones(3))
    peaked = torch.zeros(2, 4096)
    peaked[:, 0] = 40.0  # tail mass about 4096 * e^-40: no digits left in 1 - p(top)
    got = topk_and_tail(peaked, 1, group_size=64)
    want = np.log(4095) - 40.0 - np.log1p(4095 * np.exp(-40.0))
    np.testing.assert_allclose(got.tail_logmass.numpy(), want, rtol=1e-6)


def test_group_stats_is_a_per_group_logsumexp():
    z = torch.randn(4, 256) * 5
    gmax, gsum = group_stats(z, 32, backend="torch")
    torch.testing.assert_close(gmax + gsum.log(), z.view(4, 8, 32).logsumexp(-1))
    with pytest.raises(ValueError, match="must divide"):
        group_stats(z, 30)
    with pytest.raises(ValueError, match="unknown backend"):
        group_stats(z, 32, backend="cuda")


@pytest.mark.parametrize("vocab_size", [49152, 65536, 100000])
def test_packing_round_trips_in_the_result_dtypes(vocab_size):
    r, t, k = 2, 3, 4
    ids = torch.tensor([0, 1, 32767, 32768, 40000, vocab_size - 1]).repeat(4)[: r * t * k].view(r, t, k)
    labels = SoftLabels(ids, torch.randn(r, t, k), torch.randn(r, t), torch.randn(r, t))
    raw = pack_soft_labels(labels, vocab_size).numpy()
    out = unpack_soft_labels(raw, r, t, k, vocab_size)
    assert out["topk_ids"].dtype == ids_dtype(vocab_size)
    np.testing.assert_array_equal(out["topk_ids"].astype(np.int64), ids.numpy())
    np.testing.assert_array_equal(out["topk_logprobs"], labels.topk_logprobs.numpy().astype(np.float16))
    np.testing.assert_array_equal(out["tail_logmass"], labels.tail_logmass.numpy())
    np.testing.assert_array_equal(out["label_logprobs"], labels.label_logprobs.numpy())
    with pytest.raises(ValueError, match="expected"):
        unpack_soft_labels(raw[:-1], r, t, k, vocab_size)


def test_chunk_rows_follows_free_memory():
    per_token = score_bytes_per_token(49152, 32, logit_bytes=2, hidden_size=576, intermediate_size=1536)
    assert 49152 * 2 < per_token < 49152 * 4  # the bf16 logits dominate with the fused pass
    gib = 1 << 30
    # 64 GiB free, half of it planned: 32 GiB / (256 tokens * per_token bytes) rows
    assert chunk_rows(10_000, 256, per_token, 64 * gib) == (32 * gib) // (256 * per_token)
    assert chunk_rows(64, 256, per_token, 64 * gib) == 64  # never more than the batch
    assert chunk_rows(64, 256, per_token, 0) == 1  # at least one row (the forward then raises OOM)
    assert chunk_rows(64, 256, per_token, 64 * gib, max_tokens=4096) == 16  # the cap still applies
    small = chunk_rows(10_000, 256, per_token, 8 * gib)
    assert small < chunk_rows(10_000, 256, per_token, 16 * gib) <= 2 * small + 1
    assert chunk_rows(10_000, 256, per_token, 8 * gib, fraction=0.25) == chunk_rows(10_000, 256, per_token, 4 * gib)
    for bad in ({"batch": 0}, {"free_bytes": -1}, {"fraction": 0.0}, {"fraction": 1.5}, {"max_tokens": 0}):
        args = {"batch": 8, "seq_len": 16, "bytes_per_token": 100, "free_bytes": 10**6} | bad
        with pytest.raises(ValueError):
            chunk_rows(**args)


def test_bytes_per_token_counts_what_the_path_allocates():
    kw = {"logit_bytes": 2, "hidden_size": 576, "intermediate_size": 1536}
    fused = score_bytes_per_token(49152, 32, **kw)
    assert score_bytes_per_token(49152, 32, fused=False, **kw) - fused > 3.9 * 49152  # fp32 pass in torch
    assert score_bytes_per_token(49152, 32, temperature=2.0, **kw) - fused > 4 * 49152  # fp32 logits / T
    assert score_bytes_per_token(49152, 32, logit_bytes=4, hidden_size=576, intermediate_size=1536) > fused


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")
def test_triton_group_stats_equals_torch_in_the_interpreter(tmp_path):
    """The Triton kernel, run by Triton's CPU interpreter (set before Triton loads: a subprocess
    with its own Triton cache folder, seeded input)."""
    code = (
        "import torch; from raykd.teacher.engines.topk import group_stats\n"
        "torch.manual_seed(0)\n"
        "z = (torch.randn(5, 4096 + 3) * 4).bfloat16()[:, :4096]\n"
        "for gs in (64, 128):\n"
        "    a, b = group_stats(z, gs, backend='triton'), group_stats(z, gs, backend='torch')\n"
        "    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)\n"
        "    torch.testing.assert_close(a[1], b[1], atol=0, rtol=1e-5)\n"
        "print('ok')\n"
    )
    env = os.environ | {"TRITON_INTERPRET": "1", "RAYKD_NO_TRITON": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (res.returncode, res.stdout[-1000:], res.stderr[-3000:])
