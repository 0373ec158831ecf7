"""Soft-label schema round trip, cache key, manifest, and the cache's refusal of bad folders."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.data import Document
from raykd.soft_labels.cache import CacheKey, documents_fingerprint
from raykd.soft_labels.schema import (
    SCHEMA_VERSION,
    SchemaError,
    decode_batch,
    encode_batch,
    schema_metadata,
    soft_label_schema,
)

B, T, K = 3, 6, 4


def _batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    block = {
        "doc_id": np.array([f"d{i}" for i in range(B)], dtype=object),
        "block_index": np.arange(B, dtype=np.int32),
        "input_ids": rng.integers(0, vocab, (B, T)).astype(np.int32),
        "attention_mask": np.ones((B, T), np.uint8),
        "loss_mask": np.concatenate([np.ones((B, T - 1), np.uint8), np.zeros((B, 1), np.uint8)], 1),
    }
    lp = np.sort(np.log(rng.dirichlet(np.ones(K + 1), (B, T))), -1)[..., ::-1]
    labels = {
        "topk_ids": rng.integers(0, vocab, (B, T, K)),
        "topk_logprobs": lp[..., :K].astype(np.float16),
        "tail_logmass": lp[..., K].astype(np.float32),
        "label_logprobs": rng.normal(-2, 1, (B, T)).astype(np.float32),
    }
    return block, labels


def _key(**changes) -> CacheKey:
    base = CacheKey("w" * 16, "t" * 16, "hf", "float32", K, 1.0, "d" * 16, T, 1, 4)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("vocab", [1000, 70000])
def test_round_trip_within_the_quantisation_bound(vocab):
    block, labels = _batch(vocab)
    labels["topk_ids"] = labels["topk_ids"].astype(np.uint16 if vocab <= 65536 else np.int32)
    schema = soft_label_schema(T, K, vocab, {"cache_key": "abc"})
    table = encode_batch(block, labels, schema)
    assert schema_metadata(table.schema) == {"schema_version": str(SCHEMA_VERSION), "seq_len": str(T), "k": str(K),
                                             "vocab_size": str(vocab), "pad_id": "0", "cache_key": "abc"}
    out = decode_batch(table, with_ids=True)
    np.testing.assert_array_equal(out["input_ids"], block["input_ids"])
    np.testing.assert_array_equal(out["topk_ids"][..., 0], labels["topk_ids"][..., 0].astype(np.int64))
    np.testing.assert_array_equal(np.sort(out["topk_ids"], -1), np.sort(labels["topk_ids"].astype(np.int64), -1))
    # sqrt(p) within half a level of 1/127 (level 0 decodes to 0.3/127)
    got = np.sort(np.exp(out["topk_logprobs"].astype(np.float64) / 2), -1)
    want = np.sort(np.exp(labels["topk_logprobs"].astype(np.float64) / 2), -1)
    assert np.abs(got - want).max() <= 0.5 / 127 + 1e-3
    np.testing.assert_allclose(np.exp(out["tail_logmass"] / 2), np.exp(labels["tail_logmass"] / 2), atol=0.5 / 127 + 1e-4)
    np.testing.assert_allclose(out["label_logprobs"], labels["label_logprobs"], rtol=1e-3)
    assert out["topk_ids"].shape == (B, T, K) and list(out["doc_id"]) == ["d0", "d1", "d2"]


def test_parquet_keeps_schema_and_metadata(tmp_path):
    block, labels = _batch(500)
    schema = soft_label_schema(T, K, 500, {"cache_key": "xyz"})
    table = encode_batch(block, labels, schema)
    pq.write_table(table, tmp_path / "s.parquet")
    back = pq.read_table(tmp_path / "s.parquet")
    assert back.schema.field("loss_mask").type == pa.list_(pa.uint8(), T)
    assert schema_metadata(back.schema)["cache_key"] == "xyz"
    for name, value in decode_batch(table).items():
        np.testing.assert_array_equal(decode_batch(back)[name], value)


def test_encode_rejects_wrong_k():
    block, labels = _batch(500)
    with pytest.raises(SchemaError, match="K=4"):
        encode_batch(block, labels, soft_label_schema(T, K + 1, 500))
    with pytest.raises(SchemaError, match="do not fit"):
        encode_batch(block, labels, soft_label_schema(T + 1, K, 500))


def test_decode_rejects_foreign_table():
    with pytest.raises(SchemaError, match="lacks columns"):
        decode_batch(pa.table({"input_ids": [[1, 2]]}))


def test_key_changes_with_every_field():
    base = _key()
    for change in [{"k": K + 1}, {"teacher_fingerprint": "x"}, {"temperature": 2.0}, {"data_fingerprint": "e"},
                   {"tokenizer_fingerprint": "u"}, {"engine": "vllm"}, {"dtype": "bfloat16"}, {"seq_len": T + 1},
                   {"schema_version": SCHEMA_VERSION + 1}]:
        assert _key(**change).digest() != base.digest(), change
    assert _key().digest() == base.digest()


def test_documents_fingerprint_ignores_order_but_not_text():
    docs = [Document("a", "x"), Document("b", "y")]
    assert documents_fingerprint(docs) == documents_fingerprint(docs[::-1])
    assert documents_fingerprint(docs) != documents_fingerprint([Document("a", "x"), Document("b", "z")])


# The cache's commit, ledger and checks (incl. refusing a v1 cache): tests/unit/test_cache_parts.py
