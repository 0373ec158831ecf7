"""The chunked loss (raykd.losses.chunked, Objective.from_hidden, train_step's chunk_positions):
chunked equals unchunked, values and gradients, for every registered logit term, with chunks that
do not divide the positions, padding, and gradient accumulation; and what it refuses."""

from __future__ import annotations

import copy

import pytest
import torch

from raykd.config import ConfigError, DistillConfig
from raykd.losses import Objective, TeacherTargets, available_losses
from raykd.methods import load
from raykd.train.step import StudentBatch, check_head_input, train_step

B, T, H, V, K = 3, 7, 8, 40, 5
TOLERANCE = 1e-5
"""Max relative difference, fp32: ``max |chunked - unchunked| / max |unchunked|``."""
PARAMS = {"uhc_kl": {"blocks": [list(range(0, 15)), list(range(15, V))]}, "generalized_jsd": {"beta": 0.3},
          "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
"""Hyper-parameters a term needs (uhc_kl's blocks) or that are not its default."""
CASES = [(name, form) for name, spec in available_losses().items() if spec.kind == "logits"
         for form in (spec.forms or (None,))]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def _padding(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``[b, t]`` and a mask with each row cut at its own length (-100 past it)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    return torch.where(mask, labels, -100), mask


def _targets(form: str | None, b: int, t: int, seed: int) -> TeacherTargets | None:
    """Sparse top-k (one padded slot, id -1) or dense teacher targets of a random teacher."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b, t, V, generator=g)
    if form == "dense":
        return TeacherTargets.dense(logits)
    if form is None:
        return None
    top = logits.log_softmax(-1).topk(K, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    ids = top.indices.clone()
    ids[..., -1] = -1  # a slot with no place in the student's vocabulary
    return TeacherTargets.sparse(ids, top.values, tail)


@pytest.mark.parametrize(("name", "form"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_every_logit_term_chunked_equals_unchunked(name, form):
    """Each registered logit term (with CE, and a term of weight 0 that is only logged) on
    chunks of 4 of the 3 x 7 positions, some padded: the same loss, term sums and gradients
    (hidden states, head weight and bias) as on the whole logits."""
    torch.manual_seed(0)
    hidden = torch.randn(B, T, H, requires_grad=True)
    head = torch.nn.Linear(H, V)
    labels, mask = _padding(B, T, seed=1)
    weights = {name: 0.7, "ce": 0.3} if name != "ce" else {"ce": 1.0}
    if form is not None and name != "tvd":
        weights["tvd"] = 0.0  # logged only (tvd takes either form)
    objective = Objective(weights, {name: PARAMS[name]} if name in PARAMS else None)
    targets = _targets(form, B, T, seed=2)

    whole = objective(head(hidden), labels, mask, targets, 2.0)
    chunked = objective.from_hidden(hidden, head, labels, mask, targets, 2.0, chunk_positions=4)
    wrt = [hidden, head.weight, head.bias]
    for got, want in zip(torch.autograd.grad(chunked.loss_sum, wrt), torch.autograd.grad(whole.loss_sum, wrt)):
        assert _rel(got, want) <= TOLERANCE
    assert _rel(chunked.loss_sum, whole.loss_sum) <= TOLERANCE
    assert list(chunked.term_sums) == list(whole.term_sums)
    for term, want in whole.term_sums.items():
        assert _rel(chunked.term_sums[term], want) <= TOLERANCE, term
    assert int(chunked.num_tokens) == int(mask.sum()) < B * T


def test_chunked_without_grad_and_without_valid_positions():
    """Under no_grad the chunks give the values alone; a micro-batch with no valid position gives
    zero, as the unchunked objective does; a head that is not an nn.Linear is refused."""
    torch.manual_seed(0)
    hidden, head = torch.randn(B, T, H), torch.nn.Linear(H, V)
    labels, mask = _padding(B, T, seed=3)
    objective = Objective({"forward_kl": 0.5, "ce": 0.5})
    targets = _targets("sparse", B, T, seed=4)
    with torch.no_grad():
        got = objective.from_hidden(hidden, head, labels, mask, targets, 1.0, chunk_positions=5)
        want = objective(head(hidden), labels, mask, targets, 1.0)
    assert _rel(got.loss_sum, want.loss_sum) <= TOLERANCE and not got.loss_sum.requires_grad
    none = torch.zeros_like(mask)
    empty = objective.from_hidden(hidden, head, torch.full_like(labels, -100), none, targets, 1.0, chunk_positions=5)
    assert float(empty.loss_sum.detach()) == 0.0 and all(float(v) == 0.0 for v in empty.term_sums.values())
    with pytest.raises(ValueError, match="nn.Linear"):
        objective.from_hidden(hidden, torch.nn.Bilinear(H, H, V), labels, mask, targets, 1.0, chunk_positions=5)


class _GradRecorder(torch.optim.SGD):
    """An optimizer that records the step's gradients and changes nothing (lr 0)."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def _tiny_lm(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        tie_word_embeddings=True))


def _lm_batch(rows: slice, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
              targets: TeacherTargets) -> StudentBatch:
    part = TeacherTargets.sparse(targets.topk_ids[rows], targets.topk_logprobs[rows], targets.tail_logmass[rows])
    inputs = {"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows])}
    return StudentBatch(inputs, labels[rows], mask[rows], part)


def test_chunked_step_with_accumulation_equals_the_unchunked_step(monkeypatch):
    """A tied-head Llama through train_step: 4 padded rows in one unchunked micro-batch give the
    same metrics and gradients as the same rows chunked 5 positions at a time, in one micro-batch
    and in two accumulated micro-batches of 2; chunked, the head never makes more than 5 rows."""
    ids = torch.randint(0, V, (4, 9), generator=torch.Generator().manual_seed(5))
    labels, mask = _padding(4, 9, seed=6)
    targets = _targets("sparse", 4, 9, seed=7)
    objective = Objective({"forward_kl": 0.5, "ce": 0.5, "reverse_kl": 0.0})
    model = _tiny_lm()
    check_head_input(model)
    rows = []  # positions of every logits tensor made (any linear map to V outputs)
    linear = torch.nn.functional.linear

    def recording(x, weight, bias=None):
        out = linear(x, weight, bias)
        if out.shape[-1] == V:
            rows.append(out[..., 0].numel())
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    runs = {}
    for arm, groups, chunk in (("whole", [slice(0, 4)], None), ("chunked", [slice(0, 4)], 5),
                               ("chunked_accum", [slice(0, 2), slice(2, 4)], 5)):
        m = copy.deepcopy(model)
        opt = _GradRecorder(m.parameters())
        rows.clear()
        metrics = train_step(m, opt, [_lm_batch(r, ids, labels, mask, targets) for r in groups], objective, 2.0,
                             chunk_positions=chunk)
        runs[arm] = (metrics, opt.grads)
        assert max(rows) == (5 if chunk else 4 * 9)  # chunked: never more than one chunk's logits
    want_metrics, want_grads = runs.pop("whole")
    for arm, (metrics, grads) in runs.items():
        assert metrics.keys() == want_metrics.keys()
        for key, want in want_metrics.items():
            assert abs(metrics[key] - want) <= TOLERANCE * abs(want), (arm, key)
        for got, want in zip(grads, want_grads, strict=True):
            assert _rel(got, want) <= TOLERANCE, arm


def test_feature_terms_run_unchanged_beside_chunked_logit_terms():
    """An online teacher giving dense logits and features: a feature term (hidden_mse) beside
    chunked forward KL and CE gives the unchunked step's metrics and gradients."""
    from raykd.losses.features import LayerMap
    from raykd.train.features import FeatureTeacher
    from raykd.train.step import causal_lm_logits

    teacher, student = _tiny_lm(layers=4, seed=1).eval(), _tiny_lm()
    objective = Objective({"hidden_mse": 1.0, "forward_kl": 0.5, "ce": 0.5}, layer_map=LayerMap([(0, 1), (1, 3)], 2, 4))
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(8))
    labels, mask = _padding(2, 9, seed=9)
    batch = StudentBatch({"input_ids": ids, "attention_mask": mask.long()}, labels, mask)
    online = FeatureTeacher(teacher, causal_lm_logits, attention=False)
    runs = []
    for chunk in (None, 4):
        m = copy.deepcopy(student)
        opt = _GradRecorder(m.parameters())
        runs.append((train_step(m, opt, [batch], objective, 2.0, feature_teacher=online, chunk_positions=chunk), opt.grads))
    (want_metrics, want_grads), (metrics, grads) = runs
    assert all(abs(metrics[k] - v) <= TOLERANCE * abs(v) for k, v in want_metrics.items()) and metrics["hidden_mse"] > 0
    assert all(_rel(g, w) <= TOLERANCE for g, w in zip(grads, want_grads, strict=True))


def test_a_model_that_changes_its_logits_after_the_head_is_refused():
    """Gemma 2 soft-caps its logits after the head: the chunked loss would miss it, so the check
    refuses it before training; a plain Llama head passes."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    check_head_input(_tiny_lm())
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=1.0))
    with pytest.raises(ValueError, match="soft-capping.*train.loss_chunk_positions=null"):
        check_head_input(gemma)


def test_step_refuses_chunks_where_whole_logits_are_needed():
    model = _tiny_lm()
    batch = _lm_batch(slice(0, 1), torch.zeros(1, 4, dtype=torch.long), *_padding(1, 4, seed=0),
                      _targets("sparse", 1, 4, seed=0))
    with pytest.raises(ValueError, match="on_logits"):
        train_step(model, _GradRecorder(model.parameters()), [batch], Objective({"ce": 1.0}), 1.0, chunk_positions=2,
                   on_logits=lambda b, logits: None)


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.strategy=fsdp", "train.num_workers=2", "train.batch_size=8"], "FSDP keeps its weight sharded"),
    (["method=rl_kd", "extra_teachers=[{name: second}]"], "rl_kd' learns its teacher choice"),
])
def test_config_refuses_what_cannot_chunk(overrides, message):
    load(DistillConfig, None, ["train.loss_chunk_positions=256"])
    with pytest.raises(ConfigError, match=message):
        load(DistillConfig, None, ["train.loss_chunk_positions=256", *overrides])
    load(DistillConfig, None, ["train.loss_chunk_positions=0", *overrides])  # 0: unchunked, nothing to refuse
