"""Driver memory of labeling: N and then 10N synthetic ~1 KB JSONL documents, tiny teacher.

Each size runs `raykd label` in a fresh driver process joined to one Ray cluster (so both see the
same cluster, teacher start and imports). A sampler thread in the driver records its resident
set size every 20 ms; the growth is the peak during planning + labeling above the RSS measured
after imports and ``ray.init``. The data path streams parts to labeler actors, so the growth at
10N may exceed the growth at N by at most 10% of the extra corpus bytes (the issue's bound).

    python benchmarks/bench_driver_memory.py --docs 5000 --out runs/bench_driver_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_WORDS = ("the market said record profits minister announced new rules team won the final match company "
          "launched strong sales court denied a surprise deal film an award band reported tax rise").split()


def write_corpus(folder: Path, n_docs: int, docs_per_file: int, seed: int = 0) -> int:
    """``n_docs`` JSONL documents of about 1 KB in files of ``docs_per_file``; returns the bytes written."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for f in range(0, n_docs, docs_per_file):
        lines = []
        for i in range(f, min(f + docs_per_file, n_docs)):
            text = " ".join(rng.choice(_WORDS) for _ in range(170))[:1000]
            lines.append(json.dumps({"id": f"doc{i:07d}", "text": text}))
        blob = ("\n".join(lines) + "\n").encode()
        (folder / f"part-{f // docs_per_file:05d}.jsonl").write_bytes(blob)
        total += len(blob)
    return total


DRIVER = r"""
import json, os, sys, threading, time
import psutil, ray
proc = psutil.Process()
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
from raykd.config import DistillConfig
from raykd.soft_labels.plan import Plan, ensure_soft_labels
cfg = DistillConfig.model_validate(json.loads(sys.argv[1]))
import gc; gc.collect()
baseline = proc.memory_info().rss
peak = [baseline]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
caches, stats = ensure_soft_labels(Plan(cfg))
seconds = time.perf_counter() - start
done.set()
peak[0] = max(peak[0], proc.memory_info().rss)
print("RESULT " + json.dumps({"baseline": baseline, "peak": peak[0], "seconds": seconds,
      "rows": sum(m.rows for _, m in caches.values()), "tokens": sum(m.tokens for _, m in caches.values()),
      "parts": len(caches["train"][1].parts), "teacher_calls": stats["teacher_calls"]}))
"""


def run_size(n_docs: int, args, model: Path, tmp: Path, address: str) -> dict:
    corpus = tmp / f"corpus-{n_docs}"
    corpus_bytes = write_corpus(corpus, n_docs, args.docs_per_file)
    cfg = {
        "data": {"source": "jsonl", "path": str(corpus), "id_column": None if args.no_id_column else "id",
                 "seq_len": args.seq_len, "min_tokens": 8,
                 "part_docs": args.docs_per_file, "splits": {"train": 0.9, "eval": 0.1}},
        "teacher": {"name": f"mem-teacher-{n_docs}", "model": str(model), "num_threads": 1, "num_cpus": 0.5},
        "labels": {"k": 8, "batch_size": 64, "cache_dir": str(tmp / f"cache-{n_docs}"), "num_labelers": 1},
        "student": {"keep_layers": [0, 3]},
    }
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg)], env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"driver for {n_docs} docs failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    res = json.loads(line[len("RESULT "):])
    res.update(docs=n_docs, corpus_bytes=corpus_bytes, growth=res["peak"] - res["baseline"])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=5000, help="N (the second run labels 10N)")
    p.add_argument("--docs-per-file", type=int, default=1000, help="also the part size (data.part_docs default: 1000)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--no-id-column", action="store_true", help="ids <file>:<row> (no cross-file id check)")
    p.add_argument("--out", default="bench_driver_memory.json")
    args = p.parse_args()

    import ray

    sys.path.insert(0, str(REPO))
    from tests.conftest import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="raykd-bench-mem-"))
    model = build_tiny_model(tmp / "tiny_teacher")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    try:
        rows = [run_size(n, args, model, tmp, address) for n in (args.docs, 10 * args.docs)]
    finally:
        ray.shutdown()
    small, large = rows
    extra_growth = large["growth"] - small["growth"]
    extra_bytes = large["corpus_bytes"] - small["corpus_bytes"]
    result = {"benchmark": "driver_memory", "rows": rows, "extra_growth_bytes": extra_growth, "extra_corpus_bytes": extra_bytes,
              "ratio": extra_growth / extra_bytes, "bound": 0.10, "holds": extra_growth <= 0.10 * extra_bytes,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"\n{'docs':>7} {'corpus MB':>10} {'parts':>6} {'driver growth MB':>17} {'label s':>8} {'teacher calls':>14}")
    for r in rows:
        print(f"{r['docs']:>7} {r['corpus_bytes'] / 1e6:>10.1f} {r['parts']:>6} {r['growth'] / 1e6:>17.1f} "
              f"{r['seconds']:>8.1f} {r['teacher_calls']:>14}")
    print(f"extra driver growth {extra_growth / 1e6:.2f} MB for {extra_bytes / 1e6:.1f} MB more corpus: "
          f"{result['ratio']:.3f} of the extra bytes (bound 0.10): {'holds' if result['holds'] else 'DOES NOT HOLD'}")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
