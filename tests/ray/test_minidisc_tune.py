"""Tiny end-to-end MiniDisc and MaxiDisc runs on Ray Tune (a 2-layer BERT built from a config)."""

from __future__ import annotations

import json
import random

import pytest

from raykd.data.documents import Document

pytestmark = pytest.mark.ray

_TOPICS = {"sport": ["match", "goal", "team", "coach"], "money": ["bank", "shares", "profit", "market"], "film": ["actor", "award", "cinema", "star"]}
_FILLER = ["the", "a", "said", "on", "new", "day", "week", "today"]


def make_labeled_docs(n: int = 66, seed: int = 0, topic_share: float = 0.5) -> list[Document]:
    """``n`` articles of 14 words, each a topic word with probability ``topic_share``, else filler."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        topic = list(_TOPICS)[i % 3]
        words = [rng.choice(_TOPICS[topic] if rng.random() < topic_share else _FILLER) for _ in range(14)]
        docs.append(Document(doc_id=f"{topic}/{i:03d}", text=" ".join(words), label=topic))
    return docs


def build_tiny_classifier(folder, labels, seed: int = 0):
    """A tiny random BertForSequenceClassification with a WordPiece tokenizer, saved to ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tests.conftest import build_word_tokenizer

    tok = build_word_tokenizer([d.text for d in make_labeled_docs()])
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_schedule(tmp_path_factory):
    from raykd.recipes.ta_search.config import ClassifierScheduleConfig

    folder = build_tiny_classifier(tmp_path_factory.mktemp("tiny_cls"), ["film", "money", "sport"])
    cfg = ClassifierScheduleConfig.model_validate({
        "run_name": "tiny",
        "data": {"max_docs": None, "test_docs": 12, "dev_docs": 12, "seq_len": 16},
        "teacher": {"model": str(folder), "name": "tiny-classifier", "num_threads": 1, "num_cpus": 0.5},
        "labels": {"cache_dir": str(tmp_path_factory.mktemp("cache")), "batch_size": 16},
        "sparsify": {"grid": [0.3, 0.6, 0.9], "target": 0.9, "importance_batches": 2},
        "kd": {"steps": 4, "batch_size": 4, "lr": 1e-3, "reports": 2, "eval_batch_size": 16},
        "minidisc": {"sandwich_steps": 2, "lambda_sweep": [0.0, 1.0]},
        "maxidisc": {"max_concurrent_trials": 2, "cpus_per_trial": 1},
    })
    return cfg, make_labeled_docs()


def test_minidisc_then_maxidisc_end_to_end(ray_start, tiny_schedule, tmp_path, monkeypatch):
    from raykd.recipes.ta_search.maxidisc import maxidisc_trial
    from raykd.recipes.ta_search.search import main_maxidisc, main_minidisc, main_sweep

    cfg, docs = tiny_schedule
    monkeypatch.chdir(tmp_path)  # a relative output dir must work: trials run in their own folders
    mini = main_minidisc(cfg, "mini", docs=docs)
    assert mini["trials_run"] == 1 and mini["chosen_ta"] in (0.3, 0.6)
    assert [c["sparsity"] for c in mini["candidates"]] == [0.3, 0.6, 0.9]
    assert 0.0 <= mini["student"]["student_test_acc"] <= 1.0  # NaN (never evaluated) fails here
    assert mini["labels"]["cache_hit"] is False and mini["labels"]["teacher_calls"] > 0
    assert (tmp_path / "mini" / "minidisc.png").stat().st_size > 1000
    on_disk = json.loads((tmp_path / "mini" / "results.json").read_text())
    assert on_disk["chosen_ta"] == mini["chosen_ta"]

    def flaky(config):  # one trial fails: it is reported and the search goes on
        if config["ta_sparsity"] == 0.6:
            raise RuntimeError("injected failure at TA sparsity 0.6")
        maxidisc_trial(config)

    # a second search finds the soft labels in the cache: the teacher is asked nothing
    no_asha = cfg.model_copy(update={"maxidisc": cfg.maxidisc.model_copy(update={"early_stopping": False})})
    maxi = main_maxidisc(no_asha, tmp_path / "maxi", docs=docs, trainable=flaky)
    assert maxi["labels"]["cache_hit"] is True and maxi["labels"]["teacher_calls"] == 0
    assert maxi["trials_run"] == 3  # direct + TAs 0.3, 0.6
    assert [f["ta_sparsity"] for f in maxi["trials_failed"]] == [0.6]
    assert "injected failure" in maxi["trials_failed"][0]["error"]
    assert maxi["best_ta"] == 0.3 and 0.0 <= maxi["direct"]["student_test_acc"] <= 1.0
    assert [c["status"] for c in maxi["candidates"]] == ["done", "error"]
    sweep = main_sweep(tmp_path / "mini", tmp_path / "maxi")
    assert [r["lambda"] for r in sweep["sweep"]] == [0.0, 1.0]
    assert sweep["maxidisc_best_ta"] == 0.3
