"""Test helpers that inject faults into a running Ray job: find an actor's process, SIGKILL it
in the middle of the work, and wait for real conditions (with a deadline) instead of sleeping.

Used by ``tests/ray/test_faults.py``; nothing here is specific to one test.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

TRAIN_WORKER_CLASS = "RayTrainWorker"
"""Class name of Ray Train's worker actors in the Ray state API."""


def wait_for(condition: Callable[[], T], *, timeout_s: float, what: str, interval_s: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Args:
        condition: checked every ``interval_s`` seconds; an exception it raises propagates.
        timeout_s: deadline in seconds.
        what: the awaited condition in words (for the error).

    Raises:
        TimeoutError: ``condition`` stayed falsy for ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s for {what}")
        time.sleep(interval_s)  # polling interval of a checked condition, not a guess at timing


def alive_actor_pids(class_name: str) -> list[int]:
    """PIDs of the ALIVE actors of ``class_name`` (Ray state API; needs the dashboard), e.g.
    :data:`TRAIN_WORKER_CLASS` or :func:`serve_replica_class`."""
    import ray
    from ray.util.state import list_actors

    # the connected cluster's address: other Ray clusters may run on the same machine
    actors = list_actors(address=ray.get_runtime_context().gcs_address, detail=True, raise_on_missing_output=False,
                         filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
    return sorted(a.pid for a in actors if a.pid)


def running_task_pids(function: str) -> list[int]:
    """PIDs of this test process's own Ray workers (children of the Ray it started) running a task
    of ``function`` now: Ray titles a worker ``ray::<task name>`` while it runs a task, and Ray
    Data names its tasks after the function (``MapBatches(fn)``). Workers of another process's
    Ray on the same machine are not counted."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if title.startswith("ray::") and f"({function})" in title:
            pids.append(proc.pid)
    return sorted(pids)


def serve_replica_class(app_name: str, deployment: str) -> str:
    """The actor class name of the replicas of ``deployment`` in Serve application ``app_name``."""
    return f"ServeReplica:{app_name}:{deployment}"


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # killed, waiting for its parent (the raylet) to reap it


def sigkill(pid: int, timeout_s: float = 30.0) -> None:
    """SIGKILL process ``pid`` (no cleanup runs in it) and wait until it is dead.

    Raises:
        TimeoutError: the process still runs after ``timeout_s`` seconds.
    """
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _gone(pid), timeout_s=timeout_s, what=f"process {pid} to die after SIGKILL")


class KillWhen(threading.Thread):
    """A background thread that SIGKILLs a process once a condition holds, while the test's main
    thread runs the job under attack (e.g. ``trainer.fit()``) to its end.

    Args:
        victim: the PID to kill, polled until it returns one (e.g. the one live train worker);
            found before ``ready`` is awaited, so the kill follows ``ready`` without a lookup.
        ready: the moment to strike (polled, e.g. "a checkpoint is registered").
        timeout_s: deadline for each of the two.
        what: ``ready`` in words (for errors).

    After :meth:`join_checked`, ``killed`` is the PID killed.
    """

    def __init__(self, victim: Callable[[], int | None], ready: Callable[[], object], *, timeout_s: float, what: str):
        super().__init__(name="kill-when", daemon=True)
        self.victim, self.ready, self.timeout_s, self.what = victim, ready, timeout_s, what
        self.killed: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            pid = wait_for(self.victim, timeout_s=self.timeout_s, what="the process to kill", interval_s=0.2)
            wait_for(self.ready, timeout_s=self.timeout_s, what=self.what)
            try:
                sigkill(pid)
            except ProcessLookupError:
                raise RuntimeError(f"process {pid} ended before the kill: the job finished within moments of "
                                   f"{self.what}; give it more work after that point") from None
            self.killed = pid
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread by join_checked
            self.error = e

    def join_checked(self, timeout_s: float = 60.0) -> int:
        """Wait for the thread and return the PID it killed.

        Raises:
            TimeoutError: the thread is still waiting after ``timeout_s`` seconds.
            Exception: whatever stopped the thread before its kill (e.g. its own ``TimeoutError``).
        """
        self.join(timeout_s)
        if self.is_alive():
            raise TimeoutError(f"the killer thread still waits for {self.what} after the job ended")
        if self.error is not None:
            raise self.error
        assert self.killed is not None
        return self.killed
