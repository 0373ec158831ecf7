"""A tiny end-to-end MUKI run: 2 tiny BERT teachers on disjoint class subsets, served, cached,
every student row trained through the shared step; the rerun asks no teacher anything."""

from __future__ import annotations

import json
import random

import pytest

from raykd.data.documents import Document

pytestmark = pytest.mark.ray

_TOPICS = {"film": ["actor", "award", "cinema", "star"], "money": ["bank", "shares", "profit", "market"],
           "sport": ["match", "goal", "team", "coach"], "tech": ["phone", "chip", "web", "software"],
           "food": ["bread", "chef", "menu", "taste"]}
_FILLER = ["the", "a", "said", "on", "new", "day", "week", "today"]


def _docs(n: int = 100, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = list(_TOPICS)[i % 5]
        words = [rng.choice(_TOPICS[topic] if rng.random() < 0.5 else _FILLER) for _ in range(12)]
        out.append(Document(doc_id=f"{topic}/{i:03d}", text=" ".join(words), label=topic))
    return out


def _tiny_encoder(folder, docs):
    """A tiny random BertModel (no head: teachers and student get theirs) and a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from tests.conftest import build_word_tokenizer

    tok = build_word_tokenizer([d.text for d in docs])
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                         max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_muki_tiny_end_to_end_and_cached_rerun(ray_start, tmp_path, monkeypatch):
    from raykd.recipes.muki.config import MukiConfig
    from raykd.recipes.muki.rows import ROWS
    from raykd.recipes.muki.run import main_muki

    METHODS = ROWS.names()

    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))  # the fine-tuned teachers go here
    docs = _docs()
    base = _tiny_encoder(tmp_path / "base", docs)
    cfg = MukiConfig.model_validate({
        "run_name": "tiny",
        "data": {"seq_len": 16, "test_share": 0.25, "dev_share": 0.15},
        "partitions": [{"name": "mixed", "teachers": [["film", "sport"], ["food", "money", "tech"]]},
                       {"name": "two_two", "teachers": [["film", "sport"], ["money", "tech"]], "drop_other_classes": True}],
        "teacher": {"base_model": base, "steps": 6, "batch_size": 8, "lr": 1e-3, "name": "tiny-muki", "num_threads": 1, "num_cpus": 0.5},
        "labels": {"cache_dir": str(tmp_path / "labels"), "batch_size": 16},
        "mc": {"passes": 3, "scope": "encoder"},
        "student": {"base_model": base, "epochs": 0.5, "evals_per_epoch": 2, "batch_size": 8, "lr": 1e-3, "eval_batch_size": 32,
                    "schedule": "linear", "warmup_share": 0.1},
        "seeds": [0],
        "publish": str(tmp_path / "bench" / "muki_tiny"),
    })
    first = main_muki(cfg, tmp_path / "out", docs=docs)
    assert [p["name"] for p in first["partitions"]] == ["mixed", "two_two"]
    mixed, two = first["partitions"]
    assert mixed["teachers"] == [["film", "sport"], ["food", "money", "tech"]] and two["classes"] == ["film", "money", "sport", "tech"]
    assert sum(two["split_sizes"].values()) == 80 and sum(mixed["split_sizes"].values()) == 100  # two_two leaves food out
    rows = {r["row"]: r for r in mixed["rows"]}
    assert set(METHODS) <= set(rows) and "oracle (all classes)" in rows
    n_train = first["split_sizes"]["train"]
    for name in METHODS:
        assert len(rows[name]["overall"]) == 1 and 0.0 <= rows[name]["overall"][0] <= 1.0
        assert len(rows[name]["subsets"]) == 2 and len(rows[name]["wall_s"]) == 1
        lo, hi = rows[name]["ci95"]
        assert lo <= rows[name]["overall"][0] <= hi
        assert rows[name]["seeds"][0]["steps"] == -(-n_train // 8) // 2 + (-(-n_train // 8) % 2)  # half an epoch
    assert "dfa_last" in rows["dfa"]["seeds"][0]
    assert 0.0 <= rows["muki_soft"]["score_picks_gold_teacher"] <= 1.0
    for part in (mixed, two):  # the selection report, before any student
        sel = part["selection"]
        assert sel["score"] == "mc" and 0.0 <= sel["muki_score_mc"] <= 1.0 and 0.0 <= sel["max_logit"] <= 1.0
        assert sum(t["own_share"] for t in sel["teachers"]) == pytest.approx(1.0)
        assert sum(t["wins"] for t in sel["teachers"]) == pytest.approx(1.0)
        assert all(0.0 <= t["auroc"] <= 1.0 for t in sel["teachers"])
    assert rows["muki_soft"]["score_picks_gold_teacher"] == mixed["selection"]["muki_score_mc"]
    costs = first["costs"]
    assert costs["teacher_calls"] > 0 and costs["cache_misses"] > 0 and costs["students_trained"] == 2 * len(METHODS)
    n_two = two["split_sizes"]["train"]
    assert costs["mc_passes"] == 3 * (n_train + n_two) * 2  # M x train articles x 2 subset teachers, per partition
    for f in ("results.json", "results.md", "muki.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert "| muki_soft_reweight |" in (tmp_path / "out" / "results.md").read_text()
    assert "raw maximum logit" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "bench" / "muki_tiny.md").read_text() == (tmp_path / "out" / "results.md").read_text()

    # the rerun (two rows, one seed) reads every teacher label and every student from the caches
    rerun = cfg.model_copy(update={"methods": ["muki_soft_reweight", "dfa"], "seeds": [0]})
    again = main_muki(rerun, tmp_path / "out", docs=docs)
    assert again["costs"]["teacher_calls"] == 0 and again["costs"]["cache_misses"] == 0 and again["costs"]["mc_passes"] == 0
    assert again["costs"]["cache_hits"] == 6 and again["costs"]["students_trained"] == 0  # 2 x (2 subset teachers + the oracle)
    from ray import serve

    assert not [a for a in serve.status().applications if a.startswith("tiny-muki")]  # no teacher deployed on the rerun
    b = {r["row"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["partitions"][0]["rows"]}
    for name in ("muki_soft_reweight", "dfa"):
        assert b[name]["overall"] == rows[name]["overall"]  # same labels, same seed: the cached student
