"""Sampled soft labels (``labels.form=sampled``, Anshumann et al. 2025): the schema round trip,
the cache key, deterministic draws, the unbiased gradient and the refusals of what cannot use them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.soft_labels.sampled import block_seeds, distinct_counts
from raykd.soft_labels.schema import SchemaError, decode_batch, encode_batch, form_of, soft_label_schema

S = 32


def _sampled_batch(lengths: list[int], t: int, vocab: int, seed: int = 0):
    """Right-padded blocks and ``S`` draws per position from peaked and flat random distributions."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    am = (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype(np.uint8)
    support = rng.choice(vocab, 64, replace=False)
    draws = np.empty((b, t, S), np.int64)
    for i in range(b):
        for j in range(t):
            p = rng.dirichlet(np.full(64, rng.choice([0.05, 1.0])))
            draws[i, j] = support[rng.choice(64, S, p=p)]
    loss_mask = np.zeros_like(am)
    loss_mask[:, :-1] = am[:, 1:]
    block = {"doc_id": np.array([f"d{i}" for i in range(b)], dtype=object), "block_index": np.arange(b, dtype=np.int32),
             "input_ids": np.where(am == 1, rng.integers(1, vocab, (b, t)), 5), "attention_mask": am, "loss_mask": loss_mask}
    return block, {"topk_ids": draws, "label_logprobs": rng.normal(-3, 1, (b, t)).astype(np.float32)}


@pytest.mark.parametrize("vocab", [300, 70000])
def test_round_trip_gives_each_positions_distinct_ids_and_exact_counts(vocab):
    block, labels = _sampled_batch([12, 5, 1, 12], 12, vocab)
    table = encode_batch(block, labels, soft_label_schema(12, S, vocab, pad_id=5, form="sampled"))
    assert form_of(table.column_names) == "sampled" and "topk_dict" not in table.column_names
    out = decode_batch(table)
    real = block["attention_mask"].astype(bool)
    assert out["topk_ids"].shape == (4, 12, S) and out["topk_logprobs"].dtype == np.float32
    np.testing.assert_array_equal(out["input_ids"], block["input_ids"])
    for draws, ids, lp in zip(labels["topk_ids"][real], out["topk_ids"][real], out["topk_logprobs"][real]):
        want_ids, want_counts = np.unique(draws, return_counts=True)
        kept = ids >= 0
        assert dict(zip(ids[kept], np.exp(lp[kept]) * S)) == pytest.approx(dict(zip(want_ids, want_counts)))
        assert (lp[~kept] == -np.inf).all() and (np.diff(lp[kept]) <= 0).all()  # by descending count, then padding
    assert (out["tail_logmass"][real] == -np.inf).all()
    assert np.isfinite(out["topk_logprobs"][~real]).all() and np.isfinite(out["tail_logmass"][~real]).all()
    np.testing.assert_allclose(out["label_logprobs"][real], labels["label_logprobs"][real], rtol=1e-3)


def test_parquet_and_slices_decode_as_the_whole(tmp_path):
    block, labels = _sampled_batch([9, 3, 7], 9, 500, seed=1)
    table = encode_batch(block, labels, soft_label_schema(9, S, 500, form="sampled"))
    pq.write_table(table, tmp_path / "s.parquet", compression="zstd")
    whole = decode_batch(pq.read_table(tmp_path / "s.parquet"))
    part = decode_batch(pa.Table.from_batches(table.slice(1, 2).to_batches()))  # as Ray Data hands it over
    for name in ("topk_ids", "topk_logprobs", "tail_logmass", "label_logprobs"):
        np.testing.assert_array_equal(part[name], whole[name][1:3])


def test_counts_that_do_not_sum_to_s_are_refused():
    block, labels = _sampled_batch([4, 4], 4, 300)
    table = encode_batch(block, labels, soft_label_schema(4, S, 300, form="sampled"))
    counts = [bytes([S + 1, S - 1, S, S]), bytes([S] * 4)]  # 8 x S in all, but the first two positions cross
    swapped = table.set_column(table.column_names.index("sample_counts"), "sample_counts", pa.array(counts, pa.binary()))
    with pytest.raises(SchemaError, match="sample_counts"):
        decode_batch(swapped)


def test_distinct_counts_is_a_run_length_code_per_position():
    pos, ids, counts = distinct_counts(np.array([[7, 3, 7, 7], [2, 2, 2, 2]]))
    assert pos.tolist() == [0, 0, 1] and ids.tolist() == [3, 7, 2] and counts.tolist() == [1, 3, 4]


def test_block_seeds_depend_on_seed_document_and_block_only():
    a = block_seeds(["x", "x", "y"], [0, 1, 0], seed=0)
    assert len(set(a.tolist())) == 3 and (a >= 0).all()
    np.testing.assert_array_equal(a, block_seeds(["x", "x", "y"], [0, 1, 0], seed=0))
    assert not set(a.tolist()) & set(block_seeds(["x", "x", "y"], [0, 1, 0], seed=1).tolist())
