"""The stall watchdog (issue 28): a block that waits on a demand Ray cannot schedule ends with
an error naming the demand and the holder; a block that is merely slow, or moving, does not."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.ray


def _hold_every_free_cpu():
    """Actors that together hold every CPU free now (a CPU another test releases meanwhile is
    taken too: holders are added until none has been free for a second)."""
    import ray

    @ray.remote
    class CpuHolder:
        def ready(self) -> bool:
            return True

    holders, calm_since = [], time.monotonic()
    while time.monotonic() - calm_since < 1.0:
        free = ray.available_resources().get("CPU", 0.0)
        if free > 0:
            holders.append(CpuHolder.options(num_cpus=free).remote())
            ray.get(holders[-1].ready.remote(), timeout=60)
            calm_since = time.monotonic()
        time.sleep(0.2)
    return holders


@pytest.fixture
def held_cpus(ray_start):
    import ray

    holders = _hold_every_free_cpu()
    yield holders
    for h in holders:
        ray.kill(h)


def _needs_one_cpu():
    import ray

    @ray.remote(num_cpus=1)
    def needs_one_cpu() -> int:
        return 1

    return needs_one_cpu.remote()


def test_a_wait_on_an_unschedulable_task_ends_naming_the_demand_and_what_holds_the_cpus(held_cpus):
    import signal

    import ray

    from raykd.watchdog import StalledError, StallWatchdog

    # a SIGINT handler that only logs, as an earlier Ray Train fit in this process leaves behind
    # (CI: the watchdog's interrupt was swallowed and the block waited out its 120 s)
    logged: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: logged.append(signum))
    waiting = _needs_one_cpu()
    start = time.monotonic()
    with pytest.raises(StalledError) as caught, StallWatchdog(lambda: 0, "the test's block", timeout_s=2, poll_s=0.5):
        ray.get(waiting, timeout=120)  # a watchdog that never fires fails here instead of hanging
    restored = signal.signal(signal.SIGINT, old)
    assert time.monotonic() - start < 30
    assert logged == [] and restored is not signal.default_int_handler  # set aside, then put back
    for h in held_cpus:
        ray.kill(h)
    assert ray.get(waiting, timeout=60) == 1  # freed, it runs: nothing is left pending for other tests
    msg = str(caught.value)
    assert "the test's block made no progress for 2 s" in msg
    # named through the state API, or by its shape from the cluster status when task events lag
    assert "task needs_one_cpu (CPU: 1)" in msg or "1 task(s) or actor(s) of (CPU: 1)" in msg, msg
    assert "CpuHolder (CPU:" in msg and "RAYKD_STALL_TIMEOUT_S" in msg


def test_demand_shapes_come_from_the_cluster_status_without_the_state_api(held_cpus):
    import ray

    from raykd.watchdog import _demand_shapes

    waiting = _needs_one_cpu()
    deadline = time.monotonic() + 30
    while not (shapes := _demand_shapes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for h in held_cpus:
        ray.kill(h)
    assert "1 task(s) or actor(s) of (CPU: 1)" in shapes
    assert ray.get(waiting, timeout=60) == 1


def test_slow_or_moving_work_is_left_alone(ray_start):
    from raykd.watchdog import StallWatchdog, pending_demands

    deadline = time.monotonic() + 30  # the cluster status lags: wait out another test's last demand
    while pending_demands() and time.monotonic() < deadline:
        time.sleep(0.5)

    with StallWatchdog(lambda: 0, "idle, nothing pending", timeout_s=0.5, poll_s=0.1):
        time.sleep(2)  # no progress, but nothing pending: a slow step, not a stall
    ticks = iter(range(10_000))
    with StallWatchdog(lambda: next(ticks), "moving", timeout_s=0.5, poll_s=0.1):
        time.sleep(2)


def test_the_timeout_setting_is_checked(monkeypatch):
    from raykd.watchdog import stall_timeout_s

    monkeypatch.setenv("RAYKD_STALL_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="RAYKD_STALL_TIMEOUT_S='0' must be a number of seconds above 0"):
        stall_timeout_s()
    monkeypatch.setenv("RAYKD_STALL_TIMEOUT_S", "12.5")
    assert stall_timeout_s() == 12.5
