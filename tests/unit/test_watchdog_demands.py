"""Which demands count as pending for the stall watchdog: the cluster status decides, the state
API only names (CI, 2026-12-06: task events of a killed counter actor stayed
``PENDING_NODE_ASSIGNMENT`` with no resources, and an idle block was called stalled)."""

from __future__ import annotations

import pytest

from raykd import watchdog

STALE = ["task TeacherCallCounter.add (no resources)", "task TeacherCallCounter.__init__ (no resources)"]


@pytest.fixture
def state(monkeypatch):
    """Set what the cluster status (``shapes``; None: no answer) and the state API (``names``) say."""
    said: dict = {"shapes": None, "names": []}
    monkeypatch.setattr(watchdog, "_demand_shapes", lambda: said["shapes"])
    monkeypatch.setattr(watchdog, "_named_demands", lambda: said["names"])
    return said


def test_stale_named_demands_do_not_count_when_the_cluster_status_has_none(state):
    state["shapes"], state["names"] = [], STALE + ["task needs_one_cpu (CPU: 1)"]
    assert watchdog.pending_demands() == []


def test_pending_demands_are_named_where_the_state_api_knows_them_else_shown_by_shape(state):
    state["shapes"] = ["1 task(s) or actor(s) of (CPU: 1)"]
    state["names"] = STALE + ["task needs_one_cpu (CPU: 1)"]
    assert watchdog.pending_demands() == ["task needs_one_cpu (CPU: 1)"]
    state["names"] = STALE
    assert watchdog.pending_demands() == ["1 task(s) or actor(s) of (CPU: 1)"]


def test_without_the_cluster_status_only_demands_that_need_resources_count(state):
    state["names"] = STALE
    assert watchdog.pending_demands() == []
    state["names"] = STALE + ["placement group pg (CPU: 1; CPU: 1)"]
    assert watchdog.pending_demands() == ["placement group pg (CPU: 1; CPU: 1)"]
