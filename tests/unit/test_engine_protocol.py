"""Every registered teacher engine implements the TeacherEngine protocol."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from raykd.teacher.engines import ENGINES, TeacherEngine, build_engine, engine_class

PROTOCOL_METHODS = ("info", "validate_score_request", "score", "generate")


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_every_engine_class_has_the_protocol_methods(name):
    if name == "vllm":
        pytest.importorskip("vllm")
    cls = engine_class(name)
    assert cls.name == name
    for method in PROTOCOL_METHODS:
        assert callable(getattr(cls, method, None)), f"{cls.__name__} lacks {method}"
        wanted = inspect.signature(getattr(TeacherEngine, method)).parameters
        got = inspect.signature(getattr(cls, method)).parameters
        assert list(wanted)[:2] == list(got)[:2], (method, list(got))


def test_built_engines_are_teacher_engines(tiny_model, tmp_path):
    from tests.unit.test_step import _tiny_classifier

    hf = build_engine("hf", tiny_model, num_threads=1)
    assert isinstance(hf, TeacherEngine)
    assert hf.score(np.array([[1, 5, 7]]), k=3)["topk_ids"].shape == (1, 3, 3)
    folder = tmp_path / "cls"
    model = _tiny_classifier()
    model.save_pretrained(folder)
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast.from_pretrained(tiny_model).save_pretrained(folder)
    classifier = build_engine("classifier", folder, num_threads=1)
    assert isinstance(classifier, TeacherEngine) and classifier.vocab_size > 0
    with pytest.raises(NotImplementedError, match="does not generate"):
        classifier.generate(["a headline"])
