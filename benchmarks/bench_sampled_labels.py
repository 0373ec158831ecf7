"""Sampled soft labels against top-32 on the demo: bytes per token on disk, and the student's
held-out perplexity and calibration (ECE), over several seeds.

Arms, each a ``raykd distill`` of the demo config (``jobs/configs/bbc_smollm2.yaml``: SmolLM2-135M
teacher, BBC News, 6-of-30-layer student) with one student trained on ``{forward_kl: 1.0}``, the
objective of the issue-27 peer table, at the demo's budget unless overridden:

- ``topk``: the cache's top-32 log-probs and tail (``labels.form=topk``, the demo's labels);
- ``sampled``: 32 independent draws per position from the teacher's whole distribution, stored
  as distinct ids and counts (``labels.form=sampled``, Anshumann et al. 2025); ``labels.seed`` =
  the seed, so each seed has its own draws (and its own cache);
- ``systematic``: the same with ``labels.draws=systematic`` (one uniform, 32 evenly spaced points
  through the teacher's cumulative distribution: the same expected counts, least variance);
- ``systematic64``: systematic draws with 64 points per position (``labels.samples=64``);
- ``full``: the teacher in the Train worker, dense targets over the whole vocabulary
  (``train.online_teacher``): the full-vocabulary KL the two caches approximate.

Seed ``s`` sets ``train.seed`` (the batch order) for every arm. The runs go seed by seed, the arms
alternating, in one process (one Ray cluster; the top-32 cache is labeled once and shared). One
function then scores every trained student on the same held-out blocks, the top-32 eval cache:
perplexity of the real next tokens, ECE of the student's top-1 next-token probability (15 bins),
top-1 agreement with the teacher and KL over the teacher's top-32 + tail buckets.

    .venv/bin/python benchmarks/bench_sampled_labels.py --out-dir /work/runs/h27s/bench
    .venv/bin/python benchmarks/bench_sampled_labels.py --arms topk,sampled --seeds 0 --override train.max_steps=20

Prints a table (mean and standard deviation over seeds) and writes every run's numbers and the
summary to ``--json`` (runs already in it are kept, so arms and seeds can be run in batches;
``--arms ""`` only rescores the runs there). Times are recorded per run (``train_s``,
``label_s``) but not tabled: on a shared machine they measure the other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq

from raykd.config import DistillConfig
from raykd.methods import load, run_method
from raykd.soft_labels.cache import iter_cache_batches, open_cache, shard_paths
from raykd.train.evaluate import evaluate_folder

ARMS = {
    "topk": ["labels.form=topk", "labels.k=32"],
    "sampled": ["labels.form=sampled", "labels.samples=32", "labels.draws=independent"],
    "systematic": ["labels.form=sampled", "labels.samples=32", "labels.draws=systematic"],
    "systematic64": ["labels.form=sampled", "labels.samples=64", "labels.draws=systematic"],
    "full": ["labels.form=topk", "labels.k=32", "train.online_teacher=true"],
}
SAMPLED = ("sampled", "systematic", "systematic64")
"""The arms that label a sampled cache of their own per seed."""
STUDENT = "student"
METRICS = ("ppl", "ece", "top1_agreement", "kl")


def run_one(config: str, arm: str, seed: int, out_root: Path, overrides: list[str]) -> dict:
    """Distil one student of ``arm`` with ``seed``; return its row (cache size, train time, folders)."""
    extra = [f"labels.seed={seed}"] if arm in SAMPLED else []
    cfg = load(DistillConfig, config, [*ARMS[arm], *extra, f"train.seed={seed}", f"run_name={arm}_s{seed}",
                                       f"train.students={{{STUDENT}: {{forward_kl: 1.0}}}}",
                                       f"labels.cache_dir={out_root / 'cache'}", *overrides])
    start = time.perf_counter()
    report = run_method(cfg, out_root / f"{arm}_s{seed}")
    c, s = report["cache"], report[STUDENT]
    return {"arm": arm, "seed": seed, "wall_s": time.perf_counter() - start, "train_s": s["train_s"], "steps": s["steps"],
            "bytes_per_token": c["bytes_per_token"], "cache": c["path"], "eval_cache": c["eval_path"],
            "model_dir": s["model_dir"], "label_s": report["timings"].get("label_s"), "own": {k: s[k] for k in METRICS},
            "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len, "train_rows": c["rows"]}


def distinct_per_position(cache: str) -> float:
    """Mean distinct ids per labeled position of a sampled cache (its decoded non-padding slots)."""
    slots, positions = 0, 0
    for b in iter_cache_batches(shard_paths(cache, open_cache(cache)), 256):
        m = b["attention_mask"].astype(bool)
        slots += int((b["topk_ids"][m] >= 0).sum())
        positions += int(m.sum())
    return slots / max(positions, 1)


def column_bytes_per_token(cache: str) -> dict[str, float]:
    """Bytes on disk per real token of each column of a cache's shards (compressed column
    chunks, from the Parquet footers; the rest of the bytes is footers and page headers)."""
    manifest = open_cache(cache)
    sizes: dict[str, int] = {}
    for path in shard_paths(cache, manifest):
        meta = pq.read_metadata(path)
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                sizes[col.path_in_schema.split(".")[0]] = sizes.get(col.path_in_schema.split(".")[0], 0) + col.total_compressed_size
    return {name: size / manifest.tokens for name, size in sizes.items()}


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per arm: mean and standard deviation over seeds of each metric, bytes per token, seeds."""
    out = {}
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm and "eval" in r]
        if not rows:
            continue
        entry = {"seeds": sorted(r["seed"] for r in rows), "train_s": statistics.mean(r["train_s"] for r in rows)}
        for m in METRICS:
            values = [r["eval"][m] for r in rows]
            entry[m] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
        entry["bytes_per_token"] = None if arm == "full" else statistics.mean(r["bytes_per_token"] for r in rows)
        if arm != "full":
            entry["column_bytes_per_token"] = {c: statistics.mean(r["column_bytes_per_token"][c] for r in rows)
                                               for c in rows[0]["column_bytes_per_token"]}
        if arm in SAMPLED:
            entry["distinct_ids_per_position"] = statistics.mean(r["distinct_ids_per_position"] for r in rows)
        out[arm] = entry
    return out


def table(summary: dict[str, dict], budget: dict) -> str:
    """The Markdown table of :func:`summarize` (mean +- sd over the seeds)."""
    def pm(e: dict, m: str, digits: int) -> str:
        return f"{e[m]['mean']:.{digits}f} +- {e[m]['sd']:.{digits}f}"

    lines = [f"Budget: {budget['steps']} steps x batch {budget['batch_size']} x {budget['seq_len']} tokens, objective "
             f"forward_kl 1.0, {budget['machine']}; held-out: the top-32 eval cache ({budget['eval_tokens']:,} positions).", "",
             "| arm | cache B/token | distinct ids / position | held-out ppl | ECE | top-1 agreement | KL(top-32 buckets) | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    names = {"topk": "top-32", "sampled": "sampled, S = 32, independent draws", "systematic": "sampled, S = 32, systematic draws",
             "systematic64": "sampled, S = 64, systematic draws",
             "full": "full vocabulary (teacher online)"}
    for arm, e in summary.items():
        size = "-" if e["bytes_per_token"] is None else f"{e['bytes_per_token']:.1f}"
        distinct = f"{e['distinct_ids_per_position']:.1f}" if "distinct_ids_per_position" in e else "-"
        lines.append(f"| {names[arm]} | {size} | {distinct} | {pm(e, 'ppl', 1)} | {pm(e, 'ece', 4)} | "
                     f"{pm(e, 'top1_agreement', 3)} | {pm(e, 'kl', 3)} | {len(e['seeds'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="jobs/configs/bbc_smollm2.yaml")
    p.add_argument("--arms", default="topk,sampled,full", help=f"comma-separated, of {list(ARMS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--override", nargs="*", default=[], help="dotted key=value overrides for every arm (the budget)")
    p.add_argument("--out-dir", default="runs/bench_sampled_labels")
    p.add_argument("--json", default="benchmarks/results/sampled_labels.json")
    args = p.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if bad := sorted(set(arms) - set(ARMS)):
        raise SystemExit(f"error: unknown arms {bad}; valid: {list(ARMS)}")
    out_root, path = Path(args.out_dir), Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    for seed in args.seeds:  # seed by seed, the arms alternating
        for arm in arms:
            print(f"=== {arm}, seed {seed} ===", flush=True)
            row = run_one(args.config, arm, seed, out_root, args.override)
            if arm in SAMPLED:
                row["distinct_ids_per_position"] = distinct_per_position(row["cache"])
            results["runs"] = [r for r in results["runs"] if (r["arm"], r["seed"]) != (arm, seed)] + [row]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
    eval_cache = next(r["eval_cache"] for r in results["runs"]  # a top-32 eval cache still on disk
                      if r["arm"] not in SAMPLED and Path(r["eval_cache"]).is_dir())
    files = shard_paths(eval_cache, open_cache(eval_cache))
    for r in results["runs"]:  # one scoring of every student, on the same held-out blocks and labels
        if not Path(r["model_dir"]).is_dir():  # an earlier batch's run whose folders are gone: its scores stay
            continue
        r["eval"] = evaluate_folder(Path(r["model_dir"]), files)
        r["column_bytes_per_token"] = column_bytes_per_token(r["cache"])
    any_run = results["runs"][0]
    results["budget"] = {"steps": any_run["steps"], "batch_size": any_run["batch_size"], "seq_len": any_run["seq_len"],
                         "overrides": args.override, "eval_tokens": any_run["eval"]["tokens"],
                         "machine": f"{os.cpu_count()}-core {platform.machine()} CPU"}
    results["summary"] = summarize(results["runs"])
    path.write_text(json.dumps(results, indent=2, default=float))
    print(table(results["summary"], results["budget"]), flush=True)


if __name__ == "__main__":
    main()
