"""GPU throughput of the transformers teacher engine (``HFEngine.score``) against the bare forward.

Random-init weights of real teacher shapes (SmolLM2-135M and the SmolLM2-1.7B shape, no
download), bf16, top-``--k`` soft labels of random token ids. For each shape and batch it times,
in one process, with the GPU synchronised around each repeat (median of ``--repeats`` after
``--warmup``):

- ``bare``: ``model(input_ids).logits``, the forward ``score`` runs (no KV cache);
- ``old_style``: that forward + fp32 log-softmax + top-k + tail + label log-prob, copied to the
  host tensor by tensor (what ``score`` did before the device-side path);
- ``score``: ``HFEngine.score`` (numpy in, numpy out), chunked from free device memory, with
  the Triton pass when Triton is installed;
- ``score_torch``: the same with the plain-torch pass (``RAYKD_NO_TRITON=1``);
- ``score_4096``: the same with chunks capped at 4,096 tokens (the old default);
- ``post_ms``: the device-side soft labels + packing alone on one batch's logits, Triton and torch.

Tokens per second count every scored position (``B * T``). With no CUDA device it says so and
exits 0; ``--tiny`` runs a tiny shape on any device as a smoke test.

    python benchmarks/bench_engine_gpu.py --out engine_gpu.json
    python benchmarks/bench_engine_gpu.py --tiny --out /tmp/smoke.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SHAPES: dict[str, dict] = {
    "smollm2-135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True},
    "smollm2-1.7b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
                     "intermediate_size": 8192, "vocab_size": 49152, "tie_word_embeddings": True},
    # smoke test: the real vocabulary (so the grouped top-k runs), a toy body
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 49152, "tie_word_embeddings": True},
}
"""LlamaConfig fields of each timed teacher shape."""


def save_random_teacher(shape: str, folder: Path, device: str, dtype: str) -> Path:
    """A ``save_pretrained`` folder with random-init weights of ``SHAPES[shape]`` and a small
    byte-level BPE tokenizer (its few hundred tokens need not match the model's vocabulary:
    scores take any id below ``vocab_size``)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(["the teacher scores every token of the batch"] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: seconds, not a minute, for 1.7B
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs, synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def old_style(engine, ids, k: int):
    """The forward, fp32 log-softmax, top-k, tail and label, each copied to the host."""
    import torch

    logits = engine.model(input_ids=ids, use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    del logits
    label = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()
    top_lp, top_ids = logp.topk(k, dim=-1)
    tail = logp.scatter_(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_ids.cpu(), top_lp.cpu(), tail.cpu(), label


@contextlib.contextmanager
def no_triton(on: bool):
    """``RAYKD_NO_TRITON=1`` while inside (the engine reads it at each call)."""
    before = os.environ.get("RAYKD_NO_TRITON")
    if on:
        os.environ["RAYKD_NO_TRITON"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAYKD_NO_TRITON", None)
        else:
            os.environ["RAYKD_NO_TRITON"] = before


def post_ms(engine, ids, k: int, device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Milliseconds of the device-side steps on one batch's logits: the pass over the logits
    (``group_stats``), the whole top-k and tail, and soft labels + packing, per backend."""
    import torch

    from raykd.teacher.engines.topk import (
        DEFAULT_GROUP_SIZE,
        group_stats,
        pack_soft_labels,
        soft_labels_of_logits,
        topk_and_tail,
        triton_available,
    )

    backends = ["triton", "torch"] if triton_available() and device.startswith("cuda") else ["torch"]
    out = {}
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, use_cache=False).logits
        flat = logits.view(-1, logits.shape[-1])
        width = flat.shape[1] // DEFAULT_GROUP_SIZE * DEFAULT_GROUP_SIZE
        for b in backends:
            steps = {
                "group_stats": lambda b=b: group_stats(flat[:, :width], DEFAULT_GROUP_SIZE, b),
                "topk_and_tail": lambda b=b: topk_and_tail(flat, k, backend=b),
                "soft_labels_and_pack": lambda b=b: pack_soft_labels(
                    soft_labels_of_logits(logits, ids, None, k=k, backend=b), engine.vocab_size),
            }
            for name, fn in steps.items():
                out[f"{name}_{b}"] = 1e3 * median_seconds(fn, device, warmup, repeats)
        for gs in (64, 256):  # other group sizes of the grouped top-k, default backend
            out[f"topk_and_tail_group{gs}"] = 1e3 * median_seconds(
                lambda gs=gs: topk_and_tail(flat, k, group_size=gs), device, warmup, repeats)
    return out


def breakdown_ms(engine, ids, k: int, device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Where ``score``'s time goes on one batch: the host's time to queue the forward (no sync),
    the forward, one chunk (forward + soft labels + packing) on the device, and ``score``."""
    import torch

    def queue_forward():
        sync(device)
        start = time.perf_counter()
        engine.model(input_ids=ids, use_cache=False)
        elapsed = time.perf_counter() - start
        sync(device)
        return elapsed

    with torch.inference_mode():
        for _ in range(warmup):
            queue_forward()
        out = {"forward_queue": 1e3 * statistics.median(queue_forward() for _ in range(repeats))}
        out["forward"] = 1e3 * median_seconds(lambda: engine.model(input_ids=ids, use_cache=False), device, warmup, repeats)
        out["chunk"] = 1e3 * median_seconds(lambda: engine._score_chunk(ids, None, k, 1.0), device, warmup, repeats)
    ids_np = ids.cpu().numpy()
    out["score"] = 1e3 * median_seconds(lambda: engine.score(ids_np, k=k), device, warmup, repeats)
    return out


def profile(engine, ids_np: np.ndarray, k: int, path: Path) -> None:
    """torch.profiler tables (by CPU and by CUDA time) of two ``score`` calls, written to ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine.score(ids_np, k=k)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            engine.score(ids_np, k=k)
    averages = prof.key_averages()
    path.write_text("\n\n".join(averages.table(sort_by=key, row_limit=30)
                                 for key in ("cpu_time_total", "self_cpu_time_total", "cuda_time_total")))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


def agreement(engine, ids_np: np.ndarray, k: int) -> dict[str, float]:
    """Largest differences between ``score`` with the Triton pass and with the torch pass."""
    a = engine.score(ids_np, k=k)
    with no_triton(True):
        b = engine.score(ids_np, k=k)
    lp = np.abs(a["topk_logprobs"].astype(np.float32) - b["topk_logprobs"].astype(np.float32)).max()
    return {
        "topk_logprobs_max_abs_diff": float(lp),
        "tail_logmass_max_abs_diff": float(np.abs(a["tail_logmass"] - b["tail_logmass"]).max()),
        "label_logprobs_max_abs_diff": float(np.abs(a["label_logprobs"] - b["label_logprobs"]).max()),
        "top1_ids_equal": float((a["topk_ids"][..., 0] == b["topk_ids"][..., 0]).mean()),
    }


def time_batch(engine, batch: int, seq_len: int, k: int, device: str, warmup: int, repeats: int) -> dict:
    """Every measurement of one ``[batch, seq_len]`` batch (see the module docstring)."""
    import torch

    from raykd.teacher.engines.topk import triton_available

    ids_np = np.random.default_rng(0).integers(0, engine.vocab_size, (batch, seq_len))
    ids = torch.as_tensor(ids_np, device=device)
    tokens = batch * seq_len

    def tok_s(fn: Callable[[], object]) -> float:
        with torch.inference_mode():
            return tokens / median_seconds(fn, device, warmup, repeats)

    row: dict = {"batch": batch, "seq_len": seq_len, "k": k, "tokens": tokens,
                 "rows_per_chunk": engine.rows_per_chunk(batch, seq_len, k)}
    row["bare"] = tok_s(lambda: engine.model(input_ids=ids, use_cache=False).logits)
    row["old_style"] = tok_s(lambda: old_style(engine, ids, k))
    row["score"] = tok_s(lambda: engine.score(ids_np, k=k))
    row["triton"] = triton_available() and device.startswith("cuda")  # after its first launch
    with no_triton(True):
        row["score_torch"] = tok_s(lambda: engine.score(ids_np, k=k))
    engine.max_tokens_per_forward = 4096
    try:
        row["score_4096"] = tok_s(lambda: engine.score(ids_np, k=k))
    finally:
        engine.max_tokens_per_forward = None
    row["post_ms"] = post_ms(engine, ids, k, device, warmup, repeats)
    row["breakdown_ms"] = breakdown_ms(engine, ids, k, device, warmup, repeats)
    if triton_available() and device.startswith("cuda"):
        row["triton_vs_torch"] = agreement(engine, ids_np, k)
    for name in ("old_style", "score", "score_torch", "score_4096"):
        row[f"{name}_over_bare"] = row[name] / row["bare"]
    return row


def environment(device: str) -> dict:
    import torch
    import transformers

    from raykd.teacher.engines.topk import triton_available

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": device, "triton_pass": triton_available() and device.startswith("cuda")}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        with contextlib.suppress(ImportError):
            import triton

            env["triton"] = triton.__version__
    return env


def table(rows: list[dict]) -> str:
    head = ("| teacher shape | B x T | bare forward | fwd + log-softmax + top-k + copy | `HFEngine.score` | "
            "score / bare | score, torch pass | score, 4,096-token chunks | post-processing ms (triton / torch) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        post = " / ".join(f"{r['post_ms'][f'soft_labels_and_pack_{b}']:.2f}" for b in ("triton", "torch")
                          if f"soft_labels_and_pack_{b}" in r["post_ms"])
        lines.append(
            f"| {r['shape']} | {r['batch']} x {r['seq_len']} | {r['bare'] / 1e3:.0f}k | {r['old_style'] / 1e3:.0f}k "
            f"({r['old_style_over_bare']:.2f}) | {r['score'] / 1e3:.0f}k | **{r['score_over_bare']:.2f}** | "
            f"{r['score_torch'] / 1e3:.0f}k ({r['score_torch_over_bare']:.2f}) | "
            f"{r['score_4096'] / 1e3:.0f}k ({r['score_4096_over_bare']:.2f}) | {post} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2-135m,smollm2-1.7b", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--batches", default="64x256,128x512", help="comma list of BxT")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="profile two score calls of the first shape and batch")
    p.add_argument("--tiny", action="store_true", help="smoke test: the tiny shape, 4x32, on any device")
    p.add_argument("--out", default="engine_gpu.json")
    args = p.parse_args()

    import torch

    from raykd.teacher.engines.hf import HFEngine

    if args.tiny:
        args.shapes, args.batches, args.repeats, args.warmup = "tiny", "4x32", 2, 1
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif not torch.cuda.is_available():
        print("bench_engine_gpu needs a CUDA GPU and torch sees none: nothing measured (--tiny runs a CPU smoke test)")
        return 0
    else:
        device = "cuda"
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        p.error(f"unknown shapes {sorted(unknown)}; valid: {sorted(SHAPES)}")
    batches = [tuple(int(x) for x in b.split("x")) for b in args.batches.split(",")]
    rows: list[dict] = []
    result = {"environment": environment(device), "dtype": args.dtype, "warmup": args.warmup,
              "repeats": args.repeats, "unit": "tokens/s (B*T scored positions), median", "rows": rows}
    for shape in args.shapes.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"raykd-{shape}-"))
        try:
            t0 = time.perf_counter()
            save_random_teacher(shape, folder, device, args.dtype)
            engine = HFEngine(folder, dtype=args.dtype, device=device)
            print(f"{shape}: built and loaded in {time.perf_counter() - t0:.1f} s", flush=True)
            if args.profile and not rows:
                ids_np = np.random.default_rng(0).integers(0, engine.vocab_size, batches[0])
                profile(engine, ids_np, args.k, Path(args.out).with_suffix(".profile.txt"))
            for batch, seq_len in batches:
                row = {"shape": shape} | time_batch(engine, batch, seq_len, args.k, device, args.warmup, args.repeats)
                rows.append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).write_text(json.dumps(result, indent=1))  # kept if a later shape fails
            del engine
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    from raykd.teacher.engines import topk

    result["environment"]["triton_failure"] = topk._TRITON_FAILED[:1]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
