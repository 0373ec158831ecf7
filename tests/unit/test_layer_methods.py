"""Universal-KD, SID and DIITO: their maths on fixed tensors (zero at equality, non-negative, a
direct formula written here), one training step lowering each on a tiny model, SID's stage
schedule, and DIITO's interchange intervention."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("first", [True, False])
def test_universal_kd_zero_when_every_teacher_layer_equals_the_student_layer(first):
    s = make_features(1, 16, 4, seed=0)
    t = make_features(3, 16, 4, seed=1)
    t.hidden = [s.hidden[0].clone() for _ in range(3)]
    obj = _ukd_objective(1, 3, ((0, 1),), first_token_only=first)
    maps = obj.projections["universal_kd"]
    w = torch.randn(16, 16)
    with torch.no_grad():
        for m in maps.values():
            m.weight.copy_(w)  # the same map on both sides
    loss = _ukd(obj, s, t)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.zeros(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("first", [True, False])
def test_universal_kd_direct_formula_and_non_negative(first):
    s, t = make_features(2, 16, 4, seed=0), make_features(3, 16, 4, seed=1)
    obj = _ukd_objective(2, 3, ((0, 0), (1, 2)), first_token_only=first, size=7)
    maps = obj.projections["universal_kd"]
    pool = (lambda h, m: h[:, 0]) if first else masked_token_mean
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
        "universal_kd", kind, {"first_token_only": kind == "bert"})
    before = _term(obj, "universal_kd", teacher, student, logits_fn, batch)
    metrics = train_step(student, opt, [batch], obj, 1.0, logits_fn=logits_fn, feature_teacher=ft)
    assert metrics["universal_kd"] * metrics["positions"] == pytest.approx(before, rel=1e-4)
    after = _term(obj, "universal_kd", teacher, student, logits_fn, batch)
    assert 0 <= after < before, (before, after)


# ---- SID ----------------------------------------------------------------------------------------

def _sid(s, t, pairs=((0, 0), (1, 2)), **hp):
    return get_loss("sid").fn(s, t, layer_map=LayerMap(pairs, s.num_layers, t.num_layers), projections={}, **hp)


@pytest.mark.parametrize("causal", [False, True])
def test_sid_zero_when_the_student_equals_the_teacher(causal):
    t = make_features(3, 16, 4, seed=0, causal=causal)
    loss = _sid(t, t, pairs=((0, 0), (1, 1), (2, 2)))
    torch.testing.assert_close(loss, torch.zeros(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("unlocked", [1, 2, 0])
def test_sid_direct_formula_over_the_unlocked_pairs(unlocked):
    s, t = make_features(2, 16, 4, seed=0), make_features(3, 16, 4, seed=1)
    pairs = ((0, 0), (1, 2))
    want = torch.zeros(3)
    for i, j in pairs[: unlocked or 2]:
        want = want + 1 - F.cosine_similarity(s.hidden[i][:, 0], t.hidden[j][:, 0], dim=-1)
        for b in range(3):  # KL of each real query row's attention, mean over heads and real queries
            n = int(t.token_mask[b].sum())
            kl = _kl(t.scores(j, masked=False)[b, :, :n, :n], s.scores(i, masked=False)[b, :, :n, :n])  # [heads, n]
            want[b] += kl.mean()
    got = _sid(s, t, pairs, unlocked=unlocked)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got >= 0).all()
    cos = get_loss("sid_cos").fn(s, t, layer_map=LayerMap(pairs, 2, 3), projections={}, unlocked=unlocked)
    assert (cos <= got + 1e-6).all() and (cos >= 0).all()


def test_sid_refuses_different_widths():
    with pytest.raises(ValueError, match="width 8 must equal the teacher's 16"):
        _sid(make_features(2, 8, 4, seed=0), make_features(3, 16, 4, seed=1))


def test_stacked_schedule_advances_by_steps_gates_kd_and_round_trips():
    from raykd.train.schedule import StackedSchedule

    sched = StackedSchedule(pairs=3, total_steps=20, gated=("forward_kl", "ce"))  # 4 stages of 5 steps
    base = {"forward_kl": 0.5, "ce": 0.5, "sid": 1.0}
    stages = []
    for step in range(1, 21):
        w, p = sched.apply(base, {"sid": {"first_token_only": 1.0}})
        stages.append(sched.stage)
        if not sched.last:
            assert w["forward_kl"] == w["ce"] == 0.0 and w["sid"] == 1.0 and p["sid"]["unlocked"] == sched.stage
        else:
            assert w == {"forward_kl": 0.5, "ce": 0.5, "sid": 0.0, "sid_cos": 0.0} and p["sid"]["unlocked"] == 3
        assert w["sid_cos"] == 0.0 and p["sid_cos"] == {"first_token_only": 1.0, "unlocked": p["sid"]["unlocked"]}
        sched.update(step, {"sid_cos": 0.5})
    assert stages == [1] * 5 + [2] * 5 + [3] * 5 + [4] * 5
    resumed = StackedSchedule(pairs=3, total_steps=20, gated=("forward_kl", "ce"))
    resumed.load_state_dict({"stage": 2})
    assert resumed.apply(base, {})[1]["sid"]["unlocked"] == 2


def test_stacked_schedule_advances_by_threshold():
    from raykd.train.schedule import StackedSchedule

    sched = StackedSchedule(pairs=2, total_steps=300, gated=("forward_kl",), threshold=0.1)
    sched.update(1, {"sid_cos": 0.2})
    assert sched.stage == 1
    sched.update(2, {"sid_cos": 0.05})
    assert sched.stage == 2
    sched.update(3, {"sid_cos": 0.01})
    assert sched.last and sched.apply({"forward_kl": 1.0, "sid": 1.0}, {})[0]["forward_kl"] == 1.0
    sched.update(4, {"sid_cos": 0.0})
    assert sched.stage == 3  # no stage after the last


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_one_step_lowers_sid(kind):
    teacher, student, logits_fn, batch, obj, ft, opt = _step_lowers(
        "sid", kind, {"first_token_only": kind == "bert", "unlocked": 2})
    before = _term(obj, "sid", teacher, student, logits_fn, batch)
    metrics = train_step(student, opt, [batch], obj, 1.0, logits_fn=logits_fn, feature_teacher=ft)
    assert metrics["sid"] * metrics["positions"] == pytest.approx(before, rel=1e-4)
    after = _term(obj, "sid", teacher, student, logits_fn, batch)
    assert 0 <= after < before, (before, after)


def test_feature_terms_keep_sids_stage_in_the_train_state():
    """The Train loop's feature side builds the schedule for a run with ``sid``, applies it to the
    step's weights, steps it, and a run resumed from its state continues the same stage."""
    from raykd.train.features import FeatureTerms
    from raykd.train.schedule import StackedSchedule

    teacher = tiny_llama()
    student = layer_drop(teacher, [0, 2])

    def terms():
        return FeatureTerms(student, ((0, 0), (1, 2)), ["sid", "sid_cos"], teacher=teacher, attention=True,
                            stages=StackedSchedule(2, 9, ["forward_kl"]))

    ft = FeatureTerms.for_run(((0, 0), (1, 2)), ["forward_kl", "sid"], student, "cpu", teacher_path=None,
                              layout={"hidden": [0, 2]}, shapes={"layers": 4, "hidden": 16, "scaling": 0.5},
                              params={"sid": {"threshold": 0.05}}, total_steps=9)
    assert ft.stages.gated == ("forward_kl",) and ft.stages.threshold == 0.05 and ft.stages.pairs == 2
    first = terms()
    w, p = first.weights_at({"forward_kl": 1.0, "sid": 1.0}, {})
    assert w == {"forward_kl": 0.0, "sid": 1.0, "sid_cos": 0.0} and p["sid"]["unlocked"] == 1
    for step in range(1, 4):  # 3 stages of 3 steps
        first.step(step, {"sid_cos": 0.5})
    assert first.stages.stage == 2
    resumed = terms()
    resumed.load_state_dict(first.state_dict())
    assert resumed.stages.stage == 2 and resumed.weights_at({"forward_kl": 1.0, "sid": 1.0}, {})[1]["sid"]["unlocked"] == 2


# ---- DIITO --------------------------------------------------------------------------------------

def test_interchange_masks_are_consecutive_spans_of_the_shorter_row():
    from raykd.train.interventions import interchange_masks

    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False  # 7 real tokens
    mask[2, :2] = False  # left padding: 10 real tokens
    m, d = interchange_masks(mask, prop=0.3, rng=random.Random(0))
    # row 0 (12) with its dual row 1 (7): int(0.3 * 7) = 2; row 1 (7) with row 2 (10): 2; row 2 (10) with row 0 (12): 3
    assert m.sum(1).tolist() == d.sum(1).tolist() == [2, 2, 3]
    assert not (m & ~mask).any() and not (d & ~torch.roll(mask, -1, 0)).any()  # real tokens only
    for row in (*m, *d):
        idx = row.nonzero().view(-1)
        assert (idx.diff() == 1).all()  # consecutive
    m, d = interchange_masks(mask, prop=0.3, max_tokens=1)
    assert m.sum(1).tolist() == [1, 1, 1]


def _plain_and_swapped(model, inputs, layer, mask, dual_mask):
    from raykd.train.features import capture_features
    from raykd.train.interventions import interchange

    with torch.no_grad(), capture_features(model, inputs) as plain:
        ref = model(**inputs).logits
    with torch.no_grad(), interchange(model, layer, mask, dual_mask), capture_features(model, inputs) as cap:
        out = model(**inputs).logits
    return ref, out, plain.features, cap.features


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_interchange_with_identical_dual_states_is_the_plain_forward(kind):
    model = tiny_bert() if kind == "bert" else tiny_llama()
    ids = torch.randint(4, 60, (1, 8), generator=torch.Generator().manual_seed(0)).repeat(2, 1)  # row 1 = row 0
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 3:6] = True
    ref, out, _, _ = _plain_and_swapped(model, inputs, 1, mask, mask.clone())
    torch.testing.assert_close(out, ref)


def test_interchange_swaps_the_dual_states_and_a_decoder_changes_only_from_the_span_on():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(4, 60, (2, 8), generator=g), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    mask, dual = torch.zeros(2, 8, dtype=torch.bool), torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 3:5], dual[0, 5:7] = True, True  # row 0, positions 3-4 <- row 1, positions 5-6
    mask[1, 0:2], dual[1, 2:4] = True, True  # row 1, positions 0-1 <- row 0, positions 2-3
    ref, out, plain, swapped = _plain_and_swapped(model, inputs, 1, mask, dual)
    torch.testing.assert_close(swapped.hidden[1][0, 3:5], plain.hidden[1][1, 5:7])
    torch.testing.assert_close(swapped.hidden[1][1, 0:2], plain.hidden[1][0, 2:4])
    torch.testing.assert_close(swapped.hidden[0], plain.hidden[0])  # blocks before it untouched
    torch.testing.assert_close(out[0, :3], ref[0, :3])  # causal: positions before the span unchanged
    assert ((out[0, 3:] - ref[0, 3:]).abs().amax(-1) > 1e-4).all()  # from the span on, changed
    assert ((out[1] - ref[1]).abs().amax(-1) > 1e-4).all()


def _intervened(s_logits, t_logits, s, t):
    from raykd.losses.features import Intervened

    m = torch.zeros(s_logits.shape[0], t.token_mask.shape[1], dtype=torch.bool)
    return Intervened(s_logits, t_logits, s, t, (0, 0), m, m)


def _diito(s, t, iv, tau=2.0, **hp):
    return get_loss("diito").fn(s, t, layer_map=LayerMap(((0, 0),), s.num_layers, t.num_layers), projections={},
                                intervened=iv, temperature=tau, **hp)


def test_diito_zero_when_the_student_equals_the_teacher():
    f = make_features(2, 16, 4, seed=0)
    logits = torch.randn(3, 6, 11)
    loss = _diito(f, f, _intervened(logits, logits.clone(), f, f), causal_cos_weight=1.0)
    torch.testing.assert_close(loss, torch.zeros(3, 6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", [6, 1])
def test_diito_direct_formula_and_non_negative(positions):
    s, t = make_features(2, 16, 4, seed=0), make_features(3, 16, 4, seed=1)
    si, ti = make_features(2, 16, 4, seed=2), make_features(3, 16, 4, seed=3)
    g = torch.Generator().manual_seed(0)
    sl, tl = torch.randn(3, positions, 11, generator=g), torch.randn(3, positions, 11, generator=g)
    tau = 2.0
    got = _diito(s, t, _intervened(sl, tl, si, ti), tau, cos_weight=0.5, causal_cos_weight=0.25)
    kd = tau**2 * _kl(tl / tau, sl / tau)  # [B, P]
    cos = 0.5 * (1 - F.cosine_similarity(s.hidden[-1], t.hidden[-1], dim=-1)) \
        + 0.25 * (1 - F.cosine_similarity(si.hidden[-1], ti.hidden[-1], dim=-1))
    want = kd + cos if positions == 6 else kd[:, 0] + masked_token_mean(cos, s.token_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got >= 0).all()


def _diito_loss(obj, student, ft, logits_fn, batch) -> float:
    """The diito term's sum over the batch, intervened at the same pair and span every call."""
    from raykd.train.features import capture_features
    from raykd.train.interventions import interchange_forwards

    random.seed(0)
    with torch.no_grad():
        _, tf = ft(batch)
        with capture_features(student, batch.inputs) as cap:
            logits = logits_fn(student, batch.inputs)
        iv = interchange_forwards(student, batch, obj, logits_fn, ft)
        out = obj(logits.float(), batch.labels, batch.mask, None, 1.0, (cap.features, tf), iv)
    return float(out.term_sums["diito"])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_one_step_lowers_diito_and_it_needs_the_teacher_online(kind):
    teacher, student, logits_fn, batch, obj, ft, opt = _step_lowers("diito", kind, {"alignment": "full"})
    if kind == "llama":  # the Train loop's features-only teacher: the intervened forward reads the LM logits itself
        ft = FeatureTeacher(teacher, None, attention=False)
    before = _diito_loss(obj, student, ft, logits_fn, batch)
    random.seed(0)
    metrics = train_step(student, opt, [batch], obj, 1.0, logits_fn=logits_fn, feature_teacher=ft)
    assert metrics["diito"] * metrics["positions"] == pytest.approx(before, rel=1e-4)  # the same pair and span
    after = _diito_loss(obj, student, ft, logits_fn, batch)
    assert 0 <= after < before, (before, after)
    with pytest.raises(ValueError, match="needs the teacher online"):
        train_step(student, opt, [batch], obj, 1.0, logits_fn=logits_fn)


def test_diito_plan_is_checked_when_the_objective_is_built():
    lm = LayerMap(((0, 0), (1, 2)), 2, 4)
    for bad, match in (({"alignment": "early"}, r"alignment='early' .* one of \['full'"),
                       ({"interchange_prop": 0.0}, r"in \(0, 1\]"), ({"max_tokens": 0}, "max_tokens=0 .* >= 1, or -1")):
        with pytest.raises(ValueError, match=match):
            Objective({"diito": 1.0}, {"diito": bad}, layer_map=lm)
