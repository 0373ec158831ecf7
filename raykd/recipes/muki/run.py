"""``raykd muki``: MUKI against its baselines, as the paper's algorithm box reads.

1. split the articles by class (stratified, seeded) and check the plan (partitions, teacher
   labels, the student's head) before anything trains;
2. fine-tune each teacher on its class block only (and the oracle on all classes), cached;
3. ask each served teacher for logits, M Monte-Carlo dropout passes and pooled features, cached;
4. per partition, per row (vanilla KD, UHC, DFA, MUKI hard / soft / soft + re-weighting / no MC)
   and per seed: build the row's targets, train a student through the shared step, pick the
   checkpoint on dev, test it;
5. write ``results.json``, ``results.md`` and ``muki.png`` (and copy them to ``cfg.publish``);
   print the table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from raykd.data.documents import Document
from raykd.recipes.muki.config import MukiConfig
from raykd.recipes.muki.methods import (
    INTEGRATIONS,
    build_targets,
    objective_of,
    predict,
    train_row,
)
from raykd.recipes.muki.prepare import (
    SPLITS,
    check_plan,
    prepare_teachers,
    stratified_split,
)

log = logging.getLogger(__name__)


def subset_accuracy(pred: np.ndarray, gold: np.ndarray, blocks: list[list[int]]) -> tuple[float, list[float]]:
    """Accuracy over all rows and over the rows whose gold class is in each block."""
    per = [float((pred[np.isin(gold, b)] == gold[np.isin(gold, b)]).mean()) if np.isin(gold, b).any() else float("nan") for b in blocks]
    return float((pred == gold).mean()), per


def _teacher_rows(part, teachers, oracle_logits, gold: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for i, (names, block, t) in enumerate(zip(part.names, part.blocks, teachers)):
        pred = np.asarray(block)[t.logits["test"].argmax(-1)]
        overall, per = subset_accuracy(pred, gold, part.blocks)
        rows.append({"row": f"teacher {i} ({', '.join(names)})", "kind": "teacher", "overall": [overall], "subsets": [[x] for x in per],
                     "note": "alone, on its own subset"})
    if oracle_logits is not None:
        overall, per = subset_accuracy(oracle_logits.argmax(-1), gold, part.blocks)
        rows.append({"row": "oracle (all classes)", "kind": "oracle", "overall": [overall], "subsets": [[x] for x in per]})
    return rows


def student_row(cfg: MukiConfig, row, part, teachers, train_rows: dict[str, np.ndarray], rows: dict[str, dict[str, np.ndarray]],
                gold: dict[str, np.ndarray], labels: list[str]) -> dict[str, Any]:
    """One row of the table: the row's targets from the teachers' cached labels, then a student
    per seed trained on them, selected on dev and tested.

    Returns:
        ``row``, ``overall`` and ``subsets`` test accuracies (one per seed), ``seeds`` details,
        ``train_target_acc`` (share of train articles whose target's arg-max is the gold class:
        the quality of what the student learns from), and for MUKI rows
        ``score_picks_gold_teacher`` (share of train articles whose most certain teacher is the
        one that knows their gold class).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from raykd.models import resolve_model_path

    targets, info = build_targets(row, teachers, part.blocks, len(labels), cfg.integration)
    objective, tau = objective_of(row, part.blocks, cfg.integration)
    features = np.concatenate([t.features for t in teachers], -1) if row.features else None
    dfa = ([t.features.shape[1] for t in teachers], cfg.integration.dfa_amalgamation_weight,
           cfg.integration.dfa_reconstruction_weight) if row.features else None
    entry = {"row": row.name, "kind": "student", "description": row.description, "overall": [], "subsets": [[] for _ in part.blocks], "seeds": []}
    entry["train_target_acc"] = float((targets.argmax(-1) == gold["train"]).mean())
    if "scores" in info:
        own = np.array([next(i for i, b in enumerate(part.blocks) if g in b) for g in gold["train"]])
        entry["score_picks_gold_teacher"] = float((info["scores"].argmax(-1) == own).mean())
    for seed in cfg.seeds:
        ts = time.time()
        torch.manual_seed(seed)
        student = AutoModelForSequenceClassification.from_pretrained(
            str(resolve_model_path(cfg.student.base_model)), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)})
        got = train_row(student, {**train_rows, "teacher_logits": targets}, rows["dev"], objective, tau, cfg.student, seed, features, dfa)
        overall, per = subset_accuracy(predict(student, rows["test"], cfg.student.eval_batch_size), gold["test"], part.blocks)
        entry["overall"].append(overall)
        for j, x in enumerate(per):
            entry["subsets"][j].append(x)
        entry["seeds"].append({"seed": seed, "test_acc": overall, "subset_acc": per, "dev_acc": got["dev_acc"], "best_step": got["best_step"],
                               "final_loss": got["losses"][-1], "seconds": round(time.time() - ts, 1),
                               **({"dfa_last": got["dfa_last"]} if "dfa_last" in got else {})})
        log.info("%s %s seed %d: test %.3f (dev %.3f at step %d)", part.name, row.name, seed, overall, got["dev_acc"], got["best_step"])
    return entry


def main_muki(cfg: MukiConfig, output_dir: str | Path, docs: list[Document] | None = None) -> dict[str, Any]:
    """Run MUKI and its baselines; write ``results.json``, ``results.md`` and ``muki.png``.

    Args:
        cfg: the config (checked when it was loaded).
        output_dir: where the results go.
        docs: labeled articles instead of BBC News (tests).

    Raises:
        ValueError: a bad partition, teacher labels or student head size (before any training).
    """
    import torch

    from raykd.data.bbc import load_bbc_news
    from raykd.models import load_tokenizer, resolve_model_path
    from raykd.recipes.muki.labels import teacher_labels
    from raykd.recipes.muki.report import plot_results, table_markdown, write_results
    from raykd.soft_labels.cache import documents_fingerprint
    from raykd.teacher.finetune import tokenize_documents

    t0 = time.time()
    output_dir = Path(output_dir)
    docs = docs if docs is not None else load_bbc_news()
    labels = sorted({d.label for d in docs if d.label is not None})
    parts = check_plan(cfg, labels)
    student_base = resolve_model_path(cfg.student.base_model)
    splits = stratified_split(docs, test_share=cfg.data.test_share, dev_share=cfg.data.dev_share, seed=cfg.data.split_seed,
                              max_docs=cfg.data.max_docs)
    torch.set_num_threads(cfg.student.num_threads)
    t_ft = time.time()
    folders, oracle = prepare_teachers(cfg, splits["train"], parts)
    finetune_s = time.time() - t_ft
    tokenizer = load_tokenizer(student_base)
    for path in [p for ps in folders.values() for p in ps] + ([oracle] if oracle else []):
        if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"teacher {path} has another tokenizer than the student {student_base}; MUKI feeds both the same ids: fine-tune the teachers from the student's base model")
    rows = {s: tokenize_documents(tokenizer, splits[s], labels, cfg.data.seq_len) for s in SPLITS}
    fps = {s: documents_fingerprint(splits[s]) for s in SPLITS}
    stats: dict[str, Any] = {"teacher_calls": 0, "label_s": 0.0, "cache_hits": 0, "cache_misses": 0, "mc_passes": 0}
    need_features = "dfa" in cfg.methods
    labels_of = {
        p.name: [teacher_labels(cfg, f"{cfg.teacher.name}-{p.name}-{i}", path, rows, fps, need_mc=cfg.uses_mc, need_features=need_features, stats=stats)
                 for i, path in enumerate(folders[p.name])]
        for p in parts
    }
    oracle_logits = teacher_labels(cfg, f"{cfg.teacher.name}-oracle", oracle, rows, fps, need_mc=False, need_features=False,
                                   stats=stats).logits["test"] if oracle else None
    gold = {s: rows[s]["label"] for s in SPLITS}
    train_rows = {**rows["train"], "label": np.zeros_like(gold["train"])}  # gold labels never reach training: 0 only marks a valid row
    results_parts, train_s = [], 0.0
    for part in parts:
        teachers = labels_of[part.name]
        table = _teacher_rows(part, teachers, oracle_logits, gold["test"])
        for name in cfg.methods:
            ts = time.time()
            table.append(student_row(cfg, INTEGRATIONS[name], part, teachers, train_rows, rows, gold, labels))
            train_s += time.time() - ts
        results_parts.append({"name": part.name, "teachers": part.names, "rows": table})
    results = {
        "run_name": cfg.run_name,
        "labels": labels,
        "split_sizes": {s: len(splits[s]) for s in SPLITS},
        "partitions": results_parts,
        "costs": {**{k: (round(v, 1) if isinstance(v, float) else v) for k, v in stats.items()}, "finetune_s": round(finetune_s, 1),
                  "student_train_s": round(train_s, 1), "student_runs": len(parts) * len(cfg.methods) * len(cfg.seeds)},
        "config": cfg.model_dump(),
        "wall_s": round(time.time() - t0, 1),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_results(output_dir, results)
    (output_dir / "results.md").write_text(table_markdown(results))
    plot_results(output_dir, results)
    if cfg.publish:
        publish(output_dir, Path(cfg.publish))
    print(table_markdown(results))
    return results


def publish(output_dir: Path, stem: Path) -> list[Path]:
    """Copy ``results.json``, ``results.md`` and ``muki.png`` to ``<stem>.json/.md/.png``."""
    import shutil

    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for src, ext in (("results.json", ".json"), ("results.md", ".md"), ("muki.png", ".png")):
        out.append(Path(shutil.copyfile(output_dir / src, stem.with_name(stem.name + ext))))
    return out
