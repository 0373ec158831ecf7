"""The maths of raykd.losses: divergences, sparse vs dense targets, masking, the objective."""

import math

import pytest
import torch
import torch.nn.functional as F

from raykd.losses import Objective, TeacherTargets, available_losses, get_loss, validate_weights
from raykd.losses.reduction import masked_sum, student_bucket_log_probs, student_log_probs
from raykd.losses.targets import teacher_buckets

B, T, V = 2, 5, 11
DIVERGENCES = [
    "forward_kl", "reverse_kl", "symmetric_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "tvd", "uld",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _logits(scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(B, T, V)


def _labels() -> torch.Tensor:
    labels = torch.randint(0, V, (B, T))
    labels[0, -2:] = -100
    labels[1, 0] = -100
    return labels


def _sparse(teacher_logits: torch.Tensor, k: int, tau: float = 1.0, dtype=torch.float32, tail=None):
    """Sparse targets from the top-k of a dense teacher at temperature tau."""
    log_p = torch.log_softmax(teacher_logits / tau, dim=-1)
    vals, ids = log_p.topk(k, dim=-1)
    if tail is None and k == V:
        tail = torch.full(vals.shape[:2], -math.inf)
    elif tail is None:
        tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-7))
    return TeacherTargets.sparse(ids, vals.to(dtype), tail)


def _loss(name, student, targets, tau=1.0, **params):
    return get_loss(name).fn(student, targets=targets, labels=_labels(), temperature=tau, **params)


# --- targets ---------------------------------------------------------------------------------

def test_targets_forms_and_shape_errors():
    t = _logits()
    assert TeacherTargets.dense(t).form == "dense"
    sparse = _sparse(t, 4)
    assert sparse.form == "sparse" and sparse.topk_ids.dtype == torch.long
    with pytest.raises(ValueError, match="topk_logprobs shape"):
        TeacherTargets.sparse(sparse.topk_ids, sparse.topk_logprobs[..., :3], sparse.tail_logmass)
    with pytest.raises(ValueError, match="tail_logmass shape"):
        TeacherTargets.sparse(sparse.topk_ids, sparse.topk_logprobs, sparse.tail_logmass[:, :2])
    with pytest.raises(ValueError, match="logits must be"):
        TeacherTargets.dense(t[0])
    with pytest.raises(ValueError, match="give one form"):
        TeacherTargets(topk_ids=sparse.topk_ids, logits=t)


def test_teacher_buckets_renormalise_fp16():
    targets = _sparse(_logits(), 4, dtype=torch.float16)
    ids, log_p = teacher_buckets(targets, 1.0)
    assert ids.shape == (B, T, 4) and log_p.shape == (B, T, 5) and log_p.dtype == torch.float32
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(B, T))


# --- divergences -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_of_identical_distributions_is_zero(name):
    z = _logits()
    dense = _loss(name, z, TeacherTargets.dense(z))
    assert torch.all(dense.abs() < 1e-6), dense
    buckets = student_bucket_log_probs(student_log_probs(z, 1.0), z.topk(4, dim=-1).indices)
    same = TeacherTargets.sparse(z.topk(4, dim=-1).indices, buckets[..., :4], buckets[..., 4])
    assert torch.all(_loss(name, z, same).abs() < 1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_kl_of_identical_dense_distributions_is_exactly_zero(name):
    z = _logits()
    assert torch.equal(_loss(name, z, TeacherTargets.dense(z)), torch.zeros(B, T))


@pytest.mark.parametrize("name", DIVERGENCES + ["mse_logits"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_divergences_are_non_negative(name, tau):
    student, teacher = _logits(), _logits()
    forms = get_loss(name).forms
    targets = [TeacherTargets.dense(teacher)] + ([_sparse(teacher, 3, tau)] if "sparse" in forms else [])
    for tgt in targets:
        loss = _loss(name, student, tgt, tau)
        assert loss.shape == (B, T) and torch.all(loss > 0), (tgt.form, loss)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", ["-inf", "tiny"])
def test_topk_with_k_equal_v_matches_dense(name, tail):
    student, teacher, tau = _logits(), _logits(), 2.0
    tail_logmass = torch.full((B, T), -math.inf if tail == "-inf" else math.log(1e-30))
    sparse = _sparse(teacher, V, tau, tail=tail_logmass)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    dense_loss = _loss(name, s1, TeacherTargets.dense(teacher), tau)
    sparse_loss = _loss(name, s2, sparse, tau)
    torch.testing.assert_close(sparse_loss, dense_loss, atol=1e-5, rtol=1e-5)
    dense_loss.sum().backward()
    sparse_loss.sum().backward()
    assert torch.isfinite(s2.grad).all()
    torch.testing.assert_close(s2.grad, s1.grad, atol=1e-5, rtol=1e-4)


def test_jsd_endpoints_are_the_kls_and_small_beta_approaches_forward_kl():
    student, teacher = _logits(1.0), _logits(1.0)  # mild logits: the O(beta) term stays small
    for targets in (TeacherTargets.dense(teacher), _sparse(teacher, 4)):
        fkl, rkl = _loss("forward_kl", student, targets), _loss("reverse_kl", student, targets)
        torch.testing.assert_close(_loss("generalized_jsd", student, targets, beta=0.0), fkl)
        torch.testing.assert_close(_loss("generalized_jsd", student, targets, beta=1.0), rkl)
        beta = 1e-3  # JSD(beta) / beta -> KL(p || q), JSD(beta) / (1 - beta) -> KL(q || p)
        near_0 = _loss("generalized_jsd", student, targets, beta=beta) / beta
        near_1 = _loss("generalized_jsd", student, targets, beta=1 - beta) / beta
        torch.testing.assert_close(near_0, fkl, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(near_1, rkl, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(_loss("skew_kl", student, targets, alpha=0.0), fkl)
        torch.testing.assert_close(_loss("skew_reverse_kl", student, targets, alpha=0.0), rkl)


def test_hyper_parameter_ranges():
    z, targets = _logits(), TeacherTargets.dense(_logits())
    with pytest.raises(ValueError, match="beta"):
        _loss("generalized_jsd", z, targets, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        _loss("skew_kl", z, targets, alpha=1.0)


def _outside(param) -> list:
    """Values a declared hyper-parameter must refuse: the wrong type, just past each bound, NaN."""
    if param.type is str:
        return ["nope", 1.0]
    if param.type is list:
        return [1.0, "x"]
    if param.type is bool:
        return [0.5, 2, math.nan]
    bad = [math.nan] + ([1.5] if param.type is int else [])
    if param.low is not None:
        bad.append(param.low if param.low_open else param.low - 0.5)
    if param.high is not None:
        bad.append(param.high if param.high_open else param.high + 0.5)
    return [b for b in bad if b not in param.choices]


def test_every_registered_loss_declares_its_hyper_parameters_with_types_and_ranges():
    import inspect

    from raykd.losses.objective import validate_params
    from raykd.losses.registry import COMMON_ARGS

    for name, spec in available_losses().items():
        signature = inspect.signature(spec.fn).parameters
        assert sorted(spec.params) == sorted(k for k, p in signature.items()
                                             if p.kind is p.KEYWORD_ONLY and k not in COMMON_ARGS), name
        for key, param in spec.params.items():
            if signature[key].default != ():  # uhc_kl's blocks have no usable default
                validate_params({name: {key: signature[key].default}}, [name])
            assert param.type is str or param.type is list or param.low is not None or param.type is bool, (name, key)
            for bad in _outside(param):
                with pytest.raises(ValueError, match=rf"train\.loss_params\.{name}\.{key}=.* out of range: it must be "):
                    validate_params({name: {key: bad}}, [name])


def test_a_loss_that_does_not_declare_its_hyper_parameters_is_refused():
    from raykd.losses.registry import define_loss

    def loss(student_logits, *, targets, labels, temperature, gamma: float = 1.0):
        return student_logits.sum(-1)

    with pytest.raises(ValueError, match=r"exactly its hyper-parameters \['gamma'\] \(declared \[\]"):
        define_loss("undeclared_gamma", description="a test loss")(loss)
    assert "undeclared_gamma" not in available_losses()


def test_forward_kl_temperature_scaling_by_hand():
    student, teacher, tau = _logits(), _logits(), 2.0
    p, q = torch.softmax(teacher / tau, -1), torch.softmax(student / tau, -1)
    expected = tau**2 * (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(_loss("forward_kl", student, TeacherTargets.dense(teacher), tau), expected)
    # sparse, K = 3: the same formula over the 3 + 1 buckets (cached log-probs already at tau)
    targets = _sparse(teacher, 3, tau)
    ids = targets.topk_ids
    pb = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
    qb = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
    expected = tau**2 * (pb * (pb.log() - qb.log())).sum(-1)
    torch.testing.assert_close(_loss("forward_kl", student, targets, tau), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradients_finite_with_fp16_soft_labels_and_low_precision_student(name):
    student = _logits(8.0).to(torch.bfloat16).requires_grad_()
    for k in (4, V):
        targets = _sparse(_logits(8.0), k, dtype=torch.float16)
        loss = _loss(name, student, targets, 2.0)
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
        (grad,) = torch.autograd.grad(loss.sum(), student)
        assert torch.isfinite(grad).all()


def test_fp16_soft_labels_give_non_negative_kl_against_the_teacher_itself():
    teacher = _logits()
    assert torch.all(_loss("forward_kl", teacher, _sparse(teacher, V, dtype=torch.float16)) > -1e-6)


def test_mse_logits():
    student, teacher = _logits(), _logits()
    expected = ((student - teacher) ** 2).mean(-1)
    torch.testing.assert_close(_loss("mse_logits", student, TeacherTargets.dense(teacher), tau=3.0), expected)


# --- hard labels and masking -----------------------------------------------------------------

def test_ce_matches_torch_cross_entropy_on_valid_positions():
    z, labels = _logits(), _labels()
    per_token = get_loss("ce").fn(z, targets=None, labels=labels, temperature=4.0)
    valid = labels != -100
    assert torch.isfinite(per_token).all()
    torch.testing.assert_close(per_token[valid], F.cross_entropy(z[valid], labels[valid], reduction="none"))


def test_masked_positions_do_not_change_masked_sum():
    z, labels = _logits(), _labels()
    mask = labels != -100
    per_token = get_loss("ce").fn(z, targets=None, labels=labels, temperature=1.0)
    poisoned = per_token.masked_fill(~mask, math.nan)
    assert masked_sum(poisoned, mask) == masked_sum(per_token, mask)
    z2 = z.clone()
    z2[~mask] = 100 * torch.randn(int((~mask).sum()), V)
    obj = Objective({"ce": 1.0, "forward_kl": 1.0})
    targets = TeacherTargets.dense(z * 0.5)
    a, b = obj(z, labels, mask, targets, 1.0), obj(z2, labels, mask, targets, 1.0)
    torch.testing.assert_close(a.loss_sum, b.loss_sum)


# --- registry and objective ------------------------------------------------------------------

def test_registry_lists_losses_and_unknown_name_lists_valid_ones():
    assert set(DIVERGENCES + ["ce", "mse_logits"]) <= set(available_losses())
    assert get_loss("ce").needs_teacher is False and get_loss("mse_logits").forms == ("dense",)
    with pytest.raises(KeyError) as err:
        get_loss("forwad_kl")
    assert "forward_kl" in str(err.value) and "reverse_kl" in str(err.value)


def _batch(b: int = 4):
    student = torch.randn(b, T, V, requires_grad=True)
    labels = torch.randint(0, V, (b, T))
    labels[::2, -3:] = -100
    return student, labels, labels != -100, TeacherTargets.dense(torch.randn(b, T, V))


def test_objective_is_the_weighted_sum_of_its_terms():
    student, labels, mask, targets = _batch()
    weights = {"forward_kl": 0.7, "ce": 0.3, "generalized_jsd": 0.5}
    out = Objective(weights, params={"generalized_jsd": {"beta": 0.9}})(student, labels, mask, targets, 2.0)
    torch.testing.assert_close(out.loss_sum, sum(w * out.term_sums[n] for n, w in weights.items()))
    jsd = get_loss("generalized_jsd").fn(student, targets=targets, labels=labels, temperature=2.0, beta=0.9)
    torch.testing.assert_close(out.term_sums["generalized_jsd"], masked_sum(jsd, mask))
    assert out.num_tokens == mask.sum()


def test_weight_zero_term_is_logged_but_gives_no_gradient():
    student, labels, mask, targets = _batch()
    logged = Objective({"forward_kl": 1.0, "reverse_kl": 0.0})(student, labels, mask, targets, 1.0)
    (g_logged,) = torch.autograd.grad(logged.loss_sum, student)
    alone = Objective({"forward_kl": 1.0})(student, labels, mask, targets, 1.0)
    (g_alone,) = torch.autograd.grad(alone.loss_sum, student)
    assert not logged.term_sums["reverse_kl"].requires_grad and logged.term_sums["reverse_kl"] > 0
    torch.testing.assert_close(g_logged, g_alone)


def test_objective_errors():
    with pytest.raises(KeyError, match="valid losses: .*forward_kl"):
        Objective({"kl": 1.0})
    for bad in ({"ce": -1.0}, {"ce": 0.0, "forward_kl": 0.0}, {}, {"ce": math.nan}, {"ce": math.inf}):
        with pytest.raises(ValueError):
            validate_weights(bad)
    with pytest.raises(ValueError, match="accepts"):
        Objective({"generalized_jsd": 1.0}, params={"generalized_jsd": {"alpha": 0.1}})
    student, labels, mask, targets = _batch()
    sparse = _sparse(torch.randn(B, T, V), 3)
    with pytest.raises(ValueError, match=r"'mse_logits' accepts .*\('dense',\)"):
        Objective({"mse_logits": 1.0})(student[:B], labels[:B], mask[:B], sparse, 1.0)
    with pytest.raises(ValueError, match="got None"):
        Objective({"forward_kl": 1.0})(student, labels, mask, None, 1.0)
    with pytest.raises(ValueError, match="vocab"):
        wider = TeacherTargets.dense(torch.randn(4, T, V + 1))
        Objective({"forward_kl": 1.0})(student, labels, mask, wider, 1.0)
    assert Objective({"ce": 1.0}).needs_teacher is False and Objective({"ce": 1, "tvd": 0}).needs_teacher


def test_accumulation_invariance_two_parts_equal_the_full_batch():
    student, labels, mask, targets = _batch(4)
    obj = Objective({"forward_kl": 0.5, "ce": 0.5})
    full = obj(student, labels, mask, targets, 2.0)
    parts = [
        obj(student[s], labels[s], mask[s], TeacherTargets.dense(targets.logits[s]), 2.0)
        for s in (slice(0, 1), slice(1, 4))  # uneven split: 1 + 3 sequences, different token counts
    ]
    total_tokens = sum(h.num_tokens for h in parts)
    assert total_tokens == full.num_tokens
    (g_full,) = torch.autograd.grad(full.loss_sum / full.num_tokens, student)
    split = sum(h.loss_sum for h in parts) / total_tokens
    (g_split,) = torch.autograd.grad(split, student)
    torch.testing.assert_close(split, full.loss_sum / full.num_tokens)
    torch.testing.assert_close(g_split, g_full)


def test_objective_shares_one_log_softmax_and_keeps_gradients():
    """Terms at the same temperature reuse one student log-softmax; gradients are unchanged."""
    from raykd.losses import reduction

    torch.manual_seed(3)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    teacher_lp = torch.log_softmax(torch.randn(2, 5, 11), -1)
    top_lp, top_ids = teacher_lp.topk(4, -1)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-6))
    targets = TeacherTargets.sparse(top_ids, top_lp, tail)
    calls = []
    real = torch.log_softmax

    def counting(x, *a, **k):
        calls.append(x.shape[-1])
        return real(x, *a, **k)

    reduction.torch.log_softmax = counting
    try:
        out = Objective({"forward_kl": 0.5, "ce": 0.5})(logits, labels, mask, targets, 1.0)
    finally:
        reduction.torch.log_softmax = real
    assert calls.count(11) == 1  # one student log-softmax over V for both terms
    (grad_shared,) = torch.autograd.grad(out.loss_sum, logits)
    separate = 0.5 * masked_sum(get_loss("forward_kl").fn(logits, targets=targets, labels=labels, temperature=1.0), mask)
    separate = separate + 0.5 * masked_sum(get_loss("ce").fn(logits, targets=None, labels=labels, temperature=1.0), mask)
    (grad_separate,) = torch.autograd.grad(separate, logits)
    torch.testing.assert_close(grad_shared, grad_separate)


def test_every_registered_teacher_loss_is_covered_by_these_maths_tests():
    from raykd.losses import available_losses

    sparse_teacher_losses = {n for n, s in available_losses().items() if s.needs_teacher and "sparse" in s.forms}
    assert sparse_teacher_losses == set(DIVERGENCES), "add a new loss to DIVERGENCES so the invariants cover it"


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tau", [0.5, 4.0])
def test_retempered_cache_equals_the_dense_teacher_at_the_new_temperature(name, tau):
    """Annealing-KD re-tempers labels cached at tau_c = 1: exact when K = V (no tail)."""
    from raykd.losses.targets import retemper

    teacher, student = _logits(), _logits()
    got = _loss(name, student, retemper(_sparse(teacher, V), 1.0, tau), tau)
    want = _loss(name, student, TeacherTargets.dense(teacher), tau)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    dense = TeacherTargets.dense(teacher)
    assert retemper(dense, 1.0, tau) is dense


def test_truncating_a_top_k_cache_equals_labeling_at_the_smaller_k():
    """A top-8 target cut to 3 holds the same ids, log-probs and tail as top-3 taken from the
    dense distribution, whatever order the cached ids are stored in (schema v2: id order)."""
    from raykd.losses.targets import truncate_topk

    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 5, 40) * 3, dim=-1)

    def top(k: int) -> TeacherTargets:
        lp, ids = logp.topk(k, dim=-1)
        tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-7))
        return TeacherTargets.sparse(ids, lp, tail)

    eight = top(8)
    perm = torch.randperm(8)
    shuffled = TeacherTargets.sparse(eight.topk_ids[..., perm], eight.topk_logprobs[..., perm], eight.tail_logmass)
    cut, direct = truncate_topk(shuffled, 3), top(3)
    assert torch.equal(cut.topk_ids, direct.topk_ids)
    torch.testing.assert_close(cut.topk_logprobs, direct.topk_logprobs)
    torch.testing.assert_close(cut.tail_logmass, direct.tail_logmass, rtol=1e-4, atol=1e-5)
    assert truncate_topk(eight, 8) is eight and truncate_topk(eight, 50) is eight
    with pytest.raises(ValueError, match="at least 1"):
        truncate_topk(eight, 0)


def test_the_registry_applies_tau_squared_to_every_teacher_logit_loss():
    for name, spec in available_losses().items():
        assert spec.tau_squared == (spec.kind == "logits" and spec.needs_teacher and name != "mse_logits"), name
        if spec.tau_squared:  # the registered loss is the declared function (the loss at tau) times tau**2
            student, teacher = _logits(), _logits()
            kw = {"blocks": [[0, 1, 2], list(range(3, V))]} if name == "uhc_kl" else {}
            targets = TeacherTargets.dense(teacher)
            at_tau = spec.fn.__wrapped__(student, targets=targets, labels=_labels(), temperature=2.5, **kw)
            torch.testing.assert_close(spec.fn(student, targets=targets, labels=_labels(), temperature=2.5, **kw),
                                       6.25 * at_tau, rtol=0, atol=0)


def test_uld_muki_kd_and_uhc_kl_keep_their_values_at_a_temperature_above_one():
    """The three losses that once applied tau**2 themselves give what they gave then (by hand)."""
    student, teacher, tau = _logits(), _logits(), 2.5
    p, q = torch.softmax(teacher / tau, -1), torch.softmax(student / tau, -1)
    sort = lambda x: x.sort(-1, descending=True).values  # noqa: E731
    torch.testing.assert_close(_loss("uld", student, TeacherTargets.dense(teacher), tau),
                               tau**2 * (sort(p) - sort(q)).abs().sum(-1), rtol=1e-6, atol=1e-7)
    targets = _sparse(teacher, 3, tau)  # sparse: the top-3 + tail of each side, sorted
    pb = torch.softmax(torch.cat([targets.topk_logprobs, targets.tail_logmass.unsqueeze(-1)], -1), -1)
    q_top = q.topk(3, -1).values
    expected = (sort(pb[..., :3]) - q_top).abs().sum(-1) + (pb[..., 3] - (1 - q_top.sum(-1)).clamp(min=0)).abs()
    torch.testing.assert_close(_loss("uld", student, targets, tau), tau**2 * expected, rtol=1e-6, atol=1e-6)
    from raykd.losses.muki import integrated_targets

    probs, w = torch.softmax(teacher[:, 0], -1), torch.rand(B)
    integrated = TeacherTargets.dense(integrated_targets(probs, w)[:, None])
    q1 = torch.log_softmax(student[:, :1] / tau, -1)
    kl = (probs[:, None] * (probs[:, None].log() - q1)).sum(-1)
    torch.testing.assert_close(_loss("muki_kd", student[:, :1], integrated, tau), w[:, None] * tau**2 * kl,
                               rtol=1e-5, atol=1e-6)
    blocks = [[0, 1, 2], list(range(3, V))]
    expected = sum(F.kl_div(torch.log_softmax(student[..., b] / tau, -1), torch.log_softmax(teacher[..., b] / tau, -1),
                            log_target=True, reduction="none").sum(-1) for b in blocks)
    torch.testing.assert_close(_loss("uhc_kl", student, TeacherTargets.dense(teacher), tau, blocks=blocks),
                               tau**2 * expected, rtol=1e-5, atol=1e-6)
