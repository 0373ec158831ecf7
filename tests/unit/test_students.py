"""Layer-dropped students and the vocabulary check."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from raykd.config import StudentConfig
from raykd.students import VocabularyMismatchError, build_student, check_same_vocabulary, layer_drop


@pytest.fixture(scope="module")
def teacher(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def test_keeping_every_layer_gives_the_teacher(teacher):
    student = layer_drop(teacher, [0, 1, 2, 3]).eval()
    ids = torch.randint(3, teacher.config.vocab_size, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_kept_layers_are_copies_of_the_chosen_ones(teacher):
    student = layer_drop(teacher, [0, -1])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    for s, t in zip(student.model.layers, [teacher.model.layers[0], teacher.model.layers[3]]):
        for (n, p), (_, q) in zip(s.named_parameters(), t.named_parameters()):
            torch.testing.assert_close(p, q, msg=n)
        assert s.self_attn.q_proj.weight.data_ptr() != t.self_attn.q_proj.weight.data_ptr()
    assert teacher.config.num_hidden_layers == 4  # the teacher is untouched
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]


@pytest.mark.parametrize("keep", [[0, 4], [1, 1], [-5]])
def test_bad_layer_lists(teacher, keep):
    with pytest.raises(ValueError, match="keep_layers"):
        layer_drop(teacher, keep)


def test_build_student_saves_a_loadable_folder(tiny_model, tmp_path):
    out = build_student(StudentConfig(keep_layers=[0, 2]), tiny_model, tmp_path / "s")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert (out / "tokenizer.json").is_file()
    ids = torch.randint(3, model.config.vocab_size, (1, 5))
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_vocabulary_mismatch_is_refused_with_the_fix():
    check_same_vocabulary("a", "a", 10, 10)
    with pytest.raises(VocabularyMismatchError, match="share the teacher's tokenizer"):
        check_same_vocabulary("a", "b", 10, 10)
    with pytest.raises(VocabularyMismatchError, match="vocab 10 vs 12"):
        check_same_vocabulary("a", "a", 10, 12)
