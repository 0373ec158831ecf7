"""Compare the distillation methods on real inputs with one budget: held-out perplexity and top-1
agreement with the teacher of each method's student.

Runs each method's config (``raykd/methods/configs/<m>.yaml``: SmolLM2-135M teacher, BBC News,
6-of-30-layer student) through ``raykd distill`` with the same budget overrides, one after the
other in one process (one Ray cluster; the teacher's soft-label cache is shared, so the teacher
labels the data once). Results are merged into ``<results>.json`` by method, so methods can be
run in several batches, and the whole table is rewritten to ``<results>.md`` each time.

    .venv/bin/python benchmarks/bench_methods.py --steps 40 --methods kd,pd,glmd
    # a second batch elsewhere, merged into the main table afterwards:
    .venv/bin/python benchmarks/bench_methods.py --methods tmkd --results runs/methods_b2
    .venv/bin/python benchmarks/bench_methods.py --methods "" --merge runs/methods_b2.json
    # sequence-level KD generates with the vLLM engine (much faster generation on CPU):
    .venv/bin/python benchmarks/bench_methods.py --methods seqkd --override teacher.engine=vllm generation.batch_size=32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from raykd.losses.registry import feature_terms
from raykd.config import DistillConfig, load_config
from raykd.methods import available_methods, get_method, run_method

COLUMNS = ("method", "params", "held-out ppl", "top-1 agreement", "KL(teacher, student)", "ppl before training", "steps",
           "train s", "objective")


def run_one(method: str, out_root: Path, budget: list[str]) -> dict:
    """Run one method's config with the budget overrides; return its table row."""
    cfg = load_config(DistillConfig, get_method(method).config_path, budget)
    start = time.perf_counter()
    report = run_method(cfg, out_root / method)
    wall_s = time.perf_counter() - start
    chain = {}
    if "final_vs_original_teacher" in report:  # a TA chain: the final stage's student, judged by the original teacher
        (student,) = report["final_vs_original_teacher"]
        judged = report["final_vs_original_teacher"][student]
        chain = {"stages": [{k: v for k, v in st.items() if k != "keep_layers"} for st in report["stages"]],
                 "teacher_ppl": report["teacher"]["ppl"]}
        report = json.loads((out_root / method / "student" / "report.json").read_text())
    else:
        (student,) = report["students"]
        judged = report[student]
    s = report[student]
    extra = {} if chain else {k: report[k] for k in report if k.startswith("teacher_")}
    prepare = report.get("prepare", {}).get("generations")
    return {
        "method": method, "student": student, "params": s["params"], "ppl": judged["ppl"],
        "top1_agreement": judged["top1_agreement"], "kl": judged["kl"], "student_init_kl": report["student_init"]["kl"],
        "steps": s["steps"], "train_s": s["train_s"],
        "objective": s["objective"], "phases": [p.model_dump(exclude_none=True) for p in cfg.train.phases],
        "teacher_ppl": report["teacher"]["ppl"],
        "student_init_ppl": report["student_init"]["ppl"],
        "extra_teachers": extra, "cache_hit": report["cache"]["hit"], "wall_s": wall_s,
        "eval_docs": report.get("data", {}).get("eval_docs"),
        **({"feature_cache": s["feature_cache"]} if s.get("feature_cache") else {}),
        **({"feature_teacher": "cached" if s.get("feature_cache") else "online"} if feature_terms(cfg.train.objective_terms()) else {}),
        **chain, **({"generations": prepare} if prepare else {}),
    }


def rescore(results: dict, out_root: Path, methods: list[str]) -> None:
    """Add the held-out KL(teacher, student) to rows measured before it was reported, from the
    students those runs exported (the ppl and agreement are recomputed and must match)."""
    from raykd.soft_labels.cache import open_cache, shard_paths
    from raykd.train.evaluate import evaluate_folder

    init_kl: dict[float, float] = {}
    for m in methods:
        row, run = results["methods"][m], out_root / m
        report = json.loads((run / ("student/report.json" if "stages" in row else "report.json")).read_text())
        folder = Path(report["cache"]["eval_path"])
        files = shard_paths(folder, open_cache(folder))
        init = run / ("student/student_init" if "stages" in row else "student_init")
        got = evaluate_folder(Path(report[row["student"]]["model_dir"]), files, vocab_dir=init)
        if "stages" not in row and abs(got["ppl"] - row["ppl"]) > 1e-3 * row["ppl"]:
            raise RuntimeError(f"{m}: rescored ppl {got['ppl']:.2f} != reported {row['ppl']:.2f}; is {run} another run?")
        if row["student_init_ppl"] not in init_kl:  # the same untrained student (same ppl): score it once
            init_kl[row["student_init_ppl"]] = evaluate_folder(init, files)["kl"]
        row["kl"], row["student_init_kl"] = got["kl"], init_kl[row["student_init_ppl"]]
        print(f"{m}: kl {row['kl']:.3f} (untrained {row['student_init_kl']:.3f})", flush=True)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _terms(weights: dict) -> str:
    return " + ".join(f"{w:g} {n}" for n, w in weights.items() if w) or "-"


def _phase(p: dict) -> str:
    """One phase in a few words: ``to 70%: 1 forward_kl, tau 4->1``."""
    text = f"to {p['until']:.0%}: " + (_terms(p["weights"]) if p.get("weights") else "own objective")
    if p.get("weights_end"):
        text += f" -> {_terms(p['weights_end'])}"
    if p.get("temperature") is not None:
        text += f", tau {p['temperature']:g}" + (f"->{p['temperature_end']:g}" if p.get("temperature_end") else "")
    return text


def write_table(results: dict, path_md: Path) -> str:
    rows = [results["methods"][m] for m in available_methods() if m in results["methods"]]
    b = results["budget"]
    lines = [
        f"# Distillation methods on BBC News, SmolLM2-135M-Instruct teacher ({b['machine']})", "",
        f"Budget per method: {b['steps']} steps x batch {b['batch_size']} x {b['seq_len']} tokens "
        f"({b['steps'] * b['batch_size']} blocks), AdamW lr {b['lr']}; student = 6 of 30 teacher layers; "
        f"held-out: {rows[0].get('eval_docs', b.get('eval_docs'))} articles. Teacher ppl {rows[0]['teacher_ppl']:.2f} (agreement 1.0), "
        f"untrained student ppl {rows[0]['student_init_ppl']:,.0f}"
        + (f", KL {rows[0]['student_init_kl']:.3f}" if rows[0].get("student_init_kl") is not None else "")
        + ". KL(teacher, student): nats per token over the teacher's top-32 + tail buckets." if rows else "", "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        objective = _terms(r["objective"]) + "".join(f"; {_phase(p)}" for p in r["phases"])
        lines.append(f"| {r['method']} | {r['params'] / 1e6:.1f}M | {r['ppl']:.1f} | {r['top1_agreement']:.3f} | {_num(r.get('kl'))} | "
                     f"{r['student_init_ppl']:,.0f} | {r['steps']} | {r['train_s']:.0f} | {objective} |")
    extra = {name: t for r in rows for name, t in r["extra_teachers"].items()}
    for name, t in extra.items():
        lines.append(f"\nMulti-teacher rows add `{name.removeprefix('teacher_')}` ({t['model']}): held-out ppl "
                     f"{t['ppl']:.1f}, top-1 agreement with the first teacher {t['top1_agreement']:.3f}.")
    for r in rows:
        if r.get("overrides"):
            lines.append(f"\n`{r['method']}` ran with `{' '.join(r['overrides'])}`.")
        if r.get("feature_teacher") == "online":
            lines.append(f"`{r['method']}`: the teacher ran in the Train worker for its features (train.feature_teacher).")
        if r.get("feature_cache"):
            fc = r["feature_cache"]
            filled = "a hit" if fc["hit"] else f"filled by the teacher in {fc['seconds']:.0f} s"
            lines.append(f"`{r['method']}`: teacher features from the feature cache ({fc['bytes_per_token']:,.0f} B/token "
                         f"on disk; {filled}).")
        if r.get("generations"):
            g = r["generations"]
            lines.append(f"`{r['method']}` trained on {g['rows']} teacher continuations ({g['new_tokens']:,} generated tokens).")
        for st in r.get("stages", [])[:-1]:
            m = st[st["stage"]]
            lines.append(f"\n`{r['method']}` stage `{st['stage']}` ({m['params'] / 1e6:.1f}M params, {m['steps']} steps, "
                         f"taught by {len(st['teachers'])} teacher(s)): held-out ppl {m['ppl']:.1f}, top-1 agreement "
                         f"with the teacher {m['top1_agreement']:.3f}; it then taught the final student.")
    text = "\n".join(lines) + "\n"
    path_md.write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(available_methods()), help="comma-separated method names")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out-dir", default="runs/bench_methods")
    p.add_argument("--results", default="benchmarks/results/methods", help="path without .json/.md")
    p.add_argument("--override", nargs="*", default=[],
                   help="extra dotted key=value overrides for the methods of this batch (recorded in their rows)")
    p.add_argument("--rescore", action="store_true",
                   help="only add the held-out KL to existing rows, from the students their runs exported")
    p.add_argument("--merge", nargs="*", default=[], help="results JSON files of other batches to merge in")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m)  # unknown names fail here, listing the valid ones
    budget = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
              f"train.checkpoint_every={args.steps}", f"train.warmup_steps={max(1, args.steps // 10)}"]
    results_json = Path(args.results + ".json")
    results = json.loads(results_json.read_text()) if results_json.exists() else {"methods": {}}
    base = load_config(DistillConfig, get_method("kd").config_path, budget)
    results["budget"] = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": base.data.seq_len,
                         "lr": base.train.lr,
                         "machine": f"{platform.machine()}, CPU only"}
    results_json.parent.mkdir(parents=True, exist_ok=True)
    for other in args.merge:
        results["methods"].update(json.loads(Path(other).read_text())["methods"])
    if args.merge:
        results_json.write_text(json.dumps(results, indent=2))
    if args.rescore:
        rescore(results, Path(args.out_dir), [m for m in methods if m in results["methods"]])
        results_json.write_text(json.dumps(results, indent=2))
        methods = []
    for m in methods:
        print(f"=== method {m} ===", flush=True)
        row = run_one(m, Path(args.out_dir), budget + args.override)
        row["overrides"] = args.override
        if results_json.exists():  # another batch may have written meanwhile: keep its rows
            results["methods"] = {**json.loads(results_json.read_text())["methods"], **results["methods"]}
        results["methods"][m] = row
        results_json.write_text(json.dumps(results, indent=2))
    print(write_table(results, Path(args.results + ".md")), flush=True)


if __name__ == "__main__":
    main()
