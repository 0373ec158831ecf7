"""GLMD vocabulary compression: the map, the smaller student, mapped soft labels, comparable eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raykd.losses import TeacherTargets, get_loss
from raykd.students.vocab import VocabMap, build_vocab_map, compress_vocabulary, map_ids, map_targets
from raykd.train.evaluate import _compressed_to_teacher


def _map(v=12, n=5, seed=0) -> VocabMap:
    counts = np.random.default_rng(seed).integers(0, 100, v)
    return build_vocab_map(counts, n)


def test_map_keeps_the_most_frequent_ids_and_one_other_entry():
    counts = np.array([5, 50, 0, 7, 50, 1, 9])
    vmap = build_vocab_map(counts, 4)
    assert vmap.kept_ids.tolist() == [1, 4, 6] and vmap.size == 4
    assert vmap.to_compressed().tolist() == [3, 0, 3, 3, 1, 3, 2]
    f = vmap.other_log_freq().exp()
    inside = vmap.to_compressed() == vmap.other
    assert float(f[inside].sum()) == pytest.approx(1.0) and bool((f[~inside] == 1).all())
    with pytest.raises(ValueError, match="vocab_size=7 must be in"):
        build_vocab_map(counts, 7)


def test_compressed_student_has_a_smaller_tied_embedding_and_a_proper_distribution_over_teacher_ids(tmp_path):
    from tests.conftest import build_tiny_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m"))
    v = model.config.vocab_size
    vmap = build_vocab_map(np.arange(v)[::-1].copy(), 40)
    kept_row = model.get_input_embeddings().weight[vmap.kept_ids[3]].clone()
    compress_vocabulary(model, vmap)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.weight.shape[0] == 40 and head.weight.shape[0] == 40 and head.weight is emb.weight
    torch.testing.assert_close(emb.weight[3], kept_row)
    ids = torch.randint(0, v, (2, 9))
    table = vmap.to_compressed()
    logp = torch.log_softmax(model(input_ids=map_ids(ids, table)).logits, -1)
    every_id = torch.arange(v).expand(2, 9, v)  # q(id) for all V teacher ids must sum to one
    q_all = torch.stack([_compressed_to_teacher(logp, every_id[..., i], table, vmap)[0] for i in range(v)], -1).exp()
    torch.testing.assert_close(q_all.sum(-1), torch.ones(2, 9), atol=1e-5, rtol=0)
    _, top1 = _compressed_to_teacher(logp, ids, table, vmap)
    assert int(top1.max()) < v


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "tvd"])
def test_mapped_soft_labels_equal_the_dense_teacher_summed_into_the_compressed_vocabulary(name):
    torch.manual_seed(0)
    vmap = _map()
    table = vmap.to_compressed()
    logits = torch.randn(2, 3, 12) * 3
    lp, ids = torch.log_softmax(logits, -1).sort(-1, descending=True)
    sparse = TeacherTargets.sparse(ids, lp.half(), torch.full((2, 3), float("-inf")))
    mapped = map_targets(sparse, table)
    dense = torch.zeros(2, 3, vmap.size).index_add_(-1, table, torch.softmax(logits, -1))
    student = torch.randn(2, 3, vmap.size)
    fn = get_loss(name).fn
    got = fn(student, targets=mapped, labels=None, temperature=1.0)
    want = fn(student, targets=TeacherTargets.dense(dense.log()), labels=None, temperature=1.0)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # fp16 soft labels
    assert map_ids(torch.tensor([[-100, 3]]), table).tolist() == [[-100, int(table[3])]]

