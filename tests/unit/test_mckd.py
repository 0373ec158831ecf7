"""MCKD without Ray: verbaliser scoring with a reused prefix, calibration maths, the A/B
cross-relabel bookkeeping, stage resume, the pseudo-label cache, prompt-target rows, ROUGE-L and
every bad input (an error before any LLM call)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raykd.data.documents import Document
from raykd.recipes.mckd.config import MckdConfig
from raykd.recipes.mckd.prepare import (
    check_plan,
    cross_relabel,
    gold_split,
    split_halves,
)
from raykd.soft_labels.pseudo_labels import (
    PseudoLabels,
    check_verbalisers,
    commit_labels,
    has_labels,
    pick_demonstrations,
    pseudo_label_key,
    read_labels,
)
from raykd.teacher.engines.continuations import calibrate, continuation_logprobs
from raykd.train.seq2seq import pair_rows, rouge_l
from tests.conftest import build_tiny_model

BBC = ["business", "entertainment", "politics", "sport", "tech"]
VERBS = {n: f" {n}" for n in BBC}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("mckd_lm"))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), folder


def _reference(model, prefix, texts, conts):
    """Every row and continuation read whole, without any cache."""
    out = np.zeros((len(texts), len(conts)))
    with torch.no_grad():
        for i, t in enumerate(texts):
            for c, k in enumerate(conts):
                lp = torch.log_softmax(model(torch.tensor([prefix + t + k])).logits[0].float(), -1)
                n = len(prefix + t)
                out[i, c] = sum(float(lp[n - 1 + j, k[j]]) for j in range(len(k)))
    return out


# ---- verbaliser scoring and calibration ------------------------------------------------------


@pytest.mark.parametrize("prefix", [[1, 5, 6, 7, 8, 9], []])
def test_scores_with_a_reused_prefix_equal_whole_forwards(tiny_lm, prefix):
    model = tiny_lm[0]
    texts = [[10, 11, 12], [13, 14], [15, 16, 17, 18, 19], [20]]
    conts = [[30], [31, 32, 33], [34, 35]]  # one and several tokens
    got = continuation_logprobs(model, prefix, texts, conts, batch_size=3)  # a batch of 3 and one of 1, left-padded
    np.testing.assert_allclose(got, _reference(model, prefix, texts, conts), atol=1e-4)


def test_the_engine_scores_text_continuations(tiny_lm):
    from raykd.teacher.engines.hf import HFEngine

    engine = HFEngine(tiny_lm[2], device="cpu", num_threads=1)
    tok = engine.tokenizer
    out = engine.score_continuations("The market said", [" a deal on day 3.", " new rules"], [" won", " lost the final"])
    ref = _reference(engine.model, tok("The market said")["input_ids"],
                     [tok(t, add_special_tokens=False)["input_ids"] for t in (" a deal on day 3.", " new rules")],
                     [tok(c, add_special_tokens=False)["input_ids"] for c in (" won", " lost the final")])
    np.testing.assert_allclose(out["scores"], ref, atol=1e-4)
    assert out["scores"].shape == (2, 2) and (out["scores"] < 0).all()


def test_calibration_maps_the_content_free_input_to_uniform_and_removes_a_class_bias():
    rng = np.random.default_rng(0)
    x, bias = rng.normal(size=(6, 5)), rng.normal(size=5) * 3
    cf = bias + 7.0  # the content-free input sees only the bias (any constant shift)
    cal = calibrate(x + bias, cf)
    np.testing.assert_allclose(np.exp(cal).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(cal, calibrate(x, None), atol=1e-5)  # the bias is gone
    np.testing.assert_allclose(calibrate(cf[None], cf), np.log(np.full((1, 5), 0.2)), atol=1e-6)
    # without calibration: a log-softmax over the classes, ranking unchanged
    raw = calibrate(x + bias, None)
    assert (raw.argmax(-1) == (x + bias).argmax(-1)).all()


# ---- prompts and the cache ---------------------------------------------------------------------


def _docs(n_per_class=16, classes=BBC):
    return [Document(f"{c}/{i:03d}", f"{c} headline {i}\nbody of a {c} story number {i}", c)
            for c in classes for i in range(n_per_class)]


def test_demonstrations_are_round_robin_and_never_held_out():
    gold = gold_split(_docs(), test_share=0.2, gold=50, seed=0)["gold"]
    demos, held = pick_demonstrations(gold, 2, seed=0)
    assert [d.label for d in demos] == BBC * 2
    assert not {d.doc_id for d in demos} & {d.doc_id for d in held} and len(demos) + len(held) == 50
    assert pick_demonstrations(gold, 1, seed=0)[0] == demos[:5]  # fewer shots: the first of the same order


def test_gold_split_is_stratified_disjoint_and_seeded():
    docs = _docs()
    s = gold_split(docs, test_share=0.25, gold=12, seed=3)
    ids = [d.doc_id for part in s.values() for d in part]
    assert len(ids) == len(set(ids)) == len(docs)
    assert sorted(d.label for d in s["gold"]) == sorted(BBC * 2 + BBC[:2])  # 12 over 5 classes: 3, 3, 2, 2, 2
    assert s == gold_split(docs, test_share=0.25, gold=12, seed=3)


def test_pseudo_labels_round_trip_through_the_cache(tmp_path):
    key = pseudo_label_key("fp", "tok", "hf", "data", "score", "settings", 3, 16)
    labels = PseudoLabels(["a", "b"], np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)))
    assert not has_labels(tmp_path, key)
    commit_labels(tmp_path, key, labels, [5, 7], {"model": "x"}, 1.5)
    got, record = read_labels(tmp_path, key)
    assert has_labels(tmp_path, key) and got.doc_ids == ["a", "b"] and record["tokens"] == 12
    np.testing.assert_allclose(got.logprobs, labels.logprobs)
    assert got.hard.tolist() == [0, 2]
    tkey = pseudo_label_key("fp", "tok", "hf", "data", "generate", "settings", 0, 16)
    commit_labels(tmp_path, tkey, PseudoLabels(["a"], texts=["A headline"]), [3], {}, 0.1)
    assert read_labels(tmp_path, tkey)[0].texts == ["A headline"]


def test_prompt_target_rows_learn_only_the_target_and_its_end(tiny_lm):
    tok = tiny_lm[1]
    rows = pair_rows(tok, ["The market said", "A minister"], [" record profits", " won"], prompt_tokens=6, target_tokens=4)
    for i, (p, t) in enumerate([("The market said", " record profits"), ("A minister", " won")]):
        head = tok(p, add_special_tokens=True)["input_ids"][-6:]
        tail = tok(t, add_special_tokens=False)["input_ids"][:4] + [tok.eos_token_id]
        labeled = rows["labels"][i][rows["labels"][i] != -100].tolist()
        assert labeled == tail
        # position t predicts token t + 1: the first labeled position is the prompt's last token
        assert rows["labels"][i][len(head) - 1] == tail[0] and rows["input_ids"][i][len(head)] == tail[0]


def test_rouge_l():
    assert rouge_l("Markets rally on deal", "markets rally on deal") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("a b", "c d") == 0.0
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)


# ---- the A/B bookkeeping and stage resume ------------------------------------------------------


def test_no_document_is_ever_labeled_by_a_student_that_trained_on_it():
    ids = [f"d{i:02d}" for i in range(21)]
    halves = split_halves(ids, 0.5, seed=4)
    assert not set(halves["A"]) & set(halves["B"]) and sorted(halves["A"] + halves["B"]) == ids
    labels = PseudoLabels(ids, np.zeros((21, 2), dtype=np.float32))
    trained: dict[str, set[str]] = {}

    def train(name, train_labels, val_labels):
        student = f"{name}@{len(trained)}"
        trained[student] = set(train_labels.doc_ids)
        assert not set(train_labels.doc_ids) & set(val_labels.doc_ids)  # validated on the other half
        return student, {}

    writers: dict[str, list[str]] = {d: [] for d in ids}

    def relabel(student, docs):
        for d in docs:
            writers[d].append(student)
        lp = np.zeros((len(docs), 2), dtype=np.float32)
        lp[:, 0 if student.startswith("A") else 1] = 1.0
        return PseudoLabels(list(docs), lp)

    for _ in range(3):  # three stages
        labels, log = cross_relabel(labels, halves, train, relabel)
        assert sorted(labels.doc_ids) == ids  # every document relabeled exactly once per stage
        assert {log.labeled_by[d] for d in halves["A"]} == {"B"} and {log.labeled_by[d] for d in halves["B"]} == {"A"}
    for doc, students in writers.items():
        assert len(students) == 3
        assert all(doc not in trained[s] for s in students)
    assert (labels.select(halves["A"]).hard == 1).all()  # A's labels came from B's student


def test_stage_students_are_checked_against_the_llms_original_labels_at_every_stage():
    ids = [f"d{i:02d}" for i in range(10)]
    halves = split_halves(ids, 0.5, seed=0)
    original = PseudoLabels(ids, np.log(np.full((10, 2), 0.5, dtype=np.float32)))
    seen = []

    def train(name, train_labels, val_labels):
        seen.append(val_labels.logprobs)
        return name, {}

    def relabel(student, docs):  # every relabel is class 1, the original labels are uniform
        return PseudoLabels(list(docs), np.log(np.array([[0.01, 0.99]] * len(docs), dtype=np.float32)))

    labels = original
    for _ in range(2):
        labels, _log = cross_relabel(labels, halves, train, relabel, original=original)
    assert len(seen) == 4 and all(np.allclose(v, np.log(0.5)) for v in seen)  # never the previous stage's relabels


def test_pool_cut_keeps_test_and_gold():
    docs = _docs(40)
    full = gold_split(docs, test_share=0.2, gold=10, seed=1)
    cut = gold_split(docs, test_share=0.2, gold=10, seed=1, pool_docs=50)
    assert cut["test"] == full["test"] and cut["gold"] == full["gold"] and len(cut["unlabeled"]) == 50
    assert {d.doc_id for d in cut["unlabeled"]} <= {d.doc_id for d in full["unlabeled"]}


def test_control_noise_matches_the_labelers_accuracy_and_lean():
    from raykd.recipes.mckd.prepare import confusion_matrix, control_labels

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 6000)
    labeler = np.where(rng.random(6000) < 0.7, gold, 2)  # 70% right, every error says class 2
    assert (control_labels("gold labels", gold, labeler, 3, 0) == gold).all()
    balanced = control_labels("balanced noise", gold, labeler, 3, 0)
    skewed = control_labels("skewed noise", gold, labeler, 3, 0)
    acc = (labeler == gold).mean()
    assert abs((balanced == gold).mean() - acc) < 0.02 and abs((skewed == gold).mean() - acc) < 0.02
    wrong = balanced != gold
    assert abs(np.bincount(balanced[wrong], minlength=3)[2] / wrong.sum() - 1 / 3) < 0.05  # spread over the other classes
    want, got = confusion_matrix(labeler, gold, 3), confusion_matrix(skewed, gold, 3)
    np.testing.assert_allclose(got / got.sum(1, keepdims=True), want / want.sum(1, keepdims=True), atol=0.03)
    with pytest.raises(ValueError, match="valid: gold labels"):
        control_labels("typo", gold, labeler, 3, 0)


def test_balanced_batches_draw_every_class_equally_and_linear_decay_ends_at_zero():
    from raykd.train.local import balanced_indices, epoch_budget
    from raykd.train.step import lr_multiplier

    labels = np.array([0] * 90 + [1] * 10)
    drawn = np.concatenate(list(balanced_indices(labels, 10, 50, seed=0)))
    assert abs((labels[drawn] == 1).mean() - 0.5) < 0.02  # the 10% class fills half the batches
    f = lr_multiplier("linear", 2, 10)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(9) == pytest.approx(0.125) and f(10) == 0.0
    assert epoch_budget(300, 16, 3, 4, 40, 20) == (57, 5) and epoch_budget(300, 16, None, 4, 40, 20) == (40, 20)


def _fake_task(cfg, calls):
    def train(docs, labels, val, seed, folder):
        folder.mkdir(parents=True, exist_ok=True)
        done = folder / "done.json"
        if done.exists():
            return {"reused": True}
        calls.append(folder.name)
        done.write_text("{}")
        return {"reused": False, "val_score": 1.0}

    return SimpleNamespace(cfg=cfg, generation=False, classes=["x", "y"], engine="classifier", train=train)


def test_a_rerun_skips_finished_stages_and_a_killed_run_resumes_at_the_last_finished(tmp_path):
    from raykd.recipes.mckd.run import Artifacts, run_stages

    cfg = MckdConfig.model_validate({"labeler": {"verbalisers": {"x": " x", "y": " y"}}, "stages": 3})
    docs = {f"d{i}": Document(f"d{i}", f"text {i}", "x") for i in range(10)}
    pseudo = PseudoLabels(sorted(docs), np.log(np.full((10, 2), 0.5, dtype=np.float32)))
    calls: list[str] = []
    stats = {"stage_hits": 0, "student_trainings": 0, "relabels": 0}
    art = Artifacts(_fake_task(cfg, calls), tmp_path, "tok", stats)
    relabeled = []

    def labels_by(folder, ds, fail_at=None):
        relabeled.append(folder.name)
        if fail_at is not None and len(relabeled) == fail_at:
            raise RuntimeError("killed")
        return PseudoLabels([d.doc_id for d in ds], np.log(np.full((len(ds), 2), 0.5, dtype=np.float32)))

    art.labels_by = lambda folder, ds: labels_by(folder, ds, fail_at=4)  # dies relabeling in stage 2 (B's student)
    with pytest.raises(RuntimeError, match="killed"):
        run_stages(art, pseudo, "pseudo", docs, seed=0)
    assert len(calls) == 4 and stats["stage_hits"] == 0  # stage 1's two students, stage 2's two
    art.labels_by = labels_by
    chain = run_stages(art, pseudo, "pseudo", docs, seed=0)
    assert [c["stage"] for c in chain] == [0, 1, 2, 3]
    assert stats["stage_hits"] == 1  # stage 1 was finished: not rerun
    assert len(calls) == 6  # stage 2's students were finished and reused; only stage 3 trained
    calls.clear()
    chain2 = run_stages(art, pseudo, "pseudo", docs, seed=0)
    assert calls == [] and stats["stage_hits"] == 4  # a rerun trains and relabels nothing
    assert [c["key"] for c in chain2] == [c["key"] for c in chain]
    other = run_stages(art, pseudo, "pseudo", docs, seed=1)  # another seed: other halves, other stages
    assert {c["key"] for c in other[1:]}.isdisjoint({c["key"] for c in chain[1:]})


# ---- bad input: an error before any LLM call --------------------------------------------------


def test_verbalisers_empty_after_tokenisation_or_shared_are_refused(tiny_lm):
    tok = tiny_lm[1]
    with pytest.raises(ValueError, match="empty after tokenisation"):
        check_verbalisers(tok, {"a": " x", "b": ""})
    with pytest.raises(ValueError, match="share the verbaliser"):
        check_verbalisers(tok, {"a": " x", "b": " x"})
    assert len(check_verbalisers(tok, {"a": " market", "b": " team"})) == 2


def test_checks_before_any_model():
    cfg = MckdConfig.model_validate({"labeler": {"verbalisers": VERBS}, "data": {"gold": 4}})
    with pytest.raises(ValueError, match="fewer than the 5 classes"):
        check_plan(cfg, BBC)
    cfg = MckdConfig.model_validate({"labeler": {"verbalisers": VERBS}, "student": {"labels": BBC[:4]}})
    with pytest.raises(ValueError, match="student.labels"):
        check_plan(cfg, BBC)
    cfg = MckdConfig.model_validate({"labeler": {"verbalisers": {**VERBS, "weather": " weather"}}})
    with pytest.raises(ValueError, match="data's classes"):
        check_plan(cfg, BBC)
    cfg = MckdConfig.model_validate({"labeler": {"verbalisers": VERBS}, "split_share": 0.01})
    with pytest.raises(ValueError, match="empty"):
        check_plan(cfg, BBC, n_unlabeled=20)
    with pytest.raises(ValueError, match="stages=0"):
        MckdConfig.model_validate({"labeler": {"verbalisers": VERBS}, "stages": 0})
    with pytest.raises(ValueError, match="shared by two classes"):
        MckdConfig.model_validate({"labeler": {"verbalisers": {**VERBS, "tech": " business"}}})
    with pytest.raises(ValueError, match="leaves a half empty"):
        MckdConfig.model_validate({"labeler": {"verbalisers": VERBS}, "split_share": 1.0})


@pytest.mark.parametrize("override,message", [
    ("data.gold=3", "fewer than the 5 classes"),
    ("labeler.verbalisers.tech=''", "empty after tokenisation"),
    ("labeler.verbalisers.tech=' business'", "shared by two classes"),
    ("split_share=0.0005", "leaves half"),
    ("stages=0", "stages=0"),
    ("student.labels=[business,sport]", "student.labels"),
])
def test_cli_refuses_bad_input_before_any_llm_call(tmp_path, capsys, monkeypatch, override, message):
    from raykd.cli import cli
    from raykd.recipes.mckd import labels

    def no_llm(self):
        raise AssertionError("the LLM was called")

    monkeypatch.setattr(labels.LLMLabeler, "_serve", no_llm)
    code = cli(["mckd", "--config", "jobs/configs/mckd_bbc.yaml", "--output-dir", str(tmp_path), override])
    err = capsys.readouterr().err
    assert code == 2, err
    # The first use of the packaged SmolLM2 converts its GGUF once into the user cache (the
    # verbalisers need its tokenizer), with transformers' progress bar above the error: the error
    # starts a line and runs to the end, and nothing but that bar comes before it.
    start = err.find("error:")
    assert start >= 0 and (start == 0 or err[start - 1] == "\n"), err
    assert message in err[start:] and "Traceback" not in err
    above = [seg for seg in err[:start].replace("\r", "\n").split("\n") if seg.strip()]
    assert all(seg.startswith("Converting and de-quantizing GGUF tensors") for seg in above), err
    assert not (Path(tmp_path) / "results.json").exists()


def test_greedy_after_a_shared_prefix_equals_plain_greedy_generation(tiny_lm):
    from raykd.teacher.engines.continuations import greedy_after_prefix
    from raykd.teacher.engines.hf import HFEngine

    model = tiny_lm[0]
    prefix, texts = [1, 5, 6, 7, 8], [[10, 11, 12], [13], [15, 16, 17, 18]]
    got = greedy_after_prefix(model, prefix, texts, max_new_tokens=5, eos_id=None, batch_size=2)
    for row, new in zip(texts, got):
        ref = model.generate(torch.tensor([prefix + row]), max_new_tokens=5, do_sample=False, min_new_tokens=5)[0, len(prefix + row):]
        assert new == ref.tolist()
    engine = HFEngine(tiny_lm[2], device="cpu", num_threads=1)
    prompts = ["The market said a deal", "The market said new rules on day"]
    out = engine.complete(prompts, max_new_tokens=4)
    plain = engine.generate(prompts, max_new_tokens=4, temperature=0.0, k=1)
    assert [o["token_ids"] for o in out] == [[t for t in p["token_ids"] if t != engine.tokenizer.eos_token_id] for p in plain]


@pytest.mark.parametrize("task,metrics,candidates", [
    ("classification", {"accuracy": [0.5, 0.7], "macro_f1": [0.4, 0.6]}, [{"shots": 1, "calibrate": False, "held_out": 0.5},
                                                                          {"shots": 1, "calibrate": True, "held_out": 0.7}]),
    ("generation", {"rouge_l": [0.2]}, [{"shots": 2, "calibrate": False, "held_out": None}]),
])
def test_the_report_writes_a_table_json_and_plot(tmp_path, task, metrics, candidates):
    import json

    from raykd.recipes.mckd.report import publish, write_all

    first = next(iter(metrics))
    rows = [{"row": "LLM labeler (few-shot)", "kind": "labeler", "test": {m: v[:1] for m, v in metrics.items()}, "label_quality": {first: [0.6]}},
            {"row": "vanilla KD (LLM labels)", "kind": "student", "test": metrics, "label_quality": {first: [0.6, 0.6]}},
            {"row": "MCKD, 1 stage", "kind": "student", "test": metrics, "label_quality": {first: [0.65, 0.7]}},
            {"row": "supervised, 50 gold", "kind": "reference", "test": metrics, "label_quality": {}}]
    results = {"task": task, "rows": rows, "split_sizes": {"test": 10, "gold": 5, "unlabeled": 20}, "config": {"seeds": [0, 1]},
               "labeler": {"model": "m", "shots": 1, "calibrate": True, "candidates": candidates, "held_out_gold": 4},
               "costs": {"label_s": 1.0, "label_tokens": 10, "llm_calls": 2, "student_trainings": 3}}
    write_all(tmp_path, results)
    md = (tmp_path / "results.md").read_text()
    assert "| MCKD, 1 stage | 0.600 +/- 0.141" in md if task == "classification" else "| MCKD, 1 stage | 0.200 |" in md
    assert json.loads((tmp_path / "results.json").read_text())["task"] == task
    assert [p.suffix for p in publish(tmp_path, tmp_path / "pub" / "x")] == [".json", ".md", ".png"]


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_items():
    from raykd.report import bootstrap_ci

    rng = np.random.default_rng(0)
    small, large = rng.random((3, 40)) < 0.7, rng.random((3, 4000)) < 0.7
    lo, hi = bootstrap_ci(small)
    assert lo <= small.mean() <= hi and 0.0 <= lo < hi <= 1.0
    lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 4 and lo2 < 0.7 < hi2
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)
