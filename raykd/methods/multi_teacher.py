"""Multi-teacher methods: several teachers label the same blocks into their own caches, joined by
row and combined into one target (:mod:`raykd.losses.multi_teacher`)."""

from __future__ import annotations

from raykd.methods.registry import Method


def _multi_teacher(name: str, description: str, paper: str, combine: str, weights: str) -> Method:
    teachers = frozenset({"teachers"})
    return Method(
        name=name, description=description, paper=paper, uses=teachers, requires=teachers, combine=combine,
        composes=f"extra_teachers: [...] (each labels the same blocks into its own cache, joined by row); {weights}",
    )


TMKD = _multi_teacher(
    "tmkd", "several teachers, their soft labels averaged",
    "Yang et al. 2020, Model Compression with Two-stage Multi-teacher Knowledge Distillation for Web "
    "Question Answering System (TMKD, WSDM)", "mean", "targets = mean of the teachers' distributions")
MT_BERT = _multi_teacher(
    "mt_bert", "several teachers weighted per example by how well each predicts the real text",
    "Wu et al. 2021, One Teacher is Enough? Pre-trained Language Model Distillation from Multiple Teachers "
    "(MT-BERT, Findings of ACL)", "truth",
    "weights = softmax over teachers of each one's mean log-likelihood of the example's real next tokens "
    "/ multi_teacher.weight_temperature")
UNCERTAINTY = _multi_teacher(
    "uncertainty", "several teachers weighted per token by their confidence (low entropy, more weight)",
    "Li et al. 2021, Dynamic Knowledge Distillation for Pre-trained Language Models (uncertainty-based "
    "weighting; here the teachers' entropy, as GKD's Uncertainty method)", "entropy",
    "weights = softmax over teachers of -entropy / multi_teacher.weight_temperature")
RL_KD = _multi_teacher(
    "rl_kd", "a policy picks one teacher per example, rewarded by the student's loss drop",
    "Yuan et al. 2021, Reinforced Multi-Teacher Selection for Knowledge Distillation (AAAI)", "policy",
    "a linear softmax policy over per-teacher features (entropy, likelihood of the text) samples one "
    "teacher per example; REINFORCE, reward = drop of the student's per-example CE over the step")


METHODS = (TMKD, MT_BERT, UNCERTAINTY, RL_KD)
"""The multi-teacher methods, in the order ``raykd methods`` lists them."""
