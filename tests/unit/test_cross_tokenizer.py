"""A teacher and a student with different tokenizers: the ULD loss, the byte-offset alignment,
the vocabulary map, and the refusals (no Ray)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from raykd.cli import cli
from raykd.config import ConfigError, DistillConfig
from raykd.data.alignment import (
    align_positions,
    common_prefix,
    token_ends,
    vocabulary_bytes,
    vocabulary_map,
)
from raykd.losses import Objective, TeacherTargets, get_loss
from raykd.losses.targets import teacher_buckets
from raykd.methods import load
from raykd.soft_labels.plan import Plan
from raykd.students import VocabularyMismatchError
from tests.conftest import build_tiny_model, make_corpus, tiny_distill_config

uld = get_loss("uld").fn


def _uld(student_logits, targets, tau=1.0):
    return uld(student_logits, targets=targets, labels=torch.zeros(student_logits.shape[:2], dtype=torch.long), temperature=tau)


def _logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log().view(1, 1, -1)


# --- ULD maths ---------------------------------------------------------------------------------

def test_uld_dense_equals_the_sorted_l1_with_zero_padding_by_hand():
    teacher, student = [0.2, 0.5, 0.3], [0.4, 0.6]  # V_t = 3, V_s = 2: the student's sorted vector gets a 0
    want = abs(0.5 - 0.6) + abs(0.3 - 0.4) + abs(0.2 - 0.0)
    got = _uld(_logits_of(student), TeacherTargets.dense(_logits_of(teacher)))
    assert got.shape == (1, 1) and got.item() == pytest.approx(want, abs=1e-6)


def test_uld_is_zero_for_the_same_distribution_under_any_relabelling_of_the_vocabulary():
    torch.manual_seed(0)
    z = 3 * torch.randn(2, 4, 9)
    assert torch.all(_uld(z, TeacherTargets.dense(z)).abs() < 1e-6)
    permuted = z[..., torch.randperm(9)]  # another vocabulary order: ids never matter to ULD
    assert torch.all(_uld(permuted, TeacherTargets.dense(z)).abs() < 1e-6)
    assert torch.all(_uld(z, TeacherTargets.dense(3 * torch.randn(2, 4, 9))) > 0)


def test_uld_sparse_uses_sorted_top_k_plus_the_tail_and_ignores_ids():
    # teacher top-2 of 0.5 and 0.2 (listed out of order, ids from another vocabulary), tail 0.3
    ids = torch.tensor([[[70000, -1]]])
    targets = TeacherTargets.sparse(ids, torch.tensor([[[math.log(0.2), math.log(0.5)]]]), torch.tensor([[math.log(0.3)]]))
    student = [0.1, 0.6, 0.05, 0.25]  # its top-2: 0.6, 0.25; tail 0.15
    want = abs(0.5 - 0.6) + abs(0.2 - 0.25) + abs(0.3 - 0.15)
    assert _uld(_logits_of(student), targets).item() == pytest.approx(want, abs=1e-6)
    same = TeacherTargets.sparse(torch.tensor([[[1, 3]]]), torch.tensor([[[math.log(0.6), math.log(0.25)]]]),
                                 torch.tensor([[math.log(0.15)]]))
    assert _uld(_logits_of(student), same).abs().item() < 1e-6


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_uld_is_non_negative_and_at_most_two_tau_squared(tau):
    torch.manual_seed(1)
    student, teacher = 4 * torch.randn(3, 5, 7), 4 * torch.randn(3, 5, 11)
    loss = _uld(student, TeacherTargets.dense(teacher), tau)
    assert torch.all(loss >= 0) and torch.all(loss <= 2 * tau**2 + 1e-5)


# --- matched tokens: the teacher mass without a student counterpart joins the tail ---------------

def test_unmatched_teacher_ids_move_their_mass_into_the_tail_bucket():
    lp = torch.tensor([[[math.log(0.5), math.log(0.3)]]])
    targets = TeacherTargets.sparse(torch.tensor([[[2, -1]]]), lp, torch.tensor([[math.log(0.2)]]))
    _, log_p = teacher_buckets(targets, 1.0)
    torch.testing.assert_close(log_p.exp(), torch.tensor([[[0.5, 0.0, 0.5]]]))
    # forward KL is then the exact KL over {id 2, the rest}: by hand for a student with q(2) = 0.25
    student = [0.25, 0.25, 0.25, 0.25]
    kl = get_loss("forward_kl").fn(_logits_of(student), targets=targets, labels=torch.zeros(1, 1, dtype=torch.long), temperature=1.0)
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), abs=1e-5)


# --- the alignment on hand-made tokenizations ----------------------------------------------------

def test_positions_align_where_both_tokens_end_at_the_same_byte():
    # text "the distillation" (16 bytes); teacher: <bos> "the" " distill" "ation"; student: <s> "the" " dist" "illation"
    t_ends = token_ends([0, 1, 2, 3], np.array([0, 3, 8, 5]))
    s_ends = token_ends([0, 1, 2, 3], np.array([0, 3, 5, 8]))
    assert t_ends.tolist() == [0, 3, 11, 16] and s_ends.tolist() == [0, 3, 8, 16]
    assert align_positions(t_ends, s_ends).tolist() == [0, 1, -1, 3]
    assert align_positions(t_ends, s_ends, limit=10).tolist() == [0, 1, -1, -1]  # texts differ after byte 10


def test_of_several_zero_length_tokens_only_the_last_is_aligned():
    t_ends = np.array([0, 0, 3, 6])  # <bos> <extra special> "abc" "def"
    s_ends = np.array([0, 6])  # <s> "abcdef"
    assert align_positions(t_ends, s_ends).tolist() == [1, 3]


def test_vocabulary_map_pairs_tokens_of_equal_bytes_one_to_one():
    teacher = [None, b" the", b"dist", b" the", b"ill"]  # id 3 repeats id 1's bytes
    student = [b"dist", b" the", None, b"xyz"]
    assert vocabulary_map(teacher, student).tolist() == [-1, 1, 0, -1, -1]
    assert common_prefix(b"abcdef", b"abcxef") == 3 and common_prefix(b"ab", b"abc") == 2


def test_vocabulary_bytes_of_byte_level_and_metaspace_tokenizers(tmp_path):
    from raykd.models import load_tokenizer

    text = "The market said record profits on day 7."
    for folder in (build_tiny_model(tmp_path / "bl", num_layers=1), build_tiny_model(tmp_path / "ms", num_layers=1, metaspace=True)):
        tok = load_tokenizer(folder)
        table = vocabulary_bytes(tok)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        joined = b"".join(table[i] for i in ids)
        assert joined.lstrip(b" ") == text.encode()  # a metaspace tokenizer prefixes one space
        assert table[tok.bos_token_id] is None and table[tok.pad_token_id] is None
    bl, ms = (vocabulary_bytes(load_tokenizer(tmp_path / f)) for f in ("bl", "ms"))
    assert b" the" in bl and b" the" in ms  # "Ġthe" and "▁the" stand for the same bytes


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("pair")
    return build_tiny_model(base / "teacher", num_layers=1), build_tiny_model(base / "student", num_layers=1, metaspace=True, vocab_size=200)


def test_aligned_positions_have_read_the_same_text(pair):
    from raykd.data.blocks import tokenize_to_blocks
    from raykd.train.cross_tokenizer import TokenizerAlignment

    teacher, student = pair
    al = TokenizerAlignment(teacher, student)
    docs = make_corpus(4, seed=3)
    batch = {"doc_id": np.array([d["id"] for d in docs], dtype=object), "text": np.array([d["text"] for d in docs], dtype=object)}
    blocks = tokenize_to_blocks(batch, al.teacher_tok, seq_len=24, max_blocks_per_doc=1, min_tokens=8)
    rows = al.align(torch.tensor(blocks["input_ids"]), torch.tensor(blocks["attention_mask"]))
    decode_t = lambda ids: b"".join(al.teacher_bytes[i] or b"" for i in ids)
    decode_s = lambda ids: b"".join(al.student_bytes[i] or b"" for i in ids).lstrip(b" ")
    for r in range(len(docs)):
        hits = rows.aligned_mask[r].nonzero().flatten().tolist()
        assert len(hits) >= 0.5 * int(rows.token_mask[r].sum())  # most positions align for two BPEs of one corpus
        for j in hits:
            i = int(rows.teacher_index[r, j])
            assert decode_s(rows.input_ids[r, : j + 1].tolist()) == decode_t(blocks["input_ids"][r, : i + 1].tolist()).lstrip(b" ")
        n = int(rows.attention_mask[r].sum())
        assert rows.labels[r, : n - 1].tolist() == rows.input_ids[r, 1:n].tolist() and rows.labels[r, n - 1] == -100
    assert rows.input_ids[0, 0] == al.student_tok.bos_token_id  # the student's own BOS comes first


def test_mapped_targets_train_through_the_objective(pair):
    from raykd.train.cross_tokenizer import TokenizerAlignment

    teacher, student = pair
    al = TokenizerAlignment(teacher, student)
    assert 0.05 < al.matched_share < 1.0  # single characters and whole words such as " the" are shared
    ids = al.teacher_tok(["The team won the final match on day 3."], add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([torch.tensor([[al.teacher_tok.bos_token_id]]), ids], 1)
    k, t = 4, ids.shape[1]
    logprobs = torch.log_softmax(torch.randn(1, t, k), -1) - 0.5
    top = torch.stack([torch.randperm(len(al.teacher_tok) - 3)[:k] + 3 for _ in range(t)])[None]  # K distinct ids a position
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "topk_ids": top,
             "topk_logprobs": logprobs, "tail_logmass": torch.log(-torch.expm1(logprobs.logsumexp(-1)))}
    sb = al.student_batch(batch, 1.0, 1.0)
    v_s = len(al.student_tok)
    assert sb.targets.batch_shape == tuple(sb.labels.shape) and int(sb.targets.topk_ids.max()) < v_s
    logits = torch.randn(*sb.labels.shape, v_s, requires_grad=True)
    out = Objective({"uld": 1.0, "forward_kl": 1.0, "ce": 1.0})(logits, sb.labels, sb.mask, sb.targets, 1.0)
    out.loss_sum.backward()
    assert torch.isfinite(logits.grad).all() and out.num_tokens == sb.mask.sum() > 0


def test_same_tokenizer_aligns_every_position_and_maps_ids_to_themselves(pair):
    from raykd.train.cross_tokenizer import TokenizerAlignment

    teacher, _ = pair
    al = TokenizerAlignment(teacher, teacher)
    ids = al.teacher_tok(["A minister denied new rules on day 12."], return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([torch.tensor([[al.teacher_tok.bos_token_id]]), ids], 1)
    rows = al.align(ids, torch.ones_like(ids))
    assert torch.equal(rows.input_ids, ids) and rows.aligned_mask.sum() == ids.shape[1] - 1
    real = [i for i, b in enumerate(al.teacher_bytes) if b]
    assert al.vocab_map[real].tolist() == real


# --- refusals, before any work -------------------------------------------------------------------

def test_another_tokenizer_without_an_alignment_is_refused_naming_the_field(tiny_model, corpus_jsonl, tmp_path):
    other = build_tiny_model(tmp_path / "other", num_layers=2, metaspace=True)
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache")
    for init in ("pretrained", "layer_drop"):  # a layer-dropped copy of another model is refused too
        bad = cfg.model_copy(update={"student": cfg.student.model_copy(update={"init": init, "model": str(other), "keep_layers": [0]})})
        with pytest.raises(VocabularyMismatchError, match="student.tokenizer_alignment=byte_offsets"):
            Plan(bad)
    assert not (tmp_path / "cache").exists()
    good = cfg.model_copy(update={"method": "uld", "student": cfg.student.model_copy(
        update={"model": str(other), "keep_layers": [0], "tokenizer_alignment": "byte_offsets"})})
    assert Plan(good).cross_tokenizer is True


def test_the_cli_refusal_is_one_error_line(capsys, tiny_model, corpus_jsonl, tmp_path):
    other = build_tiny_model(tmp_path / "other", num_layers=2, metaspace=True)
    capsys.readouterr()  # the fixture's own output
    code = cli(["distill", "--output-dir", str(tmp_path / "run"), "data.source=jsonl", f"data.path={corpus_jsonl}",
                "data.id_column=id", f"teacher.model={tiny_model}", f"student.model={other}", "student.keep_layers=[0]",
                f"labels.cache_dir={tmp_path / 'cache'}"])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: teacher and student tokenizers differ") and "tokenizer_alignment" in err
    assert "Traceback" not in out + err


@pytest.mark.parametrize("overrides, message", [
    (["student.tokenizer_alignment=byte_offsets"], "student.model is not"),
    (["student.tokenizer_alignment=byte_offsets", "student.model=x", "train.online_teacher=true"], "online_teacher"),
    (["student.tokenizer_alignment=byte_offsets", "student.model=x", "student.vocab_size=0.5"], "vocab"),
    (["method=kd", "student.tokenizer_alignment=byte_offsets", "student.model=x"], "does not use \\['cross_tokenizer'\\]"),
    (["student.tokenizer_alignment=bytes"], "byte_offsets"),
])
def test_cross_tokenizer_configs_that_cannot_work_are_refused_at_load_time(overrides, message):
    base = ["method=uld"] if not any(o.startswith("method=") for o in overrides) else []
    with pytest.raises(ConfigError, match=message):
        load(DistillConfig, None, [*base, "train.students={s: {uld: 1.0}}", *overrides])


def test_a_gguf_path_that_does_not_exist_names_the_file(tmp_path):
    from raykd.models import resolve_model_path

    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


def test_the_teacher_perplexity_check_warns_on_an_implausible_teacher(pair, caplog):
    from raykd.models import load_tokenizer
    from raykd.teacher.sanity import check_teacher_perplexity

    tok = load_tokenizer(pair[0])
    texts = [d["text"] for d in make_corpus(3)]

    def uniform_over(v):  # a teacher that knows nothing: every next token has probability 1/v
        return lambda ids, am: {"label_logprobs": np.full(ids.shape, -math.log(v), dtype=np.float32)}

    def good_unless_first_is(first_id, good=True):  # predicts well only when the block starts (or not) with first_id
        return lambda ids, am: {"label_logprobs": np.where((ids[:, :1] == first_id) != good, -math.log(20), -math.log(5000))
                                * np.ones(ids.shape, dtype=np.float32)}

    def warning() -> str:
        (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        caplog.clear()
        return record.getMessage()

    with caplog.at_level(logging.INFO, logger="raykd.teacher.sanity"):
        assert check_teacher_perplexity(uniform_over(50), tok, texts, seq_len=16) == pytest.approx(50, rel=1e-4)
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        assert check_teacher_perplexity(uniform_over(5000), tok, texts, seq_len=16) == pytest.approx(5000, rel=1e-4)
        assert "without its BOS token '<s>' it scores 5000 (as labeled 5000): the BOS token is not the cause" in warning()
        check_teacher_perplexity(good_unless_first_is(tok.bos_token_id), tok, texts, seq_len=16)  # trained without a BOS
        assert "it scores 20 without its BOS token '<s>' against 5000 as labeled: the BOS token is the cause" in warning()
        tok.bos_token = None  # a tokenizer that lost its BOS, for a teacher trained with </s> first
        check_teacher_perplexity(good_unless_first_is(tok.eos_token_id, good=False), tok, texts, seq_len=16)
        assert "scores 20 with '</s>' prepended as a BOS (its tokenizer has none) against 5000 as labeled" in warning()
