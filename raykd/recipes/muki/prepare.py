"""What MUKI needs before any student trains: the split, the checks, the teachers.

:func:`stratified_split` splits by article within each class; :func:`check_plan` refuses bad
input (partitions, teacher labels, the student's head size) before anything is trained;
:func:`prepare_teachers` fine-tunes each teacher on its class block only (cached by
:func:`raykd.train.finetune.finetune_classifier`: a rerun trains nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raykd.data.documents import Document
from raykd.data.splits import shuffled_by_class
from raykd.recipes.muki.config import MukiConfig, resolve_partition

SPLITS = ("train", "dev", "test")


def stratified_split(docs: list[Document], *, test_share: float, dev_share: float, seed: int,
                     max_docs: int | None = None) -> dict[str, list[Document]]:
    """Train / dev / test articles, whole articles only, the same class shares in every split.

    Each class's articles are sorted by id and shuffled with ``random.Random(seed)``; with
    ``max_docs`` each class keeps its share of ``max_docs``; then the first ``test_share`` of
    them go to test, the next ``dev_share`` to dev, the rest to train (at least one each).

    Raises:
        ValueError: an article without a label, or a class too small for three splits.
    """
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for label, members in shuffled_by_class(docs, seed, max_docs, "MUKI needs labeled articles (gold labels for dev/test)").items():
        n_test, n_dev = max(1, round(len(members) * test_share)), max(1, round(len(members) * dev_share))
        if len(members) < n_test + n_dev + 1:
            raise ValueError(f"class {label!r} has {len(members)} articles, too few for test, dev and train; keep more articles (data.max_docs)")
        out["test"] += members[:n_test]
        out["dev"] += members[n_test : n_test + n_dev]
        out["train"] += members[n_test + n_dev :]
    return out


@dataclass
class Partition:
    """One partition of the classes: each teacher's class names and indices into ``labels``
    (the partition's classes: the data's, or with ``drop_other_classes`` the teachers' union)."""

    name: str
    names: list[list[str]]
    blocks: list[list[int]]
    models: list[str] | None = None
    labels: list[str] | None = None


def _teacher_labels(path: str | Path) -> list[str]:
    config = json.loads((Path(path) / "config.json").read_text())
    id2label = config.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)]


def check_teacher_labels(path: str | Path, block: list[str], where: str) -> None:
    """Raise ``ValueError`` unless the classifier at ``path`` names exactly ``block``'s classes.

    Raises:
        ValueError: other label names (the message gives both lists and the fix).
        FileNotFoundError: no ``config.json``.
    """
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{where}: {path} has no config.json (not a model folder)")
    have = _teacher_labels(path)
    if sorted(have) != sorted(block):
        raise ValueError(f"{where}: teacher {path} has labels {have}, but its block is {sorted(block)}; the teacher's "
                         "id2label must name exactly the data's classes of its block (fine-tune it on them, or fix the partition)")


def check_plan(cfg: MukiConfig, labels: list[str]) -> list[Partition]:
    """Every check that needs the data's class names, before any training.

    Returns:
        The resolved partitions (class indices sorted within each teacher, as its head is).

    Raises:
        ValueError: overlapping or missing classes, a name the data does not have, a teacher
            with fewer than 2 classes, a given teacher whose labels differ from its block, or a
            student head size other than the union of the teachers' classes.
    """
    labels = sorted(labels)
    parts = []
    for p in cfg.partitions:
        names = [sorted(b) for b in resolve_partition(p, labels)]
        own = sorted(n for b in names for n in b)
        if p.models is not None:
            if len(p.models) != len(names):
                raise ValueError(f"partition {p.name!r} gives {len(p.models)} teacher models for {len(names)} blocks")
            for i, (m, b) in enumerate(zip(p.models, names)):
                check_teacher_labels(m, b, f"partition {p.name!r}, teacher {i}")
        parts.append(Partition(p.name, names, [[own.index(n) for n in b] for b in names], p.models, own))
        union = len(own)
        if cfg.student.num_labels is not None and cfg.student.num_labels != union:
            raise ValueError(f"student.num_labels={cfg.student.num_labels}, but the teachers' classes of partition {p.name!r} together "
                             f"are {union} ({own}); set student.num_labels={union} or leave it empty")
    if cfg.teacher.model:
        raise ValueError("teacher.model is not used by muki (each partition's teachers are fine-tuned on their blocks); "
                         "give finished teachers as partitions[].models instead")
    return parts


def prepare_teachers(cfg: MukiConfig, train: list[Document], parts: list[Partition]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Each partition's teacher folders (fine-tuned on its block's training articles only, or
    the given ones), and, when ``cfg.oracle``, an oracle per partition (all of its classes; one
    fine-tuning per distinct class set).

    Returns:
        ``({partition name: [folder per teacher]}, {partition name: oracle folder})``.
    """
    # lazy: keeps torch out of import time
    from raykd.train.finetune import finetune_classifier

    folders: dict[str, list[str]] = {}
    for part in parts:
        if part.models is not None:
            folders[part.name] = [str(m) for m in part.models]
            continue
        folders[part.name] = []
        for i, block in enumerate(part.names):
            own = [d for d in train if d.label in set(block)]
            path = finetune_classifier(cfg.teacher, own, block, cfg.data.seq_len)
            check_teacher_labels(path, block, f"partition {part.name!r}, teacher {i}")
            folders[part.name].append(str(path))
    oracles = {}
    for part in parts if cfg.oracle else []:
        own = [d for d in train if d.label in set(part.labels)]
        oracles[part.name] = str(finetune_classifier(cfg.teacher, own, part.labels, cfg.data.seq_len))  # cached: one per class set
    return folders, oracles
