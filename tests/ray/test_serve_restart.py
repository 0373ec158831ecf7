"""A worker process that Ray reuses keeps Serve's cached controller client; after Serve restarts
on the cluster, :func:`raykd.teacher.apps.teacher_handle` still reaches the running controller
(a labeling run after ``raykd teacher up`` restarted Serve failed in a reused Ray Data worker)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_a_reused_worker_gets_the_teacher_handle_after_serve_restarts(ray_start):
    import ray
    from ray import serve

    from raykd.teacher.deployment import DEPLOYMENT_NAME

    @serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 0})
    class Probe:
        def __init__(self, generation: int):
            self.generation = generation

        def ping(self) -> int:
            return self.generation

    @ray.remote(num_cpus=0)
    class Caller:  # one process throughout, as a reused Ray Data worker
        def call(self, app: str) -> tuple[int, int]:
            import os

            from raykd.teacher.apps import teacher_handle

            return os.getpid(), teacher_handle(app).ping.remote().result(timeout_s=60)

    app = "restart-probe"
    caller = Caller.remote()
    try:
        serve.run(Probe.bind(1), name=app, route_prefix=None)
        pid, first = ray.get(caller.call.remote(app))
        assert first == 1
        serve.shutdown()  # a new controller, as when `raykd teacher up` restarts Serve with a proxy
        serve.run(Probe.bind(2), name=app, route_prefix=None)
        again, second = ray.get(caller.call.remote(app), timeout=120)
        assert again == pid and second == 2  # the same process, through the new controller
    finally:
        ray.kill(caller)
        serve.shutdown()  # leave Serve off, as the HTTP tests do; later tests start it on demand
