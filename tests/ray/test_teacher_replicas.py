"""Two fixed replicas of the tiny teacher: both serve a split's labelers, and the application's
call count sums over them (exact under concurrent calls; ``info()`` from either replica reports
the application's total). One application for both checks: each replica costs seconds to start."""

from __future__ import annotations

import numpy as np
import pytest

from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.teacher.apps import stop_teacher
from raykd.teacher.counter import COUNTER_NAMESPACE, counter_name
from raykd.teacher.deployment import DEPLOYMENT_NAME
from tests.conftest import tiny_distill_config
from tests.faults import wait_for

pytestmark = pytest.mark.ray


def _counter_totals(app: str) -> dict:
    import ray

    return ray.get(ray.get_actor(counter_name(app), namespace=COUNTER_NAMESPACE).totals.remote())


def test_two_replicas_both_serve_the_labelers_and_the_call_count_sums_over_them(ray_start, tiny_model, corpus_jsonl, tmp_path):
    from ray import serve

    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache")
    cfg.teacher.name = "tiny-teacher-2-replicas"
    cfg.teacher.num_replicas = 2
    cfg.teacher.keep_alive = True  # read the replicas' counters after labeling
    cfg.labels.batch_size = 2  # many small score calls, so both replicas get some
    cfg.labels.num_labelers = 2
    plan = Plan(cfg)
    app = cfg.teacher.name
    try:
        caches, stats = ensure_soft_labels(plan)
        assert stats["hit"] is False and stats["teacher"]["started_by_run"] is True
        rows = sum(manifest.rows for _, manifest in caches.values())

        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app)
        status = serve.status().applications[app].deployments[DEPLOYMENT_NAME]
        assert status.replica_states == {"RUNNING": 2}
        # every call the run made (the teacher check's and the labelers'), counted once its answer was
        # sent: the last counts may land a moment after labeling returns
        made = stats["teacher_calls"] + stats["teacher"]["check_calls"]
        labeled = wait_for(lambda: (t := _counter_totals(app))["calls"]["score"] >= made and t,
                           timeout_s=30, what=f"the run's {made} counted score calls")
        assert labeled["calls"]["score"] == made
        per_replica = {r: c["score"] for r, c in labeled["calls_by_replica"].items()}
        assert len(per_replica) == 2 and all(n > 0 for n in per_replica.values()), f"a replica served no labeler: {per_replica}"
        assert labeled["calls"]["score"] >= -(-rows // cfg.labels.batch_size)  # every batch was scored once at least

        calls, rng = 24, np.random.default_rng(0)
        ids = rng.integers(3, plan.vocab_size, size=(2, 16), dtype=np.int64)
        for response in [handle.score.remote(ids, np.ones_like(ids), k=4) for _ in range(calls)]:  # concurrent
            response.result(timeout_s=120)
        want = labeled["calls"]["score"] + calls
        # every answer was sent after its count; another replica's count may land a moment later
        totals = wait_for(lambda: (t := _counter_totals(app))["calls"]["score"] >= want and t,
                          timeout_s=30, what=f"{want} counted score calls")
        assert totals["calls"]["score"] == want
        assert sum(c["score"] for c in totals["calls_by_replica"].values()) == want
        answers = {}
        for _ in range(20):  # info() from either replica reports the application's total
            for info in [handle.info.remote().result(timeout_s=60) for _ in range(4)]:
                answers[info["replica"]] = info["calls"]["score"]
            if len(answers) == 2:
                break
        assert answers == {r: want for r in per_replica}
    finally:
        stop_teacher(app)
