"""A tiny end-to-end MCKD run: a tiny Llama labels through the teacher service (verbaliser
scoring, and generation), tiny students relabel each other's half through Ray Data, the stages
are keyed artifacts; the rerun calls no model (stage resume after a kill: tests/unit/test_mckd.py)."""

from __future__ import annotations

import random

import pytest

from raykd.data.documents import Document

pytestmark = pytest.mark.ray

_TOPICS = {"film": ["actor", "award", "cinema", "star"], "money": ["bank", "shares", "profit", "market"],
           "sport": ["match", "goal", "team", "coach"]}
_FILLER = ["the", "a", "said", "on", "new", "day"]


def _docs(n: int = 60, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = list(_TOPICS)[i % 3]
        words = [rng.choice(_TOPICS[topic] if rng.random() < 0.5 else _FILLER) for _ in range(10)]
        out.append(Document(doc_id=f"{topic}/{i:03d}", text=f"{topic} {words[0]} {words[1]}\n" + " ".join(words), label=topic))
    return out


def _tiny_bert(folder, docs):
    from tests.ray.test_muki import _tiny_encoder

    return _tiny_encoder(folder, docs)


def _config(tmp_path, labeler_model, student_model, **extra):
    from raykd.recipes.mckd.config import MckdConfig

    return MckdConfig.model_validate({
        "run_name": "tiny",
        "data": {"test_share": 0.2, "gold": 12, "seq_len": 12, "target_tokens": 4},
        "labeler": {"model": str(labeler_model), "name": "tiny-mckd-labeler", "verbalisers": {t: f" {t}" for t in _TOPICS},
                    "template": "{text} topic:", "shots": [1], "calibration": [False, True], "demo_tokens": 8, "doc_tokens": 8,
                    "batch_size": 8, "num_threads": 1, "num_cpus": 0.5, "cache_dir": str(tmp_path / "pseudo")},
        "student": {"base_model": str(student_model), "steps": 3, "batch_size": 8, "lr": 1e-3, "eval_every": 2, "eval_batch_size": 16,
                    "num_threads": 1},
        "stages": 1, "supervised_extra": 0, "seeds": [0], **extra})


def test_mckd_tiny_classification_and_cached_rerun(ray_start, tiny_model, tmp_path):
    from raykd.recipes.mckd.run import main_mckd

    docs = _docs()
    cfg = _config(tmp_path, tiny_model, _tiny_bert(tmp_path / "bert", docs), publish=str(tmp_path / "bench" / "mckd_tiny"),
                  controls=True, unbalanced_ablation=True)
    cfg.student.epochs, cfg.student.evals_per_epoch, cfg.student.balanced, cfg.student.schedule = 1.0, 2, True, "linear"
    first = main_mckd(cfg, tmp_path / "out", docs=docs)
    rows = {r["row"]: r for r in first["rows"]}
    assert list(rows) == ["LLM labeler (few-shot)", "vanilla KD (LLM labels)", "MCKD, 1 stage", "vanilla KD, class-balanced sampling off",
                          "control: gold labels on the pool", "control: balanced noise on the pool", "control: skewed noise on the pool",
                          "supervised, 12 gold"]
    for r in rows.values():
        assert 0.0 <= r["test"]["accuracy"][0] <= 1.0 and 0.0 <= r["test"]["macro_f1"][0] <= 1.0 and len(r["wall_s"]) == 1
    assert rows["control: gold labels on the pool"]["label_quality"]["accuracy"] == [1.0]
    assert rows["vanilla KD (LLM labels)"]["vs_vanilla KD (LLM labels)"] == [0.0, 0.0, 0.0]
    diff, lo, hi = rows["MCKD, 1 stage"]["vs_vanilla KD (LLM labels)"]  # paired, on the same test articles
    assert lo <= diff <= hi and diff == pytest.approx(rows["MCKD, 1 stage"]["test"]["accuracy"][0] - rows["vanilla KD (LLM labels)"]["test"]["accuracy"][0])
    pool = first["labeler"]["pool"]
    n_pool = first["split_sizes"]["unlabeled"]
    assert sum(pool["counts_gold"]) == sum(pool["counts_labeler"]) == n_pool
    assert pool["accuracy"] == rows["vanilla KD (LLM labels)"]["label_quality"]["accuracy"][0]
    costs = first["costs"]
    assert costs["llm_calls"] > 0 and costs["label_tokens"] > 0
    assert costs["student_trainings"] == 2 + 2 + 1 + 3 + 1  # stage 1's A and B, 2 finals, ablation, 3 controls, supervised
    assert [c["calibrate"] for c in first["labeler"]["candidates"]] == [False, True]
    stage1 = first["stages"][0]["stages"][1]["log"]
    assert set(stage1["students"]) == {"A", "B"} and sum(stage1["halves"].values()) == n_pool
    half = stage1["halves"]["A"]
    steps = -(-half // 8)  # 1 epoch of batch 8, checked twice per epoch and at the end
    assert stage1["students"]["A"]["steps"] == steps and [c[0] for c in stage1["students"]["A"]["checks"]][-1] == steps
    for ext in (".json", ".md", ".png"):
        assert (tmp_path / "bench" / f"mckd_tiny{ext}").is_file()

    again = main_mckd(cfg, tmp_path / "out", docs=docs)  # every cache and stage hit: no model is called
    c2 = again["costs"]
    assert c2["llm_calls"] == 0 and c2["student_trainings"] == 0 and c2["relabels"] == 0 and c2["cache_misses"] == 0
    assert c2["stage_hits"] == 1 and c2["row_hits"] == 7
    assert c2["recorded_label_tokens"] == costs["recorded_label_tokens"] > 0  # the labeling's cost, read from the caches
    assert [r["test"] for r in again["rows"]] == [r["test"] for r in first["rows"]]
    assert [r["wall_s"] for r in again["rows"][1:]] == [r["wall_s"] for r in first["rows"][1:]]  # wall times read from the caches


def test_mckd_tiny_generation(ray_start, tiny_model, tmp_path):
    from raykd.recipes.mckd.run import main_mckd

    docs = _docs(45)
    cfg = _config(tmp_path, tiny_model, tiny_model, task="generation",
                  labeler={"model": str(tiny_model), "name": "tiny-mckd-writer", "mode": "generate", "instruction": "Write a headline.",
                           "template": "{text}", "shots": [2], "demo_tokens": 8, "doc_tokens": 8, "max_new_tokens": 4,
                           "batch_size": 8, "num_threads": 1, "num_cpus": 0.5, "cache_dir": str(tmp_path / "pseudo")})
    cfg.student.keep_layers = [0, 3]
    cfg.student.val_docs = 4
    got = main_mckd(cfg, tmp_path / "gen", docs=docs)
    rows = {r["row"]: r for r in got["rows"]}
    assert list(rows) == ["LLM labeler (few-shot)", "vanilla KD (LLM labels)", "MCKD, 1 stage", "supervised, 12 gold"]
    assert all(0.0 <= r["test"]["rouge_l"][0] <= 1.0 for r in rows.values())
    assert got["costs"]["student_trainings"] == 5
