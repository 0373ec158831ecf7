"""Cache misses filled live (``labels.fill=live``) against label-then-train, on real inputs.

The shipped BBC config (``jobs/configs/bbc_smollm2.yaml``: SmolLM2-135M-Instruct served, BBC
News, the 6-of-30-layer student) with small overrides, one student, ``train.shuffle=false``, in
one process (one Ray cluster):

1. the full soft-label cache of the run is labeled once (not timed; kept under ``--root`` and
   resumed from its ledger if an earlier attempt was interrupted);
2. two copies of it lose every other part (ledger entry and shard) and their manifests: a cache
   with half of the documents' parts;
3. ``before``: the run on one half cache with ``labels.fill=before`` (label the missing half, then
   train on the finished cache);
4. ``live``: the run on the other half cache with ``labels.fill=live`` (train at once, the missing
   half labeled by the served teacher as training reaches it; what training does not reach, after).

Reported per row: wall time of the whole run, labeling and training time, the steps' summed wait
for data (``data_s`` of the history) and its share of the training time. The share of the live
run's training time that waited for labels = (live data wait - before data wait, which reads a
finished cache) / live training time. The two students saw the same rows in the same order: the
max |weight difference| between them is reported.

    .venv/bin/python benchmarks/bench_live_fill.py --sample 0.06 --part-docs 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def half_cache(plan, src_root: Path, dst_root: Path) -> dict:
    """Copy the plan's caches from ``src_root`` to ``dst_root`` without every other part."""
    from raykd.soft_labels.cache import (
        MANIFEST,
        cache_dir_for,
        ledger_file,
        part_file,
        read_entry,
    )

    dropped = [p.digest() for p in plan.sources["train"][1]][1::2]
    docs = 0
    for key in plan.keys.values():
        src, dst = cache_dir_for(str(src_root), key), cache_dir_for(str(dst_root), key)
        shutil.copytree(src, dst)
        Path(dst, MANIFEST).unlink()
        for part in dropped:
            docs += len(read_entry(dst, part, key)["doc_ids"])
            Path(ledger_file(dst, part)).unlink()
            Path(part_file(dst, part)).unlink(missing_ok=True)
    return {"parts_dropped": len(dropped), "parts": len(plan.sources["train"][1]), "docs_dropped": docs}


def weights(report: dict, student: str):
    from safetensors.torch import load_file

    return load_file(str(Path(report[student]["model_dir"]) / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample", type=float, default=0.06, help="data.sample (share of the 2,225 articles)")
    ap.add_argument("--part-docs", type=int, default=200, help="data.part_docs (articles per part)")
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (default: one epoch of the train cache)")
    ap.add_argument("--root", default="runs/live_fill", help="folder of the caches and run outputs (deleted first)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/live_fill_bbc.json"))
    ap.add_argument("--override", nargs="*", default=[], help="more dotted overrides for every run")
    args = ap.parse_args()

    from raykd.cluster import connect
    from raykd.config import DistillConfig, load_config
    from raykd.recipes.lm.distill import run_distill
    from raykd.soft_labels.plan import Plan, ensure_soft_labels

    root = Path(args.root).resolve()
    for old in ("before", "live", "out"):  # the full cache is kept (an interrupted labeling resumes)
        shutil.rmtree(root / old, ignore_errors=True)
    base = [f"data.sample={args.sample}", f"data.part_docs={args.part_docs}", "train.shuffle=false",
            "train.students={student_kd: {forward_kl: 0.5, ce: 0.5}}", "ray.num_cpus=4", *args.override]

    def config(cache: str, *extra: str) -> DistillConfig:
        return load_config(DistillConfig, REPO / "jobs/configs/bbc_smollm2.yaml",
                           [*base, f"labels.cache_dir={root / cache}", *extra])

    probe = config("full")
    connect(probe.ray)
    plan = Plan(probe)
    t0 = time.perf_counter()
    caches, _ = ensure_soft_labels(plan)
    full_label_s = time.perf_counter() - t0
    rows = caches["train"][1].rows
    steps = args.steps or rows // probe.train.batch_size
    budget = [f"train.max_steps={steps}", f"train.checkpoint_every={steps}", f"train.warmup_steps={max(1, steps // 10)}"]
    halves = {name: half_cache(plan, root / "full", root / name) for name in ("before", "live")}

    results: dict = {"rows": {}}
    for name, cache, extra in (("before", "before", ["labels.fill=before"]), ("live", "live", ["labels.fill=live"])):
        cfg = config(cache, *budget, *extra)
        load = os.getloadavg()
        start = time.perf_counter()
        report = run_distill(cfg, root / "out" / name)
        wall = time.perf_counter() - start
        s, c = report["student_kd"], report["cache"]
        results["rows"][name] = {
            "fill": cfg.labels.fill, "wall_s": wall, "label_s": report["timings"]["label_s"],
            "train_s": report["timings"]["train_s"], "eval_s": report["timings"]["eval_s"],
            "student_train_s": s["train_s"], "data_wait_s": s["data_wait_s"], "data_wait_share": s["data_wait_share"],
            "teacher_calls": c["teacher_calls"], "cache_hit": c["hit"], "parts": c.get("parts"),
            "parts_live": c.get("parts_live"), "parts_after": c.get("parts_after"),
            "ppl": s["ppl"], "top1_agreement": s["top1_agreement"], "kl": s["kl"], "steps": s["steps"],
            "load_avg_before": load, "load_avg_after": os.getloadavg(), "model_dir": s["model_dir"]}
        results["rows"][name]["_report"] = report

    r = results["rows"]
    before_w = weights(r["before"].pop("_report"), "student_kd")
    results["max_weight_diff_live_vs_before"] = max_diff(weights(r["live"].pop("_report"), "student_kd"), before_w)
    live = r["live"]
    results.update(
        date=time.strftime("%Y-%m-%d"), machine=f"{platform.node()} ({os.cpu_count()} cores)",
        config="jobs/configs/bbc_smollm2.yaml", overrides=base + budget, train_rows=rows, steps=steps,
        batch_size=probe.train.batch_size, halves=halves, full_label_s=full_label_s,
        live_wall_over_before=live["wall_s"] / r["before"]["wall_s"],
        live_label_wait_s=live["data_wait_s"] - r["before"]["data_wait_s"],
        live_label_wait_share=(live["data_wait_s"] - r["before"]["data_wait_s"]) / live["student_train_s"],
        command="python benchmarks/bench_live_fill.py " + " ".join(
            [f"--sample {args.sample}", f"--part-docs {args.part_docs}"] + ([f"--steps {args.steps}"] if args.steps else [])
            + ([f"--override {' '.join(args.override)}"] if args.override else [])))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print("| row | fill | wall s | label s | train s | data wait s | data wait share | teacher calls | ppl | agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, x in r.items():
        print(f"| {name} | {x['fill']} | {x['wall_s']:.0f} | {x['label_s']:.0f} | {x['student_train_s']:.0f} | "
              f"{x['data_wait_s']:.1f} | {x['data_wait_share']:.3f} | {x['teacher_calls']} | {x['ppl']:.1f} | "
              f"{x['top1_agreement']:.3f} |")
    print(f"live / before wall time: {results['live_wall_over_before']:.3f}; share of live training time waiting "
          f"for labels: {results['live_label_wait_share']:.3f}; max |w_live - w_before| "
          f"{results['max_weight_diff_live_vs_before']:.2e}")


if __name__ == "__main__":
    main()
