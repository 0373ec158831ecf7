"""The per-application call counter of a teacher service: a small detached actor that outlives
the replicas (see :class:`TeacherCallCounter`).

Its own module, importing nothing but Ray: the counter's process imports the module that
defines it, and :mod:`raykd.teacher.deployment` would bring Ray Serve (about a second of CPU)
into every counter of every application.
"""

from __future__ import annotations

from typing import Any

import ray

COUNTER_NAMESPACE = "raykd"
"""Ray namespace of the per-application :class:`TeacherCallCounter` actors (callers of any
namespace, Serve replicas included, find them by name there)."""


@ray.remote(num_cpus=0, max_restarts=-1)
class TeacherCallCounter:
    """The ``score`` / ``generate`` calls one teacher application answered, per replica.

    A detached actor named :func:`counter_name` that outlives the application's replicas: each
    replica sends ``add`` fire-and-forget after a call is answered (a local enqueue, off the
    request's critical path), and :meth:`TeacherDeployment.info` asks for :meth:`totals`.
    Chosen over Ray's metrics (``ray.util.metrics.Counter``) because those are exported to
    Prometheus every few seconds and read back only through a metrics server, while ``info()``
    must answer exactly, at once, on any cluster. :func:`stop_teacher` kills the counter with
    its application, so a new application of the same name counts from zero.

    Calls still in flight when a replica dies are not counted (they were never answered); the
    caller's resent call is counted once, on the replica that answers it. If the counter's own
    process dies, Ray restarts it empty.
    """

    def __init__(self) -> None:
        self.calls: dict[str, dict[str, int]] = {}
        self.by_caller: dict[str, dict[str, int]] = {}

    def add(self, replica: str, method: str, n: int = 1, caller: str = "anonymous") -> None:
        """Count ``n`` answered ``method`` calls of ``replica`` (a Serve replica id) from ``caller``."""
        for table, key in ((self.calls, replica), (self.by_caller, caller)):
            per = table.setdefault(key, {"score": 0, "generate": 0})
            per[method] = per.get(method, 0) + n

    def totals(self) -> dict[str, Any]:
        """``{"calls": {method: n}, "calls_by_replica": {replica: {method: n}}, "calls_by_caller":
        {caller: {method: n}}}``; ``calls`` sums every replica the application ever had, the dead
        ones included."""
        total = {"score": 0, "generate": 0}
        for per in self.calls.values():
            for method, n in per.items():
                total[method] = total.get(method, 0) + n
        return {"calls": total, "calls_by_replica": {r: dict(per) for r, per in self.calls.items()},
                "calls_by_caller": {c: dict(per) for c, per in self.by_caller.items()}}


def counter_name(app_name: str) -> str:
    """Actor name of the call counter of teacher application ``app_name``."""
    return f"teacher_calls:{app_name}"


def call_counter(app_name: str) -> ray.actor.ActorHandle:
    """The call counter of ``app_name``, created (detached, 0 CPUs) if it does not exist yet."""
    return TeacherCallCounter.options(name=counter_name(app_name), namespace=COUNTER_NAMESPACE,
                                      lifetime="detached", get_if_exists=True).remote()
