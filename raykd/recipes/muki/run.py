"""``raykd muki``: MUKI against its baselines, as the paper's algorithm box reads.

1. split the articles by class (stratified, seeded) and check the plan (partitions, teacher
   labels, the student's head) before anything trains;
2. fine-tune each teacher on its class block only (and an oracle on all of the partition's
   classes), cached; a partition with ``drop_other_classes`` is the smaller problem of its classes;
3. ask each served teacher for logits, M Monte-Carlo dropout passes and pooled features, cached;
   report, before any student trains, how well MUKI's score and the raw maximum logit pick the
   teacher that knows each article;
4. per seed, partition and row (vanilla KD, UHC, DFA, MUKI hard / soft / soft + re-weighting /
   no MC): build the row's targets, train a student through the shared step, pick the
   checkpoint on dev, test it (each cached under ``<output-dir>/rows``);
5. write ``results.json``, ``results.md`` and ``muki.png`` (and copy them to ``cfg.publish``);
   print the table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from raykd.data.bbc import load_bbc_news
from raykd.data.documents import Document
from raykd.models import load_tokenizer, new_classifier, resolve_model_path
from raykd.recipes.muki.config import MukiConfig
from raykd.recipes.muki.labels import teacher_labels
from raykd.recipes.muki.methods import (
    build_targets,
    objective_of,
    predict,
    selection_report,
    train_row,
)
from raykd.recipes.muki.prepare import (
    SPLITS,
    check_plan,
    prepare_teachers,
    stratified_split,
)
from raykd.recipes.muki.report import plot_results, table_markdown, write_results
from raykd.recipes.muki.rows import ROWS
from raykd.report import bootstrap_ci
from raykd.soft_labels.cache import documents_fingerprint, fingerprint
from raykd.train.finetune import tokenize_documents

log = logging.getLogger(__name__)


def subset_accuracy(pred: np.ndarray, gold: np.ndarray, blocks: list[list[int]]) -> tuple[float, list[float]]:
    """Accuracy over all rows and over the rows whose gold class is in each block."""
    per = [float((pred[np.isin(gold, b)] == gold[np.isin(gold, b)]).mean()) if np.isin(gold, b).any() else float("nan") for b in blocks]
    return float((pred == gold).mean()), per


def _teacher_rows(part, teachers, oracle_logits, gold: np.ndarray) -> list[dict[str, Any]]:
    """The teachers' and the oracle's rows (test accuracy, bootstrap 95% interval)."""
    rows = []
    for i, (names, block, t) in enumerate(zip(part.names, part.blocks, teachers)):
        pred = np.asarray(block)[t.logits["test"].argmax(-1)]
        overall, per = subset_accuracy(pred, gold, part.blocks)
        rows.append({"row": f"teacher {i} ({', '.join(names)})", "kind": "teacher", "overall": [overall], "subsets": [[x] for x in per],
                     "note": "alone, on its own subset", "ci95": list(bootstrap_ci(pred == gold))})
    if oracle_logits is not None:
        overall, per = subset_accuracy(oracle_logits.argmax(-1), gold, part.blocks)
        rows.append({"row": "oracle (all classes)", "kind": "oracle", "overall": [overall], "subsets": [[x] for x in per],
                     "ci95": list(bootstrap_ci(oracle_logits.argmax(-1) == gold))})
    return rows


def row_entry(cfg: MukiConfig, row, part, teachers, gold_train: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """A student row's table entry (before any seed) and its train targets ``[N, C]``.

    Returns:
        ``(entry, targets)``: the entry holds ``train_target_acc`` (share of train articles whose
        target's arg-max is the gold class: the quality of what the student learns from) and,
        for MUKI rows, ``score_picks_gold_teacher`` (share whose most certain teacher is the one
        that knows their gold class).
    """
    targets, info = build_targets(row, teachers, part.blocks, len(part.labels), cfg.integration)
    entry = {"row": row.name, "kind": "student", "description": row.description, "overall": [], "subsets": [[] for _ in part.blocks],
             "seeds": [], "wall_s": [], "train_target_acc": float((targets.argmax(-1) == gold_train).mean())}
    if "scores" in info:
        own = np.array([next(i for i, b in enumerate(part.blocks) if g in b) for g in gold_train])
        entry["score_picks_gold_teacher"] = float((info["scores"].argmax(-1) == own).mean())
    return entry, targets


def train_seed(cfg: MukiConfig, row, part, teachers, targets: np.ndarray, rows: dict[str, dict[str, np.ndarray]], seed: int,
               out: Path) -> dict[str, Any]:
    """One student of a row and seed: trained on ``targets``, selected on dev, tested; cached as
    ``<out>/rows/<key>.json`` (the key hashes the targets, the student and integration settings,
    the data and the seed), so a rerun trains nothing.

    Returns:
        ``seed``, ``test_acc``, ``subset_acc``, ``dev_acc``, ``best_step``, ``final_loss``,
        ``seconds`` (training and test), ``cached``.
    """
    import hashlib
    import json

    import torch

    key = fingerprint({"row": row.name, "part": [part.labels, part.blocks], "seed": seed, "student": cfg.student.model_dump(),
                       "integration": cfg.integration.model_dump(), "seq_len": cfg.data.seq_len,
                       "targets": hashlib.sha256(np.ascontiguousarray(targets, dtype=np.float32).tobytes()).hexdigest(),
                       "docs": [rows[s]["doc_id"].tolist() for s in SPLITS]})
    path = out / "rows" / f"{key}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    ts = time.time()
    torch.manual_seed(seed)
    student = new_classifier(resolve_model_path(cfg.student.base_model), list(part.labels))
    objective, tau = objective_of(row, part.blocks, cfg.integration)
    features = np.concatenate([t.features for t in teachers], -1) if row.features else None
    dfa = ([t.features.shape[1] for t in teachers], cfg.integration.dfa_amalgamation_weight,
           cfg.integration.dfa_reconstruction_weight) if row.features else None
    train_rows = {**rows["train"], "label": np.zeros_like(rows["train"]["label"]), "teacher_logits": targets}  # gold never trains
    got = train_row(student, train_rows, rows["dev"], objective, tau, cfg.student, seed, features, dfa)
    pred = predict(student, rows["test"], cfg.student.eval_batch_size)
    overall, per = subset_accuracy(pred, rows["test"]["label"], part.blocks)
    result = {"seed": seed, "test_acc": overall, "subset_acc": per, "dev_acc": got["dev_acc"], "best_step": got["best_step"],
              "steps": got["steps"], "final_loss": got["losses"][-1], "seconds": round(time.time() - ts, 1), "test_pred": pred.tolist(),
              **({"dfa_last": got["dfa_last"]} if "dfa_last" in got else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, default=float))
    log.info("%s %s seed %d: test %.3f (dev %.3f at step %d)", part.name, row.name, seed, overall, got["dev_acc"], got["best_step"])
    return {**result, "cached": False}


def add_seed(entry: dict[str, Any], result: dict[str, Any], gold: np.ndarray) -> None:
    """Append one seed's result to a row's entry, and update its bootstrap 95% interval of the
    test accuracy (test articles resampled, the mean over the seeds so far)."""
    entry["overall"].append(result["test_acc"])
    for j, x in enumerate(result["subset_acc"]):
        entry["subsets"][j].append(x)
    entry["wall_s"].append(result["seconds"])
    entry.setdefault("_correct", []).append(np.asarray(result["test_pred"]) == gold)
    entry["ci95"] = list(bootstrap_ci(np.stack(entry["_correct"])))
    entry["seeds"].append({k: v for k, v in result.items() if k not in ("cached", "test_pred")})


def partition_rows(tokenizer, splits: dict[str, list[Document]], labels: list[str], seq_len: int):
    """The tokenised rows and document fingerprints of each split, restricted to ``labels``'
    articles (label indices into ``labels``)."""
    keep = {s: [d for d in splits[s] if d.label in set(labels)] for s in SPLITS}
    return ({s: tokenize_documents(tokenizer, keep[s], labels, seq_len) for s in SPLITS},
            {s: documents_fingerprint(keep[s]) for s in SPLITS})


def prepare_labels(cfg: MukiConfig, splits: dict[str, list[Document]], parts, stats: dict[str, Any]):
    """Fine-tune (or find) every teacher and oracle, then read (or ask) their labels, per partition.

    Returns:
        ``(rows, labels_of, oracle_logits, finetune_s)``: per partition name its tokenised rows,
        its teachers' :class:`~raykd.recipes.muki.labels.TeacherLabels` and its oracle's test
        logits (or None).

    Raises:
        ValueError: a teacher whose tokenizer is not the student's.
    """
    student_base = resolve_model_path(cfg.student.base_model)
    t_ft = time.time()
    folders, oracles = prepare_teachers(cfg, splits["train"], parts)
    finetune_s = time.time() - t_ft
    tokenizer = load_tokenizer(student_base)
    for path in [p for ps in folders.values() for p in ps] + list(oracles.values()):
        if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"teacher {path} has another tokenizer than the student {student_base}; MUKI feeds both the same ids: "
                             "fine-tune the teachers from the student's base model")
    rows, labels_of, oracle_logits = {}, {}, {}
    for p in parts:
        rows[p.name], fps = partition_rows(tokenizer, splits, p.labels, cfg.data.seq_len)
        labels_of[p.name] = [teacher_labels(cfg, f"{cfg.teacher.name}-{p.name}-{i}", path, rows[p.name], fps, need_mc=cfg.uses_mc,
                                            need_features="dfa" in cfg.methods, stats=stats) for i, path in enumerate(folders[p.name])]
        oracle_logits[p.name] = teacher_labels(cfg, f"{cfg.teacher.name}-oracle", oracles[p.name], rows[p.name], fps, need_mc=False,
                                               need_features=False, stats=stats).logits["test"] if p.name in oracles else None
    return rows, labels_of, oracle_logits, finetune_s


def train_students(cfg: MukiConfig, parts, entries, labels_of, rows, output_dir: Path, stats: dict[str, Any],
                   after: Callable[[list[int]], None] | None = None) -> None:
    """Every student, seed by seed (every partition and row of the first seed first), each added
    to its row's entry; ``after(seeds done)`` after each newly trained student, so a run cut
    short leaves its results so far."""
    done: list[int] = []
    for seed in cfg.seeds:
        for p in parts:
            for m in cfg.methods:
                entry, targets = entries[(p.name, m)]
                result = train_seed(cfg, ROWS.get(m), p, labels_of[p.name], targets, rows[p.name], seed, output_dir)
                stats["students_cached" if result["cached"] else "students_trained"] += 1
                add_seed(entry, result, rows[p.name]["test"]["label"])
                if after is not None and not result["cached"]:
                    after(done)
        done.append(seed)


def main_muki(cfg: MukiConfig, output_dir: str | Path, docs: list[Document] | None = None) -> dict[str, Any]:
    """Run MUKI and its baselines; write ``results.json``, ``results.md`` and ``muki.png``.

    Before any student trains, each partition's selection report
    (:func:`raykd.recipes.muki.methods.selection_report`): how often MUKI's score and the raw
    maximum logit pick the teacher that knows the article, and each teacher's certainty on its
    own and on foreign articles. Students then train seed by seed (:func:`train_students`),
    each cached under ``output_dir/rows``.

    Args:
        cfg: the config (checked when it was loaded).
        output_dir: where the results and the students' cached results go.
        docs: labeled articles instead of BBC News (tests).

    Raises:
        ValueError: a bad partition, teacher labels or student head size (before any training).
    """
    import torch

    t0 = time.time()
    output_dir = Path(output_dir)
    docs = docs if docs is not None else load_bbc_news()
    parts = check_plan(cfg, sorted({d.label for d in docs if d.label is not None}))
    splits = stratified_split(docs, test_share=cfg.data.test_share, dev_share=cfg.data.dev_share, seed=cfg.data.split_seed,
                              max_docs=cfg.data.max_docs)
    torch.set_num_threads(cfg.student.num_threads)
    stats: dict[str, Any] = {"teacher_calls": 0, "label_s": 0.0, "cache_hits": 0, "cache_misses": 0, "mc_passes": 0,
                             "students_trained": 0, "students_cached": 0}
    rows, labels_of, oracle_logits, finetune_s = prepare_labels(cfg, splits, parts, stats)
    tables = {p.name: _teacher_rows(p, labels_of[p.name], oracle_logits[p.name], rows[p.name]["test"]["label"]) for p in parts}
    reports = {p.name: selection_report(labels_of[p.name], p.blocks, rows[p.name]["train"]["label"], cfg.integration.muki_temperature)
               for p in parts}
    entries = {(p.name, m): row_entry(cfg, ROWS.get(m), p, labels_of[p.name], rows[p.name]["train"]["label"])
               for p in parts for m in cfg.methods}
    t_students = time.time()

    run = SimpleNamespace(cfg=cfg, labels=sorted({d.label for d in docs if d.label is not None}), splits=splits, parts=parts, rows=rows,
                          reports=reports, tables=tables, entries=entries, stats=stats, finetune_s=finetune_s, t0=t0, t_students=t_students,
                          output_dir=output_dir)
    write = partial(write_run, run)
    write([])
    train_students(cfg, parts, entries, labels_of, rows, output_dir, stats, lambda done: write(list(done)))
    results = write(list(cfg.seeds))
    print(table_markdown(results))
    return results


def write_run(run: SimpleNamespace, seeds_done: list[int]) -> dict[str, Any]:
    """The results so far (after the selection report, then after every student), written and
    published; ``partial`` until every seed is done (a row's ``seeds`` say which it has)."""
    cfg, rows = run.cfg, run.rows
    results = {
        "run_name": cfg.run_name,
        "labels": run.labels,
        "split_sizes": {s: len(run.splits[s]) for s in SPLITS},
        "seeds_done": seeds_done,
        "partial": seeds_done != list(cfg.seeds),
        "partitions": [{"name": p.name, "teachers": p.names, "classes": p.labels, "selection": run.reports[p.name],
                        "split_sizes": {s: len(rows[p.name][s]["label"]) for s in SPLITS},
                        "rows": run.tables[p.name] + [{k: v for k, v in run.entries[(p.name, m)][0].items() if k != "_correct"}
                                                      for m in cfg.methods]} for p in run.parts],
        "costs": {**{k: (round(v, 1) if isinstance(v, float) else v) for k, v in run.stats.items()}, "finetune_s": round(run.finetune_s, 1),
                  "student_phase_s": round(time.time() - run.t_students, 1),
                  "student_runs": len(run.parts) * len(cfg.methods) * len(seeds_done)},
        "config": cfg.model_dump(),
        "wall_s": round(time.time() - run.t0, 1),
    }
    write_all(run.output_dir, results, cfg.publish)
    return results


def write_all(output_dir: Path, results: dict[str, Any], stem: str | None) -> None:
    """``results.json``, ``results.md`` and ``muki.png`` in ``output_dir``, copied to ``<stem>.*`` when given."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_results(output_dir, results)
    (output_dir / "results.md").write_text(table_markdown(results))
    plot_results(output_dir, results)
    if stem:
        publish(output_dir, Path(stem))


def publish(output_dir: Path, stem: Path) -> list[Path]:
    """Copy ``results.json``, ``results.md`` and ``muki.png`` to ``<stem>.json/.md/.png``."""
    import shutil

    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for src, ext in (("results.json", ".json"), ("results.md", ".md"), ("muki.png", ".png")):
        out.append(Path(shutil.copyfile(output_dir / src, stem.with_name(stem.name + ext))))
    return out
