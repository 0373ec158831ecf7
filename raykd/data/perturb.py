"""Perturbed inputs for robust distillation (GKD's ``distill_random_data``, "replace" mode).

A share of each document's tokens is replaced by tokens drawn uniformly from the vocabulary
(special tokens excluded) and the result is decoded back to text. The teacher then labels the
perturbed text like any other, so the student learns the teacher's behaviour on noisy input;
the perturbed documents have their own data fingerprint, hence their own soft-label cache.
Deterministic: the replacement of a document depends only on ``seed`` and its ``doc_id``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from raykd.data.documents import Document


def _rng(seed: int, doc_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def perturb_documents(docs: list[Document], tokenizer, share: float, seed: int = 0) -> list[Document]:
    """Replace ``share`` of each document's tokens by random tokens.

    Args:
        docs: documents to perturb (not changed).
        tokenizer: the teacher's tokenizer (``__call__``, ``decode``, ``all_special_ids``, ``len``).
        share: fraction of tokens replaced, in [0, 1); the number is ``round(share * n)`` per document.
        seed: seed of the replacement.

    Returns:
        New documents with the same ids and labels and the perturbed text.

    Raises:
        ValueError: ``share`` is outside [0, 1).
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"perturb share must be in [0, 1), got {share}")
    special = set(tokenizer.all_special_ids)
    candidates = np.array([i for i in range(len(tokenizer)) if i not in special])
    out = []
    for doc in docs:
        ids = np.array(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        rng = _rng(seed, doc.doc_id)
        n = int(round(share * len(ids)))
        if n:
            where = rng.choice(len(ids), size=n, replace=False)
            ids[where] = rng.choice(candidates, size=n)
        out.append(Document(doc.doc_id, tokenizer.decode(ids.tolist()), doc.label))
    return out
