"""Method configs end to end on the tiny teacher: each runs through ``raykd distill``'s entry
point (``main_distill``) for a couple of steps and produces a student that was really trained.

Every method config runs here (the chains and sequence-level KD in tests/ray/test_chains.py), on
one shared Ray cluster and one shared soft-label cache, so after the first run of a kind the
teacher is not asked again; every config is also checked without Ray in tests/unit/test_methods.py.
"""

from __future__ import annotations

import json

import pytest

from raykd.cli import main_distill
from raykd.config import DistillConfig, load_config
from raykd.methods import get_method
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray

SINGLE_TEACHER = ["kd", "pd", "annealing_kd", "continuation_kd"]
MULTI_TEACHER = ["tmkd", "mt_bert", "uncertainty", "rl_kd"]
RUN_ELSEWHERE = {"glmd", "glmd_vocab", "robust_kd"}  # their own tests below
PEAKED = {"name": "peaked-teacher"}
"""The peaked teacher's application (the tiny model's is the shared ``tiny-teacher``, tests/conftest.py)."""


def method_config(method: str, tiny_model, corpus, cache_dir, **extra) -> DistillConfig:
    """The method's shipped config with the data, teacher and budget of the tiny fixture."""
    shipped = load_config(DistillConfig, get_method(method).config_path)
    tiny = tiny_distill_config(tiny_model, corpus, cache_dir, max_steps=2, checkpoint_every=2, log_every=1)
    tree = tiny.model_dump()
    tree.update(method=method, run_name=method)
    tree["train"].update(students=shipped.train.students, phases=[p.model_dump() for p in shipped.train.phases],
                         loss_params=shipped.train.loss_params)
    tree["data"].update(perturb_share=shipped.data.perturb_share, perturb_seed=shipped.data.perturb_seed)
    tree["multi_teacher"] = shipped.multi_teacher.model_dump()
    for section, fields in extra.items():
        tree[section] = {**tree[section], **fields} if isinstance(tree.get(section), dict) else fields
    return DistillConfig.model_validate(tree)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("methods_cache")


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory):
    """Another tiny teacher: same tokenizer, other weights (served as its own deployment)."""
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher_b"), seed=1)


@pytest.fixture(scope="module")
def peaked_teacher(tmp_path_factory):
    """A tiny teacher with large initial weights: peaked next-token distributions (the default
    tiny model is close to uniform, so a student would already be within KL 1e-3 of it)."""
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher_peaked"), seed=2, initializer_range=0.5)


@pytest.mark.parametrize("method", SINGLE_TEACHER)
def test_single_teacher_method_runs(method, ray_start, peaked_teacher, second_teacher, corpus_jsonl, shared_cache, tmp_path):
    # a near-uniform random student and a peaked teacher: both the text and the teacher have something to teach
    cfg = method_config(method, peaked_teacher, corpus_jsonl, shared_cache, train={"max_steps": 4, "checkpoint_every": 4},
                        student={"init": "pretrained", "model": str(second_teacher)}, teacher=PEAKED)
    report = main_distill(cfg, tmp_path)
    (student,) = report["students"]
    assert report["method"] == method and report[student]["steps"] == 4
    trained, init = report[student], report["student_init"]
    if "ce" in cfg.train.students[student]:  # hard labels: the real text gets likelier
        assert trained["ppl"] < init["ppl"]
    if set(cfg.train.students[student]) - {"ce"}:  # teacher terms: the student moves towards the teacher
        assert trained["kl"] < init["kl"]
    assert (tmp_path / "students" / student / "tokenizer.json").exists()  # servable as a teacher


@pytest.mark.parametrize("method", MULTI_TEACHER)
def test_multi_teacher_method_runs_on_joined_caches(method, ray_start, tiny_model, tiny_teacher, second_teacher, corpus_jsonl,
                                                    shared_cache, tmp_path):
    extra = [{"name": "tiny-teacher-b", "model": str(second_teacher), "num_threads": 1, "num_cpus": 0.5}]
    cfg = method_config(method, tiny_model, corpus_jsonl, shared_cache, extra_teachers=extra,
                        train={"max_steps": 3, "checkpoint_every": 3})
    report = main_distill(cfg, tmp_path)
    (student,) = report["students"]
    assert report[student]["steps"] == 3 and report[student]["ppl"] < report["student_init"]["ppl"]
    other = report["teacher_tiny-teacher-b"]
    assert 0.0 <= other["top1_agreement"] < 1.0 and other["ppl"] != pytest.approx(report["teacher"]["ppl"])
    history = __import__("json").loads((tmp_path / "ray_train").glob(f"{student}/checkpoint_*/history.json").__next__().read_text())
    if method == "rl_kd":  # the policy chose teachers and was rewarded every step
        assert all({"reward", "policy_loss", "chose_t0", "chose_t1"} <= set(row) for row in history)


def test_glmd_runs_a_task_agnostic_stage_with_the_teacher_online_then_the_task_stage(
        ray_start, peaked_teacher, second_teacher, corpus_jsonl, shared_cache, tmp_path):
    import json

    cfg = method_config("glmd", peaked_teacher, corpus_jsonl, shared_cache, teacher=PEAKED, train={"max_steps": 2, "checkpoint_every": 2},
                        agnostic_stage={"steps": 3, "temperature": 15.0, "teacher": "online"},
                        student={"init": "pretrained", "model": str(second_teacher)})
    report = main_distill(cfg, tmp_path)
    agnostic, task = report["stages"]
    assert (agnostic["temperature"], agnostic["teacher"], agnostic["steps"]) == (15.0, "online", 3)
    assert (task["temperature"], task["steps"]) == (1.0, 2) and report["glmd"]["steps"] == 2
    history = max((tmp_path / "agnostic" / "ray_train" / "glmd").glob("checkpoint_*/history.json"))
    assert [row["temperature"] for row in json.loads(history.read_text())] == [15.0] * 3
    # the task stage starts from the agnostic stage's student, on the same (hit) cache
    assert report["student_init"]["ppl"] == pytest.approx(agnostic["ppl"], rel=1e-4)
    assert report["cache"]["hit"] is True and report["cache"]["teacher_calls"] == 0
    assert json.loads((tmp_path / "report.json").read_text())["stages"][1]["stage"] == "task"
    assert "| agnostic | 15 | online | 3 |" in (tmp_path / "report.md").read_text()


def test_glmd_vocab_trains_a_smaller_student_evaluated_over_the_teacher_vocabulary(ray_start, tiny_model, tiny_teacher, corpus_jsonl,
                                                                                 shared_cache, tmp_path):
    cfg = method_config("glmd_vocab", tiny_model, corpus_jsonl, shared_cache, student={"vocab_size": 64, "vocab_map": "decoder"},
                        train={"max_steps": 3, "checkpoint_every": 3})
    report = main_distill(cfg, tmp_path)
    student = report["glmd_vocab"]
    assert student["params"] < report["teacher"]["params"] and student["steps"] == 3
    assert student["ppl"] < report["student_init"]["ppl"] and student["tokens"] == report["student_init"]["tokens"]
    assert json.loads((tmp_path / "students" / "glmd_vocab" / "vocab_map.json").read_text())["mapping"] == "decoder"


def test_robust_kd_labels_perturbed_text_in_its_own_cache(ray_start, tiny_model, tiny_teacher, corpus_jsonl, shared_cache, tmp_path):
    clean = method_config("kd", tiny_model, corpus_jsonl, shared_cache)
    cfg = method_config("robust_kd", tiny_model, corpus_jsonl, shared_cache, train={"max_steps": 2})
    from raykd.soft_labels.plan import Plan

    assert Plan(cfg).keys["train"] != Plan(clean).keys["train"] and Plan(cfg).keys["eval"] == Plan(clean).keys["eval"]
    report = main_distill(cfg, tmp_path)
    assert report["robust_kd"]["steps"] == 2 and report["cache"]["teacher_calls"] > 0
