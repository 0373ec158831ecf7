"""Feature methods on tiny models through the shared step (raykd.train.features, raykd.train.step):
the capture equals transformers' own outputs, a student copied from the mapped teacher layers has
zero feature loss at step 0, one step lowers each loss, projections train, online equals cached."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from raykd.losses import Objective
from raykd.losses.features import LayerMap
from raykd.students.build import layer_drop
from raykd.train.features import FeatureTeacher, capture_features
from raykd.train.local import class_batch, train_classifier
from raykd.train.step import StudentBatch, build_optimizer, causal_lm_logits, classifier_logits, train_step

FEATURE_TERMS = ["distilbert_cos", "pkd", "tinybert", "alp_kd", "minilm", "minilmv2", "rail_kd", "ckd", "mgskd", "lrc_bert",
                 "hidden_mse", "attention_kl"]
PARAMS = {"minilmv2": {"relation_heads": 4}}


def tiny_bert(layers: int = 4, hidden: int = 16, heads: int = 4, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=0.3)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def _inputs(seed: int = 0, b: int = 4, t: int = 8):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    return {"input_ids": torch.randint(4, 60, (b, t), generator=g), "attention_mask": mask}


def _class_batch(seed: int = 0) -> StudentBatch:
    inputs = _inputs(seed)
    labels = torch.arange(4)[:, None] % 3
    return StudentBatch(inputs, labels, torch.ones(4, 1, dtype=torch.bool))


def _lm_batch(seed: int = 0) -> StudentBatch:
    inputs = _inputs(seed)
    labels = inputs["input_ids"].roll(-1, 1).masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, -1] = -100
    return StudentBatch(inputs, labels, labels >= 0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_capture_equals_transformers_outputs_and_leaves_logits_unchanged(kind):
    model = tiny_bert() if kind == "bert" else tiny_llama()
    model.set_attn_implementation("eager")
    inputs = _inputs()
    ref = model(**inputs, output_hidden_states=True, output_attentions=True)
    model.set_attn_implementation("sdpa")
    with capture_features(model, inputs, attention=True) as cap:
        logits = model(**inputs).logits
    assert model.config._attn_implementation == "sdpa"  # restored
    f = cap.features
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.embeddings, ref.hidden_states[0])
    last = 4 if kind == "bert" else 3  # Llama's last hidden state in transformers is after the final norm
    for i in range(last):
        torch.testing.assert_close(f.hidden[i], ref.hidden_states[i + 1])
    m = inputs["attention_mask"].bool()
    for i in range(4):  # attention of the real query tokens
        torch.testing.assert_close(f.probs(i).permute(0, 2, 1, 3)[m], ref.attentions[i].permute(0, 2, 1, 3)[m],
                                   rtol=1e-5, atol=1e-6)


def _objective(name, layer_map):
    return Objective({name: 1.0}, {name: PARAMS[name]} if name in PARAMS else None, layer_map=layer_map)


def _term(obj, name, teacher, student, logits_fn, batch) -> float:
    """The term's sum over the batch's positions, without gradients."""
    _, tf = FeatureTeacher(teacher, logits_fn, attention=obj.needs_attention)(batch)
    with torch.no_grad(), capture_features(student, batch.inputs, attention=obj.needs_attention) as cap:
        logits = logits_fn(student, batch.inputs)
    return float(obj(logits.float(), batch.labels, batch.mask, None, 1.0, (cap.features, tf)).term_sums[name])


def _term_at_step_0(teacher, student, logits_fn, batch, name, pairs, n_student):
    obj = _objective(name, LayerMap(pairs, n_student, teacher.config.num_hidden_layers))
    return _term(obj, name, teacher, student, logits_fn, batch)


def _identity_blocks(model, blocks):
    """Zero the output projections of attention and MLP in ``blocks``: a pre-norm block (Llama)
    becomes the identity, a post-norm one (BERT, norms at their init gamma=1, beta=0) the identity
    up to LayerNorm's epsilon."""
    from raykd.students.build import transformer_layers

    layers = transformer_layers(model)
    with torch.no_grad():
        for i in blocks:
            for name, p in layers[i].named_parameters():
                if any(k in name for k in ("attention.output.dense", "output.dense", "o_proj", "down_proj")) \
                        and "LayerNorm" not in name:
                    p.zero_()
    return model


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("name", [n for n in FEATURE_TERMS if n not in ("alp_kd", "lrc_bert")])
def test_student_copied_from_the_mapped_layers_has_zero_feature_loss_at_step_0(kind, name):
    """The default map of a layer-dropped student gives 0; the naive (i, i) map does not.

    A layer-dropped student's block equals the teacher block it was copied from only when the
    blocks dropped before it do nothing (its input is otherwise another one), so the dropped
    teacher blocks are made identities here; the student keeps teacher blocks 0 and 2 of 4."""
    teacher, logits_fn, batch = ((tiny_bert(), classifier_logits, _class_batch()) if kind == "bert"
                                 else (tiny_llama(), causal_lm_logits, _lm_batch()))
    keep = [0, 2]
    _identity_blocks(teacher, [1, 3])
    student = layer_drop(teacher, keep).eval()
    default = LayerMap.from_keep_layers(keep, 4).pairs
    assert default == ((0, 0), (1, 2))
    assert _term_at_step_0(teacher, student, logits_fn, batch, name, default, 2) == pytest.approx(0.0, abs=1e-5)
    assert _term_at_step_0(teacher, student, logits_fn, batch, name, ((0, 0), (1, 1)), 2) > 1e-3


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("name", FEATURE_TERMS)
def test_one_step_lowers_each_feature_loss(kind, name):
    teacher, logits_fn, batch = ((tiny_bert(), classifier_logits, _class_batch()) if kind == "bert"
                                 else (tiny_llama(), causal_lm_logits, _lm_batch()))
    student = layer_drop(teacher, [0, 2])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    obj = _objective(name, LayerMap.from_keep_layers([0, 2], 4))
    feature_teacher = FeatureTeacher(teacher, logits_fn, attention=obj.needs_attention)
    opt, _ = build_optimizer(list(student.parameters()), lr=3e-3)
    before = _term(obj, name, teacher, student, logits_fn, batch)
    metrics = train_step(student, opt, [batch], obj, 1.0, logits_fn=logits_fn, feature_teacher=feature_teacher)
    assert metrics[name] * metrics["positions"] == pytest.approx(before, rel=1e-4)  # the step saw the same loss
    after = _term(obj, name, teacher, student, logits_fn, batch)
    assert 0 <= after < before, (name, before, after)


def test_projection_is_created_only_when_widths_differ_and_trains_with_the_student():
    teacher, student = tiny_bert(hidden=32), tiny_bert(layers=2, hidden=16, seed=1)
    lm = LayerMap(((0, 1), (1, 3)), 2, 4)
    obj = Objective({"tinybert": 1.0, "ce": 1.0}, layer_map=lm, widths=(16, 32))
    assert set(obj.projections["tinybert"]) == {"embeddings", "hidden"}
    before = [p.detach().clone() for p in obj.parameters()]
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(4, 60, (8, 8)), "attention_mask": np.ones((8, 8), dtype=np.int64),
            "label": rng.integers(0, 3, 8)}
    losses = train_classifier(student, data, {}, steps=3, batch_size=4, lr=1e-2, objective=obj,
                              feature_teacher=FeatureTeacher(teacher, classifier_logits, attention=True))
    assert all(np.isfinite(losses))
    assert all(not torch.equal(a, b) for a, b in zip(before, obj.parameters()))
    assert not {k for k in student.state_dict() if "projection" in k}  # not part of the student (dropped at export)


def test_online_feature_teacher_equals_cached_teacher_features():
    teacher = tiny_bert()
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(4, 60, (8, 8)), "attention_mask": np.ones((8, 8), dtype=np.int64),
            "label": rng.integers(0, 3, 8)}
    obj = Objective({"forward_kl": 1.0, "tinybert": 1.0}, layer_map=LayerMap.from_keep_layers([0, 2], 4))
    online = FeatureTeacher(teacher, classifier_logits, attention=True)
    runs = []
    for cached in (False, True):
        student = layer_drop(teacher, [0, 2])
        torch.manual_seed(3)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p))
        batches = [class_batch(data, np.arange(s, s + 4)) for s in (0, 4, 0)]
        if cached:
            for b in batches:
                b.targets, b.teacher_features = online(b)
        opt, _ = build_optimizer(list(student.parameters()), lr=1e-2)
        runs.append([train_step(student, opt, [b], obj, 1.0, logits_fn=classifier_logits,
                                feature_teacher=None if cached else online)["loss"] for b in copy.copy(batches)])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)


@pytest.mark.parametrize("name,keep", [
    ("pkd", dict(hidden=[0, 2], first_token_only=True)),
    ("tinybert", dict(hidden=[0, 2], attention=[0, 2], embeddings=True)),
    ("minilmv2", dict(attention=[2])),
    ("distilbert_cos", dict(hidden=[2])),
])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_compact_cached_form_gives_the_loss_of_the_full_features(name, keep, kind):
    """The cache keeps only the blocks a method reads, without the [B, 1, T, T] masks."""
    from raykd.train.features import compact, feature_bytes

    teacher, logits_fn, batch = ((tiny_bert(), classifier_logits, _class_batch()) if kind == "bert"
                                 else (tiny_llama(), causal_lm_logits, _lm_batch()))
    if name == "pkd" and kind == "llama":
        keep = dict(hidden=[0, 2])
    student = layer_drop(teacher, [0, 2])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obj = _objective(name, LayerMap.from_keep_layers([0, 2], 4))
    params = {"pkd": {"first_token_only": kind == "bert"}}.get(name)
    if params:
        obj = Objective({name: 1.0}, {name: params}, layer_map=LayerMap.from_keep_layers([0, 2], 4))
    _, full = FeatureTeacher(teacher, logits_fn, attention=obj.needs_attention)(batch)
    small = compact(full, **keep, causal=kind == "llama", dtype=torch.float32)
    assert feature_bytes(small) < feature_bytes(full)
    with torch.no_grad(), capture_features(student, batch.inputs, attention=obj.needs_attention) as cap:
        logits = logits_fn(student, batch.inputs)
    got = [float(obj(logits.float(), batch.labels, batch.mask, None, 1.0, (cap.features, f)).term_sums[name]) for f in (full, small)]
    assert got[1] == pytest.approx(got[0], rel=1e-5, abs=1e-6)
