"""Sampled soft labels (``labels.form=sampled``, Anshumann et al. 2025): the schema round trip,
the cache key, deterministic draws, the unbiased gradient and the refusals of what cannot use them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raykd.config import ConfigError, DistillConfig, TeacherConfig
from raykd.losses import get_loss
from raykd.losses.targets import TeacherTargets
from raykd.methods import load
from raykd.soft_labels.cache import CacheKey
from raykd.soft_labels.sampled import block_seeds, distinct_counts
from raykd.soft_labels.schema import SchemaError, decode_batch, encode_batch, form_of, soft_label_schema
from raykd.teacher.engines import check_engine_request
from raykd.teacher.engines.topk import soft_labels_of_logits
from raykd.train.evaluate import calibration_bins, expected_calibration_error

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


# --- the draws: deterministic, and an unbiased estimate of the full-vocabulary gradient -----------

def _draws(logits: torch.Tensor, seeds: list[int], samples: int = S, temperature: float = 1.0,
           draws: str = "independent") -> np.ndarray:
    """The engine's sampled soft labels of ``logits [R, T, V]``: ``[R, T, S]`` draws."""
    ids = torch.zeros(logits.shape[:2], dtype=torch.long)
    return soft_labels_of_logits(logits, ids, k=samples, temperature=temperature, seeds=seeds, draws=draws).topk_ids.numpy()


def test_same_seed_same_draws_whatever_the_batch_and_chunks(tiny_model):
    from raykd.teacher.engines.hf import HFEngine

    logits = torch.randn(3, 5, 40)
    a = _draws(logits, [1, 2, 3])
    np.testing.assert_array_equal(a, _draws(logits, [1, 2, 3]))
    np.testing.assert_array_equal(a[1:], _draws(logits[1:], [2, 3]))  # a row's draws do not depend on the others
    assert not np.array_equal(a, _draws(logits, [4, 5, 6]))
    ids = np.random.default_rng(0).integers(3, 300, size=(4, 12))
    whole = HFEngine(tiny_model, num_threads=1).score(ids, k=8, seeds=np.arange(4))
    chunked = HFEngine(tiny_model, num_threads=1, max_tokens_per_forward=12).score(ids, k=8, seeds=np.arange(4))
    np.testing.assert_array_equal(whole["topk_ids"], chunked["topk_ids"])  # one row per forward: the same draws


def _kl_grad(student: torch.Tensor, targets: TeacherTargets, temperature: float) -> torch.Tensor:
    """Mean over positions of d forward_kl / d student logits ``[V]`` (the registered loss, tau^2 included)."""
    z = student.clone().requires_grad_(True)
    get_loss("forward_kl").fn(z, targets=targets, labels=torch.zeros(z.shape[:2], dtype=torch.long),
                              temperature=temperature).sum().backward()
    return z.grad[0].mean(0)


def test_systematic_draws_give_each_id_floor_or_ceil_of_s_p_and_s_p_on_average():
    """Systematic draws: per position, an id of probability p is drawn floor(S p) or ceil(S p)
    times (independent draws spread far wider), and over many positions S p times on average.
    (Distinct ids per position are then sum(min(1, S p)), more than independent draws give.)"""
    v, n = 12, 4000
    logits = (torch.randn(v, generator=torch.Generator().manual_seed(3)) * 1.5).expand(1, n, v).contiguous()
    p = torch.softmax(logits[0, 0].double(), -1).numpy()
    counts = {d: np.stack([np.bincount(row, minlength=v) for row in _draws(logits, [5], draws=d)[0]])
              for d in ("systematic", "independent")}
    low, high = np.floor(S * p) - 1e-9, np.ceil(S * p) + 1e-9
    assert ((counts["systematic"] >= low) & (counts["systematic"] <= high)).all()
    assert not ((counts["independent"] >= low) & (counts["independent"] <= high)).all()  # the test can fail
    # unbiased: the mean count of every id is S p, within 4 standard errors (a count varies by at most 1)
    np.testing.assert_allclose(counts["systematic"].mean(0), S * p, atol=4 * 0.5 / math.sqrt(n))
    with pytest.raises(ValueError, match="draws must be one of"):
        _draws(logits[:, :2], [5], draws="stratified")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_target_gives_the_full_kl_gradient_in_expectation(temperature):
    """N positions share one teacher p over V ids; their S draws each are M = N * S independent
    draws from p. The mean sampled-target gradient of tau^2 KL is tau (q - mean p_hat), and by
    Hoeffding P(|mean p_hat_j - p_j| >= eps) <= 2 exp(-2 M eps^2): with eps below, the chance that
    any of the V ids misses (for any seed) is under 1e-9. Top-3 targets miss by far more."""
    n, v = 2000, 10
    gen = torch.Generator().manual_seed(0)
    teacher = (torch.randn(v, generator=gen) * 2).expand(1, n, v)
    student = torch.randn(v, generator=gen).expand(1, n, v)
    full = _kl_grad(student, TeacherTargets.dense(teacher), temperature)
    block = {"doc_id": np.array(["d"], dtype=object), "block_index": np.zeros(1, np.int32),
             "input_ids": np.zeros((1, n), np.int64), "attention_mask": np.ones((1, n), np.uint8),
             "loss_mask": np.ones((1, n), np.uint8)}
    labels = {"topk_ids": _draws(teacher, [7], temperature=temperature), "label_logprobs": np.zeros((1, n), np.float32)}
    out = decode_batch(encode_batch(block, labels, soft_label_schema(n, S, v, form="sampled")))  # through the cache
    sampled = _kl_grad(student, TeacherTargets.sparse(*(torch.as_tensor(out[k]) for k in ("topk_ids", "topk_logprobs", "tail_logmass"))),
                       temperature)
    eps = math.sqrt(math.log(2 * v / 1e-9) / (2 * n * S))
    assert (sampled - full).abs().max() <= temperature * eps
    lp = torch.log_softmax(teacher / temperature, -1)
    top_lp, top_ids = lp.topk(3, -1)
    top3 = _kl_grad(student, TeacherTargets.sparse(top_ids, top_lp, torch.log1p(-top_lp.exp().sum(-1))), temperature)
    assert (top3 - full).abs().max() > 3 * temperature * eps  # the test can fail: truncation is biased


# --- the cache key and the refusals ----------------------------------------------------------------

def test_the_key_changes_with_form_draws_and_seed_and_top_k_keys_stay_as_they_were():
    base = CacheKey("w" * 16, "t" * 16, "hf", "float32", 32, 1.0, "d" * 16, 128, 1, 8)
    before = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
              if f.name not in ("form", "samples", "sample_seed", "sample_draws")}  # the fields top-k keys had before
    blob = json.dumps(before, sort_keys=True, separators=(",", ":")).encode()
    assert base.digest() == hashlib.sha256(blob).hexdigest()[:24]
    sampled = dataclasses.replace(base, form="sampled", samples=32)
    digests = {base.digest(), sampled.digest(), dataclasses.replace(sampled, samples=16, k=16).digest(),
               dataclasses.replace(sampled, samples=16).digest(), dataclasses.replace(sampled, sample_seed=1).digest(),
               dataclasses.replace(sampled, sample_draws="systematic").digest()}
    assert len(digests) == 6
    assert dataclasses.replace(base, sample_draws="systematic").digest() == base.digest()  # top-k: not in the key
    independent = {f.name: getattr(sampled, f.name) for f in dataclasses.fields(sampled) if f.name != "sample_draws"}
    blob = json.dumps(independent, sort_keys=True, separators=(",", ":")).encode()
    assert sampled.digest() == hashlib.sha256(blob).hexdigest()[:24]  # sampled caches written before draws existed


def test_the_plan_keys_the_cache_by_form_and_draws(tiny_model, corpus_jsonl, tmp_path):
    from raykd.soft_labels.plan import Plan
    from tests.conftest import tiny_distill_config

    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path)
    topk = Plan(cfg).keys["train"]
    sampled = Plan(cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"form": "sampled", "samples": 16})})).keys["train"]
    assert (sampled.form, sampled.samples, sampled.k, topk.form) == ("sampled", 16, 16, "topk")
    assert sampled.digest() != topk.digest()
    labels = cfg.labels.model_copy(update={"form": "sampled", "samples": 16, "draws": "systematic"})
    systematic = Plan(cfg.model_copy(update={"labels": labels})).keys["train"]
    assert systematic.sample_draws == "systematic" and systematic.digest() != sampled.digest()


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.students={s: {reverse_kl: 0.5, ce: 0.5}}"], r"\['reverse_kl'\] would be biased"),
    (["train.students={a: {forward_kl: 1}, b: {tvd: 1, generalized_jsd: 1}}"], r"\['generalized_jsd', 'tvd'\] would be biased"),
    (["train.target_k=8"], r"\['train.target_k'\] need top-k soft labels"),
    (["method=annealing_kd", "train.phases=[{until: 0.5, weights: {forward_kl: 1}, temperature: 4.0, temperature_end: 1.0}, "
      "{until: 1.0, weights: {ce: 1}}]"], r"phases temperature"),
])
def test_what_needs_top_k_is_refused_at_load_with_sampled_labels(overrides, message):
    with pytest.raises(ConfigError, match=rf"labels.form=sampled .*{message}"):
        load(DistillConfig, None, ["labels.form=sampled", *overrides])


def test_unbiased_terms_with_sampled_labels_load():
    cfg = load(DistillConfig, None, ["labels.form=sampled", "train.students={kd: {forward_kl: 0.5, ce: 0.5}, ce: {ce: 1}}"])
    assert cfg.labels.width == cfg.labels.samples == 32
    online = ["labels.form=sampled", "train.online_teacher=true", "train.students={s: {reverse_kl: 1}}"]
    assert load(DistillConfig, None, online).train.online_teacher  # the terms read the dense teacher then


def test_only_the_hf_engine_draws_sampled_labels():
    teacher = TeacherConfig()
    check_engine_request("hf", teacher, k=32, form="sampled")
    with pytest.raises(ValueError, match="labels.form=sampled .* 'vllm' engine .* teacher.engine=hf"):
        check_engine_request("vllm", teacher, k=32, form="sampled")


def test_expected_calibration_error_of_known_bins():
    conf = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.15, 0.15])
    correct = torch.tensor([True, True, True, False, False, False])
    # bin 14: 4 positions, confidence 0.95, accuracy 0.75; bin 2: 2 positions, 0.15 against 0
    assert expected_calibration_error(calibration_bins(conf, correct)) == pytest.approx((4 * 0.2 + 2 * 0.15) / 6)
    assert expected_calibration_error(calibration_bins(torch.tensor([1.0, 0.5]), torch.tensor([True, False]))) \
        == pytest.approx(0.25)  # perfectly confident and right costs nothing; 0.5 and wrong: 0.5 in half the mass
