"""The training step every student kind shares (raykd.train.step) and the classification students
trained through it (raykd.train.local)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raykd.losses import Objective
from raykd.train.local import accuracy, class_batch, classifier_loss, train_classifier
from raykd.train.step import StudentBatch, build_optimizer, causal_lm_logits, train_step


def _tiny_classifier(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def _class_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(4, 60, (n, 8)), "attention_mask": np.ones((n, 8), dtype=np.int64),
            "label": rng.integers(0, 3, n), "teacher_logits": rng.normal(size=(n, 3)).astype(np.float32) * 3}


def test_classifier_objective_is_hintons_kd_plus_ce():
    """kd_weight * tau^2 KL(teacher || student) + ce_weight * CE, averaged over the batch."""
    model, data, tau = _tiny_classifier(), _class_data(6), 2.0
    batch = class_batch(data, np.arange(6))
    got = classifier_loss({"forward_kl": 0.7, "ce": 0.3}, tau)(model, batch)
    s = model(**batch.inputs).logits
    t = torch.as_tensor(data["teacher_logits"])
    kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True, reduction="none").sum(-1)
    want = 0.7 * tau**2 * kl.mean() + 0.3 * F.cross_entropy(s, torch.as_tensor(data["label"]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_accumulation_equals_one_big_batch():
    """Micro-batches of 3 and 5 positions give the same update as one batch of 8: every position
    weighs 1/8 of the step. (A mean per micro-batch would weigh the 3 rows 1/6 and the 5 rows 1/10.)"""
    data = _class_data(8)
    objective = Objective({"forward_kl": 1.0, "ce": 0.5})
    from raykd.train.step import classifier_logits

    models = []
    for groups in ([class_batch(data, np.arange(8))], [class_batch(data, np.arange(3)), class_batch(data, np.arange(3, 8))]):
        m = _tiny_classifier()
        opt, _ = build_optimizer(list(m.parameters()), lr=1e-2)
        out = train_step(m, opt, groups, objective, 2.0, logits_fn=classifier_logits, max_grad_norm=1.0)
        assert out["positions"] == 8
        models.append((m, out))
    (a, out_a), (b, out_b) = models
    assert out_a["loss"] == pytest.approx(out_b["loss"], rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_online_teacher_equals_cached_teacher_logits():
    """A teacher computed in the step gives the same training as its logits cached in the data."""
    teacher, data = _tiny_classifier(), _class_data(12)
    with torch.no_grad():
        cached = {**data, "teacher_logits": teacher(**class_batch(data, np.arange(12)).inputs).logits.numpy()}
    runs = []
    for rows, online in ((cached, None), ({k: v for k, v in data.items() if k != "teacher_logits"}, teacher)):
        torch.manual_seed(1)
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p))
        fn = None if online is None else (lambda b, t=online: t(**b.inputs).logits)
        runs.append(train_classifier(student, rows, {"forward_kl": 1.0}, temperature=2.0, steps=3, batch_size=4,
                                     lr=1e-2, teacher=fn))
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)
    assert runs[0][0] > 0


def test_train_classifier_learns_and_leaves_the_teacher_unchanged():
    teacher = _tiny_classifier()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = _class_data(16)
    student = copy.deepcopy(teacher)
    losses = train_classifier(student, data, {"ce": 1.0}, steps=30, batch_size=16, lr=3e-2, freeze_embeddings=True)
    assert losses[-1] < losses[0] - 0.2
    assert accuracy(student, data) > accuracy(teacher, data)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    emb_before = teacher.get_input_embeddings().weight
    assert torch.equal(student.get_input_embeddings().weight, emb_before)  # frozen embeddings stay


def test_step_context_wraps_each_micro_batch_forward():
    """A micro-batch's context is entered around its forward (MiniDisc's sandwich masks use it)."""
    from contextlib import contextmanager

    entered = []

    @contextmanager
    def ctx(name):
        entered.append(name)
        yield

    data = _class_data(4)
    from dataclasses import replace

    from raykd.train.step import classifier_logits

    b = class_batch(data, np.arange(4))
    m = _tiny_classifier()
    opt, _ = build_optimizer(list(m.parameters()), lr=1e-3)
    train_step(m, opt, [replace(b, context=lambda: ctx("a")), replace(b, context=lambda: ctx("b"))],
               Objective({"ce": 1.0}), 1.0, logits_fn=classifier_logits)
    assert entered == ["a", "b"]


def test_causal_lm_step_matches_the_objective_mean(tiny_model):
    """An LM micro-batch: the step's loss is the objective's per-token mean before the update."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.randint(3, 100, (2, 12))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    mask = labels >= 0
    batch = StudentBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels, mask)
    objective = Objective({"ce": 1.0})
    with torch.no_grad():
        want = F.cross_entropy(causal_lm_logits(model, batch.inputs)[mask], labels[mask])
    opt, _ = build_optimizer(list(model.parameters()), lr=1e-3)
    got = train_step(model, opt, [batch], objective, 1.0)
    assert got["loss"] == pytest.approx(float(want), rel=1e-5)
    assert got["ce"] == pytest.approx(float(want), rel=1e-5) and got["positions"] == 22


def test_an_evaluating_callback_does_not_turn_dropout_off():
    """Issue 29: a callback that evaluates (``model.eval()``) between steps left the student in
    eval mode for the rest of the phase, so training after the first report ran without dropout.
    With dropout on, the student trained with an evaluation after every step must equal the one
    trained without any."""
    from transformers import BertConfig, BertForSequenceClassification

    data = _class_data(12)
    trained = []
    for evaluate in (False, True):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.3)
        model = BertForSequenceClassification(cfg)
        on_step = (lambda _step, _m, model=model: accuracy(model, data)) if evaluate else None
        torch.manual_seed(1)
        train_classifier(model, data, {"forward_kl": 1.0}, temperature=2.0, steps=4, batch_size=4, lr=1e-2, on_step=on_step)
        trained.append(model.state_dict())
        assert not model.training  # left in eval mode at the end, as documented
    plain, evaluated = trained
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)
