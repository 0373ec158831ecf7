"""Soft-label schema v2: the quantisation bound, padding that costs nothing and decodes finite,
token counts, slices (as Ray Data hands them to the decoder) and the refusal of v1 tables."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raykd.losses import Objective, available_losses
from raykd.soft_labels.schema import (
    SQRT_LEVELS,
    SchemaError,
    count_tokens,
    decode_batch,
    encode_batch,
    soft_label_schema,
    varint_decode,
    varint_encode,
)
from raykd.train.loop import step_inputs

V, K = 300, 32


def _teacher_batch(lengths: list[int], t: int, seed: int = 0, vocab: int = V, k: int = K):
    """Right-padded blocks and top-k labels of softmax(random logits), peaked and flat rows mixed."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    am = (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype(np.uint8)
    scale = rng.choice([0.5, 2.0, 6.0], size=(b, t, 1))
    logits = torch.as_tensor(rng.normal(size=(b, t, vocab)) * scale)
    lp = torch.log_softmax(logits, -1)
    top_lp, top_ids = lp.topk(k, -1)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-12))
    ids = np.where(am == 1, rng.integers(1, vocab, (b, t)), 7).astype(np.int32)  # pad id 7
    loss_mask = np.zeros_like(am)
    loss_mask[:, :-1] = am[:, 1:]
    block = {"doc_id": np.array([f"d{i}" for i in range(b)], dtype=object), "block_index": np.zeros(b, np.int32),
             "input_ids": ids, "attention_mask": am, "loss_mask": loss_mask}
    labels = {"topk_ids": top_ids.numpy().astype(np.uint16), "topk_logprobs": top_lp.numpy().astype(np.float16),
              "tail_logmass": tail.numpy().astype(np.float32), "label_logprobs": rng.normal(-3, 1, (b, t)).astype(np.float32)}
    return block, labels


def _bucket_kl(a: dict, b: dict, real: np.ndarray) -> np.ndarray:
    """Per real position KL(a || b) of the K + 1 buckets, ids matched (the order of ties may differ)."""
    def buckets(d):
        order = np.argsort(d["topk_ids"][real], -1, kind="stable")
        lp = np.take_along_axis(d["topk_logprobs"][real].astype(np.float64), order, -1)
        m = np.concatenate([lp, d["tail_logmass"][real][:, None].astype(np.float64)], -1)
        return np.take_along_axis(d["topk_ids"][real], order, -1), m - np.logaddexp.reduce(m, -1, keepdims=True)
    ids_a, la = buckets(a)
    ids_b, lb = buckets(b)
    np.testing.assert_array_equal(ids_a, ids_b)
    return (np.exp(la) * (la - lb)).sum(-1)


def test_round_trip_keeps_ids_and_top1_and_stays_within_the_kl_bound():
    block, labels = _teacher_batch([64, 40, 1, 64], 64)
    out = decode_batch(encode_batch(block, labels, soft_label_schema(64, K, V, pad_id=7)))
    real = block["attention_mask"].astype(bool)
    np.testing.assert_array_equal(out["input_ids"], block["input_ids"])  # padding back to the pad id
    np.testing.assert_array_equal(out["topk_ids"][real][:, 0], labels["topk_ids"][real][:, 0])
    kl = _bucket_kl({**labels, "topk_ids": labels["topk_ids"].astype(np.int64)}, out, real)
    assert kl.max() <= (K + 1) / (2 * SQRT_LEVELS**2) and kl.mean() <= 1e-3
    assert (np.diff(out["topk_logprobs"][real][:, 1:].astype(np.float32), axis=-1) <= 0).all()  # descending after the top-1


def test_top1_is_exact_when_it_ties_with_the_second():
    block, labels = _teacher_batch([8], 8)
    labels["topk_logprobs"][0, :, 1] = labels["topk_logprobs"][0, :, 0]  # equal probabilities: same level
    labels["topk_ids"][0, :, :2] = labels["topk_ids"][0, :, 1::-1]  # the larger id first
    out = decode_batch(encode_batch(block, labels, soft_label_schema(8, K, V)))
    np.testing.assert_array_equal(out["topk_ids"][0, :, 0], labels["topk_ids"][0, :, 0])


def _parquet_bytes(table: pa.Table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return len(buf.getvalue())


def test_padding_is_not_stored():
    short_block, labels = _teacher_batch([16] * 8, 16, seed=1)
    padded = {name: np.pad(a, [(0, 0), (0, 496)] + [(0, 0)] * (a.ndim - 2)) if a.ndim >= 2 else a
              for name, a in {**short_block, **labels}.items()}
    t16 = encode_batch(short_block, labels, soft_label_schema(16, K, V))
    t512 = encode_batch({n: padded[n] for n in short_block}, {n: padded[n] for n in labels}, soft_label_schema(512, K, V))
    assert _parquet_bytes(t512) < _parquet_bytes(t16) * 1.05  # 32x the positions, the same real tokens
    for name in ("topk_ids", "topk_logprobs", "tail_logmass", "label_logprobs"):
        np.testing.assert_array_equal(decode_batch(t512)[name][:, :16], decode_batch(t16)[name])
    double, double_labels = _teacher_batch([32] * 8, 32, seed=2)
    assert _parquet_bytes(encode_batch(double, double_labels, soft_label_schema(32, K, V))) > 1.6 * _parquet_bytes(t16)


@pytest.mark.parametrize("retemper_to", [1.0, 2.0])
def test_every_loss_is_finite_on_a_padded_batch(retemper_to):
    block, labels = _teacher_batch([12, 3, 1], 12, seed=3)
    out = decode_batch(encode_batch(block, labels, soft_label_schema(12, K, V)))
    for name, value in out.items():
        assert np.isfinite(value.astype(np.float64)).all(), name
    batch = {name: torch.as_tensor(value) for name, value in out.items()}
    _, _, labels_t, mask, targets = step_inputs(batch, 1.0, retemper_to)
    sparse = [name for name, spec in available_losses().items() if "sparse" in spec.forms or not spec.needs_teacher]
    assert "forward_kl" in sparse and "ce" in sparse
    for name in sparse:
        student = torch.randn(3, 12, V, requires_grad=True)
        loss = Objective({name: 1.0})(student, labels_t, mask, targets, retemper_to).loss_sum
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all(), name
        assert student.grad[~mask].abs().max() == 0, name  # padding contributes nothing


def test_decode_of_a_slice_equals_the_slice_of_the_decode():
    block, labels = _teacher_batch([10, 4, 10, 7, 1], 10, seed=4)
    table = encode_batch(block, labels, soft_label_schema(10, K, V))
    whole = decode_batch(table, with_ids=True)
    part = decode_batch(pa.concat_tables([table.slice(1, 2), table.slice(3, 2)]), with_ids=True)
    for name, value in whole.items():
        np.testing.assert_array_equal(part[name], value[1:5], err_msg=name)


def test_count_tokens_of_a_table_and_a_shard(tmp_path):
    block, labels = _teacher_batch([10, 4, 1], 10, seed=5)
    table = encode_batch(block, labels, soft_label_schema(10, K, V))
    pq.write_table(table, tmp_path / "s.parquet")
    want = (15, 9 + 3 + 0)
    assert count_tokens(table) == want and count_tokens(tmp_path / "s.parquet") == want
    assert count_tokens(pa.table({"attention_mask": [[1, 1, 0]]})) == (2, 1)  # class labels: one per row


def test_v1_tables_and_bad_blocks_are_refused():
    v1 = pa.table({"input_ids": pa.array([[1, 2]], pa.list_(pa.int32(), 2)), "topk_logprobs": [[0.0]]})
    with pytest.raises(SchemaError, match="version 1 columns: relabel"):
        decode_batch(v1)
    block, labels = _teacher_batch([4, 4], 4)
    block["attention_mask"][0] = [1, 0, 1, 0]
    with pytest.raises(SchemaError, match="row 0: attention_mask is not right-padded"):
        encode_batch(block, labels, soft_label_schema(4, K, V))
    block, labels = _teacher_batch([4], 4)
    labels["topk_logprobs"][0, 0, 3] = np.nan
    with pytest.raises(SchemaError, match="NaN"):
        encode_batch(block, labels, soft_label_schema(4, K, V))


def test_varint_round_trip_and_truncation():
    values = np.array([0, 1, 127, 128, 16383, 16384, 49151, 1 << 30], np.int64)
    enc = varint_encode(values)
    assert len(enc) == 1 + 1 + 1 + 2 + 2 + 3 + 3 + 5
    np.testing.assert_array_equal(varint_decode(enc), values)
    with pytest.raises(SchemaError, match="ends inside a value"):
        varint_decode(enc[:-1])


def test_join_of_two_v2_caches_decodes_each_teacher(tmp_path):
    from raykd.soft_labels.join import decode_joined, join_caches

    files, want = [], []
    for seed, name in [(6, "a"), (7, "b")]:
        block, labels = _teacher_batch([9, 3, 9], 9, seed=seed)
        block["input_ids"] = _teacher_batch([9, 3, 9], 9, seed=0)[0]["input_ids"]  # the same blocks for both teachers
        table = encode_batch(block, labels, soft_label_schema(9, K, V))
        (tmp_path / name).mkdir()
        pq.write_table(table.take([2, 0, 1]), tmp_path / name / "p.parquet")  # rows in another order
        files.append([str(tmp_path / name / "p.parquet")])
        want.append(decode_batch(table))
    joined = decode_joined(pq.read_table(join_caches(files, ["A", "B"], tmp_path / "joined")[0]), 2)
    for i, prefix in enumerate(["", "t1."]):
        for name in ("topk_ids", "topk_logprobs", "tail_logmass", "label_logprobs"):
            np.testing.assert_array_equal(joined[prefix + name], want[i][name], err_msg=prefix + name)
    np.testing.assert_array_equal(joined["attention_mask"], want[0]["attention_mask"])


def test_join_refuses_a_v1_cache(tmp_path):
    from raykd.soft_labels.join import join_caches

    pq.write_table(pa.table({"doc_id": ["d"], "block_index": [0], "topk_logprobs": [[0.0]]}), tmp_path / "v1.parquet")
    with pytest.raises(SchemaError, match="relabel"):
        join_caches([[str(tmp_path / "v1.parquet")]] * 2, ["A", "B"], tmp_path / "joined")
