"""On-policy methods end to end on the tiny teacher: ``raykd distill``'s entry point with the
teacher served during training, the student's samples scored through the Serve handle."""

from __future__ import annotations

import math

import pytest

from raykd.cli import main_distill
from raykd.config import DistillConfig, load_config
from raykd.methods import get_method
from tests.ray.test_methods import method_config

pytestmark = pytest.mark.ray

ON_POLICY = ["gkd", "distillm"]
# Every on-policy method's shipped objective also has a short run of its own without Ray, MiniLLM's
# included (tests/unit/test_on_policy.py).

STEPS = 3
ROWS = 4  # tiny_distill_config's batch (one micro-batch per step, local mode)


@pytest.fixture
def two_free_cpus(request, ray_start):
    """For ``gkd``: an actor holds all but 2 of the cluster's free CPUs, so the run meets the
    2-core laptop the README's command runs on (teacher replica, Train worker and cache reads
    together); the other methods run as they are."""
    import ray

    if request.node.callspec.params["method"] != "gkd":
        yield
        return

    @ray.remote
    class CpuHolder:
        def ready(self) -> bool:
            return True

    holder = CpuHolder.options(num_cpus=ray.available_resources()["CPU"] - 2).remote()
    ray.get(holder.ready.remote())
    yield
    ray.kill(holder)


@pytest.mark.parametrize("method", ON_POLICY)
def test_on_policy_method_trains_on_samples_scored_by_the_served_teacher(method, ray_start, tiny_labeled, tmp_path,
                                                                         two_free_cpus, monkeypatch):
    """gkd runs with the shipped resource settings on 2 free CPUs: a Train worker of 1 CPU (not
    local mode) beside the teacher replica of 0.5 (issue 28: step 0 waited forever, Ray Data's
    file listing asked for the last whole CPU); a stall would end in StalledError after 120 s."""
    from raykd.teacher.apps import running_teacher

    cfg0, _, _, _ = tiny_labeled
    shipped_cfg = load_config(DistillConfig, get_method(method).config_path)
    shipped = shipped_cfg.on_policy
    on_policy = {**shipped.model_dump(), "prompt_tokens": 8, "max_new_tokens": 8, "teacher_batch": 2}
    train = {"max_steps": STEPS, "checkpoint_every": STEPS}
    teacher = {"name": "on-policy-teacher"}  # not the shared tiny teacher: the run starts its own, and stops it
    if method == "distillm":  # every step on-policy, so the buffer fills after one step and is reused
        on_policy.update(on_policy_share=1.0, replay_size=ROWS, replay_share=0.5)
    else:
        on_policy.update(on_policy_share=1.0)  # every step asks the teacher from the worker (0.5 drew none of 3)
        train.update(num_workers=shipped_cfg.train.num_workers, cpus_per_worker=shipped_cfg.train.cpus_per_worker)
        teacher.update(num_cpus=shipped_cfg.teacher.num_cpus)
        assert shipped_cfg.train.num_workers == 1 and shipped_cfg.ray.num_cpus is None  # the shipped: a worker, the machine's CPUs
        monkeypatch.setenv("RAYKD_STALL_TIMEOUT_S", "120")
    cfg = method_config(method, cfg0.teacher.model, cfg0.data.path, cfg0.labels.cache_dir, on_policy=on_policy,
                        train=train, teacher=teacher)
    report = main_distill(cfg, tmp_path)
    (student,) = report["students"]
    entry, split = report[student], report[student]["time_split"]
    assert report["cache"]["hit"] and entry["steps"] == STEPS and math.isfinite(entry["final_train_loss"])
    assert split["steps"] == STEPS and split["on_policy_steps"] >= (STEPS if on_policy["on_policy_share"] == 1 else 0)
    fresh = split["on_policy_steps"] - split["replayed_steps"]
    assert split["teacher_calls"] == fresh * ROWS // 2  # calls of 2 rows, sent only for fresh samples
    if fresh:
        assert split["on_policy_sample_s"] > 0 and split["on_policy_update_s"] > 0
    if method == "distillm":
        assert split["replayed_steps"] >= 1
    assert running_teacher(cfg.teacher.name) is None  # the run started the teacher for training, then stopped it


def test_on_policy_without_a_running_teacher_and_start_false_fails_before_any_work(ray_start, tiny_model, corpus_jsonl,
                                                                                 tmp_path):
    from raykd.teacher.apps import TeacherNotRunningError

    shipped = load_config(DistillConfig, get_method("gkd").config_path).on_policy
    cfg = method_config("gkd", tiny_model, corpus_jsonl, tmp_path / "cache", on_policy=shipped.model_dump(),
                        teacher={"name": "no-such-teacher", "start": False})
    with pytest.raises(TeacherNotRunningError, match="'no-such-teacher', which is not running"):
        main_distill(cfg, tmp_path / "out")
    assert not (tmp_path / "cache").exists()  # nothing labeled
