"""Multi-teacher maths (mixtures, weights, the selection policy) and joining caches by row."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raykd.losses import TeacherTargets, available_losses, get_loss
from raykd.losses.multi_teacher import (
    TeacherPolicy,
    bucket_entropy,
    mix_sparse,
    teacher_features,
    teacher_weights,
)
from raykd.losses.targets import merge_duplicate_ids
from raykd.soft_labels.join import CacheJoinError, decode_joined, join_caches
from raykd.soft_labels.schema import encode_batch, soft_label_schema

B, T, V = 2, 3, 11
TEACHER_LOSSES = [n for n, s in available_losses().items() if "sparse" in s.forms and n != "uld"]
"""Losses a mixture of teachers feeds. ULD compares sorted probability vectors whose length is the
number of ids, so a union of two teachers' ids is another vector: cross-tokenizer runs refuse
extra teachers (config check), and ULD is left out here."""


def _full_sparse(logits: torch.Tensor) -> TeacherTargets:
    """K = V sparse targets (every id listed, in descending order, zero tail)."""
    lp, ids = torch.log_softmax(logits, -1).sort(-1, descending=True)
    return TeacherTargets.sparse(ids, lp, torch.full(logits.shape[:2], float("-inf")))


def _topk(logits: torch.Tensor, k: int) -> TeacherTargets:
    lp = torch.log_softmax(logits, -1)
    top, ids = lp.topk(k, -1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    return TeacherTargets.sparse(ids, top.half(), tail)


@pytest.mark.parametrize("name", TEACHER_LOSSES)
def test_mixture_of_full_teachers_equals_the_dense_mixture(name):
    torch.manual_seed(0)
    l1, l2 = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    w = torch.tensor([[0.3, 0.7], [0.9, 0.1]]).view(B, 1, 2)
    mixed = mix_sparse([_full_sparse(l1), _full_sparse(l2)], w)
    dense = w[..., :1] * torch.softmax(l1, -1) + w[..., 1:] * torch.softmax(l2, -1)
    student = torch.randn(B, T, V, requires_grad=True)
    fn = get_loss(name).fn
    got = fn(student, targets=mixed, labels=None, temperature=1.0)
    want = fn(student, targets=TeacherTargets.dense(dense.log()), labels=None, temperature=1.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_mixture_of_topk_teachers_sums_to_one_and_merges_shared_ids():
    torch.manual_seed(1)
    base = torch.randn(B, T, V)
    a, b = _topk(base, 4), _topk(base + 0.1 * torch.randn(B, T, V), 4)  # mostly the same top ids
    mixed = mix_sparse([a, b], torch.full((B, 1, 2), 0.5))
    ids = mixed.topk_ids
    for row in ids.reshape(-1, ids.shape[-1]):
        real = row[row >= 0]
        assert len(real) == len(set(real.tolist()))  # each id once
    total = mixed.topk_logprobs.exp().sum(-1) + mixed.tail_logmass.exp()
    torch.testing.assert_close(total, torch.ones(B, T), atol=2e-3, rtol=0)
    for name in TEACHER_LOSSES:  # a teacher's divergence from itself is ~0 with padding slots present
        assert get_loss(name).fn(torch.log(torch.softmax(base, -1)), targets=mixed, labels=None, temperature=1.0).min() > -1e-5


def test_merge_duplicate_ids_sums_mass_and_pads():
    ids = torch.tensor([[[3, 1, 3, -1, 1]]])
    p = torch.tensor([[[0.1, 0.2, 0.3, 0.9, 0.05]]])
    out_ids, out_p = merge_duplicate_ids(ids, p)
    assert out_ids.tolist() == [[[1, 3, -1, -1, -1]]]
    torch.testing.assert_close(out_p, torch.tensor([[[0.25, 0.4, 0.0, 0.0, 0.0]]]))


def test_teacher_weights_follow_each_rule():
    torch.manual_seed(2)
    sharp, flat = _full_sparse(torch.randn(B, T, V) * 8), _full_sparse(torch.randn(B, T, V) * 0.1)
    mask = torch.ones(B, T, dtype=torch.bool)
    label_lp = torch.stack([torch.full((B, T), -1.0), torch.full((B, T), -3.0)], -1)
    mean = teacher_weights("mean", [sharp, flat], label_lp, mask)
    assert mean.shape == (B, 1, 2) and torch.allclose(mean, torch.full_like(mean, 0.5))
    truth = teacher_weights("truth", [sharp, flat], label_lp, mask)
    torch.testing.assert_close(truth[..., 0], torch.full((B, 1), float(torch.sigmoid(torch.tensor(2.0)))))
    ent = teacher_weights("entropy", [sharp, flat], label_lp, mask)
    assert ent.shape == (B, T, 2) and (ent[..., 0] > 0.5).all()  # the confident teacher counts more
    assert (bucket_entropy(sharp) < bucket_entropy(flat)).all()
    with pytest.raises(KeyError, match="valid teacher combinations: entropy, mean, policy, truth"):
        teacher_weights("median", [sharp, flat], label_lp, mask)
    with pytest.raises(ValueError, match="'policy' is learned"):
        teacher_weights("policy", [sharp, flat], label_lp, mask)


def test_policy_learns_to_pick_the_teacher_that_is_rewarded():
    torch.manual_seed(3)
    policy = TeacherPolicy(lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        good, bad = _full_sparse(torch.randn(8, T, V) * 6), _full_sparse(torch.randn(8, T, V) * 0.2)
        feats = teacher_features([good, bad], torch.randn(8, T, 2), torch.ones(8, T, dtype=torch.bool))
        actions, weights = policy.select(feats, gen)
        assert weights.shape == (8, 1, 2) and torch.equal(weights.argmax(-1).squeeze(1), actions)
        policy.update(feats, actions, (actions == 0).float())  # reward choosing the low-entropy teacher
    assert policy.probs(feats)[:, 0].mean() > 0.8


def _write_cache(folder, doc_ids, seed=0, shift_row=None):
    rng = np.random.default_rng(seed)
    n, t, k = len(doc_ids), 4, 2
    ids = np.arange(n * t).reshape(n, t) % 7
    if shift_row is not None:
        ids[shift_row, 1] += 1
    block = {"doc_id": np.array(doc_ids), "block_index": np.zeros(n, dtype=np.int32), "input_ids": ids,
             "attention_mask": np.ones((n, t)), "loss_mask": np.ones((n, t))}
    labels = {"topk_ids": rng.integers(0, 7, (n, t, k)).astype(np.uint16), "topk_logprobs": -rng.random((n, t, k)),
              "tail_logmass": np.full((n, t), -2.0), "label_logprobs": -rng.random((n, t))}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-0.parquet"
    pq.write_table(encode_batch(block, labels, soft_label_schema(t, k, 7)), path)
    return [str(path)], labels


def test_join_by_row_sorts_and_keeps_each_teachers_labels(tmp_path):
    a, la = _write_cache(tmp_path / "a", ["d2", "d0", "d1"], seed=0)
    order = [1, 2, 0]  # the same rows in another order (Ray Data does not keep order)
    b, lb = _write_cache(tmp_path / "b", ["d2", "d0", "d1"], seed=1)
    files = join_caches([a, b], ["A", "B"], tmp_path / "joined")
    joined = decode_joined(pq.read_table(files[0]), 2)
    np.testing.assert_array_equal(joined["topk_ids"], la["topk_ids"][order])
    np.testing.assert_array_equal(joined["t1.topk_ids"], lb["topk_ids"][order])
    assert joined["t1.label_logprobs"].shape == joined["label_logprobs"].shape


@pytest.mark.parametrize("docs_b, shift, message", [
    (["d0", "d1", "d2"], 1, "first mismatching row 1: doc 'd1' block 0 vs doc 'd1' block 0"),
    (["d0", "dX", "d2"], None, "first mismatching row 1: doc 'd1' block 0 vs doc 'd2' block 0"),
    (["d0", "d1"], None, "first mismatching row 2: doc 'd2' block 0 vs no row"),
])
def test_join_refuses_caches_whose_rows_differ_naming_the_first(tmp_path, docs_b, shift, message):
    a, _ = _write_cache(tmp_path / "a", ["d0", "d1", "d2"])
    b, _ = _write_cache(tmp_path / "b", docs_b, shift_row=shift)
    with pytest.raises(CacheJoinError, match=message):
        join_caches([a, b], ["A", "B"], tmp_path / "joined")


@pytest.mark.parametrize("combine", ["mean", "truth", "entropy"])
def test_mixed_objective_is_invariant_to_splitting_the_batch(combine):
    """Teacher weights are per example or per token, so two micro-batches give the same token-summed
    loss as one batch (what gradient accumulation relies on). The policy rule samples, so it is not."""
    from raykd.losses import Objective
    from raykd.train.loop import step_inputs
    from raykd.train.teachers import TeacherMix

    torch.manual_seed(4)
    b, t, k, v = 4, 5, 3, 13
    batch = {"input_ids": torch.randint(0, v, (b, t)), "attention_mask": torch.ones(b, t, dtype=torch.long),
             "loss_mask": (torch.rand(b, t) > 0.2) & (torch.arange(t) < t - 1)}  # the last position has no target
    for i, prefix in enumerate(["", "t1."]):
        top, ids = torch.log_softmax(torch.randn(b, t, v) * (2 + i), -1).topk(k, -1)
        batch.update({prefix + "topk_ids": ids, prefix + "topk_logprobs": top.half(),
                      prefix + "tail_logmass": torch.log1p(-top.exp().sum(-1)), prefix + "label_logprobs": -torch.rand(b, t)})
    student = torch.randn(b, t, v)
    objective = Objective({"forward_kl": 0.5, "ce": 0.5})
    mix = TeacherMix(combine, 2)

    def loss(rows):
        part = {key: val[rows] for key, val in batch.items()}
        _, _, labels, mask, targets = step_inputs(part, 1.0, 2.0, mix)
        return objective(student[rows], labels, mask, targets, 2.0).loss_sum

    whole = loss(slice(0, b))
    torch.testing.assert_close(loss(slice(0, 1)) + loss(slice(1, b)), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TEACHER_LOSSES)
def test_one_hot_weights_give_exactly_the_chosen_teacher(name):
    """RL-KD picks one teacher per example: the other teacher's ids must not appear as zero-mass buckets."""
    torch.manual_seed(5)
    a, b = _topk(torch.randn(B, T, V) * 3, 4), _topk(torch.randn(B, T, V) * 3, 4)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(B, 1, 2)
    mixed = mix_sparse([a, b], w)
    student = torch.randn(B, T, V)
    fn = get_loss(name).fn
    got = fn(student, targets=mixed, labels=None, temperature=1.0)
    for row, chosen in enumerate([a, b]):
        want = fn(student[row : row + 1], targets=TeacherTargets.sparse(chosen.topk_ids[row : row + 1],
                  chosen.topk_logprobs[row : row + 1], chosen.tail_logmass[row : row + 1]), labels=None, temperature=1.0)
        torch.testing.assert_close(got[row : row + 1], want, atol=1e-4, rtol=1e-4)
