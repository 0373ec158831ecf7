"""Splits by document: a seeded hash of the id (the streamed data path) or a seeded shuffle of an
in-memory list (the classification recipes)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import numpy as np

from raykd.data.documents import Document


def shuffled_by_class(docs: Sequence[Document], seed: int, max_docs: int | None = None,
                      why: str = "the recipe needs labeled articles") -> dict[str, list[Document]]:
    """Each class's documents, sorted by id and shuffled with ``random.Random(seed)`` (classes in
    sorted order); with ``max_docs`` each class keeps its share of ``max_docs`` (at least 3).

    Raises:
        ValueError: a document without a label (``why`` says what the labels are for).
    """
    by_class: dict[str, list[Document]] = {}
    for d in docs:
        if d.label is None:
            raise ValueError(f"article {d.doc_id!r} has no label; {why}")
        by_class.setdefault(d.label, []).append(d)
    keep = 1.0 if max_docs is None else min(1.0, max_docs / max(len(docs), 1))
    out = {}
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda d: d.doc_id)
        random.Random(seed).shuffle(members)
        out[label] = members[: max(3, round(len(members) * keep))]
    return out


def split_documents(
    docs: Sequence[Document], *, test_docs: int, seed: int, max_docs: int | None = None
) -> tuple[list[Document], list[Document]]:
    """Split documents into train and test sets, whole documents only.

    The documents are sorted by ``doc_id`` and shuffled with ``random.Random(seed)``, so the
    result depends on the seed and the set of documents, not on their input order. The last
    ``test_docs`` of the shuffle are the test set; the train set is taken from the front, up to
    ``max_docs - test_docs`` of them. The test set therefore does not change with ``max_docs``,
    and a smaller ``max_docs`` gives a prefix of a larger one's train set. Splitting by document
    (never by block or paragraph) keeps held-out text out of training.

    Args:
        docs: the corpus; ids must be unique.
        test_docs: held-out documents, at least 1.
        seed: shuffle seed.
        max_docs: keep at most this many documents in all (train + test); None keeps all.

    Returns:
        ``(train, test)`` in shuffled order; ``len(test) == test_docs`` and
        ``len(train) == min(len(docs), max_docs) - test_docs``.

    Raises:
        ValueError: ``test_docs < 1``, ``max_docs < test_docs + 1``, fewer than
            ``test_docs + 1`` documents, or a duplicate ``doc_id``.
    """
    if test_docs < 1:
        raise ValueError(f"test_docs={test_docs} must be at least 1 (set data.test_docs)")
    n = len(docs)
    keep = n if max_docs is None else min(n, max_docs)
    if keep < test_docs + 1:
        have = f"data.max_docs={max_docs} keeps {keep} of {n}" if keep < n else f"there are only {n}"
        raise ValueError(
            f"{have} documents, too few for {test_docs} test documents and at least one for "
            f"training; lower data.test_docs below {keep}, raise data.max_docs, or supply more documents"
        )
    ordered = sorted(docs, key=lambda d: d.doc_id)
    for a, b in zip(ordered, ordered[1:]):
        if a.doc_id == b.doc_id:
            raise ValueError(
                f"document id {a.doc_id!r} appears twice; ids must be unique to split by document"
            )
    random.Random(seed).shuffle(ordered)
    test = ordered[n - test_docs :]
    train = ordered[: keep - test_docs]
    return train, test


_SPLIT_ORDER = ("train", "eval", "test")


def unit_hash(doc_ids, salt: str, seed: int) -> np.ndarray:
    """A uniform value in ``[0, 1)`` per document id, stable across runs, machines and Python
    versions (SHA-256 of ``salt``, ``seed`` and the id; not Python's salted ``hash``).

    Args:
        doc_ids: ``[D]`` ids (str).
        salt: separates independent uses (``"split"``, ``"sample"``).
        seed: ``data.split_seed``.

    Returns:
        float64 ``[D]``.
    """
    prefix = f"raykd\0{salt}\0{seed}\0".encode()
    values = [int.from_bytes(hashlib.sha256(prefix + str(d).encode()).digest()[:8], "big") for d in doc_ids]
    return np.asarray(values, dtype=np.float64) / float(1 << 64)


def hash_split(doc_ids, splits: dict[str, float], seed: int) -> np.ndarray:
    """The split of each document by a seeded hash of its id: no shuffle, no global view.

    The hash's unit interval is cut in the order train, eval, test, with each split's fraction,
    so a document's split depends only on its id, the fractions and the seed. Splitting by
    document (never by block) keeps held-out text out of training.

    Args:
        doc_ids: ``[D]`` ids.
        splits: fractions by split name (``data.splits``; they sum to 1).
        seed: ``data.split_seed``.

    Returns:
        object ``[D]`` of split names.
    """
    u = unit_hash(doc_ids, "split", seed)
    names = [s for s in _SPLIT_ORDER if splits.get(s, 0.0) > 0]
    edges = np.cumsum([splits[s] for s in names])
    edges[-1] = 1.0  # fractions summing to 1 within rounding: the last interval takes the rest
    return np.asarray(names, dtype=object)[np.searchsorted(edges, u, side="right").clip(max=len(names) - 1)]


def in_sample(doc_ids, sample: float, seed: int) -> np.ndarray:
    """Which documents ``data.sample`` keeps: ``unit_hash(id, "sample") < sample``.

    Independent of the split hash, so a sample has the split's proportions; a smaller sample's
    documents are a subset of a larger one's.

    Returns:
        bool ``[D]``.
    """
    if sample >= 1.0:
        return np.ones(len(doc_ids), dtype=bool)
    return unit_hash(doc_ids, "sample", seed) < sample


def select_split(doc_ids, split: str, splits: dict[str, float], sample: float, seed: int) -> np.ndarray:
    """bool ``[D]``: the documents of ``split`` within the sample."""
    return in_sample(doc_ids, sample, seed) & (hash_split(doc_ids, splits, seed) == split)
