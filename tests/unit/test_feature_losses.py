"""The maths of the feature losses (raykd.losses.hidden, raykd.losses.relations) on fixed tensors:
zero when the student's features equal the teacher's, never negative, and equal to a direct
formula written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raykd.losses import Objective, available_losses, get_loss
from raykd.losses.features import Features, LayerMap, to_positions

FEATURE_LOSSES = ["distilbert_cos", "pkd", "tinybert", "alp_kd", "minilm", "minilmv2", "rail_kd", "ckd", "mgskd",
                  "lrc_bert", "hidden_mse", "attention_kl"]
NOT_ZERO_AT_EQUALITY = {"alp_kd", "lrc_bert"}  # checks of their own below
B, T = 3, 6


def _token_mask() -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 4:] = False  # padding
    m[2, 2:] = False
    return m


def make_features(layers: int, width: int, heads: int, seed: int, token_mask=None, causal: bool = False) -> Features:
    g = torch.Generator().manual_seed(seed)
    mask = _token_mask() if token_mask is None else token_mask
    allowed = mask[:, None, None, :].expand(B, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    additive = torch.zeros(B, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    d = width // heads
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return Features(embeddings=r(B, T, width), hidden=[r(B, T, width) for _ in range(layers)], token_mask=mask,
                    queries=[r(B, heads, T, d) for _ in range(layers)], keys=[r(B, heads, T, d) for _ in range(layers)],
                    values=[r(B, heads, T, d) for _ in range(layers)], attention_masks=[additive] * layers,
                    scaling=d ** -0.5)


def _loss(name, s, t, pairs=((0, 0), (1, 2)), **hp):
    lm = LayerMap(pairs, s.num_layers, t.num_layers)
    return get_loss(name).fn(s, t, layer_map=lm, projections={}, **hp)


def test_every_feature_loss_is_covered_here():
    from tests.unit.test_layer_methods import NEW_TERMS  # tested there (learned maps, stages, interventions)

    assert {n for n, s in available_losses().items() if s.kind == "features"} == set(FEATURE_LOSSES) | {
        n for n in NEW_TERMS if n in available_losses()}


@pytest.mark.parametrize("name", [n for n in FEATURE_LOSSES if n not in NOT_ZERO_AT_EQUALITY])
@pytest.mark.parametrize("causal", [False, True])
def test_zero_when_the_student_equals_the_teacher(name, causal):
    t = make_features(3, 16, 4, seed=0, causal=causal)
    loss = _loss(name, t, t, pairs=((0, 0), (1, 1), (2, 2)), **({"relation_heads": 4} if name == "minilmv2" else {}))
    torch.testing.assert_close(loss, torch.zeros_like(loss), atol=1e-5, rtol=0)


def test_alp_kd_is_zero_when_every_teacher_layer_equals_the_student_layer():
    s = make_features(1, 16, 4, seed=0)
    t = make_features(3, 16, 4, seed=1)
    t.hidden = [s.hidden[0].clone() for _ in range(3)]
    loss = _loss("alp_kd", s, t, pairs=((0, 1),), first_token_only=False)
    torch.testing.assert_close(loss, torch.zeros_like(loss), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_non_negative_and_finite(name):
    s, t = make_features(2, 16, 4, seed=2), make_features(3, 16, 4, seed=3)
    for scale in (1.0, 30.0):
        s.hidden = [h * scale for h in s.hidden]
        s.queries = [q * scale for q in s.queries]
        loss = _loss(name, s, t, **({"relation_heads": 2} if name == "minilmv2" else {}))
        assert torch.isfinite(loss).all() and (loss >= 0).all(), name


def test_distilbert_cos_direct_formula():
    s, t = make_features(2, 16, 4, seed=4), make_features(3, 16, 4, seed=5)
    got = _loss("distilbert_cos", s, t)
    a, b = s.hidden[1], t.hidden[2]  # the last pair (1, 2)
    want = 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("first", [True, False])
def test_pkd_direct_formula(first):
    s, t = make_features(2, 16, 4, seed=6), make_features(3, 16, 4, seed=7)
    got = _loss("pkd", s, t, first_token_only=first)
    want = 0
    for i, j in ((0, 0), (1, 2)):
        a, b = s.hidden[i], t.hidden[j]
        if first:
            a, b = a[:, 0], b[:, 0]
        want = want + ((a / a.norm(dim=-1, keepdim=True) - b / b.norm(dim=-1, keepdim=True)) ** 2).sum(-1)
    torch.testing.assert_close(got, want)


def test_tinybert_direct_formula():
    s, t = make_features(2, 16, 4, seed=8), make_features(3, 16, 4, seed=9)
    got = _loss("tinybert", s, t)
    mask = _token_mask()
    want = ((s.embeddings - t.embeddings) ** 2).mean(-1)
    for i, j in ((0, 0), (1, 2)):
        want = want + ((s.hidden[i] - t.hidden[j]) ** 2).mean(-1)
        att = torch.zeros(B, T)
        for b in range(B):
            keys = mask[b].nonzero().flatten()
            for q in range(T):
                d = 0.0
                for h in range(4):
                    ss = s.queries[i][b, h, q] @ s.keys[i][b, h, keys].T * s.scaling
                    tt = t.queries[j][b, h, q] @ t.keys[j][b, h, keys].T * t.scaling
                    d += ((ss - tt) ** 2).mean()
                att[b, q] = d / 4
        want = want + att
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_alp_kd_direct_formula():
    s, t = make_features(2, 16, 4, seed=10), make_features(3, 16, 4, seed=11)
    got = _loss("alp_kd", s, t)
    want = torch.zeros(B)
    for i in (0, 1):
        for b in range(B):
            h = s.hidden[i][b, 0]
            layers = [t.hidden[j][b, 0] for j in range(3)]
            alpha = torch.softmax(torch.stack([h @ x for x in layers]), 0)
            mix = sum(a * x for a, x in zip(alpha, layers))
            want[b] += ((h - mix) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _kl_rows(p_logits, q_logits, keys):
    p = torch.softmax(p_logits[keys], 0)
    q = torch.log_softmax(q_logits[keys], 0)
    return (p * (p.log() - q)).sum()


def test_minilm_direct_formula():
    s, t = make_features(2, 16, 4, seed=12), make_features(3, 16, 4, seed=13, causal=True)
    got = _loss("minilm", s, t)
    i, j = 1, 2
    want = torch.zeros(B, T)
    for b in range(B):
        for q in range(T):
            keys = (_token_mask()[b] & (torch.arange(T) <= q))  # the teacher's (causal) mask
            for h in range(4):
                a_s = s.queries[i][b, h, q] @ s.keys[i][b, h].T / 2
                a_t = t.queries[j][b, h, q] @ t.keys[j][b, h].T / 2
                v_s = s.values[i][b, h, q] @ s.values[i][b, h].T / 2
                v_t = t.values[j][b, h, q] @ t.values[j][b, h].T / 2
                want[b, q] += (_kl_rows(a_t, a_s, keys) + _kl_rows(v_t, v_s, keys)) / 4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_minilmv2_direct_formula_with_different_widths_and_heads():
    s, t = make_features(2, 8, 2, seed=14), make_features(3, 16, 4, seed=15)
    got = _loss("minilmv2", s, t, relation_heads=2, teacher_layer=1)
    want = torch.zeros(B, T)
    for b in range(B):
        keys = _token_mask()[b]
        for xs, xt in ((s.queries, t.queries), (s.keys, t.keys), (s.values, t.values)):
            cs = xs[1][b].transpose(0, 1).reshape(T, -1)  # heads concatenated [T, width]
            ct = xt[1][b].transpose(0, 1).reshape(T, -1)
            for r in range(2):
                a = cs[:, r * 4:(r + 1) * 4]
                c = ct[:, r * 8:(r + 1) * 8]
                for q in range(T):
                    want[b, q] += _kl_rows(c[q] @ c.T / math.sqrt(8), a[q] @ a.T / math.sqrt(4), keys) / 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_head_and_width_errors_say_what_to_do():
    s, t = make_features(2, 16, 2, seed=0), make_features(3, 16, 4, seed=1)
    with pytest.raises(ValueError, match="heads"):
        _loss("minilm", s, t)
    with pytest.raises(ValueError, match="relation_heads"):
        _loss("minilmv2", s, t, relation_heads=3)


def test_layer_map_checks():
    assert LayerMap.from_keep_layers([0, 2, 4], 6).pairs == ((0, 0), (1, 2), (2, 4))
    assert LayerMap.from_keep_layers([0, -1], 6).pairs == ((0, 0), (1, 5))
    with pytest.raises(ValueError, match="out of range"):
        LayerMap(((0, 0), (1, 6)), 2, 6)
    with pytest.raises(ValueError, match="out of range"):
        LayerMap(((0, 0), (2, 3)), 2, 6)
    with pytest.raises(ValueError, match="at most one pair"):
        LayerMap(((0, 0), (1, 1), (2, 2)), 2, 6)
    with pytest.raises(ValueError, match="increase"):
        LayerMap(((0, 3), (1, 1)), 2, 6)
    with pytest.raises(ValueError, match="empty"):
        LayerMap((), 2, 6)
    with pytest.raises(ValueError, match="out of range"):
        LayerMap.from_keep_layers([0, 6], 6)
    lm = LayerMap(((0, 0), (1, 2)), 2, 3)
    with pytest.raises(ValueError, match="rebuild"):
        lm.check(make_features(3, 16, 4, 0), make_features(3, 16, 4, 0))


def test_to_positions():
    mask = _token_mask()
    per_token = torch.arange(B * T, dtype=torch.float32).view(B, T)
    assert torch.equal(to_positions(per_token, mask, T), torch.where(mask, per_token, 0.0))
    row_mean = to_positions(per_token, mask, 1)
    torch.testing.assert_close(row_mean[:, 0], torch.stack([per_token[b][mask[b]].mean() for b in range(B)]))
    per_seq = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(to_positions(per_seq, mask, 1), per_seq[:, None])
    torch.testing.assert_close(to_positions(per_seq, mask, T).sum(1), per_seq)
    with pytest.raises(ValueError, match="P = 1"):
        to_positions(per_token, mask, 3)


def test_objective_mixes_feature_and_logit_terms_and_checks_its_inputs():
    s, t = make_features(2, 16, 4, seed=0), make_features(3, 16, 4, seed=1)
    lm = LayerMap(((0, 0), (1, 2)), 2, 3)
    logits = torch.randn(B, 1, 5)
    labels, mask = torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.bool)
    obj = Objective({"ce": 0.5, "pkd": 2.0}, layer_map=lm)
    assert obj.needs_features and not obj.needs_teacher and not obj.needs_attention
    out = obj(logits, labels, mask, None, 1.0, features=(s, t))
    pkd = get_loss("pkd").fn(s, t, layer_map=lm, projections={})
    ce = F.cross_entropy(logits[:, 0], labels[:, 0], reduction="sum")
    torch.testing.assert_close(out.loss_sum, 0.5 * ce + 2.0 * pkd.sum())
    with pytest.raises(ValueError, match="layer map"):
        Objective({"pkd": 1.0})
    with pytest.raises(ValueError, match="features"):
        obj(logits, labels, mask, None, 1.0)
    with pytest.raises(ValueError, match="hyper-parameters"):
        Objective({"pkd": 1.0}, {"pkd": {"beta": 1.0}}, layer_map=lm)
    narrow = make_features(2, 8, 4, seed=2)
    with pytest.raises(ValueError, match="widths"):
        obj(logits, labels, mask, None, 1.0, features=(narrow, t))
    with_proj = Objective({"pkd": 1.0}, layer_map=lm, widths=(8, 16))
    assert sum(p.numel() for p in with_proj.parameters()) == 8 * 16 + 16
    assert not list(Objective({"pkd": 1.0}, layer_map=lm, widths=(16, 16)).parameters())
    assert with_proj(logits, labels, mask, None, 1.0, features=(narrow, t)).loss_sum.requires_grad


def _huber(x):
    x = x.abs()
    return torch.where(x < 1, 0.5 * x**2, x - 0.5)


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_ckd_direct_formula():
    s, t = make_features(2, 16, 4, seed=16), make_features(3, 16, 4, seed=17)
    got = _loss("ckd", s, t)
    mask = _token_mask()
    want = torch.zeros(B, T)
    pairs = ((0, 0), (1, 2))
    for b in range(B):
        keys = mask[b].nonzero().flatten()
        for i in range(T):
            for a, c in pairs:
                want[b, i] += torch.stack([_huber(_cos(s.hidden[a][b, i], s.hidden[a][b, k]) - _cos(t.hidden[c][b, i], t.hidden[c][b, k]))
                                           for k in keys]).mean()
            want[b, i] += _huber(_cos(s.hidden[0][b, i], s.hidden[1][b, i]) - _cos(t.hidden[0][b, i], t.hidden[2][b, i]))
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-5)  # padding is masked out by the objective


def test_mgskd_direct_formula():
    s, t = make_features(2, 16, 4, seed=18), make_features(3, 16, 4, seed=19)
    got = _loss("mgskd", s, t, span=4)
    mask = _token_mask()

    def rel_loss(xs, xt):  # mean over all pairs of the Huber loss of the cosine relations
        n = len(xs)
        return torch.stack([_huber(_cos(xs[p], xs[q]) - _cos(xt[p], xt[q])) for p in range(n) for q in range(n)]).mean()

    want = torch.zeros(B)
    for a, c in ((0, 0), (1, 2)):
        pooled_s = torch.stack([s.hidden[a][r][mask[r]].mean(0) for r in range(B)])
        pooled_t = torch.stack([t.hidden[c][r][mask[r]].mean(0) for r in range(B)])
        for b in range(B):
            real = mask[b].nonzero().flatten()
            want[b] += rel_loss(s.hidden[a][b, real], t.hidden[c][b, real])
            spans = [w for w in (range(0, 4), range(4, 6)) if mask[b, list(w)].any()]
            span_s = torch.stack([s.hidden[a][b, [k for k in w if mask[b, k]]].mean(0) for w in spans])
            span_t = torch.stack([t.hidden[c][b, [k for k in w if mask[b, k]]].mean(0) for w in spans])
            want[b] += rel_loss(span_s, span_t)
            want[b] += torch.stack([_huber(_cos(pooled_s[b], pooled_s[q]) - _cos(pooled_t[b], pooled_t[q])) for q in range(B)]).mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rail_kd_is_pkd_on_a_map_redrawn_every_epoch():
    from raykd.losses.hidden import random_layer_map

    s, t = make_features(2, 16, 4, seed=20), make_features(6, 16, 4, seed=21)
    maps = [random_layer_map(2, 6, epoch, seed=0) for epoch in range(8)]
    assert all(m.student_layers == 2 and m.teacher_layers == 6 for m in maps)  # LayerMap checked range and order
    assert len({m.pairs for m in maps}) > 1  # re-drawn
    assert random_layer_map(2, 6, 3, seed=0) == maps[3]  # seeded
    for m in maps[:3]:
        torch.testing.assert_close(_loss("rail_kd", s, t, pairs=m.pairs), _loss("pkd", s, t, pairs=m.pairs))
    with pytest.raises(ValueError, match="cannot be mapped"):
        random_layer_map(4, 3, 0)


def test_lrc_bert_contrastive_checks():
    t = make_features(2, 16, 4, seed=22)
    lm = LayerMap(((0, 0), (1, 1)), 2, 2)
    fn = lambda s, **hp: get_loss("lrc_bert").fn(s, t, layer_map=lm, projections={}, **hp)  # noqa: E731
    mask = _token_mask()
    # direct formula
    s = make_features(2, 16, 4, seed=23)
    want = torch.zeros(B)
    for i in range(2):
        zs = torch.stack([s.hidden[i][r][mask[r]].mean(0) for r in range(B)])
        zt = torch.stack([t.hidden[i][r][mask[r]].mean(0) for r in range(B)])
        for r in range(B):
            sims = torch.stack([_cos(zs[r], zt[q]) for q in range(B)]) / 0.1
            want[r] += -(sims[r] - torch.logsumexp(sims, 0))
    torch.testing.assert_close(fn(s), want, rtol=1e-4, atol=1e-5)
    # the student equal to its teacher scores better than the same student with its rows shuffled
    aligned = fn(t).sum()
    perm = torch.tensor([1, 2, 0])
    shuffled = Features(None, [h[perm] for h in t.hidden], t.token_mask)
    assert (fn(shuffled) >= 0).all() and fn(shuffled).sum() > aligned + 1.0
    # one row: no negatives, the loss is 0
    one = Features(None, [h[:1] for h in t.hidden], t.token_mask[:1])
    single = get_loss("lrc_bert").fn(one, one, layer_map=lm, projections={})
    torch.testing.assert_close(single, torch.zeros(1))
    with pytest.raises(ValueError, match="tau"):
        fn(s, tau=0.0)


def test_the_facts_of_each_feature_loss_live_on_its_entry():
    from raykd.losses.registry import define_loss, losses_where

    assert set(losses_where("cached")) == {"distilbert_cos", "pkd", "rail_kd", "lrc_bert", "tinybert", "minilmv2", "minilm"}
    assert set(losses_where("measured_faster", "cached")) == {"distilbert_cos", "pkd", "tinybert", "minilmv2"}
    assert losses_where("transfer") == ("hidden_mse", "attention_kl")
    with pytest.raises(ValueError, match="describe feature losses"):
        define_loss("x_logit", description="", cached=True)
    with pytest.raises(ValueError, match="'cached' with cached=True"):
        define_loss("x_feature", kind="features", description="", measured_faster="cached")
