"""On-policy distillation against the served teacher on real inputs: off-policy KD, GKD and DistiLLM
with one budget, compared on held-out ppl, top-1 agreement, KL and a generation measure.

Every row runs a method's shipped config (``raykd/methods/configs/<m>.yaml``: SmolLM2-135M-Instruct
teacher, BBC News, the 6-of-30-layer student, the one shared soft-label cache) through ``raykd
distill`` with the same budget overrides, in one process (one Ray cluster). The on-policy rows keep
the teacher served during training and the student's samples are scored through its Serve handle.
``--init`` continues every row from one trained student (e.g. the demo's KD student) instead of
the untrained layer-dropped copy.

Generation measure: each student's greedy continuations (``--new-tokens``) of the first
``--prompt-tokens`` tokens of ``--prompts`` held-out blocks, scored by the teacher in this
process: its mean log-likelihood per generated token (higher: text the teacher finds likelier).

    .venv/bin/python benchmarks/bench_on_policy.py --steps 40 --init runs/demo/students/student_kd
    .venv/bin/python benchmarks/bench_on_policy.py --rows gkd_l1 --steps 40 ...   # one row, merged into the JSON

Results are merged into ``--out`` by row, so rows can run in several batches.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from raykd.config import DistillConfig, load_config
from raykd.methods import get_method, run_method

ROWS = {  # row -> (method, extra overrides)
    "kd": ("kd", []),
    "gkd_l0.5_b0.5": ("gkd", ["on_policy.on_policy_share=0.5", "train.loss_params.generalized_jsd.beta=0.5"]),
    "gkd_l1_b0.5": ("gkd", ["on_policy.on_policy_share=1.0", "train.loss_params.generalized_jsd.beta=0.5"]),
    "distillm": ("distillm", []),
}
COLUMNS = ("row", "objective", "on-policy share", "held-out ppl", "top-1 agreement", "KL(teacher, student)",
           "teacher log-lik / token of greedy continuations", "distinct-2", "steps (on-policy, replayed)", "train s")


def budget(args) -> list[str]:
    out = [f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", f"train.warmup_steps={args.warmup}",
           "teacher.keep_alive=true", f"on_policy.max_new_tokens={args.sample_tokens}"]
    if args.init:
        out += ["student.init=pretrained", f"student.model={Path(args.init).resolve()}"]
    return out + list(args.override)


def run_row(row: str, args, out_root: Path) -> dict:
    method, extra = ROWS[row]
    overrides = [o for o in budget(args) if method != "kd" or not o.startswith("on_policy.")] + extra
    cfg = load_config(DistillConfig, get_method(method).config_path, overrides)
    start = time.perf_counter()
    report = run_method(cfg, out_root / row)
    (student,) = report["students"]
    s = report[student]
    return {"row": row, "method": method, "objective": s["objective"], "loss_params": cfg.train.loss_params,
            "on_policy": cfg.on_policy.model_dump() if cfg.on_policy else None, "ppl": s["ppl"],
            "top1_agreement": s["top1_agreement"], "kl": s["kl"], "steps": s["steps"], "train_s": s["train_s"],
            "time_split": s.get("time_split"), "model_dir": s["model_dir"], "eval_path": report["cache"]["eval_path"],
            "teacher_path": report["cache"]["teacher"] and report["cache"]["teacher"].get("path"),
            "teacher_ppl": report["teacher"]["ppl"], "student_init": report["student_init"],
            "wall_s": time.perf_counter() - start}


def generation_quality(results: dict, args, cfg: DistillConfig) -> None:
    """Teacher log-likelihood per token of every row's greedy continuations (and the initial
    student's and the teacher's own, for scale), on the same held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from raykd.models import load_causal_lm, resolve_model_path
    from raykd.soft_labels.cache import open_cache, shard_paths
    from raykd.soft_labels.cache import iter_cache_batches
    from raykd.train.on_policy import teacher_loglik_of_continuations

    torch.manual_seed(0)
    any_row = next(iter(results["rows"].values()))
    folder = any_row["eval_path"]
    prompts = []
    for b in iter_cache_batches(shard_paths(folder, open_cache(folder)), 64):
        for ids, am in zip(b["input_ids"], b["attention_mask"]):
            prompts.append([int(t) for t in ids[:int(am.sum())][:args.prompt_tokens]])
        if len(prompts) >= args.prompts:
            break
    prompts = prompts[:args.prompts]
    teacher = load_causal_lm(resolve_model_path(cfg.teacher.model)).eval()
    judged = {name: row["model_dir"] for name, row in results["rows"].items()}
    judged["student_init"] = str(Path(args.init).resolve()) if args.init else None
    for name, path in judged.items():
        if path is None or (name in results["generation"] and not args.regenerate):
            continue
        student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results["generation"][name] = teacher_loglik_of_continuations(student, teacher, prompts, max_new_tokens=args.new_tokens)
        print(f"{name}: {results['generation'][name]}")
    if "teacher" not in results["generation"]:
        results["generation"]["teacher"] = teacher_loglik_of_continuations(teacher, teacher, prompts,
                                                                           max_new_tokens=args.new_tokens)
    results["generation_setup"] = {"prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
                                   "new_tokens": args.new_tokens, "decoding": "greedy, ends at EOS"}


def table(results: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    gen = results["generation"]
    for name in ("teacher", "student_init"):
        if name in gen:
            lines.append(f"| {name} | - | - | - | - | - | {gen[name]['teacher_logprob']:.3f} | {gen[name]['distinct_2']:.3f} | - | - |")
    for name, r in results["rows"].items():
        split = r["time_split"] or {}
        share = r["on_policy"]["on_policy_share"] if r["on_policy"] else 0.0
        obj = " + ".join(f"{w:g} {n}" for n, w in r["objective"].items())
        params = "; ".join(f"{k}={v}" for p in r["loss_params"].values() for k, v in p.items())
        g = gen.get(name, {})
        lines.append(
            f"| {name} | {obj}{' (' + params + ')' if params else ''} | {share:g} | {r['ppl']:.1f} | {r['top1_agreement']:.3f} | "
            f"{r['kl']:.3f} | {g.get('teacher_logprob', float('nan')):.3f} | {g.get('distinct_2', float('nan')):.3f} | "
            f"{r['steps']} ({split.get('on_policy_steps', 0)}, {split.get('replayed_steps', 0)}) | {r['train_s']:.0f} |")
    lines += ["", "| row | on-policy steps | sampling s | teacher wait s | update s | data s | teacher wait share "
              "(on-policy steps) | teacher calls |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        s = r["time_split"]
        if s:
            lines.append(f"| {name} | {s['on_policy_steps']} | {s['on_policy_sample_s']:.1f} | {s['on_policy_teacher_wait_s']:.1f} | "
                         f"{s['on_policy_update_s']:.1f} | {s['on_policy_data_s']:.1f} | {s['teacher_wait_share']:.3f} | "
                         f"{s['teacher_calls']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--sample-tokens", type=int, default=32, help="on_policy.max_new_tokens of the on-policy rows")
    p.add_argument("--init", help="continue every row from this student folder (default: the untrained layer drop)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--regenerate", action="store_true", help="recompute the generation measure of rows that have it")
    p.add_argument("--out", default="benchmarks/results/on_policy_bbc.json")
    p.add_argument("--run-root", default="runs/bench_on_policy")
    p.add_argument("--override", nargs="*", default=[], help="more dotted overrides for every row")
    args = p.parse_args()

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}, "generation": {}}
    rows = [r for r in args.rows.split(",") if r]
    try:
        for row in rows:
            print(f"== {row}")
            results["rows"][row] = run_row(row, args, Path(args.run_root))
            results["generation"].pop(row, None)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
    finally:
        from raykd.teacher.apps import stop_teacher

        try:
            import ray

            if ray.is_initialized():
                stop_teacher(load_config(DistillConfig, get_method("gkd").config_path).teacher.name)
        except Exception as e:  # noqa: BLE001
            print(f"could not stop the teacher: {e}")
    cfg = load_config(DistillConfig, get_method("gkd").config_path)
    generation_quality(results, args, cfg)
    results["setup"] = {"steps": args.steps, "init": args.init, "sample_tokens": args.sample_tokens,
                        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    out.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
