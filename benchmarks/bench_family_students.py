"""The family's student architectures on BBC News topics (classification, i.e. encoder, students):
an ALBERT-style student (factorised embedding, one shared block) and a MobileBERT-style student
(bottleneck blocks, progressive layer-wise transfer then KD), against the layer-dropped 3-layer
student's ``kd`` row of ``bench_feature_methods.py``.

Same teacher, data, split and low-data budget as ``benchmarks/bench_feature_methods.py`` (its
helpers are imported): all-MiniLM-L6-v2 fine-tuned on all training articles; students see
``--share`` of them; test accuracy of the final step, per seed.

- ALBERT: :func:`raykd.students.family.albert_student` (``E = --albert-embedding``, ``--albert-layers``
  blocks sharing one block copied from teacher layer ``--share-from``; ``auto`` picks the layer
  whose student has the best step-0 accuracy on the *training* articles), ``--steps`` steps
  (the feature table's budget), lr ``--lr``; rows KD and KD + TinyBERT on TinyBERT's uniform map
  (student block ``m`` <-> teacher block ``(m + 1) L_t / L_s - 1``); and KD with ``E = H`` (the
  teacher's embeddings exactly: the shared block's effect without the factorisation's).
- MobileBERT: :func:`raykd.students.family.mobilebert_student` (as deep as the teacher, intra-block
  width ``H / 4``), each of the ``--mobilebert-steps`` budgets (default 140 and 700 steps, 7 and 36 epochs of the 156 articles) at lr ``--mobilebert-lr`` (its blocks start
  random: a larger budget than the other rows, stated in the results); rows KD only, and PKT
  (:class:`raykd.train.progressive.ProgressiveTransfer`, ``L + 1`` stages) then KD.

    .venv/bin/python benchmarks/bench_family_students.py --seq-len 32 --test-every 2

Writes ``benchmarks/results/family_students_bbc.json`` and ``.md`` (``--results`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_feature_methods import KD, KEEP, batches, load, teacher_cache  # noqa: E402  (the same data and teacher)

from raykd.losses import Objective  # noqa: E402
from raykd.losses.features import LayerMap  # noqa: E402
from raykd.students.build import count_parameters, layer_drop, transformer_layers  # noqa: E402
from raykd.students.family import albert_student, mobilebert_student, truncated_svd_embedding  # noqa: E402
from raykd.train.features import capture_features  # noqa: E402
from raykd.train.local import accuracy, class_batch  # noqa: E402
from raykd.train.progressive import ProgressiveTransfer  # noqa: E402
from raykd.train.step import build_optimizer, classifier_logits, run_steps  # noqa: E402

ROWS = ("albert_kd", "albert_kd+tinybert", "albert_fullE_kd", "mobilebert_kd", "mobilebert_pkt_kd", "mobilebert_random_pkt_kd")


def uniform_map(student_layers: int, teacher_layers: int) -> LayerMap:
    """TinyBERT's uniform mapping: student block ``m`` <-> the last teacher block of its group."""
    return LayerMap(tuple((m, (m + 1) * teacher_layers // student_layers - 1) for m in range(student_layers)),
                    student_layers, teacher_layers)


def embedding_size(row: str, teacher, args) -> int:
    """``E`` of an ALBERT row (``fullE``: the teacher's width, sharing without factorising)."""
    return teacher.config.hidden_size if "fullE" in row else args.albert_embedding


def build(row: str, teacher, args, share_from: int, steps: int):
    """``(student, objective or PKT schedule, steps, lr)`` of a row."""
    n_t = teacher.config.num_hidden_layers
    if row.startswith("albert"):
        student = albert_student(teacher, embedding_size=embedding_size(row, teacher, args), num_layers=args.albert_layers,
                                 share_from=share_from)
        lm = uniform_map(args.albert_layers, n_t)
        weights = {**KD, "tinybert": 1.0} if row.endswith("tinybert") else KD
        return student, Objective(weights, layer_map=lm if "tinybert" in weights else None), steps, args.lr
    student = mobilebert_student(teacher, init="random" if "random" in row else "teacher")
    lm = LayerMap(tuple((i, i) for i in range(n_t)), n_t, n_t)
    if "pkt" in row:
        return student, ProgressiveTransfer(lm, steps, lower_lr=args.lower_lr, kd_weights=KD,
                                            temperature=args.temperature), steps, args.mobilebert_lr
    return student, Objective(KD), steps, args.mobilebert_lr


def train_row(row, teacher, data, test, cached, args, seed: int, share_from: int, steps: int):
    """One student: built, trained through the shared loop, tested: its accuracy, s/step, final loss,
    parameters, steps, lr and (PKT) the loss at the end of every stage."""
    torch.manual_seed(seed)
    student, plan, steps, lr = build(row, teacher, args, share_from, steps)
    if "random" not in row:  # frozen word embeddings, as the feature table's students
        student.get_input_embeddings().weight.requires_grad_(False)
    if isinstance(plan, ProgressiveTransfer):
        optimizer, scheduler = plan.optimizer(student, transformer_layers(student), lr=lr)
        objective_at = plan.objective_at
    else:
        optimizer, scheduler = build_optimizer([p for p in student.parameters() if p.requires_grad], lr=lr)
        objective_at = lambda _step: (plan, args.temperature)  # noqa: E731
    groups = batches(data, cached if objective_at(0)[0].needs_features or isinstance(plan, ProgressiveTransfer) else None,
                     args.batch_size, steps, seed)
    start = time.perf_counter()
    history = run_steps(student, optimizer, lambda _tau: next(groups), objective_at, max_steps=steps,
                        logits_fn=classifier_logits, scheduler=scheduler, max_grad_norm=1.0)
    per_step = (time.perf_counter() - start) / steps
    stage_losses = None
    if isinstance(plan, ProgressiveTransfer):  # the loss at the end of every stage
        ends = [s - 1 for s in plan.stage_starts()[1:]] + [steps - 1]
        stage_losses = [round(history[t]["loss"], 4) for t in ends]
    return {"acc": accuracy(student, test), "s_per_step": per_step, "final_loss": history[-1]["loss"],
            "params": count_parameters(student), "steps": steps, "lr": lr, "stage_losses": stage_losses}


@torch.no_grad()
def pick_share_from(teacher, data, args, e: int) -> tuple[int, list[dict]]:
    """The teacher layer whose one-block ALBERT student has the best step-0 training accuracy
    (ties: the lower cross-entropy); the training articles only, never the test set."""
    scores = []
    b = class_batch(data, np.arange(len(data["label"])))
    for j in range(teacher.config.num_hidden_layers):
        student = albert_student(teacher, embedding_size=e, num_layers=args.albert_layers, share_from=j)
        logits = classifier_logits(student, b.inputs)[:, 0]
        ce = float(torch.nn.functional.cross_entropy(logits, b.labels[:, 0]))
        scores.append({"share_from": j, "train_acc_step0": accuracy(student, data), "train_ce_step0": round(ce, 4)})
    best = max(scores, key=lambda s: (s["train_acc_step0"], -s["train_ce_step0"]))
    return best["share_from"], scores


@torch.no_grad()
def embedding_errors(teacher, data, args) -> dict:
    """Relative errors of the factorised embeddings: of the word-embedding matrix at rank ``E``
    (MobileBERT's, uncentred) and ``E - 1`` (ALBERT's, centred), and of ALBERT's embedding output
    against the teacher's on the training articles' real tokens."""
    w = teacher.get_input_embeddings().weight
    e = args.albert_embedding
    b = class_batch(data, np.arange(min(64, len(data["label"]))))
    mask = b.inputs["attention_mask"].bool()
    out = []
    for model in (teacher, albert_student(teacher, embedding_size=e, num_layers=1)):
        with capture_features(model, b.inputs) as cap:
            model(**b.inputs)
        out.append(cap.features.embeddings[mask])
    return {"word_rank_E": truncated_svd_embedding(w, e).relative_error,
            "word_centred_rank_E_minus_1": truncated_svd_embedding(w, e - 1, centre=True).relative_error,
            "albert_embedding_output": float((out[1] - out[0]).norm() / out[0].norm())}


def to_markdown(results: dict) -> str:
    s = results["setup"]
    ref = results["reference"]
    lines = [f"BBC News, 5 topics, classification students; teacher all-MiniLM-L6-v2 fine-tuned (test acc "
             f"{results['teacher_test_acc']:.3f}, {results['params']['teacher'] / 1e6:.1f}M parameters); student data "
             f"{s['student_articles']} articles ({s['share']:.0%} of train), batch {s['batch_size']}, T = {s['seq_len']}, "
             f"KD tau {s['temperature']}; {len(s['seeds'])} seeds; {s['test_articles']} test articles; final-step accuracy.",
             "", "| student | training | params | steps x lr | test accuracy (mean ± std) | per seed | s/step |",
             "|---|---|---|---|---|---|---|",
             f"| layer-dropped, teacher layers {KEEP} (feature table) | {ref['row']} `{json.dumps(ref['weights'])}` | "
             f"{results['params']['layer_drop'] / 1e6:.2f}M | {ref['steps']} x {ref['lr']} | "
             f"{np.mean(ref['acc']):.3f} ± {np.std(ref['acc']):.3f} | {', '.join(f'{a:.3f}' for a in ref['acc'])} | "
             f"{np.mean(ref['s_per_step']):.2f} |"]
    for r in results["rows"]:
        acc = np.asarray(r["acc"])
        name = r["student"] + (f", shared block = teacher layer {r['share_from']}" if r.get("share_from") is not None else "")
        lines.append(f"| {name} | {r['training']} | {r['params'] / 1e6:.2f}M | {r['steps']} x {r['lr']} | "
                     f"{acc.mean():.3f} ± {acc.std():.3f} | {', '.join(f'{a:.3f}' for a in acc)} | "
                     f"{np.mean(r['s_per_step']):.2f} |")
    err = results["embedding_errors"]
    scores = "; ".join(f"E = {e}: " + ", ".join(f"{x['share_from']}: {x['train_acc_step0']:.3f}" for x in sc)
                       for e, sc in s["share_from_scores"].items())
    lines += ["", f"Factorised embeddings (E = {s['albert_embedding']}): word-embedding relative error "
              f"{err['word_rank_E']:.3f} at rank E (MobileBERT), {err['word_centred_rank_E_minus_1']:.3f} centred at rank "
              f"E - 1 (ALBERT); ALBERT's embedding output vs the teacher's: {err['albert_embedding_output']:.3f}. "
              f"ALBERT's shared block from teacher layer {s['share_from']} (E: layer; {s['share_from_rule']}; step-0 "
              f"training accuracy per layer: {scores})."]
    return "\n".join(lines) + "\n"


STUDENTS = {"albert_kd": ("ALBERT-style", "KD"), "albert_kd+tinybert": ("ALBERT-style", "KD + tinybert (uniform map)"),
            "albert_fullE_kd": ("ALBERT-style, E = H (shared block, embedding not factorised)", "KD"),
            "mobilebert_kd": ("MobileBERT-style, teacher-initialised embeddings", "KD"),
            "mobilebert_pkt_kd": ("MobileBERT-style, teacher-initialised embeddings", "PKT then KD"),
            "mobilebert_random_pkt_kd": ("MobileBERT-style, random init", "PKT then KD")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--share", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=25, help="steps of the ALBERT rows (the feature table's budget)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--teacher-seq-len", type=int, default=128)
    p.add_argument("--test-every", type=int, default=2)
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--albert-embedding", type=int, default=128)
    p.add_argument("--albert-layers", type=int, default=3)
    p.add_argument("--share-from", default="auto", help="teacher layer of ALBERT's shared block, or auto")
    p.add_argument("--mobilebert-steps", default="140,700",
                   help="budgets of the MobileBERT rows, comma-separated (140: 7 PKT stages of 20; 700: of 100)")
    p.add_argument("--mobilebert-lr", type=float, default=1e-3)
    p.add_argument("--lower-lr", type=float, default=0.1, help="PKT's lr factor of the blocks below the current one")
    p.add_argument("--reference", default="benchmarks/results/feature_methods_bbc.json")
    p.add_argument("--results", default="benchmarks/results/family_students_bbc")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows, seeds = [r for r in args.rows.split(",") if r], [int(s) for s in args.seeds.split(",")]
    teacher, _labels, folder, train, test, n_train_all = load(args)
    teacher_acc = accuracy(teacher, test)
    print(f"teacher {folder.name}: test acc {teacher_acc:.3f}; student rows {len(train['label'])}, test {len(test['label'])}")
    share = {}  # E -> (teacher layer of the shared block, step-0 training scores per layer)
    for e in sorted({embedding_size(r, teacher, args) for r in rows if r.startswith("albert")}):
        share[e] = pick_share_from(teacher, train, args, e) if args.share_from == "auto" else (int(args.share_from), [])
        print(f"ALBERT E={e}: shared block from teacher layer {share[e][0]}: {share[e][1]}")
    rule = "auto: best step-0 training accuracy, per E" if args.share_from == "auto" else "given"
    reference = json.loads(Path(args.reference).read_text())
    ref = next(r for r in reference["rows"] if r["row"] == "kd")
    n_t = teacher.config.num_hidden_layers
    logits, cached = teacher_cache(teacher, train, {"hidden": set(range(n_t)), "attention": set(range(n_t)),
                                                    "embeddings": True, "first_token_only": False})
    data = {**train, "teacher_logits": logits}
    results = {"setup": {"share": args.share, "student_articles": len(train["label"]), "train_articles_all": n_train_all,
                         "test_articles": len(test["label"]), "steps": args.steps, "mobilebert_steps": args.mobilebert_steps,
                         "batch_size": args.batch_size, "lr": args.lr, "mobilebert_lr": args.mobilebert_lr,
                         "lower_lr": args.lower_lr, "seq_len": args.seq_len, "temperature": args.temperature,
                         "seeds": seeds, "albert_embedding": args.albert_embedding, "albert_layers": args.albert_layers,
                         "share_from": {e: j for e, (j, _) in share.items()}, "share_from_rule": rule,
                         "share_from_scores": {e: sc for e, (_, sc) in share.items()},
                         "teacher_folder": folder.name, "test_every": args.test_every, "threads": args.threads,
                         "machine": platform.processor() or platform.machine()},
               "teacher_test_acc": teacher_acc,
               "params": {"teacher": count_parameters(teacher), "layer_drop": count_parameters(layer_drop(teacher, KEEP))},
               "reference": {**ref, "steps": reference["setup"]["steps"], "lr": reference["setup"]["lr"],
                             "source": args.reference},
               "embedding_errors": embedding_errors(teacher, train, args), "rows": []}
    print(json.dumps(results["embedding_errors"]))
    budgets = [int(s) for s in str(args.mobilebert_steps).split(",")]
    for row, steps in [(r, s) for r in rows for s in (budgets if r.startswith("mobilebert") else [args.steps])]:
        j = share.get(embedding_size(row, teacher, args), (None,))[0] if row.startswith("albert") else None
        entry = {"row": row, "student": STUDENTS[row][0], "training": STUDENTS[row][1], "share_from": j, "acc": [],
                 "s_per_step": [], "final_loss": [], "stage_losses": []}
        for seed in seeds:
            out = train_row(row, teacher, data, test, cached, args, seed, j, steps)
            entry.update(params=out["params"], steps=out["steps"], lr=out["lr"])
            if out["stage_losses"] is not None:
                entry["stage_losses"].append(out["stage_losses"])
            acc, per_step, loss = out["acc"], out["s_per_step"], out["final_loss"]
            entry["acc"].append(acc)
            entry["s_per_step"].append(round(per_step, 3))
            entry["final_loss"].append(loss)
            print(f"{row:<26} seed {seed}: test acc {acc:.3f} ({per_step:.2f} s/step, final loss {loss:.4f})", flush=True)
        results["rows"].append(entry)
        results["wall_s"] = round(time.perf_counter() - t0, 1)
        write(Path(args.results), results)  # after every row: a run that stops keeps its finished rows
    print(to_markdown(results))


def write(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=float))
    out.with_suffix(".md").write_text(to_markdown(results))


if __name__ == "__main__":
    main()
