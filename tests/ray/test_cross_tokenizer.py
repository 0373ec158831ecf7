"""A student with another tokenizer than the teacher's, end to end through the main job: it reads
the teacher's own cache (labeled for same-tokenizer students, a hit here), re-tokenises and
aligns the blocks in the Train loop, and is evaluated in its own tokens."""

from __future__ import annotations

import math

import pytest

from raykd.cli import main_distill
from raykd.models import load_tokenizer
from tests.conftest import build_tiny_model, tiny_distill_config

pytestmark = pytest.mark.ray

CROSS_TOKENIZER = {"uld"}
"""Methods whose tiny-model run is here."""


def test_a_student_of_another_tokenizer_trains_on_the_teachers_cache(tiny_labeled, tiny_model, corpus_jsonl, tmp_path):
    labeled_cfg, _, caches, _ = tiny_labeled
    student_src = build_tiny_model(tmp_path / "metaspace_student", num_layers=2, metaspace=True, vocab_size=260)
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, labeled_cfg.labels.cache_dir, students={"uld": {"uld": 0.5, "forward_kl": 0.5, "ce": 0.5}})
    cfg = cfg.model_copy(update={"method": "uld", "student": cfg.student.model_copy(
        update={"model": str(student_src), "keep_layers": [0, 1], "tokenizer_alignment": "byte_offsets"})})
    report = main_distill(type(cfg).model_validate(cfg.model_dump()), tmp_path / "run")

    assert report["cache"]["hit"] is True and report["cache"]["teacher_calls"] == 0  # the teacher's cache, as labeled
    assert report["cache"]["path"] == str(caches["train"][0])
    history_terms = {"uld", "forward_kl", "ce"}
    assert report["uld"]["steps"] == 6 and math.isfinite(report["uld"]["final_train_loss"])
    for entry in (report["student_init"], report["uld"]):
        assert entry["tokens"] >= entry["aligned"] > 0.5 * entry["tokens"]  # ppl over every student token, the rest aligned
        assert 0.0 <= entry["top1_agreement"] <= 1.0 and entry["kl"] > 0 and 0 < entry["uld"] <= 2
        assert entry["bits_per_byte"] > 0
    assert report["uld"]["ppl"] < report["student_init"]["ppl"]  # trained in its own tokens
    assert report["teacher"]["bits_per_byte"] > 0 and report["teacher"]["ppl"] > 1
    exported = load_tokenizer(report["uld"]["model_dir"])
    assert any("\u2581" in t for t in exported.convert_ids_to_tokens(exported("the team")["input_ids"]))  # its own tokenizer
    assert history_terms <= set(report["uld"]["objective"])
