"""A Ray Train failure as one line a person can act on.

``trainer.fit()`` raises :class:`ray.train.TrainingFailedError` when a worker fails more often
than ``train.max_failures`` allows; its message holds the worker's whole traceback (a gloo or
NCCL collective's included). :func:`training_failure` turns it into a :class:`TrainingFailed`
whose message is one line: the worker's exception (its type and first line), whether it ran out
of memory and what to change then, the step of the last checkpoint Ray Train registered, and
that the same command resumes from it. The original error stays chained, so the traceback
goes to ``raykd.log``.
"""

from __future__ import annotations

from typing import Any

from raykd import storage

SNAPSHOT = "checkpoint_manager_snapshot.json"
"""The file in a Ray Train run folder that records the latest registered checkpoint."""
_OOM_HINT = ("it ran out of memory: lower train.batch_size (raise train.grad_accum to keep the batch), set "
             "train.gradient_checkpointing=true, or give the node more memory")


class TrainingFailed(RuntimeError):
    """A student's Train workers failed (more than ``train.max_failures`` times); the message
    names the worker's error, the last checkpoint and how to resume."""


def last_checkpoint_step(run_dir: Any) -> int | None:
    """The step of the latest checkpoint Ray Train registered in ``run_dir`` (a path or URI of
    the run folder, ``<train.checkpoint_dir>/<student>``), or None when there is none."""
    try:
        latest = storage.read_json(storage.join(str(run_dir), SNAPSHOT)).get("latest_checkpoint_result")
        return None if latest is None else int(latest["metrics"]["step"])
    except Exception:  # noqa: BLE001 - no snapshot (no checkpoint yet) or an unreadable one: unknown
        return None


def worker_cause(error: BaseException) -> tuple[str, bool]:
    """The first worker exception inside a Ray Train failure, as ``"worker R: Type: first line"``,
    and whether it was killed for running out of memory."""
    failures = getattr(error, "worker_failures", None) or {}
    rank, cause = min(failures.items()) if failures else (None, getattr(error, "controller_failure", error))
    for attribute in ("_base_exc", "health_check_failure", "cause"):  # Ray Train's wrappers around it
        cause = getattr(cause, attribute, None) or cause
    text = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    oom = type(cause).__name__ == "OutOfMemoryError" or "out of memory" in str(cause).lower()
    where = f"worker {rank}: " if rank is not None else ""
    return f"{where}{type(cause).__name__}: {text[:300].rstrip('.')}", oom


def training_failure(name: str, error: BaseException, run_dir: Any, *, max_steps: int, max_failures: int) -> TrainingFailed:
    """One-line :class:`TrainingFailed` for ``error`` raised by ``trainer.fit()`` of student
    ``name`` whose Ray Train run folder is ``run_dir``; raise it ``from error``."""
    cause, oom = worker_cause(error)
    step = last_checkpoint_step(run_dir)
    where = (f"the last checkpoint is step {step} of {max_steps}: the same command resumes from it" if step
             else "no checkpoint was registered yet: the same command starts this student again")
    retry = "" if max_failures < 0 else f" (train.max_failures={max_failures + 1} or more restarts it automatically)"
    memory = f"; {_OOM_HINT}" if oom else ""
    return TrainingFailed(f"student {name}: training failed: {cause}{memory}; {where}{retry}")
