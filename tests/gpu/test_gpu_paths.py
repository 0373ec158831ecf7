"""GPU paths: the transformers teacher on CUDA and one bf16-autocast distillation step.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest tests/gpu`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def engines(tiny_model):
    from raykd.teacher.engines.hf import HFEngine

    return HFEngine(tiny_model, device="cpu", num_threads=1), HFEngine(tiny_model, device="cuda")


def test_teacher_on_cuda_scores_like_cpu(engines):
    cpu, gpu = engines
    assert gpu.info().device == "cuda"
    ids = np.random.default_rng(0).integers(3, 300, (4, 32))
    a, b = cpu.score(ids, k=8), gpu.score(ids, k=8)
    np.testing.assert_array_equal(a["topk_ids"][..., 0], b["topk_ids"][..., 0])
    np.testing.assert_allclose(a["topk_logprobs"].astype(np.float32), b["topk_logprobs"].astype(np.float32), atol=5e-3)
    np.testing.assert_allclose(a["label_logprobs"], b["label_logprobs"], atol=1e-3)


def test_teacher_generates_on_cuda(engines):
    cpu, gpu = engines
    a = cpu.generate(["the market said"], max_new_tokens=6, k=4)[0]
    b = gpu.generate(["the market said"], max_new_tokens=6, k=4)[0]
    assert a["token_ids"] == b["token_ids"]


def test_bf16_autocast_kd_step_matches_fp32(engines, tiny_model):
    """The training loop's step (forward under autocast, fp32 objective) on CUDA."""
    from transformers import AutoModelForCausalLM

    from raykd.losses import Objective, TeacherTargets

    _, gpu = engines
    ids = np.random.default_rng(1).integers(3, 300, (4, 32))
    lab = gpu.score(ids, k=8)
    dev = torch.device("cuda")
    targets = TeacherTargets.sparse(torch.as_tensor(lab["topk_ids"].astype(np.int64), device=dev),
                                    torch.as_tensor(lab["topk_logprobs"], device=dev).float(),
                                    torch.as_tensor(lab["tail_logmass"], device=dev))
    x = torch.as_tensor(ids, device=dev)
    labels = torch.full_like(x, -100)
    labels[:, :-1] = x[:, 1:]
    mask = labels >= 0
    objective = Objective({"forward_kl": 0.5, "ce": 0.5})
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(dev)
    losses = {}
    for mode in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "bf16" else torch.autocast("cuda", enabled=False)
        with ctx:
            logits = model(input_ids=x).logits
        out = objective(logits.float(), labels, mask, targets, 1.0)
        (out.loss_sum / out.num_tokens).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        losses[mode] = float(out.loss_sum.detach() / out.num_tokens)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
