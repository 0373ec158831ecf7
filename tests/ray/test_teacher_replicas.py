"""Two fixed replicas of the tiny teacher label a split, and both of them serve score calls."""

from __future__ import annotations

import pytest

from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.teacher.deployment import DEPLOYMENT_NAME
from raykd.teacher.apps import stop_teacher
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray


def _score_calls_per_replica(handle) -> dict[str, int]:
    """``{replica id: score calls}`` from the application's call counter (any replica answers)."""
    return {r: c["score"] for r, c in handle.info.remote().result()["calls_by_replica"].items()}


def test_two_replicas_both_serve_the_labelers(ray_start, tiny_model, corpus_jsonl, tmp_path):
    from ray import serve

    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache")
    cfg.teacher.name = "tiny-teacher-2-replicas"
    cfg.teacher.num_replicas = 2
    cfg.teacher.keep_alive = True  # read the replicas' counters after labeling
    cfg.labels.batch_size = 2  # many small score calls, so both replicas get some
    cfg.labels.num_labelers = 2
    plan = Plan(cfg)
    try:
        caches, stats = ensure_soft_labels(plan)
        assert stats["hit"] is False and stats["teacher"]["started_by_run"] is True
        rows = sum(manifest.rows for _, manifest in caches.values())

        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=cfg.teacher.name)
        status = serve.status().applications[cfg.teacher.name].deployments[DEPLOYMENT_NAME]
        assert status.replica_states == {"RUNNING": 2}
        calls = _score_calls_per_replica(handle)
        assert len(calls) == 2, f"only replicas {sorted(calls)} answered info()"
        assert all(n > 0 for n in calls.values()), f"a replica served no score call: {calls}"
        assert sum(calls.values()) >= -(-rows // cfg.labels.batch_size)  # every batch was scored once at least
    finally:
        stop_teacher(cfg.teacher.name)
