"""Held-out metrics from a soft-label cache (raykd.train.evaluate): perplexity, top-1 agreement and
the forward KL from the teacher, checked against a teacher whose full distribution is known."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raykd.losses import get_loss
from raykd.losses.targets import TeacherTargets
from raykd.soft_labels.schema import decode_batch, encode_batch, soft_label_schema
from raykd.train.evaluate import student_metrics, teacher_metrics

V, T, B = 48, 12, 6


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5)
    return LlamaForCausalLM(cfg).eval()


@torch.inference_mode()
def _cache(tmp_path, teacher, k: int):
    """One shard labeled by ``teacher`` with top-``k`` soft labels; the last row is right-padded."""
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T // 2:] = 0
    logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), -1)
    top = logp.topk(k, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    label = torch.zeros(B, T)
    label[:, :-1] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss_mask = torch.zeros_like(mask)
    loss_mask[:, :-1] = mask[:, 1:]  # position t is scored iff t + 1 is a real token (raykd.data.blocks)
    block = {"doc_id": np.array([f"d{i}" for i in range(B)]), "block_index": np.zeros(B, dtype=np.int32),
             "input_ids": ids.numpy(), "attention_mask": mask.numpy(), "loss_mask": loss_mask.numpy()}
    labels = {"topk_ids": top.indices.numpy().astype(np.uint16), "topk_logprobs": top.values.numpy(),
              "tail_logmass": tail.numpy(), "label_logprobs": label.numpy()}
    path = tmp_path / f"k{k}.parquet"
    pq.write_table(encode_batch(block, labels, soft_label_schema(T, k, V)), path)
    return [str(path)], ids, mask, labels


def test_the_teacher_as_its_own_student_has_zero_kl_full_agreement_and_the_teacher_ppl(tmp_path):
    teacher = _model(0)
    files, *_ = _cache(tmp_path, teacher, k=V)
    own = student_metrics(teacher, files, batch_size=4)
    ref = teacher_metrics(files)
    assert own["kl"] == pytest.approx(0.0, abs=2e-3)  # fp16 storage of the cached log-probs
    assert own["top1_agreement"] == 1.0 and own["tokens"] == ref["tokens"] == (B - 1) * (T - 1) + T // 2 - 1 == 60
    assert own["ppl"] == pytest.approx(ref["ppl"], rel=1e-3)  # the cache keeps label log-probs in fp16


@pytest.mark.parametrize("k", [V, 5])
def test_kl_is_the_sparse_forward_kl_loss_averaged_over_scored_positions(tmp_path, k):
    teacher, student = _model(0), _model(1)
    files, ids, mask, _ = _cache(tmp_path, teacher, k=k)
    got = student_metrics(student, files, batch_size=4)
    with torch.inference_mode():
        logits = student(input_ids=ids, attention_mask=mask).logits.float()[:, :-1]
    cached = decode_batch(pq.read_table(files[0]))  # the targets as the cache stores them (schema v2 quantisation)
    fp16 = {n: torch.as_tensor(cached[n][:, :-1]) for n in ("topk_ids", "topk_logprobs", "tail_logmass")}
    targets = TeacherTargets.sparse(fp16["topk_ids"].long(), fp16["topk_logprobs"].float(), fp16["tail_logmass"])
    per_token = get_loss("forward_kl").fn(logits, targets=targets, labels=ids[:, 1:], temperature=1.0)
    m = mask[:, 1:].bool()  # the cache's loss_mask without its last (never scored) position
    expected = float(per_token[m].mean())
    assert got["kl"] > 0.05 and got["kl"] == pytest.approx(expected, rel=1e-4)
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert got["ppl"] == pytest.approx(math.exp(float(nll[m].mean())), rel=1e-4)


def test_kl_of_a_compressed_vocabulary_student_is_over_its_distribution_mapped_back_to_teacher_ids(tmp_path):
    from raykd.students.vocab import build_vocab_map, compress_vocabulary, map_ids
    from raykd.train.evaluate import _compressed_to_teacher

    teacher, student = _model(0), _model(1)
    files, ids, mask, _ = _cache(tmp_path, teacher, k=V)
    vmap = build_vocab_map(np.arange(V)[::-1].copy(), 20)  # 19 kept ids + OTHER
    compress_vocabulary(student, vmap)
    got = student_metrics(student, files, batch_size=4, vocab=vmap)
    table = vmap.to_compressed()
    with torch.inference_mode():
        logp = torch.log_softmax(student(input_ids=map_ids(ids, table), attention_mask=mask).logits.float()[:, :-1], -1)
        log_p = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float()[:, :-1], -1)
    every = torch.arange(V).expand(B, T - 1, V)
    log_q = torch.stack([_compressed_to_teacher(logp, every[..., i], table, vmap)[0] for i in range(V)], -1)
    dense_kl = (log_p.exp() * (log_p - log_q)).sum(-1)[mask[:, 1:].bool()].mean()
    assert got["kl"] == pytest.approx(float(dense_kl), rel=2e-3)
