"""MUKI's maths on fixed tensors, its config checks and the classifier engine's MC dropout (no Ray)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from raykd.losses import Objective, TeacherTargets, get_loss
from raykd.losses.muki import (
    FeatureAmalgamation,
    attach_aux_loss,
    concat_logits,
    integrate,
    integrated_targets,
    margin_weights,
    pad_to_label_space,
    uncertainty_score,
)

BBC = ["business", "entertainment", "politics", "sport", "tech"]


# ---- integration maths ---------------------------------------------------------------------


def test_score_is_one_for_one_hot_and_zero_for_uniform():
    p = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    s = uncertainty_score(p)
    assert s[0] == pytest.approx(1.0)
    assert s[1] == pytest.approx(0.0, abs=1e-6)
    assert s[2] == pytest.approx(1 - math.log(2) / math.log(3), abs=1e-6)


def test_score_of_a_one_class_teacher_is_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        uncertainty_score(torch.ones(4, 1))


def test_padding_puts_each_teacher_at_its_classes():
    p0 = torch.tensor([[0.2, 0.3, 0.5]])  # classes 0, 2, 4
    p1 = torch.tensor([[0.9, 0.1]])  # classes 1, 3
    out = pad_to_label_space([p0, p1], [[0, 2, 4], [1, 3]], 5)
    assert out.shape == (1, 2, 5)
    assert out[0, 0].tolist() == pytest.approx([0.2, 0.0, 0.3, 0.0, 0.5])
    assert out[0, 1].tolist() == pytest.approx([0.0, 0.9, 0.0, 0.1, 0.0])


@pytest.mark.parametrize("blocks", [[[0, 1], [1, 2, 3, 4]], [[0, 1], [2, 3]]])
def test_padding_refuses_overlapping_or_missing_classes(blocks):
    with pytest.raises(ValueError, match="exactly once"):
        pad_to_label_space([torch.rand(1, len(b)) for b in blocks], blocks, 5)


def _two_teachers():
    padded = pad_to_label_space([torch.tensor([[0.6, 0.4], [0.5, 0.5]]), torch.tensor([[0.1, 0.1, 0.8], [0.9, 0.05, 0.05]])],
                                [[0, 1], [2, 3, 4]], 5)
    scores = torch.tensor([[0.3, 0.5], [0.1, 0.2]])
    return padded, scores


def test_hard_integration_takes_the_most_certain_teacher():
    padded, _ = _two_teachers()
    out = integrate(padded, torch.tensor([[0.9, 0.1], [0.2, 0.7]]), "hard")
    assert out[0].tolist() == pytest.approx([0.6, 0.4, 0, 0, 0])
    assert out[1].tolist() == pytest.approx([0, 0, 0.9, 0.05, 0.05])


def test_soft_integration_weights_by_softmax_of_scores_over_0_2():
    padded, scores = _two_teachers()
    out = integrate(padded, scores, "soft")
    w = torch.softmax(scores / 0.2, -1)
    # by hand for row 0: w0 * [0.6, 0.4, 0, 0, 0] + w1 * [0, 0, 0.1, 0.1, 0.8]
    expect0 = [w[0, 0] * 0.6, w[0, 0] * 0.4, w[0, 1] * 0.1, w[0, 1] * 0.1, w[0, 1] * 0.8]
    assert out[0].tolist() == pytest.approx([float(x) for x in expect0], abs=1e-6)
    assert out.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    assert float(w[0, 1]) == pytest.approx(1 / (1 + math.exp(-1.0)))  # (0.5 - 0.3) / 0.2 = 1


def test_reweighting_is_the_gap_between_the_two_best_scores():
    s = torch.tensor([[0.3, 0.5, 0.45], [0.9, 0.1, 0.0]])
    assert margin_weights(s).tolist() == pytest.approx([0.05 + 1e-6, 0.8 + 1e-6], abs=1e-7)


def test_integrated_targets_carry_the_distribution_and_the_weight():
    p = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.25, 0.75]])
    w = torch.tensor([0.5, 2.0])
    z = integrated_targets(p, w)
    assert torch.softmax(z, -1).tolist()[0] == pytest.approx([0.6, 0.4, 0.0], abs=1e-6)
    assert torch.logsumexp(z, -1).exp().tolist() == pytest.approx([0.5, 2.0], rel=1e-5)
    assert torch.isfinite(z).all()


def test_muki_kd_is_the_weighted_kl_and_forward_kl_ignores_the_weight():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(4, 5), -1)
    w = torch.tensor([0.1, 0.5, 1.0, 2.0])
    s = torch.randn(4, 1, 5)
    got = get_loss("muki_kd").fn(s, targets=TeacherTargets.dense(integrated_targets(p, w)[:, None]), labels=None, temperature=1.0)
    kl = (p * (p.log() - torch.log_softmax(s[:, 0], -1))).sum(-1)
    assert got[:, 0].tolist() == pytest.approx((w * kl).tolist(), rel=1e-4)
    plain = get_loss("forward_kl").fn(s, targets=TeacherTargets.dense(integrated_targets(p, w)[:, None]), labels=None, temperature=1.0)
    assert plain[:, 0].tolist() == pytest.approx(kl.tolist(), rel=1e-4)
    same = get_loss("muki_kd").fn(p.log()[:, None], targets=TeacherTargets.dense(integrated_targets(p)[:, None]), labels=None, temperature=1.0)
    assert same.abs().max() < 1e-5


def test_muki_kd_with_padded_zeros_stays_finite_and_non_negative():
    p = torch.tensor([[0.7, 0.3, 0.0, 0.0, 0.0]])
    s = torch.randn(1, 1, 5, requires_grad=True)
    out = get_loss("muki_kd").fn(s, targets=TeacherTargets.dense(integrated_targets(p)[:, None]), labels=None, temperature=1.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and float(out.detach()) >= 0 and torch.isfinite(s.grad).all()


def test_uhc_renormalises_the_student_over_each_block():
    torch.manual_seed(1)
    blocks = [[0, 2, 4], [1, 3]]
    t = [torch.randn(3, 3), torch.randn(3, 2)]
    z = concat_logits(t, blocks, 5)
    s = torch.randn(3, 1, 5)
    tau = 5.0
    got = get_loss("uhc_kl").fn(s, targets=TeacherTargets.dense(z[:, None]), labels=None, temperature=tau, blocks=blocks)
    q = torch.softmax(s[:, 0] / tau, -1)
    expect = 0
    for b, tz in zip(blocks, t):
        p_b = torch.softmax(tz / tau, -1)
        q_b = q[:, b] / q[:, b].sum(-1, keepdim=True)  # the code's split_prob
        expect = expect + (p_b * (p_b.log() - q_b.log())).sum(-1)
    assert got[:, 0].tolist() == pytest.approx((tau**2 * expect).tolist(), rel=1e-4)
    # a student equal to the teachers up to a shift per block has zero UHC loss (but not zero KD)
    shifted = z.clone()
    shifted[:, blocks[1]] += 7.0
    zero = get_loss("uhc_kl").fn(shifted[:, None], targets=TeacherTargets.dense(z[:, None]), labels=None, temperature=tau, blocks=blocks)
    assert zero.abs().max() < 1e-4
    kd = get_loss("forward_kl").fn(shifted[:, None], targets=TeacherTargets.dense(z[:, None]), labels=None, temperature=tau)
    assert kd.min() > 1e-3


def test_vanilla_kd_target_is_the_concatenated_logits_at_their_classes():
    z = concat_logits([torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0, 5.0]])], [[1, 3], [0, 2, 4]], 5)
    assert z[0].tolist() == [3.0, 1.0, 4.0, 2.0, 5.0]


def test_uhc_runs_through_the_objective_with_its_blocks():
    obj = Objective({"uhc_kl": 1.0}, {"uhc_kl": {"blocks": [[0, 1], [2, 3, 4]]}})
    out = obj(torch.randn(2, 1, 5), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool),
              TeacherTargets.dense(torch.randn(2, 1, 5)), 5.0)
    assert float(out.loss_sum) > 0


def test_feature_amalgamation_matches_the_codes_mse_terms():
    torch.manual_seed(0)
    fa = FeatureAmalgamation(8, [6, 4])
    fs, ft = torch.randn(5, 8), torch.randn(5, 10)
    amal, rec = fa(fs, ft)
    code = fa.t_encoder(ft)
    assert float(amal.mean()) == pytest.approx(float(F.mse_loss(fa.s_encoder(fs), code)), rel=1e-5)
    recon = fa.t_decoder(code)
    expect = F.mse_loss(recon[:, :6], ft[:, :6]) + F.mse_loss(recon[:, 6:], ft[:, 6:])
    assert float(rec.mean()) == pytest.approx(float(expect), rel=1e-5)


def test_attached_aux_loss_adds_its_batch_mean_to_the_gradient():
    torch.manual_seed(0)
    x = torch.randn(4, 3, requires_grad=True)
    logits, aux = x * 2, (x**2).sum(-1)
    attach_aux_loss(logits, aux).sum().backward()
    expect = torch.autograd.grad((x * 2).sum() + ((x**2).sum(-1)).mean(), x)[0]
    assert torch.allclose(x.grad, expect)


# ---- config and plan checks -----------------------------------------------------------------


def _cfg(**kw):
    from raykd.recipes.muki.config import MukiConfig

    return MukiConfig.model_validate(kw)


def test_code_rule_splits_sorted_labels_with_the_remainder_last():
    from raykd.recipes.muki.config import code_rule

    assert code_rule(BBC, 2) == [["business", "entertainment"], ["politics", "sport", "tech"]]


@pytest.mark.parametrize("teachers, match", [
    ([["business", "politics"], ["politics", "sport", "tech", "entertainment"]], "must not overlap"),
    ([["business"], ["entertainment", "politics", "sport", "tech"]], "at least 2 classes"),
])
def test_bad_partitions_fail_at_load(teachers, match):
    with pytest.raises(ValueError, match=match):
        _cfg(partitions=[{"name": "p", "teachers": teachers}])


@pytest.mark.parametrize("partition, match", [
    ({"name": "p", "teachers": [["business", "politics"], ["sport", "tech"]]}, r"belong to no teacher.*entertainment"),
    ({"name": "p", "teachers": [["business", "politics"], ["sports", "tech", "entertainment"]]}, r"\['sports'\] are not classes"),
    ({"name": "p", "n_teachers": 3}, "at least 2 classes"),
])
def test_partitions_checked_against_the_data(partition, match):
    from raykd.recipes.muki.prepare import check_plan

    with pytest.raises(ValueError, match=match):
        check_plan(_cfg(partitions=[partition]), BBC)


def test_mc_needs_two_passes():
    with pytest.raises(ValueError, match="M >= 2"):
        _cfg(mc={"passes": 1})
    assert _cfg(mc={"passes": 0}, methods=["kd", "muki_no_mc"]).uses_mc is False


def test_student_head_must_match_the_union_of_classes():
    from raykd.recipes.muki.prepare import check_plan

    with pytest.raises(ValueError, match="student.num_labels=4"):
        check_plan(_cfg(student={"num_labels": 4}), BBC)


def test_teacher_with_other_label_names_is_refused(tmp_path):
    from raykd.recipes.muki.prepare import check_plan

    for i, names in enumerate((["business", "entertainment"], ["politics", "sports", "tech"])):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(json.dumps({"id2label": {str(j): n for j, n in enumerate(names)}}))
    cfg = _cfg(partitions=[{"name": "p", "models": [str(tmp_path / "0"), str(tmp_path / "1")]}])
    with pytest.raises(ValueError, match=r"teacher 1.*\['politics', 'sports', 'tech'\]"):
        check_plan(cfg, BBC)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: kd, uhc, dfa"):
        _cfg(methods=["kd", "mimic"])


def test_stratified_split_keeps_class_shares():
    from raykd.data.documents import Document
    from raykd.recipes.muki.prepare import stratified_split

    docs = [Document(f"{c}/{i}", f"text {i}", c) for c in ("a", "b") for i in range(50 if c == "a" else 20)]
    out = stratified_split(docs, test_share=0.2, dev_share=0.1, seed=0)
    assert sum(d.label == "a" for d in out["test"]) == 10 and sum(d.label == "b" for d in out["test"]) == 4
    assert sum(d.label == "b" for d in out["dev"]) == 2
    ids = [d.doc_id for s in out.values() for d in s]
    assert len(ids) == len(set(ids)) == 70


# ---- MC dropout in the classifier engine ----------------------------------------------------


def _tiny_bert(labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=32, num_labels=labels, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("scope", ["encoder", "head"])
def test_mc_dropout_means_probabilities_of_stochastic_passes(scope):
    from raykd.teacher.engines.classifier import mc_dropout_probs

    model = _tiny_bert()
    ids = torch.randint(1, 50, (4, 10))
    am = torch.ones_like(ids)
    det = mc_dropout_probs(model, ids, am, passes=0)
    with torch.no_grad():
        assert torch.allclose(det["logits"], model(input_ids=ids, attention_mask=am).logits)
    assert det["features"].shape == (4, 16) and "mean_probs" not in det
    a = mc_dropout_probs(model, ids, am, passes=8, scope=scope, seed=3)
    b = mc_dropout_probs(model, ids, am, passes=8, scope=scope, seed=3)
    c = mc_dropout_probs(model, ids, am, passes=8, scope=scope, seed=4)
    assert torch.allclose(a["mean_probs"], b["mean_probs"])  # seeded
    assert not torch.allclose(a["mean_probs"], c["mean_probs"])  # dropout was on
    assert not torch.allclose(a["mean_probs"], torch.softmax(det["logits"], -1))
    assert a["mean_probs"].sum(-1).tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    assert not model.training


def test_engine_score_mc_returns_scores(tmp_path):
    from raykd.teacher.engines.classifier import ClassifierEngine
    from tests.ray.test_minidisc_tune import build_tiny_classifier

    engine = ClassifierEngine(build_tiny_classifier(tmp_path / "cls", ["a", "b", "c"]), device="cpu", num_threads=1)
    ids = engine.tokenizer(["goal team match", "bank profit"], padding=True, return_tensors="np")
    out = engine.score_mc(ids["input_ids"], ids["attention_mask"], passes=4)
    assert out["mean_probs"].shape == (2, 3) and out["features"].shape == (2, 32) and out["scores"].shape == (2,)
    assert out["scores"].tolist() == pytest.approx(uncertainty_score(torch.as_tensor(out["mean_probs"])).tolist())
    with pytest.raises(ValueError, match="unknown MC dropout scope"):
        engine.score_mc(ids["input_ids"], passes=2, scope="layers")


def test_cli_reports_a_bad_plan_as_a_user_error(tmp_path, capsys):
    from raykd.cli import cli

    code = cli(["muki", "--config", "jobs/configs/muki_bbc.yaml", "--output-dir", str(tmp_path), "student.num_labels=4"])
    assert code == 2
    assert "error: student.num_labels=4" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_shipped_config_loads_with_three_partitions():
    from raykd.config import load_config
    from raykd.recipes.muki.config import MukiConfig
    from raykd.recipes.muki.prepare import check_plan

    cfg = load_config(MukiConfig, "jobs/configs/muki_bbc.yaml")
    parts = check_plan(cfg, BBC)
    assert [p.names for p in parts] == [[["business", "entertainment"], ["politics", "sport", "tech"]],
                                        [["business", "politics", "tech"], ["entertainment", "sport"]],
                                        [["business", "entertainment"], ["politics", "tech"]]]
    assert parts[1].blocks == [[0, 2, 4], [1, 3]]
    assert parts[2].labels == ["business", "entertainment", "politics", "tech"] and parts[2].blocks == [[0, 1], [2, 3]]
    assert cfg.mc.scope == "encoder" and cfg.mc.passes == 16 and cfg.data.seq_len == 128


def test_selection_report_counts_who_picks_the_owner():
    from raykd.recipes.muki.labels import TeacherLabels
    import numpy as np

    from raykd.recipes.muki.methods import auroc, selection_report

    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0 and auroc(np.array([0.5]), np.array([0.5])) == 0.5
    # teacher 0 knows classes {0, 1}, teacher 1 {2, 3}; teacher 0 is confident everywhere, teacher 1 only on its own
    gold = np.array([0, 1, 2, 3])
    t0 = TeacherLabels({"train": np.array([[9.0, 0], [0, 9], [9, 0], [9, 0]])}, mean_probs=np.array([[0.99, 0.01], [0.01, 0.99], [0.99, 0.01], [0.6, 0.4]]))
    t1 = TeacherLabels({"train": np.array([[0.0, 0], [0, 0], [3, 0], [0, 8]])}, mean_probs=np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.01, 0.99]]))
    rep = selection_report([t0, t1], [[0, 1], [2, 3]], gold)
    assert rep["max_logit"] == 0.5  # articles 2 and 3: teacher 0's logit 9 beats teacher 1's 3 and 8
    assert rep["muki_score_mc"] == 0.75  # article 2: teacher 0's 0.99 is more certain; article 3: teacher 1's 0.99 wins
    assert [t["own_share"] for t in rep["teachers"]] == [0.5, 0.5] and rep["teachers"][0]["wins"] == 0.75
    assert rep["teachers"][1]["auroc"] == 1.0 and rep["teachers"][1]["certainty_foreign"] == 0.0
