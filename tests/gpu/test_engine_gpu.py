"""The device-side score path on CUDA: equal to the CPU engine, chunked equal to unchunked (the
pinned copies overlapping the next forward), the Triton pass equal to the torch pass.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest tests/gpu`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raykd.teacher.engines.topk import group_stats, topk_and_tail, triton_available
from tests.unit.test_hf_score import _wide_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A 49,152-way tiny teacher (the grouped top-k of a real vocabulary) on CPU and on CUDA."""
    from raykd.teacher.engines.hf import HFEngine

    folder = _wide_model(tmp_path_factory.mktemp("wide_gpu_teacher"), 49152)
    return HFEngine(folder, device="cpu", num_threads=1), HFEngine(folder, device="cuda")


def _batch(b=6, t=48, seed=0):
    ids = np.random.default_rng(seed).integers(3, 49152, (b, t))
    mask = np.ones_like(ids)
    mask[2, t - 7 :] = 0
    return ids, mask


def _assert_close(a: dict, b: dict, lp_atol: float, atol: float) -> None:
    np.testing.assert_array_equal(a["topk_ids"][..., 0], b["topk_ids"][..., 0])
    np.testing.assert_allclose(a["topk_logprobs"].astype(np.float32), b["topk_logprobs"].astype(np.float32), atol=lp_atol)
    np.testing.assert_allclose(a["tail_logmass"], b["tail_logmass"], atol=atol)
    np.testing.assert_allclose(a["label_logprobs"], b["label_logprobs"], atol=atol)


@pytest.mark.parametrize(("k", "temperature"), [(8, 1.0), (32, 2.0)])
def test_gpu_score_equals_cpu_score(engines, k, temperature):
    cpu, gpu = engines
    ids, mask = _batch()
    a, b = cpu.score(ids, mask, k=k, temperature=temperature), gpu.score(ids, mask, k=k, temperature=temperature)
    assert {n: v.dtype for n, v in a.items()} == {n: v.dtype for n, v in b.items()}
    _assert_close(a, b, lp_atol=5e-3, atol=1e-3)


def test_gpu_chunks_equal_one_chunk(engines):
    _, gpu = engines
    ids, mask = _batch(b=9)
    assert gpu.rows_per_chunk(9, 48, 16) == 9  # free memory holds the whole batch
    whole = gpu.score(ids, mask, k=16)
    gpu.max_tokens_per_forward = 96  # 2 rows per forward: 5 chunks, copies overlapping forwards
    try:
        assert gpu.rows_per_chunk(9, 48, 16) == 2
        chunked = gpu.score(ids, mask, k=16)
    finally:
        gpu.max_tokens_per_forward = None
    _assert_close(whole, chunked, lp_atol=2e-3, atol=1e-4)


def test_memory_sized_chunks_exceed_the_old_4096_tokens(engines):
    _, gpu = engines
    assert gpu.rows_per_chunk(100_000, 256, 32) > 4096 // 256


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_triton_pass_equals_torch_pass_on_cuda(monkeypatch):
    from raykd.teacher.engines import topk

    torch.manual_seed(0)
    z = (torch.randn(300, 49152 + 5, device="cuda") * 4).bfloat16()[:, :49152]  # row stride != V
    a = group_stats(z, 128, backend="triton")
    with monkeypatch.context() as m:  # backend="torch" must not reach the kernel
        m.setattr(topk, "_group_stats_triton", None)
        b = group_stats(z, 128, backend="torch")
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=2e-5)
    ta, tb = topk_and_tail(z, 32, backend="triton"), topk_and_tail(z, 32, backend="torch")
    torch.testing.assert_close(ta.logprobs, tb.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ta.tail_logmass, tb.tail_logmass, atol=1e-5, rtol=0)


def test_grouped_topk_on_cuda_equals_a_full_topk():
    torch.manual_seed(1)
    z = (torch.randn(512, 49152, device="cuda") * 4).bfloat16()
    got = topk_and_tail(z, 32)
    want = torch.log_softmax(z.float(), -1).topk(32, -1)
    torch.testing.assert_close(got.logprobs, want.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(z.gather(1, got.ids), z.gather(1, want.indices), atol=0, rtol=0)
