"""BERT-of-Theseus (raykd.students.theseus): the hybrid is the teacher at p = 0 and the student at
p = 1, the curriculum, frozen predecessors, and one step through the shared step."""

from __future__ import annotations

import pytest
import torch

from raykd.losses import Objective
from raykd.students.build import layer_drop
from raykd.students.theseus import (export_student, replacement_rate, theseus_groups, theseus_layers,
                                    theseus_model)
from raykd.train.step import build_optimizer, causal_lm_logits, classifier_logits, train_step
from tests.unit.test_feature_training import _class_batch, _lm_batch, tiny_bert, tiny_llama


def test_groups_and_curriculum():
    assert theseus_groups(6, 3) == [[0, 1], [2, 3], [4, 5]]
    assert theseus_groups(5, 2) == [[0, 1, 2], [3, 4]] or theseus_groups(5, 2) == [[0, 1], [2, 3, 4]]
    assert sum(map(len, theseus_groups(30, 6))) == 30
    with pytest.raises(ValueError):
        theseus_groups(2, 3)
    assert replacement_rate(0, 0.5, 0.01) == 0.5
    assert replacement_rate(10, 0.5, 0.01) == pytest.approx(0.6)
    assert replacement_rate(1000, 0.5, 0.01) == 1.0


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_hybrid_is_the_teacher_at_p0_and_the_student_at_p1(kind):
    teacher, fn, batch = ((tiny_bert(), classifier_logits, _class_batch()) if kind == "bert"
                          else (tiny_llama(), causal_lm_logits, _lm_batch()))
    hybrid = theseus_model(teacher, [0, 2]).eval()
    layers = theseus_layers(hybrid)
    with torch.no_grad():
        layers.p = 0.0
        torch.testing.assert_close(fn(hybrid, batch.inputs), fn(teacher, batch.inputs))
        layers.p = 1.0
        student = layer_drop(teacher, [0, 2]).eval()
        torch.testing.assert_close(fn(hybrid, batch.inputs), fn(student, batch.inputs))
        torch.testing.assert_close(fn(export_student(hybrid).eval(), batch.inputs), fn(student, batch.inputs))
    assert export_student(hybrid).config.num_hidden_layers == 2
    if kind == "llama":  # KV-cache slots follow the successors' new positions
        assert [layer.self_attn.layer_idx for layer in export_student(hybrid).model.layers] == [0, 1]


def test_replacement_is_random_per_group_and_only_successors_learn():
    teacher, batch = tiny_bert(), _class_batch()
    hybrid = theseus_model(teacher, [0, 2], p=0.5, seed=0).train()
    layers = theseus_layers(hybrid)
    choices = set()
    for _ in range(20):
        layers.sequence()
        choices.add(tuple(layers.last_choice))
    assert len(choices) > 2  # both groups vary independently
    before = [p.detach().clone() for p in layers.teacher_layers.parameters()]
    succ = [p.detach().clone() for p in layers.successors.parameters()]
    trainable = [p for p in hybrid.parameters() if p.requires_grad]
    opt, _ = build_optimizer(trainable, lr=1e-2)
    objective = Objective({"ce": 1.0})
    losses = [train_step(hybrid, opt, [batch], objective, 1.0, logits_fn=classifier_logits)["loss"] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(before, layers.teacher_layers.parameters()))  # predecessors frozen
    assert any(not torch.equal(a, b) for a, b in zip(succ, layers.successors.parameters()))
    layers.p = 1.0
    hybrid.eval()
    with torch.no_grad():
        assert torch.isfinite(classifier_logits(hybrid, batch.inputs)).all()
    assert all(torch.isfinite(torch.tensor(losses)))
