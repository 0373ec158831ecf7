"""Universal-KD, SID and DIITO: their maths on fixed tensors (zero at equality, non-negative, a
direct formula written here), one training step lowering each on a tiny model, SID's stage
schedule, and DIITO's interchange intervention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raykd.losses import Objective, get_loss
from raykd.losses.features import LayerMap, masked_token_mean
from raykd.students.build import layer_drop
from raykd.train.features import FeatureTeacher
from raykd.train.step import build_optimizer, causal_lm_logits, classifier_logits, train_step
from tests.unit.test_feature_losses import make_features
from tests.unit.test_feature_training import _class_batch, _lm_batch, _term, tiny_bert, tiny_llama

NEW_TERMS = ("universal_kd", "sid", "sid_cos", "diito")


def _kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) over the last axis, written out."""
    p = torch.softmax(p_logits, -1)
    return (p * (torch.log(p) - torch.log_softmax(q_logits, -1))).sum(-1)


# ---- Universal-KD -------------------------------------------------------------------------------

def _ukd_objective(s_layers, t_layers, pairs, width=16, **params):
    return Objective({"universal_kd": 1.0}, {"universal_kd": params} if params else None,
                     layer_map=LayerMap(pairs, s_layers, t_layers), widths=(width, width))


def _ukd(obj, s, t):
    return get_loss("universal_kd").fn(s, t, layer_map=obj.layer_map, projections=dict(obj.projections["universal_kd"]),
                                       **obj.params.get("universal_kd", {}))


def test_universal_kd_maps_are_the_objectives_and_sized_by_the_layer_map():
    obj = _ukd_objective(2, 3, ((0, 0), (1, 2)), size=5)
    maps = obj.projections["universal_kd"]
    assert sorted(maps) == ["s0", "s1", "t0", "t1", "t2"]
    assert all(m.weight.shape == (5, 16) for m in maps.values())
    assert {id(p) for p in obj.parameters()} == {id(p) for p in maps.parameters()}  # they join the optimizer


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_universal_kd_zero_when_every_teacher_layer_equals_the_student_layer(pooling):
    s = make_features(1, 16, 4, seed=0)
    t = make_features(3, 16, 4, seed=1)
    t.hidden = [s.hidden[0].clone() for _ in range(3)]
    obj = _ukd_objective(1, 3, ((0, 1),), pooling=pooling)
    maps = obj.projections["universal_kd"]
    w = torch.randn(16, 16)
    with torch.no_grad():
        for m in maps.values():
            m.weight.copy_(w)  # the same map on both sides
    loss = _ukd(obj, s, t)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.zeros(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_universal_kd_direct_formula_and_non_negative(pooling):
    s, t = make_features(2, 16, 4, seed=0), make_features(3, 16, 4, seed=1)
    obj = _ukd_objective(2, 3, ((0, 0), (1, 2)), pooling=pooling, size=7)
    maps = obj.projections["universal_kd"]
    pool = (lambda h, m: h[:, 0]) if pooling == "cls" else masked_token_mean
    tj = [maps[f"t{j}"](pool(t.hidden[j], t.token_mask)) for j in range(3)]
    want = torch.zeros(3)
    for k, i in enumerate((0, 1)):
        sk = maps[f"s{k}"](pool(s.hidden[i], s.token_mask))
        scores = torch.stack([(sk * x).sum(-1) for x in tj], -1)
        alpha = torch.softmax(scores, -1)
        mix = sum(alpha[:, j:j + 1] * tj[j] for j in range(3))
        want = want + _kl(mix, sk)
    got = _ukd(obj, s, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got >= 0).all()


# ---- one step lowers each term on a tiny model --------------------------------------------------

def _step_lowers(name, kind, params=None, extra=None):
    teacher, logits_fn, batch = ((tiny_bert(), classifier_logits, _class_batch()) if kind == "bert"
                                 else (tiny_llama(), causal_lm_logits, _lm_batch()))
    student = layer_drop(teacher, [0, 2])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    obj = Objective({name: 1.0, **(extra or {})}, {name: params} if params else None,
                    layer_map=LayerMap.from_keep_layers([0, 2], 4), widths=(16, 16))
    feature_teacher = FeatureTeacher(teacher, logits_fn, attention=obj.needs_attention)
    opt, _ = build_optimizer(list(student.parameters()) + list(obj.parameters()), lr=3e-3)
    return teacher, student, logits_fn, batch, obj, feature_teacher, opt


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_one_step_lowers_universal_kd(kind):
    teacher, student, logits_fn, batch, obj, ft, opt = _step_lowers(
        "universal_kd", kind, {"pooling": "cls" if kind == "bert" else "mean"})
    before = _term(obj, "universal_kd", teacher, student, logits_fn, batch)
    metrics = train_step(student, opt, [batch], obj, 1.0, logits_fn=logits_fn, feature_teacher=ft)
    assert metrics["universal_kd"] * metrics["positions"] == pytest.approx(before, rel=1e-4)
    after = _term(obj, "universal_kd", teacher, student, logits_fn, batch)
    assert 0 <= after < before, (before, after)
