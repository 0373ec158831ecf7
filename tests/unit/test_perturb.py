"""Perturbed inputs for robust distillation."""

from __future__ import annotations

import pytest


def test_perturbation_replaces_the_share_deterministically(tiny_model):
    from raykd.data import Document
    from raykd.data.perturb import perturb_documents
    from raykd.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    docs = [Document(f"d{i}", "The market said record profits on day 3. The team won the final match.") for i in range(3)]
    a = perturb_documents(docs, tok, 0.3, seed=0)
    assert a == perturb_documents(docs, tok, 0.3, seed=0) and a != perturb_documents(docs, tok, 0.3, seed=1)
    assert [d.doc_id for d in a] == ["d0", "d1", "d2"] and len({d.text for d in a}) == 3  # per-document noise
    n = len(tok(docs[0].text, add_special_tokens=False)["input_ids"])
    changed = sum(x != y for x, y in zip(tok(a[0].text, add_special_tokens=False)["input_ids"],
                                         tok(docs[0].text, add_special_tokens=False)["input_ids"]))
    assert 0 < changed and perturb_documents(docs, tok, 0.0) == docs
    assert n > 5
    with pytest.raises(ValueError, match="share must be in"):
        perturb_documents(docs, tok, 1.0)
