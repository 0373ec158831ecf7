"""The stall watchdog (issue 28): a block that waits on a demand Ray cannot schedule ends with
an error naming the demand and the holder; a block that is merely slow, or moving, does not."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.ray


def test_a_wait_on_an_unschedulable_task_ends_naming_the_demand_and_what_holds_the_cpus(ray_start):
    import ray

    from raykd.watchdog import StalledError, StallWatchdog

    @ray.remote
    class CpuHolder:
        def ready(self) -> bool:
            return True

    @ray.remote(num_cpus=1)
    def needs_one_cpu() -> int:
        return 1

    holder = CpuHolder.options(num_cpus=ray.available_resources()["CPU"]).remote()
    ray.get(holder.ready.remote())
    waiting = needs_one_cpu.remote()
    try:
        start = time.monotonic()
        with pytest.raises(StalledError) as caught, StallWatchdog(lambda: 0, "the test's block", timeout_s=2, poll_s=0.5):
            ray.get(waiting)
        assert time.monotonic() - start < 30
    finally:
        ray.kill(holder)
    assert ray.get(waiting, timeout=60) == 1  # freed, it runs: nothing is left pending for other tests
    msg = str(caught.value)
    assert "the test's block made no progress for 2 s" in msg
    assert "task needs_one_cpu (CPU: 1)" in msg and "CpuHolder (CPU:" in msg and "RAYKD_STALL_TIMEOUT_S" in msg


def test_slow_or_moving_work_is_left_alone(ray_start):
    from raykd.watchdog import StallWatchdog

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
