"""MiniDisc without Ray: the lambda-tradeoff selection, config checks, the classifier teacher and
its soft-label cache, a TA chain on a tiny encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raykd.config import ConfigError, load_config
from raykd.recipes.ta_search.minidisc import lambda_tradeoff, select_teacher_assistant, sweep_lambdas
from raykd.recipes.ta_search.config import ClassifierScheduleConfig

# dev accuracy of the sandwich student at each sparsity (a fixed table)
TABLE = [
    {"sparsity": 0.1, "dev_metric": 0.95},
    {"sparsity": 0.3, "dev_metric": 0.94},
    {"sparsity": 0.5, "dev_metric": 0.90},
    {"sparsity": 0.7, "dev_metric": 0.70},
    {"sparsity": 0.9, "dev_metric": 0.40},
]


def test_lambda_tradeoff_is_metric_plus_lambda_sparsity():
    assert lambda_tradeoff(0.9, 0.5, 0.2) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("lam", "expected"),
    [(0.0, 0.1), (0.04, 0.1), (0.06, 0.3), (0.1, 0.3), (0.3, 0.5), (1.5, 0.7)],
)
def test_selection_on_a_fixed_table(lam, expected):
    # e.g. lambda 0.3: 0.98, 1.03, 1.05, 0.91 -> 0.5; lambda 1.5: 1.10, 1.39, 1.65, 1.75 -> 0.7
    assert select_teacher_assistant(TABLE, lam, current=0.0, target=0.9) == expected


def test_selection_by_hand_at_lambda_0_1():
    scores = {r["sparsity"]: r["dev_metric"] + 0.1 * r["sparsity"] for r in TABLE if r["sparsity"] < 0.9}
    assert max(scores, key=scores.get) == select_teacher_assistant(TABLE, 0.1, 0.0, 0.9)


def test_selection_stays_between_current_teacher_and_target():
    # the target itself (0.9) and points at or below the current teacher (0.3) are never picked
    assert select_teacher_assistant(TABLE, 100.0, current=0.0, target=0.9) == 0.7
    assert select_teacher_assistant(TABLE, 0.0, current=0.3, target=0.9) == 0.5
    with pytest.raises(ValueError, match="no candidate TA sparsity"):
        select_teacher_assistant(TABLE, 0.1, current=0.7, target=0.9)


def test_ties_go_to_the_less_sparse_ta():
    table = [{"sparsity": 0.2, "dev_metric": 0.8}, {"sparsity": 0.4, "dev_metric": 0.8}]
    assert select_teacher_assistant(table, 0.0, 0.0, 0.9) == 0.2


def test_negative_lambda_is_refused():
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        select_teacher_assistant(TABLE, -0.1, 0.0, 0.9)
    with pytest.raises(ConfigError, match="lambda_tradeoff"):
        load_config(ClassifierScheduleConfig, None, ["minidisc.lambda_tradeoff=-0.5"])
    with pytest.raises(ConfigError, match="lambda_sweep"):
        load_config(ClassifierScheduleConfig, None, ["minidisc.lambda_sweep=[0.1, -1]"])


def test_sweep_lists_the_pick_of_each_lambda():
    assert [r["ta_sparsity"] for r in sweep_lambdas(TABLE, [0.0, 0.1, 1.5], 0.0, 0.9)] == [0.1, 0.3, 0.7]


@pytest.mark.parametrize(
    "override",
    ["sparsify.target=0.95", "sparsify.target=0.1", "sparsify.grid=[0.5, 0.3, 0.9]", "sparsify.grid=[0.5, 1.0]", "kd.kd_weight=0"],
)
def test_bad_schedule_configs_fail_at_load(override):
    with pytest.raises(ConfigError):
        load_config(ClassifierScheduleConfig, None, [override])


def test_shipped_config_loads():
    cfg = load_config(ClassifierScheduleConfig, "tune/configs/minidisc_bbc.yaml")
    assert cfg.sparsify.target == 0.9 and cfg.sparsify.candidates == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def _tiny_classifier(folder, with_head: bool = True):
    from tests.ray.test_minidisc_tune import build_tiny_classifier

    build_tiny_classifier(folder, ["film", "money", "sport"])
    if not with_head:
        import json

        cfg = json.loads((folder / "config.json").read_text())
        cfg["architectures"] = ["BertModel"]
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_teacher_without_classification_head_is_refused(tmp_path):
    from raykd.teacher.engines.classifier import ClassifierEngine, NotAClassifierError

    with pytest.raises(NotAClassifierError, match="classification head"):
        ClassifierEngine(_tiny_classifier(tmp_path / "enc", with_head=False), device="cpu", num_threads=1)


def test_classifier_engine_scores_and_validates(tmp_path):
    from raykd.teacher.engines.classifier import ClassifierEngine

    engine = ClassifierEngine(_tiny_classifier(tmp_path / "cls"), device="cpu", num_threads=1)
    ids = np.array([[2, 10, 11, 3], [2, 12, 3, 0]])
    out = engine.score(ids, np.array([[1, 1, 1, 1], [1, 1, 1, 0]]), k=3, temperature=2.0)
    assert out["logits"].shape == (2, 3) and out["class_logprobs"].shape == (2, 3)
    np.testing.assert_allclose(np.exp(out["class_logprobs"]).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["class_logprobs"], torch.log_softmax(torch.tensor(out["logits"]) / 2, -1).numpy(), atol=1e-6)
    assert engine.info().engine == "classifier" and engine.info().max_k == 3
    with pytest.raises(ValueError, match="number of classes"):
        engine.score(ids, k=4)
    with pytest.raises(ValueError, match="token ids"):
        engine.score(ids + 10_000)


def test_class_label_cache_round_trip(tmp_path):
    from raykd.soft_labels.class_labels import class_cache_key, find_class_cache, label_rows, read_class_cache

    class FakeRef:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    class FakeScore:
        calls = 0

        def remote(self, input_ids, attention_mask, k):
            FakeScore.calls += 1
            return FakeRef({"logits": np.stack([input_ids.sum(1), -input_ids.sum(1)], 1).astype(np.float32)})

    class FakeHandle:
        score = FakeScore()

    rows = {"doc_id": np.array([f"d{i}" for i in range(7)], dtype=object), "input_ids": np.arange(28).reshape(7, 4),
            "attention_mask": np.ones((7, 4), dtype=np.int64), "label": np.arange(7) % 2}
    key = class_cache_key("w", "t", "float32", 2, "data", 4)
    folder, manifest = find_class_cache(tmp_path, key)
    assert manifest is None
    label_rows(FakeHandle(), rows, tmp_path, key, num_classes=2, batch_size=3, rows_per_shard=4)
    assert FakeScore.calls == 3
    folder, manifest = find_class_cache(tmp_path, key)
    assert manifest.rows == 7 and len(manifest.shards) == 2
    back = read_class_cache(folder, manifest)
    np.testing.assert_array_equal(back["input_ids"], rows["input_ids"])
    np.testing.assert_array_equal(back["teacher_logits"][:, 0], rows["input_ids"].sum(1))
    assert back["doc_id"].tolist() == rows["doc_id"].tolist()


def test_ta_chain_on_a_tiny_encoder(tmp_path):
    from raykd.recipes.ta_search.config import KDConfig, SparsifyConfig
    from raykd.recipes.ta_search.classifier_chain import distill_chain, importance_of
    from raykd.students.sparsify import prunable_params
    from raykd.teacher.engines.classifier import load_classifier

    teacher = load_classifier(_tiny_classifier(tmp_path / "cls"))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    rng = np.random.default_rng(0)

    def split(n):
        return {"input_ids": rng.integers(4, teacher.config.vocab_size, (n, 8)), "attention_mask": np.ones((n, 8), dtype=np.int64),
                "label": rng.integers(0, 3, n), "teacher_logits": rng.normal(size=(n, 3)).astype(np.float32)}

    splits = {"train": split(16), "dev": split(6), "test": split(6)}
    kd = KDConfig(steps=2, batch_size=4, reports=2, eval_batch_size=8)
    sp = SparsifyConfig(grid=[0.4, 0.8], target=0.8, importance_batches=1)
    reports = []
    res = distill_chain(teacher, 0.4, importance_of(teacher, splits["train"], kd, 1), splits, kd, sp, report=reports.append)
    assert [r["step"] for r in reports] == [1, 2]
    assert res.student_params < res.ta_params < sum(p.numel() for p in teacher.parameters())
    assert 0 <= res.student_test_acc <= 1
    with pytest.raises(ValueError, match="TA sparsity"):
        distill_chain(teacher, 0.8, importance_of(teacher, splits["train"], kd, 1), splits, kd, sp)
    # the teacher is not changed by pruning, distilling or scoring
    assert prunable_params(teacher) > res.ta_params - sum(p.numel() for p in teacher.get_input_embeddings().parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_layer_dropped_student_on_the_classifier_path(tmp_path):
    """Issue 5 wired ``student_kind=layer_drop``; here it runs: direct and through a sparse TA."""
    from raykd.recipes.ta_search.classifier_chain import distill_chain, importance_of
    from raykd.recipes.ta_search.config import KDConfig, SparsifyConfig
    from raykd.teacher.engines.classifier import load_classifier

    teacher = load_classifier(_tiny_classifier(tmp_path / "cls"))
    rng = np.random.default_rng(1)

    def split(n):
        return {"input_ids": rng.integers(4, teacher.config.vocab_size, (n, 8)), "attention_mask": np.ones((n, 8), dtype=np.int64),
                "label": rng.integers(0, 3, n), "teacher_logits": rng.normal(size=(n, 3)).astype(np.float32)}

    splits = {"train": split(16), "dev": split(6), "test": split(6)}
    kd = KDConfig(steps=2, batch_size=4, reports=1, eval_batch_size=8)
    sp = SparsifyConfig(grid=[0.4, 0.8], target=0.8, importance_batches=1, student_kind="layer_drop", keep_layers=[1])
    imp = importance_of(teacher, splits["train"], kd, 1)
    direct = distill_chain(teacher, 0.0, imp, splits, kd, sp)
    via_ta = distill_chain(teacher, 0.4, imp, splits, kd, sp)
    one_layer = sum(p.numel() for p in teacher.bert.encoder.layer[1].parameters())
    assert direct.student_params == sum(p.numel() for p in teacher.parameters()) - one_layer  # 1 of 2 layers kept
    assert via_ta.student_params < direct.student_params < direct.ta_params  # the TA's pruned layer 1 is the one kept
    assert 0 <= direct.student_test_acc <= 1 and 0 <= via_ta.student_test_acc <= 1
