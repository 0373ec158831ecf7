"""A run that stops moving while Ray cannot schedule what it waits for ends with ``error:``.

Ray queues a task, actor or placement group whose resources are not free and waits for them
without a word, e.g. a Ray Data task of 1 CPU on a 2-CPU node whose teacher replica and Train
worker hold 1.5. :class:`StallWatchdog` watches a progress count (a bar's steps or rows) beside
Ray's pending demands (tasks and actors waiting for resources, placement groups waiting for
bundles: the cluster status the GCS keeps decides, the state API names them). When the count has
not moved for ``timeout_s`` and demands are pending, it interrupts the main thread, and the block
raises :class:`StalledError` naming each demand and what holds the resources.

The timeout is ``$RAYKD_STALL_TIMEOUT_S`` (300 s by default): a queue that other jobs will free
is worth waiting for, one that nothing will free is not, and raykd cannot tell them apart.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from raykd.console import UserError
from raykd.storage import seconds_from_env

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "RAYKD_STALL_TIMEOUT_S"


class StalledError(UserError):
    """No progress for the stall timeout while Ray had demands it could not schedule."""


def stall_timeout_s() -> float:
    """Seconds without progress (with demands pending) before a run gives up: ``$RAYKD_STALL_TIMEOUT_S``
    or 300. Raises ValueError for a value that is not a positive number."""
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def _resources(required: dict[str, Any] | None) -> str:
    """``{"CPU_group_0_ab12": 1, "CPU_group_ab12": 1, "memory": ..}`` -> ``"CPU: 1"``: a placement
    group's copies of one resource shown once, bookkeeping resources left out."""
    shown: dict[str, float] = {}
    for key, amount in (required or {}).items():
        if key.startswith(("node:", "bundle_group", "memory", "object_store")) or not amount:
            continue
        base = key.split("_group_")[0]
        shown[base] = max(shown.get(base, 0.0), float(amount))
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) or "no resources"


def _state(fn: Callable[..., list], **filters: Any) -> list:
    import ray

    # the connected cluster's state API (another local cluster on the machine must not answer)
    return fn(address=ray.get_runtime_context().gcs_address, filters=[(k, "=", v) for k, v in filters.items()],
              detail=True, limit=1000, raise_on_missing_output=False)


def pending_demands() -> list[str]:
    """What Ray has not scheduled yet for want of resources, each as ``"what (CPU: 1)"``.

    Whether anything is pending comes from the cluster status the raylets report to the GCS
    (what Ray's autoscaler reads: tasks and actors waiting for resources, placement groups
    waiting for bundles). The state API names the demands where it knows them; its task events
    may lag, be dropped, or stay ``PENDING_NODE_ASSIGNMENT`` after their actor was killed, so a
    named demand alone never counts, nor one that needs no resources. Empty when nothing is
    pending or neither answers."""
    shapes = _demand_shapes()
    if shapes == []:  # the GCS answered: nothing waits for resources, whatever stale events say
        return []
    names = [n for n in _named_demands() if not n.endswith("(no resources)")]
    return names or shapes or []


def _demand_shapes() -> list[str] | None:
    """The cluster status's resource demands by shape; None when the GCS does not answer."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
    except Exception:  # noqa: BLE001 - no answer: the state API decides alone
        return None
    out = [f"{b.count} task(s) or actor(s) of ({_resources(b.bundle)})"
           for d in demands.ray_task_actor_demand for b in d.bundles_by_count]
    out += [f"a placement group of ({'; '.join(_resources(b.bundle) for b in d.bundles_by_count)})"
            for d in demands.placement_group_demand]
    return out


def _named_demands() -> list[str]:
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    try:
        tasks = _state(list_tasks, state="PENDING_NODE_ASSIGNMENT")
        actors = _state(list_actors, state="PENDING_CREATION")
        groups = _state(list_placement_groups, state="PENDING")
    except Exception:  # noqa: BLE001 - no state API (no dashboard)
        return []
    out = [f"task {t.name} ({_resources(t.required_resources)})" for t in tasks]
    out += [f"actor {a.class_name} ({_resources(a.required_resources)})" for a in actors]
    for g in groups:
        bundles = "; ".join(_resources(b.get("unit_resources")) for b in (g.bundles or []))
        out.append(f"placement group {g.name or g.placement_group_id[:8]} ({bundles})")
    return out


def resource_holders() -> list[str]:
    """Live actors that reserve resources, each as ``"class (CPU: 0.5)"`` (empty when the state
    API does not answer)."""
    from ray.util.state import list_actors

    try:
        actors = _state(list_actors, state="ALIVE")
    except Exception:  # noqa: BLE001
        return []
    return [f"{a.class_name} ({_resources(a.required_resources)})" for a in actors
            if _resources(a.required_resources) != "no resources"]


class StallWatchdog:
    """Context manager: raise :class:`StalledError` from the block when ``progress()`` has not
    changed for ``timeout_s`` while Ray has pending demands.

    Args:
        progress: returns a count that grows while the work moves (steps, rows); polled.
        what: the work, for the message (e.g. ``"student 'gkd'"``).
        timeout_s: seconds without progress; None: :func:`stall_timeout_s`.
        poll_s: seconds between polls.

    Raises:
        StalledError: on exit, when the watchdog interrupted the block.

    It watches only when entered from the main thread (the one a SIGINT interrupts); elsewhere,
    e.g. in a Tune trial's thread, it does nothing. While it watches, SIGINT has Python's default
    handler (a ``KeyboardInterrupt``) unless the block installs its own, as Ray Train's ``fit``
    does (it then aborts the run); a handler an earlier ``fit`` left behind, which only logs, is
    set aside and restored on exit.
    """

    def __init__(self, progress: Callable[[], float | None], what: str, timeout_s: float | None = None,
                 poll_s: float = 5.0):
        self.progress, self.what = progress, what
        self.timeout_s = stall_timeout_s() if timeout_s is None else timeout_s
        self.poll_s = min(poll_s, self.timeout_s / 4)
        self.message: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raykd-stall-watchdog", daemon=True)
        self._old_handler: Any = None

    def __enter__(self) -> StallWatchdog:
        if threading.current_thread() is threading.main_thread():  # it interrupts the main thread only
            self._old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
            self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_s + 5)
        if self._old_handler is not None:
            signal.signal(signal.SIGINT, self._old_handler)
        if self.message is not None and (kind is None or issubclass(kind, KeyboardInterrupt)):
            raise StalledError(self.message) from None

    def _watch(self) -> None:
        last, since = self.progress(), time.monotonic()
        while not self._stop.wait(self.poll_s):
            now = self.progress()
            if now != last:
                last, since = now, time.monotonic()
                continue
            if time.monotonic() - since < self.timeout_s or not (demands := pending_demands()):
                continue
            holders = resource_holders()
            self.message = (
                f"{self.what} made no progress for {self.timeout_s:g} s while Ray could not schedule: "
                f"{'; '.join(demands)}. Resources are held by: {'; '.join(holders) or 'nothing raykd can see'}. "
                "Free them (stop a teacher you do not need: `raykd teacher down NAME`), reserve less "
                "(`teacher.num_cpus`, `train.cpus_per_worker`) or start Ray with more (`ray.num_cpus`); "
                f"${TIMEOUT_ENV} sets how long to wait. What was written is kept: the same command resumes.")
            log.error("%s", self.message, extra={"console": False})
            os.kill(os.getpid(), signal.SIGINT)  # a KeyboardInterrupt in the main thread, even inside ray.get
            return
