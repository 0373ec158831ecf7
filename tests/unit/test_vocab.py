"""GLMD vocabulary compression: the maps (bucket and nearest kept id), the smaller student, mapped
soft labels, comparable eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raykd.losses import TeacherTargets, get_loss
from raykd.students.vocab import (
    VOCAB_MAP_FILE,
    VocabMap,
    build_vocab_map,
    compress_student_folder,
    compress_vocabulary,
    map_ids,
    map_targets,
    nearest_kept_ids,
    resolve_vocab_size,
)
from raykd.train.evaluate import _compressed_to_teacher


def _map(v=12, n=5, seed=0, mapping="bucket") -> VocabMap:
    counts = np.random.default_rng(seed).integers(0, 100, v)
    emb = torch.randn(v, 6, generator=torch.Generator().manual_seed(seed))
    return build_vocab_map(counts, n, mapping, emb)


def test_bucket_map_keeps_the_most_frequent_ids_and_one_other_entry():
    counts = np.array([5, 50, 0, 7, 50, 1, 9])
    vmap = build_vocab_map(counts, 4)
    assert vmap.heads.tolist() == [1, 4, 6, -1] and vmap.size == 4
    assert vmap.to_compressed().tolist() == [3, 0, 3, 3, 1, 3, 2]
    assert vmap.group_top_ids().tolist() == [1, 4, 6, 3]  # OTHER's top-1 is its most frequent id
    f = vmap.group_log_freq().exp()
    inside = vmap.to_compressed() == 3
    assert float(f[inside].sum()) == pytest.approx(1.0) and bool((f[~inside] == 1).all())


# Kept A, B, C (ids 0-2, the most frequent), dropped d = (1, 1.2) (id 3): A has the largest dot
# product with d, C (d's direction, far away) the largest cosine, B the smallest distance.
_EMB = torch.tensor([[10.0, 0.0], [0.0, 3.0], [4.0, 4.8], [1.0, 1.2]])


@pytest.mark.parametrize(("mapping", "nearest"), [("decoder", 0), ("cosine", 2), ("euclidean", 1)])
def test_each_similarity_maps_a_dropped_id_to_its_known_nearest_kept_id(mapping, nearest):
    vmap = build_vocab_map(np.array([9, 8, 7, 1]), 3, mapping, _EMB)
    assert vmap.heads.tolist() == [0, 1, 2] and vmap.to_compressed().tolist() == [0, 1, 2, nearest]
    assert vmap.group_top_ids().tolist() == [0, 1, 2]


@pytest.mark.parametrize("mapping", ["decoder", "cosine", "euclidean"])
def test_chunked_nearest_search_equals_the_direct_formula(mapping):
    emb = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    kept, dropped = torch.arange(0, 40, 3), torch.tensor([i for i in range(40) if i % 3])
    d, k = emb[dropped], emb[kept]
    direct = {"decoder": d @ k.T, "euclidean": -torch.cdist(d, k),
              "cosine": torch.nn.functional.cosine_similarity(d[:, None], k[None], dim=-1)}[mapping].argmax(-1)
    one_row = nearest_kept_ids(emb, kept, dropped, mapping, chunk_bytes=1)  # one dropped row per chunk
    assert nearest_kept_ids(emb, kept, dropped, mapping).tolist() == one_row.tolist() == direct.tolist()


def test_similarity_map_table_and_inverse():
    vmap = _map(v=30, n=8, mapping="decoder")
    table, heads = vmap.to_compressed(), torch.as_tensor(vmap.heads)
    order = np.lexsort((np.arange(30), -vmap.counts))
    assert sorted(vmap.heads.tolist()) == sorted(order[:8].tolist())  # the 8 most frequent ids head the entries
    assert table[heads].tolist() == list(range(8)) and vmap.group_top_ids().tolist() == vmap.heads.tolist()
    emb = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))  # as in _map
    dropped = torch.as_tensor(order[8:])
    assert heads[table[dropped]].tolist() == heads[(emb[dropped] @ emb[heads].T).argmax(-1)].tolist()


@pytest.mark.parametrize("mapping", ["bucket", "decoder"])
def test_student_mapped_back_is_a_distribution_over_teacher_ids(mapping):
    vmap = _map(v=20, n=6, mapping=mapping)
    table = vmap.to_compressed()
    logp = torch.log_softmax(torch.randn(2, 3, 6) * 2, -1)
    every_id = torch.arange(20).expand(2, 3, 20)
    q_all = torch.stack([_compressed_to_teacher(logp, every_id[..., i], table, vmap)[0] for i in range(20)], -1).exp()
    torch.testing.assert_close(q_all.sum(-1), torch.ones(2, 3), atol=1e-5, rtol=0)
    _, top1 = _compressed_to_teacher(logp, every_id[..., 0], table, vmap)
    assert (table[top1] == logp.argmax(-1)).all()  # the top-1 maps back into its own entry


def test_maps_round_trip_and_old_format_files_load_as_bucket_maps(tmp_path):
    vmap = _map(mapping="cosine")
    vmap.save(tmp_path)
    back = VocabMap.load(tmp_path)
    assert back.mapping == "cosine" and (back.table == vmap.table).all() and (back.heads == vmap.heads).all()
    counts = np.array([5, 50, 0, 7, 50, 1, 9])
    (tmp_path / VOCAB_MAP_FILE).write_text(json.dumps({"kept_ids": [1, 4, 6], "counts": counts.tolist()}))
    old, new = VocabMap.load(tmp_path), build_vocab_map(counts, 4)
    assert old.mapping == "bucket" and (old.table == new.table).all() and (old.heads == new.heads).all()
    assert VocabMap.load(tmp_path / "missing") is None


@pytest.mark.parametrize("mapping", ["bucket", "decoder"])
def test_compressed_student_has_a_smaller_tied_embedding_with_the_kept_rows(mapping, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    v = model.config.vocab_size
    teacher_rows = model.get_input_embeddings().weight.detach().clone()
    vmap = build_vocab_map(np.arange(v)[::-1].copy(), 40, mapping, teacher_rows)
    compress_vocabulary(model, vmap)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.weight.shape[0] == 40 and head.weight.shape[0] == 40 and head.weight is emb.weight
    headed = vmap.heads >= 0
    torch.testing.assert_close(emb.weight[torch.as_tensor(headed)], teacher_rows[vmap.heads[headed]])
    logits = model(input_ids=map_ids(torch.randint(0, v, (2, 9)), vmap.to_compressed())).logits
    assert logits.shape == (2, 9, 40)


def test_bad_sizes_and_mappings_fail_naming_the_setting(tiny_model):
    assert resolve_vocab_size(0.25, 320) == 80 and resolve_vocab_size(64, 320) == 64
    for size in (320, 0.01, 1.0):
        with pytest.raises(ValueError, match=f"student.vocab_size={size} gives"):
            resolve_vocab_size(size, 320)
    counts = np.arange(7)
    with pytest.raises(ValueError, match="vocab_size=7 must be in"):
        build_vocab_map(counts, 7)
    with pytest.raises(ValueError, match=r"unknown student.vocab_map='dot'; use one of \['bucket', 'decoder'"):
        build_vocab_map(counts, 4, "dot")
    with pytest.raises(ValueError, match=r"needs the teacher's \[7, H\] input embeddings, got \[6, 2\]"):
        build_vocab_map(counts, 4, "decoder", torch.zeros(6, 2))
    with pytest.raises(ValueError, match="inconsistent vocabulary map"):
        VocabMap(np.array([0, 0, 2]), np.zeros(3, dtype=np.int64), np.array([0, 1, -1]))  # entry 1 has no id
    with pytest.raises(ValueError, match="compares teacher embeddings"):
        compress_student_folder(tiny_model, [], 16, "decoder")


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "tvd"])
@pytest.mark.parametrize("mapping", ["bucket", "decoder"])
def test_mapped_soft_labels_equal_the_dense_teacher_summed_into_the_compressed_vocabulary(name, mapping):
    torch.manual_seed(0)
    vmap = _map(mapping=mapping)
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
