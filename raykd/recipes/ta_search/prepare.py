"""What both schedule searches need before any trial: data, teacher, cached soft labels, importance.

:func:`check_plan` does the cheap checks (config, teacher has a classification head, an
importance file fits the teacher) so bad input fails before anything runs; :func:`prepare`
then fine-tunes the teacher once, labels the splits through the teacher's Serve deployment
into the soft-label cache (or finds them there: a second run asks the teacher nothing), and
scores the teacher's heads and neurons.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd.cluster import connect
from raykd.config import TeacherConfig, default_cache_root
from raykd.data.bbc import BBC_TOPICS, load_bbc_news
from raykd.data.documents import Document
from raykd.data.splits import split_documents
from raykd.models import load_tokenizer, resolve_model_path, tokenizer_fingerprint, weights_fingerprint
from raykd.recipes.ta_search.config import ClassifierScheduleConfig
from raykd.soft_labels.cache import documents_fingerprint, open_cache
from raykd.soft_labels.class_labels import class_cache_key, find_class_cache, label_rows, read_class_cache
from raykd.teacher.engines.classifier import load_classifier

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


def split_bbc(cfg: ClassifierScheduleConfig, docs: list[Document] | None = None) -> dict[str, list[Document]]:
    """Train / dev / test articles, split by article with ``data.split_seed``.

    Raises:
        ValueError: too few articles for the requested dev and test sizes.
    """
    d = cfg.data
    rest, test = split_documents(docs if docs is not None else load_bbc_news(), test_docs=d.test_docs, seed=d.split_seed, max_docs=d.max_docs)
    train, dev = split_documents(rest, test_docs=d.dev_docs, seed=d.split_seed + 1)
    return {"train": train, "dev": dev, "test": test}


def teacher_deployment_config(cfg: ClassifierScheduleConfig, model_path: Path) -> TeacherConfig:
    """The Serve config of the classifier teacher."""
    t = cfg.teacher
    return TeacherConfig(name=t.name, model=str(model_path), engine="classifier", num_threads=t.num_threads, num_cpus=t.num_cpus, keep_alive=t.keep_alive)


@dataclass
class Prepared:
    """Everything a trial reads from disk (paths only, so it pickles small)."""

    teacher_path: str
    caches: dict[str, str]
    labels: list[str]
    importance_file: str
    teacher_acc: dict[str, float]
    stats: dict[str, Any] = field(default_factory=dict)


def check_teacher(path: Path) -> None:
    """Raise :class:`~raykd.teacher.engines.classifier.NotAClassifierError` unless ``path`` is a classifier."""
    load_classifier(path)


def _label_splits(cfg: ClassifierScheduleConfig, teacher_path: Path, docs: dict[str, list[Document]], labels: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Find each split's class-label cache, or label it through the Serve teacher."""
    # lazy: keeps torch out of import time
    from raykd.train.finetune import tokenize_documents

    root = Path(cfg.labels.cache_dir).expanduser().resolve() if cfg.labels.cache_dir else default_cache_root() / "soft_labels"
    root = root / "class_labels"
    tokenizer = load_tokenizer(teacher_path)
    w_fp, t_fp = weights_fingerprint(teacher_path), tokenizer_fingerprint(tokenizer)
    caches, stats, handle, started = {}, {"cache_hit": True, "teacher_calls": 0, "label_s": 0.0}, None, False
    for split in SPLITS:
        key = class_cache_key(w_fp, t_fp, "float32", len(labels), documents_fingerprint(docs[split]), cfg.data.seq_len)
        folder, manifest = find_class_cache(root, key)
        if manifest is None:
            if handle is None:
                from raykd.teacher.apps import start_teacher

                connect(cfg.ray)  # Ray starts only when the teacher must be asked
                handle, started = start_teacher(teacher_deployment_config(cfg, teacher_path), str(teacher_path))
            t0 = time.time()
            rows = tokenize_documents(tokenizer, docs[split], labels, cfg.data.seq_len)
            manifest = label_rows(handle, rows, root, key, num_classes=len(labels), batch_size=cfg.labels.batch_size,
                                  teacher={"path": str(teacher_path), "weights_fingerprint": w_fp})
            stats["cache_hit"] = False
            stats["teacher_calls"] += -(-len(rows["label"]) // cfg.labels.batch_size)
            stats["label_s"] += time.time() - t0
            log.info("labeled %s: %d articles into %s", split, manifest.rows, folder)
        caches[split] = str(folder)
    if started and not cfg.teacher.keep_alive:
        from raykd.teacher.apps import stop_teacher

        stop_teacher(cfg.teacher.name)
    return caches, stats


def load_splits(prepared: Prepared) -> dict[str, dict]:
    """The cached rows of every split (see :func:`raykd.soft_labels.class_labels.read_class_cache`)."""
    return {s: read_class_cache(Path(p), open_cache(Path(p))) for s, p in prepared.caches.items()}


def load_importance(path: str | Path):
    """Unit scores saved by :func:`prepare` (a :class:`~raykd.students.sparsify.Masks` of floats)."""
    # lazy: keeps torch out of import time
    import torch

    from raykd.students.sparsify import Masks

    raw = json.loads(Path(path).read_text())
    return Masks([torch.tensor(x) for x in raw["heads"]], [torch.tensor(x) for x in raw["neurons"]])


def check_importance(teacher, importance_path: str | Path) -> None:
    """Raise :class:`~raykd.students.sparsify.MaskError` unless saved scores fit the teacher."""
    # lazy: keeps torch out of import time
    from raykd.students.sparsify import check_masks

    check_masks(teacher, load_importance(importance_path))


def prepare(cfg: ClassifierScheduleConfig, output_dir: Path, docs: list[Document] | None = None) -> Prepared:
    """Data, teacher, soft-label caches and teacher importance for a schedule search.

    Args:
        cfg: the search config.
        output_dir: where ``teacher_importance.json`` is written.
        docs: the corpus (None: the BBC News corpus; tests pass their own).

    Raises:
        NotAClassifierError: ``teacher.model`` has no classification head.
        ValueError: too few articles for the split.
    """
    # lazy: keeps torch out of import time
    import torch

    from raykd.train.finetune import finetune_classifier
    from raykd.recipes.ta_search.classifier_chain import importance_of

    t0 = time.time()
    output_dir = Path(output_dir).resolve()  # trials read these paths from their own folders
    splits = split_bbc(cfg, docs)
    labels = sorted({d.label for d in splits["train"] if d.label is not None}) if docs is not None else list(BBC_TOPICS)
    if cfg.teacher.model:
        teacher_path = resolve_model_path(cfg.teacher.model)
        check_teacher(teacher_path)
    else:
        teacher_path = finetune_classifier(cfg.teacher, splits["train"], labels, cfg.data.seq_len)
    finetune_s = time.time() - t0
    caches, stats = _label_splits(cfg, teacher_path, splits, labels)
    prepared = Prepared(str(teacher_path), caches, labels, str(output_dir / "teacher_importance.json"), {}, stats)
    data = load_splits(prepared)
    teacher = load_classifier(teacher_path)
    # the teacher's accuracy from its cached logits: no forward pass needed
    prepared.teacher_acc = {s: float((data[s]["teacher_logits"].argmax(-1) == data[s]["label"]).mean()) for s in ("dev", "test")}
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.sparsify.importance_file:
        check_importance(teacher, cfg.sparsify.importance_file)
        scores = load_importance(cfg.sparsify.importance_file)
    else:
        torch.manual_seed(cfg.kd.seed)
        scores = importance_of(teacher, data["train"], cfg.kd, cfg.sparsify.importance_batches)
    Path(prepared.importance_file).write_text(json.dumps({"heads": [s.tolist() for s in scores.heads], "neurons": [s.tolist() for s in scores.neurons]}))
    prepared.stats.update({"finetune_s": round(finetune_s, 1), "prepare_s": round(time.time() - t0, 1),
                           "rows": {s: int(len(data[s]["label"])) for s in SPLITS}})
    return prepared
