"""Seeded train/test split by document."""

from __future__ import annotations

import random
from collections.abc import Sequence

from raykd.data.documents import Document


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
