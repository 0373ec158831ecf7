"""``raykd mckd``: Multistage Collaborative Knowledge Distillation (Zhao et al., ACL 2024), as
the paper's algorithm box reads.

1. split the articles (gold, unlabeled, test) and check the plan before any LLM call;
2. the LLM labels the unlabeled articles few-shot from the gold ones (prompt, shots and
   calibration chosen on the held-out gold examples): the pseudo-labels;
3. per seed, split the pseudo-labeled articles into halves A and B; each stage trains a student
   on A (validated on B) and one on B (validated on A), and each relabels the half it did not
   see; those labels are the next stage's;
4. after each stage ``s`` (and at ``s = 0``: vanilla KD), a final student trains on all of
   A + B's stage-``s`` labels and is tested; supervised students on the gold labels are the
   references;
5. write ``results.json``, ``results.md`` and ``mckd.png`` (and copy them to ``cfg.publish``);
   print the table.

Every labeling, stage and student is a keyed artifact under the run (``stages/``, ``rows/``,
``students/``) or the pseudo-label cache: a rerun skips what is finished, and a killed run
resumes at its first unfinished stage (even its first unfinished student).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from raykd.cluster import connect
from raykd.console import user_errors
from raykd.data.bbc import load_bbc_news
from raykd.data.documents import Document
from raykd.models import load_tokenizer, resolve_model_path, tokenizer_fingerprint
from raykd.recipes.mckd.config import MckdConfig
from raykd.recipes.mckd.labels import LLMLabeler, class_histogram
from raykd.recipes.mckd.prepare import (
    CONTROLS,
    SPLITS,
    check_plan,
    confusion_matrix,
    control_labels,
    cross_relabel,
    gold_split,
    hard_labels,
    split_halves,
)
from raykd.recipes.mckd.report import publish, results_table, write_all
from raykd.recipes.mckd.students import Task
from raykd.report import bootstrap_ci
from raykd.soft_labels.cache import CacheKey, fingerprint
from raykd.soft_labels.pseudo_labels import (
    PseudoLabels,
    commit_labels,
    has_labels,
    pseudo_label_key,
    read_labels,
)
from raykd.soft_labels.relabel import relabel

log = logging.getLogger(__name__)

VANILLA = "vanilla KD (LLM labels)"
"""The row every other row is compared with (paired, on the same test articles)."""


class Artifacts:
    """The run's keyed artifacts: stage labels and test predictions (pseudo-label caches under
    ``<run>/stages`` and ``<run>/rows``), students under ``<run>/students``."""

    def __init__(self, task: Task, output_dir: Path, tokenizer_fp: str, stats: dict[str, Any]):
        self.task, self.out, self.tok_fp, self.stats = task, output_dir, tokenizer_fp, stats

    def key(self, chain: str, kind: str, data_fp: str) -> CacheKey:
        """The key of one artifact; ``chain`` fingerprints everything it depends on."""
        n_cls = 0 if self.task.generation else len(self.task.classes)
        return pseudo_label_key(chain, self.tok_fp, f"mckd_{kind}", data_fp, "soft" if self.task.cfg.soft_relabel else "hard",
                                kind, n_cls, self.task.cfg.data.seq_len)

    def get(self, kind: str, key: CacheKey) -> tuple[PseudoLabels, dict[str, Any]] | None:
        """The cached labels of ``key`` and their record, or None."""
        root = self.out / kind
        return read_labels(root, key) if has_labels(root, key) else None

    def put(self, kind: str, key: CacheKey, labels: PseudoLabels, record: dict[str, Any]) -> None:
        commit_labels(self.out / kind, key, labels, [1] * len(labels.doc_ids), record, float(record.get("seconds", 0.0)))

    def student(self, name: str) -> Path:
        return self.out / "students" / name

    def labels_by(self, folder: Path, docs: list[Document]) -> PseudoLabels:
        """A trained student's labels of ``docs``, through Ray Data on its serving engine."""
        connect(self.task.cfg.ray)
        st = self.task.cfg.student
        self.stats["relabels"] += 1
        return relabel(self.task.engine, str(folder), self.task.rows(docs), batch_size=st.eval_batch_size,
                       num_threads=st.num_threads, max_new_tokens=self.task.cfg.data.target_tokens)


def run_stages(art: Artifacts, pseudo: PseudoLabels, pseudo_key: str, docs: dict[str, Document], seed: int) -> list[dict[str, Any]]:
    """Stages ``1..S`` of one seed (each cached); returns, per stage ``0..S``, its labels of every
    unlabeled article, its key and its log (stage 0: the LLM's pseudo-labels)."""
    cfg = art.task.cfg
    halves = split_halves(pseudo.doc_ids, cfg.split_share, seed)
    data_fp = fingerprint(sorted(pseudo.doc_ids))
    chain = [{"stage": 0, "labels": pseudo, "key": pseudo_key, "log": None}]
    for stage in range(1, cfg.stages + 1):
        prev = chain[-1]
        link = fingerprint({"prev": prev["key"], "halves": halves, "student": cfg.student.model_dump(), "seed": seed, "stage": stage,
                            "soft": cfg.soft_relabel, "task": cfg.task, "data": cfg.data.model_dump(), "validation": "llm_labels"})
        key = art.key(link, "stage", data_fp)
        found = art.get("stages", key)
        if found is not None:
            art.stats["stage_hits"] += 1
            chain.append({"stage": stage, "labels": found[0], "key": key.digest(), "log": found[1]})
            continue

        def train(name: str, labels: PseudoLabels, val: PseudoLabels, link=link) -> tuple[Path, dict[str, Any]]:
            folder = art.student(f"{link}-{name}")
            info = art.task.train([docs[d] for d in labels.doc_ids], labels, ([docs[d] for d in val.doc_ids], val), seed, folder)
            art.stats["student_trainings"] += 0 if info["reused"] else 1
            return folder, info

        def relabel(folder: Path, ids: list[str]) -> PseudoLabels:
            return art.labels_by(folder, [docs[d] for d in ids])

        t0 = time.time()
        labels, stage_log = cross_relabel(prev["labels"], halves, train, relabel, original=pseudo)
        labels = labels.select(pseudo.doc_ids)
        record = {"stage": stage, "seed": seed, "halves": {h: len(v) for h, v in halves.items()}, "students": stage_log.info,
                  "seconds": round(time.time() - t0, 1)}
        art.put("stages", key, labels, record)
        chain.append({"stage": stage, "labels": labels, "key": key.digest(), "log": record})
    return chain


def student_row(art: Artifacts, name: str, labels: PseudoLabels, label_key: str, docs: dict[str, Document],
                test: list[Document], seed: int, val: tuple[list[Document], PseudoLabels, str] | None = None,
                task: Task | None = None) -> tuple[PseudoLabels, dict[str, Any]]:
    """A student trained on ``labels``, then its test predictions (cached by the labels' key,
    the student config, the validation and the seed).

    Args:
        val: documents, labels and their key that choose the checkpoint (None: the last step).
        task: the students' task when it differs from the run's (an ablation's config).

    Returns:
        The test predictions and the row's record (``seconds``: training and test predictions).
    """
    task = task or art.task
    cfg = task.cfg
    link = fingerprint({"labels": label_key, "row": name, "student": cfg.student.model_dump(), "seed": seed, "data": cfg.data.model_dump(),
                        "val": None if val is None else [val[2], sorted(d.doc_id for d in val[0])]})
    key = art.key(link, "row", fingerprint(sorted(d.doc_id for d in test)))
    found = art.get("rows", key)
    if found is not None:
        art.stats["row_hits"] += 1
        return found
    t0 = time.time()
    folder = art.student(f"{link}-final")
    info = task.train([docs[d] for d in labels.doc_ids], labels, None if val is None else val[:2], seed, folder)
    art.stats["student_trainings"] += 0 if info["reused"] else 1
    preds = art.labels_by(folder, test)
    record = {"row": name, "seed": seed, **info, "row_seconds": round(time.time() - t0, 1)}
    art.put("rows", key, preds, record)
    return preds, record


class Rows:
    """The table's rows: per row, its test metrics, its training labels' quality and its wall
    time, one value per seed."""

    def __init__(self, task: Task, truth: dict[str, PseudoLabels]):
        self.task, self.truth, self.rows, self.items = task, truth, {}, {}

    def add(self, name: str, kind: str, preds: PseudoLabels, quality: PseudoLabels | None = None, seconds: float | None = None) -> None:
        """Score one seed's test predictions of row ``name`` (and the quality of its training labels)."""
        row = self.rows.setdefault(name, {"row": name, "kind": kind, "test": {}, "label_quality": {}, "wall_s": []})
        for metric, value in self.task.score(preds, self.truth["test"]).items():
            row["test"].setdefault(metric, []).append(value)
        self.items.setdefault(name, []).append(self.task.per_item(preds, self.truth["test"]))
        row["ci95"] = list(bootstrap_ci(np.stack(self.items[name])))
        if quality is not None:
            for metric, value in self.task.score(quality, self.truth["unlabeled"]).items():
                row["label_quality"].setdefault(metric, []).append(value)
        if seconds is not None:
            row["wall_s"].append(round(seconds, 1))

    def paired(self, reference: str) -> None:
        """Each row's difference to ``reference`` on the same test articles: the mean and a paired
        bootstrap 95% interval (seeds matched by position; a one-seed row, such as the LLM's,
        is compared with every seed of the other)."""
        if reference not in self.items:
            return
        ref = np.stack(self.items[reference])
        for name, row in self.rows.items():
            mine = np.stack(self.items[name])
            n = max(len(mine), len(ref))
            diff = np.resize(mine, (n, mine.shape[1])) - np.resize(ref, (n, ref.shape[1]))
            row["vs_" + reference] = [float(diff.mean()), *bootstrap_ci(diff)]


def seed_rows(art: Artifacts, rows: Rows, pseudo: PseudoLabels, pseudo_key: str, by_id: dict[str, Document],
              splits: dict[str, list[Document]], seed: int) -> dict[str, Any]:
    """Every row of one seed: the stages, a final student per stage (vanilla KD at stage 0), the
    ablation, the controls and the supervised references. Returns the seed's stage log."""
    cfg, task, test = art.task.cfg, art.task, splits["test"]
    chain = run_stages(art, pseudo, pseudo_key, by_id, seed)
    val = (splits["unlabeled"], pseudo, pseudo_key)  # final students: the LLM's labels of the pool (a val_docs sample)
    stage_s = 0.0
    for link in chain:
        stage_s += float(link["log"].get("seconds", 0.0)) if isinstance(link["log"], dict) else 0.0
        name = VANILLA if link["stage"] == 0 else f"MCKD, {link['stage']} stage{'s' if link['stage'] > 1 else ''}"
        preds, rec = student_row(art, name, link["labels"], link["key"], by_id, test, seed, val)
        rows.add(name, "student", preds, link["labels"], stage_s + rec.get("row_seconds", rec.get("seconds", 0.0)))
    if cfg.unbalanced_ablation and not task.generation:
        plain = Task(cfg.model_copy(update={"student": cfg.student.model_copy(update={"balanced": False})}), task.classes, task.tokenizer)
        name = "vanilla KD, class-balanced sampling off"
        preds, rec = student_row(art, name, pseudo, pseudo_key, by_id, test, seed, val, task=plain)
        rows.add(name, "ablation", preds, pseudo, rec.get("row_seconds"))
    if cfg.controls and not task.generation:
        pool = rows.truth["unlabeled"]
        for kind in CONTROLS:
            labels = hard_labels(pool.doc_ids, control_labels(kind, pool.hard, pseudo.select(pool.doc_ids).hard, len(task.classes), seed),
                                 len(task.classes))
            preds, rec = student_row(art, f"control: {kind}", labels, fingerprint({"control": kind, "seed": seed, "pseudo": pseudo_key}),
                                     by_id, test, seed)
            rows.add(f"control: {kind} on the pool", "control", preds, labels, rec.get("row_seconds"))
    preds, rec = student_row(art, "supervised_gold", rows.truth["gold"], fingerprint({"gold": sorted(d.doc_id for d in splits["gold"])}),
                             by_id, test, seed)
    rows.add(f"supervised, {len(splits['gold'])} gold", "reference", preds, seconds=rec.get("row_seconds"))
    if cfg.supervised_extra:
        ids = sorted(d.doc_id for d in splits["unlabeled"])
        random.Random(seed).shuffle(ids)
        extra = rows.truth["unlabeled"].select(sorted(ids[: cfg.supervised_extra]))
        preds, rec = student_row(art, "supervised_extra", extra, fingerprint({"extra": extra.doc_ids}), by_id, test, seed)
        rows.add(f"supervised, {len(extra.doc_ids)} gold (reference)", "reference", preds, seconds=rec.get("row_seconds"))
    return {"seed": seed, "stages": [{"stage": c["stage"], "key": c["key"], "log": c["log"],
                                      "label_quality": task.score(c["labels"], rows.truth["unlabeled"])} for c in chain]}


def labeler_report(pseudo: PseudoLabels, truth: PseudoLabels, classes: list[str]) -> dict[str, Any]:
    """The LLM's labels of the pool against gold: accuracy, confusion matrix (rows: gold class,
    columns: the LLM's class) and the per-class counts of both."""
    pred, gold = pseudo.select(truth.doc_ids).hard, truth.hard
    conf = confusion_matrix(pred, gold, len(classes))
    return {"accuracy": float((pred == gold).mean()), "confusion": conf.tolist(), "counts_labeler": conf.sum(0).tolist(),
            "counts_gold": conf.sum(1).tolist()}


def plan_run(cfg: MckdConfig, docs: list[Document] | None, stats: dict[str, Any]):
    """The split, the checks and the tokenizers, before any model is called; bad input exits
    with ``error: ...``. Returns ``(splits, classes, labeler, student tokenizer)``."""
    with user_errors(ValueError, FileNotFoundError):
        docs = docs if docs is not None else load_bbc_news()
        splits = gold_split(docs, test_share=cfg.data.test_share, gold=cfg.data.gold, seed=cfg.data.split_seed,
                            max_docs=cfg.data.max_docs, pool_docs=cfg.data.pool_docs)
        classes = check_plan(cfg, sorted({str(d.label) for d in docs}), None, len(splits["unlabeled"]))
        labeler = LLMLabeler(cfg, classes, splits["gold"], stats)
        check_plan(cfg, classes, labeler.tokenizer)
        student_tok = load_tokenizer(resolve_model_path(cfg.student.base_model))
    return splits, classes, labeler, student_tok


def main_mckd(cfg: MckdConfig, output_dir: str | Path, docs: list[Document] | None = None) -> dict[str, Any]:
    """Run MCKD and its baselines; write ``results.json``, ``results.md`` and ``mckd.png``.

    Args:
        cfg: the config (checked when it was loaded).
        output_dir: where the results and the run's artifacts go.
        docs: labeled articles instead of BBC News (tests).

    Raises:
        ValueError: bad input (see :func:`raykd.recipes.mckd.prepare.check_plan`), before any LLM call.
    """
    t0 = time.time()
    output_dir = Path(output_dir).resolve()
    stats: dict[str, Any] = {"llm_calls": 0, "label_s": 0.0, "label_tokens": 0, "new_tokens": 0, "cache_hits": 0, "cache_misses": 0,
                             "recorded_label_s": 0.0, "recorded_label_tokens": 0, "student_trainings": 0, "relabels": 0,
                             "stage_hits": 0, "row_hits": 0}
    splits, classes, labeler, student_tok = plan_run(cfg, docs, stats)
    task = Task(cfg, classes, student_tok)
    try:
        choice = labeler.choose(lambda labels, truth: task.agreement(labels, truth))
        pseudo = labeler.labels(choice, splits["unlabeled"])
        llm_test = labeler.labels(choice, splits["test"])
    finally:
        labeler.close()
    by_id = {d.doc_id: d for s in SPLITS for d in splits[s]}
    rows = Rows(task, {s: task.gold(splits[s]) for s in SPLITS})
    art = Artifacts(task, output_dir, tokenizer_fingerprint(student_tok), stats)
    pseudo_key = fingerprint({"labeler": labeler.fps, "choice": [choice.shots, choice.calibrate], "docs": sorted(pseudo.doc_ids)})
    rows.add("LLM labeler (few-shot)", "labeler", llm_test, pseudo, stats["recorded_label_s"])
    stages_out = [seed_rows(art, rows, pseudo, pseudo_key, by_id, splits, seed) for seed in cfg.seeds]
    rows.paired(VANILLA)
    results = {
        "run_name": cfg.run_name,
        "task": cfg.task,
        "classes": classes,
        "split_sizes": {s: len(splits[s]) for s in SPLITS},
        "labeler": {"model": cfg.labeler.model, "shots": choice.shots, "calibrate": choice.calibrate, "candidates": choice.candidates,
                    "held_out_gold": len(labeler.held_out), "test": task.score(llm_test, rows.truth["test"]),
                    **({} if task.generation else {"class_histogram_unlabeled": class_histogram(pseudo, len(classes)),
                                                   "pool": labeler_report(pseudo, rows.truth["unlabeled"], classes)})},
        "rows": list(rows.rows.values()),
        "stages": stages_out,
        "costs": {**{k: (round(v, 1) if isinstance(v, float) else v) for k, v in stats.items()}},
        "config": cfg.model_dump(),
        "wall_s": round(time.time() - t0, 1),
    }
    write_all(output_dir, results)
    if cfg.publish:
        publish(output_dir, Path(cfg.publish))
    print(results_table(results))
    return results
