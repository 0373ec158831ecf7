"""Student architectures of the family (raykd.students.family) and MobileBERT's progressive
transfer (raykd.train.progressive, raykd.losses.layerwise) on tiny models: parameter counts
against their formulas, the SVD-initialised factorised embedding, a shared block copied from the
mapped teacher layer, shared-block feature capture, PKT stages, and one step of each student."""

from __future__ import annotations

import copy

import pytest
import torch

from raykd.losses import Objective, get_loss
from raykd.losses.features import LayerMap
from raykd.students import STUDENT_ARCHITECTURES
from raykd.students.build import count_parameters, transformer_layers
from raykd.students.family import albert_student, mobilebert_student, truncated_svd_embedding
from raykd.train.features import FeatureTeacher, capture_features
from raykd.train.progressive import TRANSFER_TERMS, ProgressiveTransfer
from raykd.train.step import build_optimizer, classifier_logits, train_step
from tests.unit.test_feature_losses import make_features
from tests.unit.test_feature_training import _class_batch, _identity_blocks, tiny_bert, tiny_llama

V, P, Y, H, I, C = 64, 16, 2, 16, 32, 3  # tiny_bert's vocabulary, positions, types, width, FFN, classes


def _features(model, batch, attention=False):
    with torch.no_grad(), capture_features(model, batch.inputs, attention=attention) as cap:
        logits = model(**batch.inputs).logits
    return cap.features, logits


def _term(name, student, teacher, batch, pairs, **params):
    """The term's value (raw, unreduced sum) for the student's and the teacher's features."""
    spec = get_loss(name)
    s, _ = _features(student, batch, spec.attention)
    t, _ = _features(teacher, batch, spec.attention)
    lm = LayerMap(pairs, s.num_layers, t.num_layers)
    return float(spec.fn(s, t, layer_map=lm, projections={}, **params).sum())


def test_albert_forward_and_parameter_count():
    teacher = tiny_bert()
    e, layers = 8, 3
    student = albert_student(teacher, embedding_size=e, num_layers=layers, share_from=1)
    assert student(**_class_batch().inputs).logits.shape == (4, C)
    formula = (V + P + Y) * e + 2 * e + e * H + H + 4 * (H * H + H) + 2 * I * H + I + 5 * H + H * H + H + C * H + C
    assert count_parameters(student) == formula
    assert count_parameters(albert_student(teacher, embedding_size=e, num_layers=6)) == formula  # shared: depth is free


def test_mobilebert_forward_and_parameter_count():
    teacher = tiny_bert()
    e, b, ffn, layers = 8, 8, 4, 3
    student = mobilebert_student(teacher, num_layers=layers, intra_size=b, embedding_size=e, num_ffn=ffn)
    assert student(**_class_batch().inputs).logits.shape == (4, C)
    emb = V * e + 3 * e * H + H + (P + Y) * H + 2 * H
    block = 2 * (H * b + 3 * b) + 2 * (b * b + b) + (H * b + b) + (b * b + 3 * b) + ffn * (8 * b * b + 7 * b) + (b * H + 3 * H)
    assert count_parameters(student) == emb + layers * block + H * H + H + C * H + C
    assert len(transformer_layers(student)) == layers


def test_truncated_svd_error_falls_with_rank_and_vanishes_at_full_rank():
    w = tiny_bert().bert.embeddings.word_embeddings.weight
    errors = [truncated_svd_embedding(w, r).relative_error for r in (2, 8, 16)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6
    f = truncated_svd_embedding(w, 16)
    torch.testing.assert_close(f.coords @ f.basis.T, w.detach(), atol=1e-5, rtol=0)


def test_albert_embeddings_equal_the_teachers_at_full_rank_and_approximate_them_below():
    teacher, batch = tiny_bert(), _class_batch()
    m = batch.inputs["attention_mask"].bool()
    t, _ = _features(teacher, batch)
    full, _ = _features(albert_student(teacher, embedding_size=H, num_layers=1), batch)
    torch.testing.assert_close(full.embeddings[m], t.embeddings[m], atol=1e-5, rtol=0)
    rel = []
    for e in (4, 12):  # below full rank: an approximation that improves with E
        low, _ = _features(albert_student(teacher, embedding_size=e, num_layers=1), batch)
        rel.append(float((low.embeddings[m] - t.embeddings[m]).norm() / t.embeddings[m].norm()))
    assert rel[0] > rel[1] > 1e-3


@pytest.mark.parametrize("name", ["hidden_mse", "tinybert"])
def test_shared_block_copied_from_layer_j_has_zero_feature_loss_against_j(name):
    """Teacher blocks below j are made identities (its block j then sees the embeddings, as the
    one-layer student's block does); the map (0, j) gives 0, the wrong (0, j - 1) does not."""
    j, batch = 2, _class_batch()
    teacher = _identity_blocks(tiny_bert(), range(j))
    student = albert_student(teacher, embedding_size=H, num_layers=1, share_from=j)
    assert _term(name, student, teacher, batch, ((0, j),)) == pytest.approx(0.0, abs=1e-4)
    assert _term(name, student, teacher, batch, ((0, j - 1),)) > 1e-2


def test_shared_block_capture_gives_one_hidden_state_and_attention_per_layer():
    teacher, batch = tiny_bert(), _class_batch()
    student = albert_student(teacher, embedding_size=H, num_layers=3, share_from=0)
    f, logits = _features(student, batch, attention=True)
    assert len(f.hidden) == len(f.queries) == 3
    student.set_attn_implementation("eager")
    ref = student(**batch.inputs, output_hidden_states=True)
    torch.testing.assert_close(logits, ref.logits)
    for k in range(3):
        torch.testing.assert_close(f.hidden[k], ref.hidden_states[k + 1])
    # a teacher whose every block is its block 0 is the shared-block student: every (k, k) pair is 0
    same = copy.deepcopy(teacher)
    for k in range(1, 4):
        same.bert.encoder.layer[k].load_state_dict(same.bert.encoder.layer[0].state_dict())
    for name in ("hidden_mse", "attention_kl"):
        assert _term(name, student, same, batch, ((0, 0), (1, 1), (2, 2))) == pytest.approx(0.0, abs=1e-4)


def test_pkt_stage_boundaries_weights_and_learning_rates():
    lm = LayerMap(((0, 0), (1, 2), (2, 3)), 3, 4)
    pkt = ProgressiveTransfer(lm, total_steps=10, lower_lr=0.1)
    assert [pkt.stage_of(t) for t in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # boundaries 2.5, 5, 7.5
    assert pkt.stage_starts() == [0, 3, 5, 8]
    for stage in range(3):
        obj, _ = pkt.objective_at(pkt.stage_starts()[stage])
        assert set(obj.weights) == set(TRANSFER_TERMS) and obj.layer_map.pairs == (lm.pairs[stage],)
        assert obj.params["hidden_mse"] == {"embeddings": stage == 0}
    final = pkt.objective(3)
    assert {"forward_kl", "ce"} <= set(final.weights) and final.layer_map.pairs == lm.pairs
    # groups: 0 embeddings, 1..3 blocks, 4 the rest; at stage 1 (step 3) block 0 and the embeddings are lower
    assert [pkt.lr_factor(g, 3) for g in range(5)] == [0.1, 0.1, 1.0, 1.0, 1.0]
    assert [pkt.lr_factor(g, 0) for g in range(5)] == [1.0] * 5
    assert [pkt.lr_factor(g, 9) for g in range(5)] == [1.0] * 5
    with pytest.raises(ValueError, match="every student block"):
        ProgressiveTransfer(LayerMap(((0, 0), (2, 3)), 3, 4), total_steps=10)
    with pytest.raises(ValueError, match="fewer than"):
        ProgressiveTransfer(lm, total_steps=3)


def test_pkt_with_frozen_lower_blocks_trains_only_the_current_block():
    teacher, batch = tiny_bert(), _class_batch()
    student = mobilebert_student(teacher, num_layers=2, intra_size=8, embedding_size=8).train()
    pkt = ProgressiveTransfer(LayerMap(((0, 0), (1, 2)), 2, 4), total_steps=6, lower_lr=0.0)
    blocks = transformer_layers(student)
    opt, sched = pkt.optimizer(student, blocks, lr=1e-2)
    feature_teacher = FeatureTeacher(teacher, classifier_logits, attention=True)
    step = lambda t: train_step(student, opt, [batch], pkt.objective_at(t)[0], 1.0, logits_fn=classifier_logits,  # noqa: E731
                                scheduler=sched, feature_teacher=feature_teacher)
    step(0), step(1)  # stage 0
    before = [copy.deepcopy(m.state_dict()) for m in (student.mobilebert.embeddings, blocks[0], blocks[1])]
    step(2)  # stage 1: block 1 learns, block 0 and the embeddings are frozen
    after = [m.state_dict() for m in (student.mobilebert.embeddings, blocks[0], blocks[1])]
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(before, after)]
    assert same == [True, True, False]


def _one_step_lowers(student, teacher, objective, lr=1e-3):
    batch = _class_batch()
    student.train()
    feature_teacher = FeatureTeacher(teacher, classifier_logits, attention=objective.needs_attention)
    opt, _ = build_optimizer([p for p in student.parameters() if p.requires_grad], lr=lr)
    run = lambda: train_step(student, opt, [batch], objective, 2.0, logits_fn=classifier_logits,  # noqa: E731
                             feature_teacher=feature_teacher)["loss"]
    first, second = run(), run()  # each is the loss before its own update
    assert second < first


@pytest.mark.parametrize("weights", [{"forward_kl": 0.5, "ce": 0.5}, {"forward_kl": 0.5, "ce": 0.5, "tinybert": 1.0}])
def test_one_step_lowers_the_albert_loss(weights):
    teacher = tiny_bert()
    student = albert_student(teacher, embedding_size=8, num_layers=2, share_from=1)
    _one_step_lowers(student, teacher, Objective(weights, layer_map=LayerMap(((0, 1), (1, 3)), 2, 4)))


@pytest.mark.parametrize("stage", [0, 2])
def test_one_step_lowers_the_mobilebert_loss(stage):
    teacher = tiny_bert()
    student = mobilebert_student(teacher, num_layers=2, intra_size=8, embedding_size=8)
    pkt = ProgressiveTransfer(LayerMap(((0, 1), (1, 3)), 2, 4), total_steps=6)
    _one_step_lowers(student, teacher, pkt.objective(stage), lr=1e-2)


def test_layerwise_losses_match_their_formulas():
    s, t = make_features(2, 16, 4, seed=0), make_features(3, 16, 4, seed=1)
    lm = LayerMap(((0, 0), (1, 2)), 2, 3)
    got = get_loss("hidden_mse").fn(s, t, layer_map=lm, projections={}, embeddings=True)
    want = sum(((s.hidden[i] - t.hidden[j]) ** 2).mean(-1) for i, j in lm.pairs) + ((s.embeddings - t.embeddings) ** 2).mean(-1)
    torch.testing.assert_close(got, want)
    got = get_loss("attention_kl").fn(s, t, layer_map=lm, projections={})
    want = 0.0
    for i, j in lm.pairs:
        keys = t.token_mask[:, None, None, :]
        ps = torch.softmax((s.queries[i] @ s.keys[i].transpose(-1, -2) * s.scaling).masked_fill(~keys, -1e9), -1)
        pt = torch.softmax((t.queries[j] @ t.keys[j].transpose(-1, -2) * t.scaling).masked_fill(~keys, -1e9), -1)
        want = want + torch.where(keys, pt * (pt.clamp_min(1e-30).log() - ps.clamp_min(1e-30).log()), 0.0).sum(-1).mean(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused():
    teacher = tiny_bert()
    with pytest.raises(ValueError, match="embedding_size"):
        albert_student(teacher, embedding_size=H + 1)
    with pytest.raises(ValueError, match="share_from"):
        albert_student(teacher, embedding_size=8, share_from=4)
    with pytest.raises(ValueError, match="multiple of the teacher's 4 heads"):
        mobilebert_student(teacher, intra_size=6)
    with pytest.raises(ValueError, match="BERT-style"):
        albert_student(tiny_llama())


def test_student_architectures_are_listed_with_their_papers():
    assert {"albert", "mobilebert", "theseus"} <= set(STUDENT_ARCHITECTURES)
    assert all("20" in text for text in STUDENT_ARCHITECTURES.values())  # a year: the paper is named
