"""What MCKD needs before any model is called: the split, the checks, the halves, and the
cross-relabel bookkeeping of one stage.

:func:`gold_split` splits by article (gold, unlabeled, test); :func:`check_plan` refuses bad
input (too few gold examples, verbalisers, halves, the student's label set) before any LLM
call; :func:`split_halves` draws A and B; :func:`cross_relabel` is one stage of the paper's
algorithm, with the models abstracted away so its bookkeeping is tested on its own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raykd.data.documents import Document
from raykd.data.splits import shuffled_by_class
from raykd.recipes.mckd.config import MckdConfig
from raykd.soft_labels.pseudo_labels import PseudoLabels, check_verbalisers

SPLITS = ("gold", "unlabeled", "test")


def headline_and_body(doc: Document) -> tuple[str, str]:
    """A BBC article's headline (its first line) and body (the rest)."""
    head, _, body = doc.text.partition("\n")
    return head.strip(), body.strip()


def gold_split(docs: Sequence[Document], *, test_share: float, gold: int, seed: int,
               max_docs: int | None = None, pool_docs: int | None = None) -> dict[str, list[Document]]:
    """Test, gold and unlabeled articles: whole articles, stratified by class, seeded.

    Each class's articles are sorted by id and shuffled with ``random.Random(seed)`` (with
    ``max_docs`` each class keeps its share); its first ``test_share`` go to test, then its
    share of the ``gold`` examples (spread round-robin over the sorted classes), the rest is
    unlabeled (their labels are kept for reporting pseudo-label quality only, never trained on).
    With ``pool_docs`` the unlabeled pool is cut to a ``seed`` sample of that many articles (not
    stratified: the pool keeps its natural class mix); test and gold do not change with it.

    Raises:
        ValueError: an article without a label, or a class too small for the split.
    """
    by_class = shuffled_by_class(docs, seed, max_docs, "MCKD's data needs labels for gold and test")
    names = list(by_class)
    per_class = {n: gold // len(names) + (1 if i < gold % len(names) else 0) for i, n in enumerate(names)}
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for name, members in by_class.items():
        n_test, n_gold = max(1, round(len(members) * test_share)), per_class[name]
        if len(members) < n_test + n_gold + 2:
            raise ValueError(f"class {name!r} has {len(members)} articles, too few for {n_test} test, {n_gold} gold and "
                             "unlabeled ones; keep more articles (data.max_docs) or fewer gold")
        out["test"] += members[:n_test]
        out["gold"] += members[n_test : n_test + n_gold]
        out["unlabeled"] += members[n_test + n_gold :]
    if pool_docs is not None and pool_docs < len(out["unlabeled"]):
        pool = sorted(out["unlabeled"], key=lambda d: d.doc_id)
        random.Random(seed).shuffle(pool)
        out["unlabeled"] = pool[:pool_docs]
    return out


def split_halves(doc_ids: Sequence[str], share: float, seed: int) -> dict[str, list[str]]:
    """MCKD's random halves: ``A`` (``round(share * N)`` documents) and ``B`` (the rest).

    Raises:
        ValueError: a half would be empty.
    """
    ids = sorted(doc_ids)
    random.Random(seed).shuffle(ids)
    n_a = round(share * len(ids))
    if n_a == 0 or n_a == len(ids):
        raise ValueError(f"split_share={share} of {len(ids)} pseudo-labeled articles leaves half "
                         f"{'A' if n_a == 0 else 'B'} empty; use a share nearer 0.5 or more articles")
    return {"A": sorted(ids[:n_a]), "B": sorted(ids[n_a:])}


def check_plan(cfg: MckdConfig, labels: Sequence[str], tokenizer: Any | None = None, n_unlabeled: int | None = None) -> list[str]:
    """Every check that needs the data's classes or the labeler's tokenizer, before any LLM call.

    Args:
        labels: the data's class names.
        tokenizer: the labeler's tokenizer (verbalisers after tokenisation); None skips that check.
        n_unlabeled: unlabeled articles (the halves); None skips that check.

    Returns:
        The class names in the verbalisers' order (the label space of every student).

    Raises:
        ValueError: fewer gold examples than classes, too many shots for the gold examples,
            verbalisers that do not name the data's classes, are empty after tokenisation or
            shared by two classes, a half left empty, or a student label set other than the
            verbalisers'.
    """
    labels = sorted(labels)
    if cfg.data.gold < len(labels):
        raise ValueError(f"data.gold={cfg.data.gold} gold examples is fewer than the {len(labels)} classes {labels}; "
                         "every class needs at least one gold example")
    per_class = cfg.data.gold // len(labels)
    most = max(cfg.labeler.shots)
    shots_per_class = most if cfg.task == "classification" else -(-most // len(labels))
    if shots_per_class >= per_class:
        raise ValueError(f"labeler.shots={cfg.labeler.shots} uses {shots_per_class} of the {per_class} gold examples per class "
                         "as demonstrations, leaving none to choose the labeler on; use fewer shots or more data.gold")
    if n_unlabeled is not None:
        split_halves([str(i) for i in range(n_unlabeled)], cfg.split_share, 0)
    if cfg.task == "generation":
        return labels
    verbalisers = cfg.labeler.verbalisers or {}
    if sorted(verbalisers) != labels:
        raise ValueError(f"labeler.verbalisers name {sorted(verbalisers)}, but the data's classes are {labels}; "
                         "give exactly one verbaliser per class")
    if tokenizer is not None:
        check_verbalisers(tokenizer, verbalisers)
    classes = list(verbalisers)
    if cfg.student.labels is not None and sorted(cfg.student.labels) != sorted(classes):
        raise ValueError(f"student.labels={cfg.student.labels} do not match the verbalisers' classes {classes}; "
                         "the student must predict exactly the classes the labeler labels")
    return classes


@dataclass
class StageLog:
    """Who trained on what and who labeled what in one stage (the bookkeeping under test)."""

    trained_on: dict[str, list[str]] = field(default_factory=dict)
    """Student (``A`` / ``B``) -> the documents it trained on."""
    labeled_by: dict[str, str] = field(default_factory=dict)
    """Document -> the student that wrote its new label."""
    info: dict[str, Any] = field(default_factory=dict)
    """Student -> what training reported (validation score, checkpoint step)."""


Trainer = Callable[[str, PseudoLabels, PseudoLabels], Any]
"""``(student name, train labels, validation labels) -> (student, info)``."""
Relabeler = Callable[[Any, list[str]], PseudoLabels]
"""``(student, documents) -> its labels of them``."""


def cross_relabel(labels: PseudoLabels, halves: dict[str, list[str]], train: Trainer, relabel: Relabeler,
                  original: PseudoLabels | None = None) -> tuple[PseudoLabels, StageLog]:
    """One MCKD stage: a student on A (validated on B) relabels B; one on B (validated on A)
    relabels A; the two relabeled halves are the next stage's labels.

    Args:
        labels: the stage's training labels (the previous stage's relabels).
        original: the validation labels: the LLM's original labels of the other half, as
            upstream passes ``datasetA/B.json`` as ``validation_file`` at every stage; None
            validates on ``labels`` (the previous stage's relabels of the other half).

    Returns:
        ``(new labels of A + B, the stage's log)``.

    Raises:
        AssertionError: a student would label a document it trained on (never, by construction).
    """
    log = StageLog()
    new = {}
    for name, other in (("A", "B"), ("B", "A")):
        student, info = train(name, labels.select(halves[name]), (original or labels).select(halves[other]))
        log.trained_on[name], log.info[name] = list(halves[name]), info
        new[other] = relabel(student, halves[other])
        seen = set(halves[name])
        assert not seen & set(new[other].doc_ids), "a student labeled a document it trained on"
        log.labeled_by.update({d: name for d in new[other].doc_ids})
    return PseudoLabels.merge([new["A"], new["B"]]), log


# --- the labeler's report and the noise controls (classification) -----------------------------

def confusion_matrix(pred: Sequence[int], gold: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts ``[C, C]``: row = gold class, column = predicted class."""
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return out


CONTROLS = ("gold labels", "balanced noise", "skewed noise")
"""The control rows: the pool's gold labels; random noise, spread evenly over the other classes,
at the labeler's accuracy; noise drawn from the labeler's confusion matrix (its accuracy and its
per-class lean, but independent of the article)."""


def control_labels(kind: str, gold: np.ndarray, labeler: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Hard labels ``[N]`` of a control row (:data:`CONTROLS`) for articles of true class ``gold``.

    Args:
        kind: one of :data:`CONTROLS`.
        gold: true classes ``[N]``; labeler: the labeler's classes of the same articles ``[N]``
            (their accuracy and confusion matrix are matched).
        seed: seeds the noise.

    Raises:
        ValueError: an unknown ``kind``.
    """
    gold, labeler = np.asarray(gold, dtype=np.int64), np.asarray(labeler, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if kind == "gold labels":
        return gold.copy()
    if kind == "balanced noise":
        keep = rng.random(len(gold)) < float((labeler == gold).mean())
        return np.where(keep, gold, (gold + rng.integers(1, num_classes, len(gold))) % num_classes)
    if kind == "skewed noise":
        conf = confusion_matrix(labeler, gold, num_classes).astype(np.float64)
        rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)
        return np.array([rng.choice(num_classes, p=rows[g]) if rows[g].sum() else g for g in gold], dtype=np.int64)
    raise ValueError(f"unknown control {kind!r}; valid: {', '.join(CONTROLS)}")


def hard_labels(doc_ids: Sequence[str], classes: np.ndarray, num_classes: int) -> PseudoLabels:
    """Hard labels as one-hot log-probs ``[N, C]`` (0 on the class, -1e4 elsewhere)."""
    onehot = np.full((len(doc_ids), num_classes), -1e4, dtype=np.float32)
    onehot[np.arange(len(doc_ids)), np.asarray(classes, dtype=np.int64)] = 0.0
    return PseudoLabels(list(doc_ids), onehot)
