"""Intermediate-layer (feature) distillation methods against logit KD and CE on BBC News topics,
at a low-data budget; and the cost of their teacher features, online against cached.

Teacher: all-MiniLM-L6-v2 fine-tuned on all training articles (5 topics; cached by
:func:`raykd.train.finetune.finetune_classifier`). Student: the teacher's layers 0, 2, 4 (and its
embeddings and classification head), :func:`raykd.students.build.layer_drop`; the layer map is the
default one of that student, ``(0, 0), (1, 2), (2, 4)``. Every student trains through the shared
objective and step (:func:`raykd.train.local.train_classifier`) on ``--share`` of the training
articles (stratified, one fixed subset), for ``--steps`` steps, once per seed; test accuracy of the
final step (no checkpoint selection).

    .venv/bin/python benchmarks/bench_feature_methods.py                 # table + results
    .venv/bin/python benchmarks/bench_feature_methods.py --rows ce,kd --seeds 0
    .venv/bin/python benchmarks/bench_feature_methods.py --rows theseus --merge   # add rows to the results

Rows ``kd+sid`` (layer stages, :class:`raykd.train.schedule.StackedSchedule`), ``kd+diito`` (teacher
online: intervened forwards) and ``theseus`` (a BERT-of-Theseus hybrid, its exported successors
tested) train through the same step.

Writes ``benchmarks/results/feature_methods_bbc.json`` and ``.md`` (``--results`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from raykd.losses import Objective
from raykd.losses.features import LayerMap
from raykd.train.features import FeatureTeacher, compact, concat_features, feature_bytes
from raykd.train.local import accuracy, batch_indices, class_batch
from raykd.train.step import StudentBatch, build_optimizer, classifier_logits, train_step

KEEP = [0, 2, 4]
KD = {"forward_kl": 0.5, "ce": 0.5}
ROWS: dict[str, tuple[dict[str, float], dict[str, dict]]] = {
    "ce": ({"ce": 1.0}, {}),
    "kd": (KD, {}),
    "kd+distilbert_cos": ({**KD, "distilbert_cos": 1.0}, {}),
    "kd+pkd": ({**KD, "pkd": 100.0}, {}),  # PKD's beta in 10..1000; its [CLS] loss is small
    "kd+tinybert": ({**KD, "tinybert": 1.0}, {}),
    "kd+minilm": ({**KD, "minilm": 1.0}, {}),
    "kd+minilmv2": ({**KD, "minilmv2": 1.0}, {"minilmv2": {"relation_heads": 12}}),
    "kd+alp_kd": ({**KD, "alp_kd": 1.0}, {}),
    "kd+rail_kd": ({**KD, "rail_kd": 100.0}, {}),  # as PKD, on a map re-drawn every epoch
    "kd+ckd": ({**KD, "ckd": 1.0}, {}),
    "kd+mgskd": ({**KD, "mgskd": 1.0}, {}),
    "kd+lrc_bert": ({**KD, "lrc_bert": 0.1}, {}),  # InfoNCE is ~log(B) per pair at the start
    "kd+universal_kd": ({**KD, "universal_kd": 0.5}, {}),  # the seed's universal_kd_gamma
    "kd+sid": ({**KD, "sid": 1.0}, {}),  # StackedSchedule: KD and CE only in the last of 4 stages
    "kd+diito": ({**KD, "diito": 0.5}, {}),  # the seed's equal alphas: ce = kd = intervened kd = cosine
    "theseus": (KD, {}),  # BERT-of-Theseus hybrid trained on CE + KD, its successors exported
}
ONLINE_ONLY = {"kd+diito"}  # a second, intervened teacher forward every step


def cache_layout(weights: dict[str, float], layer_map: LayerMap, teacher_layers: int) -> dict:
    """What the compact teacher cache of a row keeps (:func:`raykd.train.features.compact`)."""
    mapped = [t for _, t in layer_map.pairs]
    last = layer_map.last[1]
    need = {"hidden": set(), "attention": set(), "embeddings": False, "first_token_only": False}
    for name in weights:
        if name == "distilbert_cos":
            need["hidden"].add(last)
        elif name == "pkd":
            need["hidden"].update(mapped)
            need["first_token_only"] = True
        elif name == "tinybert":
            need["hidden"].update(mapped)
            need["attention"].update(mapped)
            need["embeddings"] = True
        elif name in ("minilm", "minilmv2"):
            need["attention"].add(last)
        elif name in ("alp_kd", "rail_kd", "universal_kd"):
            need["hidden"].update(range(teacher_layers))
            need["first_token_only"] = True
        elif name in ("sid", "sid_cos"):
            need["hidden"].update(mapped)
            need["attention"].update(mapped)
            need["first_token_only"] = True
        elif name in ("ckd", "mgskd", "lrc_bert"):
            need["hidden"].update(mapped)
    if need["first_token_only"] and ({"distilbert_cos", "tinybert", "ckd", "mgskd", "lrc_bert"} & set(weights)):
        need["first_token_only"] = False
    return need


def teacher_cache(teacher, data: dict[str, np.ndarray], layout: dict, batch_size: int = 32):
    """The teacher's class logits ``[N, C]`` and compact features of every row, one pass."""
    online = FeatureTeacher(teacher, classifier_logits, attention=bool(layout["attention"]))
    logits, parts = [], []
    for s in range(0, len(data["label"]), batch_size):
        b = class_batch(data, np.arange(s, min(s + batch_size, len(data["label"]))))
        targets, f = online(b)
        logits.append(targets.logits[:, 0].numpy())
        parts.append(compact(f, hidden=sorted(layout["hidden"]), attention=sorted(layout["attention"]),
                             embeddings=layout["embeddings"], first_token_only=layout["first_token_only"]))
    return np.concatenate(logits), concat_features(parts)


def batches(data, cached, batch_size: int, steps: int, seed: int):
    """Seeded batches carrying their rows' cached teacher features (None when there are none)."""
    for idx in batch_indices(len(data["label"]), batch_size, steps, seed):
        b = class_batch(data, idx)
        if cached is not None:
            b.teacher_features = cached.slice(torch.as_tensor(idx))
        yield [b]


def train_row(teacher, data, test, weights, params, *, steps, batch_size, lr, seed, temperature, online: bool, cached):
    """One student: layer-dropped from the teacher, trained, tested. Returns (accuracy, s/step, loss).

    RAIL-KD's objective gets a new random layer map every epoch (its widths agree: no projection);
    SID's its stage's weights every step (:class:`raykd.train.schedule.StackedSchedule`); DIITO
    runs with the teacher online (its interventions drawn from Python's ``random``, seeded here)."""
    from raykd.losses import get_loss
    from raykd.losses.hidden import random_layer_map
    from raykd.students.build import layer_drop
    from raykd.train.schedule import StackedSchedule

    torch.manual_seed(seed)
    random.seed(seed)
    student = layer_drop(teacher, KEEP)
    student.get_input_embeddings().weight.requires_grad_(False)  # frozen word embeddings (as the teacher's fine-tuning)
    n_teacher = teacher.config.num_hidden_layers
    layer_map = LayerMap.from_keep_layers(KEEP, n_teacher)
    width = teacher.config.hidden_size
    objective = Objective(weights, params, layer_map=layer_map, widths=(width, width))  # Universal-KD's maps
    stages = StackedSchedule(len(layer_map.pairs), steps, [n for n in weights if get_loss(n).kind == "logits"]) \
        if "sid" in weights else None
    online = online or objective.needs_interventions
    feature_teacher = FeatureTeacher(teacher, classifier_logits, attention=objective.needs_attention) \
        if objective.needs_features and online else None
    trainable = [p for p in student.parameters() if p.requires_grad] + list(objective.parameters())
    optimizer, _ = build_optimizer(trainable, lr=lr)
    student.train()
    start, losses = time.perf_counter(), []
    per_epoch = max(1, len(data["label"]) // batch_size)
    for step, group in enumerate(batches(data, None if online else cached, batch_size, steps, seed)):
        if "rail_kd" in weights and step % per_epoch == 0:
            objective = Objective(weights, params, layer_map=random_layer_map(len(KEEP), n_teacher, step // per_epoch, seed))
        if stages is not None:
            objective = Objective(*stages.apply(weights, params), layer_map=layer_map, projections=objective.projections)
        metrics = train_step(student, optimizer, group, objective, temperature, logits_fn=classifier_logits,
                             max_grad_norm=1.0, feature_teacher=feature_teacher)
        if stages is not None:
            stages.update(step + 1, metrics)
        losses.append(metrics["loss"])
    per_step = (time.perf_counter() - start) / steps
    return accuracy(student, test), per_step, losses[-1]


def train_theseus(teacher, data, test, weights, *, steps, batch_size, lr, seed, temperature):
    """BERT-of-Theseus: the teacher's block groups (0-1, 2-3, 4-5) replaced at random by successors
    initialised from blocks 0, 2, 4, trained on ``weights`` through the shared step, the replacement
    rate following the seed's curriculum (0.3 rising linearly to 1 at 66% of the steps); the
    exported successors are tested. Returns (accuracy, s/step, loss)."""
    from raykd.students.theseus import export_student, replacement_rate, theseus_layers, theseus_model

    torch.manual_seed(seed)
    hybrid = theseus_model(teacher, KEEP, p=0.3, seed=seed)
    hybrid.get_input_embeddings().weight.requires_grad_(False)
    objective = Objective(weights)
    optimizer, _ = build_optimizer([p for p in hybrid.parameters() if p.requires_grad], lr=lr)
    hybrid.train()
    start, losses = time.perf_counter(), []
    for step, group in enumerate(batches(data, None, batch_size, steps, seed)):
        theseus_layers(hybrid).p = replacement_rate(step, 0.3, 0.7 / (0.66 * steps))
        losses.append(train_step(hybrid, optimizer, group, objective, temperature, logits_fn=classifier_logits,
                                 max_grad_norm=1.0)["loss"])
    per_step = (time.perf_counter() - start) / steps
    return accuracy(export_student(hybrid).eval(), test), per_step, losses[-1]


def measure(teacher, data, layouts, *, steps: int, batch_size: int, temperature: float) -> list[dict]:
    """Bytes per token of each row's compact cache, and s/step online vs cached, same batches."""
    out = []
    n_tokens = int(data["attention_mask"].size)
    for row, (weights, params) in ROWS.items():
        if row not in layouts:
            continue
        t0 = time.perf_counter()
        logits, cached = teacher_cache(teacher, data, layouts[row])
        cache_s = time.perf_counter() - t0
        times = {}
        for online in (True, False):
            _, per_step, _ = train_row(teacher, {**data, "teacher_logits": logits}, {k: v[:2] for k, v in data.items()},
                                       weights, params, steps=steps, batch_size=batch_size, lr=1e-4, seed=0,
                                       temperature=temperature, online=online, cached=cached)
            times["online" if online else "cached"] = per_step
        out.append({"row": row, "compact_bytes_per_token": feature_bytes(cached) / n_tokens,
                    "cache_build_s": round(cache_s, 1), "online_s_per_step": round(times["online"], 3),
                    "cached_s_per_step": round(times["cached"], 3)})
        print(json.dumps(out[-1]))
    return out


def full_bytes_per_token(teacher, data) -> float:
    """Bytes per token of every block's hidden state and Q/K/V in fp16 (the uncompacted form)."""
    _, f = FeatureTeacher(teacher, classifier_logits, attention=True)(class_batch(data, np.arange(4)))
    n = teacher.config.num_hidden_layers
    full = compact(f, hidden=range(n), attention=range(n), embeddings=True)
    return feature_bytes(full) / f.token_mask.numel()


def load(args):
    from raykd.config import ClassifierTeacherConfig
    from raykd.data.bbc import load_bbc_news
    from raykd.models import load_tokenizer
    from raykd.recipes.muki.prepare import stratified_split
    from raykd.train.finetune import finetune_classifier, tokenize_documents
    from transformers import AutoModelForSequenceClassification

    docs = load_bbc_news()
    labels = sorted({d.label for d in docs})
    splits = stratified_split(docs, test_share=0.2, dev_share=0.1, seed=0)
    cfg = ClassifierTeacherConfig(steps=args.teacher_steps, batch_size=16, lr=1e-4, num_threads=args.threads)
    folder = finetune_classifier(cfg, splits["train"], labels, args.teacher_seq_len)
    tok = load_tokenizer(folder)
    train_all = splits["train"]
    small = stratified_split(train_all, test_share=args.share, dev_share=0.0001, seed=1)["test"]  # args.share per class
    teacher = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    return (teacher, labels, folder, tokenize_documents(tok, small, labels, args.seq_len),
            tokenize_documents(tok, splits["test"][:: args.test_every], labels, args.seq_len), len(train_all))


def to_markdown(results: dict) -> str:
    s = results["setup"]
    if not results["rows"]:  # a cost-only run
        lines = [f"Teacher features on BBC News, {s['student_articles']} articles, T = {s['seq_len']} tokens, batch "
                 f"{s['batch_size']}, {s['threads']} torch thread(s); teacher {s['teacher_folder']}."]
        return "\n".join(lines + _cost_lines(results)) + "\n"
    lines = [f"BBC News, 5 topics; teacher all-MiniLM-L6-v2 fine-tuned on all {s['train_articles_all']} training "
             f"articles at T = {s.get('teacher_seq_len')} (test acc at the students' T: {results['teacher_test_acc']:.3f}); student = teacher layers {KEEP}; "
             f"student data: {s['student_articles']} articles ({s['share']:.0%} of train, stratified); {s['steps']} steps "
             f"of {s['batch_size']} (word embeddings frozen), lr {s['lr']}, T = {s['seq_len']} tokens, KD temperature {s['temperature']}; "
             f"{len(s['seeds'])} seeds; test set {s['test_articles']} articles; final-step accuracy.", "",
             "| row | objective | test accuracy (mean ± std) | per seed | s/step |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        acc = np.asarray(r["acc"])
        lines.append(f"| {r['row']} | `{json.dumps(r['weights'])}` | {acc.mean():.3f} ± {acc.std():.3f} | "
                     f"{', '.join(f'{a:.3f}' for a in acc)} | {np.mean(r['s_per_step']):.2f} |")
    notes = [f"- {r['row']}: {r['note']}" for r in results["rows"] if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []) + _cost_lines(results)) + "\n"


def _cost_lines(results: dict) -> list[str]:
    lines = []
    if results.get("cost"):
        lines += ["", f"Teacher features, full fp16 form (embeddings + every block's hidden state and Q/K/V): "
                  f"{results['full_bytes_per_token']:.0f} B/token.", "",
                  "| row | compact cache B/token | cache build s | online s/step | cached s/step |", "|---|---|---|---|---|"]
        for c in results["cost"]:
            lines.append(f"| {c['row']} | {c['compact_bytes_per_token']:.0f} | {c['cache_build_s']} | "
                         f"{c['online_s_per_step']} | {c['cached_s_per_step']} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--share", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per article of the students (and the teacher's inputs)")
    p.add_argument("--teacher-seq-len", type=int, default=128, help="tokens per article of the teacher's fine-tuning")
    p.add_argument("--test-every", type=int, default=1, help="every n-th test article (the test split is stratified)")
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads; on a shared 2-core machine 2 threads ran 7x slower than 1")
    p.add_argument("--measure-steps", type=int, default=3, help="steps timed online vs cached (0: skip)")
    p.add_argument("--measure-rows", default="kd+pkd,kd+tinybert", help="rows whose cost is measured")
    p.add_argument("--mode", choices=("cached", "online"), default="cached", help="teacher features of the table's runs")
    p.add_argument("--max-test", type=int, default=None, help="first N test articles only (a smoke run)")
    p.add_argument("--results", default="benchmarks/results/feature_methods_bbc")
    p.add_argument("--merge", action="store_true",
                   help="add the rows run here to the existing results (same setup required; other rows kept as measured)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows, seeds = [r for r in args.rows.split(",") if r], [int(s) for s in args.seeds.split(",")]  # --rows "": cost only
    teacher, labels, folder, train, test, n_train_all = load(args)
    if args.max_test:
        test = {k: v[: args.max_test] for k, v in test.items()}
    teacher_acc = accuracy(teacher, test)
    print(f"teacher {folder.name}: test acc {teacher_acc:.3f}; student rows {len(train['label'])}, test {len(test['label'])}")
    layer_map = LayerMap.from_keep_layers(KEEP, teacher.config.num_hidden_layers)
    layouts = {r: cache_layout(ROWS[r][0], layer_map, teacher.config.num_hidden_layers) for r in rows}
    measured = [r for r in args.measure_rows.split(",") if r]
    cost = measure(teacher, train, {r: cache_layout(ROWS[r][0], layer_map, teacher.config.num_hidden_layers) for r in measured},
                   steps=args.measure_steps, batch_size=args.batch_size, temperature=args.temperature) if args.measure_steps else []
    results = {"setup": {"share": args.share, "student_articles": len(train["label"]), "train_articles_all": n_train_all,
                         "test_articles": len(test["label"]), "steps": args.steps, "batch_size": args.batch_size,
                         "lr": args.lr, "seq_len": args.seq_len, "temperature": args.temperature, "seeds": seeds,
                         "keep_layers": KEEP, "layer_map": layer_map.pairs, "teacher_folder": folder.name,
                         "teacher_steps": args.teacher_steps, "teacher_seq_len": args.teacher_seq_len,
                         "test_every": args.test_every, "mode": args.mode, "threads": args.threads,
                         "machine": platform.processor() or platform.machine()},
               "teacher_test_acc": teacher_acc, "full_bytes_per_token": full_bytes_per_token(teacher, train),
               "cost": cost, "rows": []}
    if not rows:
        write(Path(args.results), results)
    union = {"hidden": set().union(*(lay["hidden"] for lay in layouts.values())),
             "attention": set().union(*(lay["attention"] for lay in layouts.values())),
             "embeddings": any(lay["embeddings"] for lay in layouts.values()),
             "first_token_only": all(lay["first_token_only"] for lay in layouts.values() if lay["hidden"])}
    logits, cached = teacher_cache(teacher, train, union) if rows else (None, None)  # one teacher pass serves every row
    if rows:
        results["setup"]["table_cache_bytes_per_token"] = feature_bytes(cached) / int(train["attention_mask"].size)
    for row in rows:
        weights, params = ROWS[row]
        entry = {"row": row, "weights": weights, "params": params, "acc": [], "s_per_step": [], "final_loss": []}
        if row in ONLINE_ONLY or args.merge:
            entry["note"] = "; ".join(
                (["teacher online (intervened forwards)"] if row in ONLINE_ONLY else [])
                + ([f"run later than the first rows ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), same setup"]
                   if args.merge else []))
        for seed in seeds:
            kw = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": seed,
                  "temperature": args.temperature}
            if row == "theseus":
                acc, per_step, loss = train_theseus(teacher, {**train, "teacher_logits": logits}, test, weights, **kw)
            else:
                acc, per_step, loss = train_row(teacher, {**train, "teacher_logits": logits}, test, weights, params,
                                                online=args.mode == "online", cached=cached, **kw)
            entry["acc"].append(acc)
            entry["s_per_step"].append(round(per_step, 3))
            entry["final_loss"].append(loss)
            print(f"{row:<22} seed {seed}: test acc {acc:.3f} ({per_step:.2f} s/step, final loss {loss:.4f})", flush=True)
        results["rows"].append(entry)
        results["wall_s"] = round(time.perf_counter() - t0, 1)
        write(Path(args.results), merged(Path(args.results), results) if args.merge else results)  # after every row: a long run that stops keeps its finished rows
    print(to_markdown(results))


def merged(out: Path, new: dict) -> dict:
    """The results at ``out`` with ``new``'s rows added (a row of the same name replaced), the
    earlier run's setup and cost kept; this run's setup and wall time under ``merged_runs``.

    Raises:
        ValueError: the two runs' setups differ in anything but the seeds' timing fields.
    """
    old = json.loads(out.with_suffix(".json").read_text())
    keys = ("share", "student_articles", "test_articles", "steps", "batch_size", "lr", "seq_len", "temperature",
            "seeds", "keep_layers", "teacher_folder", "test_every", "mode")
    if diff := {k: (old["setup"].get(k), new["setup"].get(k)) for k in keys
                if json.loads(json.dumps(old["setup"].get(k))) != json.loads(json.dumps(new["setup"].get(k)))}:
        raise ValueError(f"--merge needs the first run's setup; these differ (old, new): {diff}")
    names = {r["row"] for r in new["rows"]}
    out_rows = [r for r in old["rows"] if r["row"] not in names] + new["rows"]
    runs = [r for r in old.get("merged_runs", []) if set(r["rows"]) - names] + [
        {"rows": sorted(names), "wall_s": new.get("wall_s"), "threads": new["setup"]["threads"],
         "teacher_test_acc": new["teacher_test_acc"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}]
    return {**old, "rows": out_rows, "merged_runs": runs}


def write(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=float))
    out.with_suffix(".md").write_text(to_markdown(results))


if __name__ == "__main__":
    main()
