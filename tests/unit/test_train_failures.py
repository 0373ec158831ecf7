"""A Ray Train failure as one line: the worker's exception, out of memory named, the last
checkpoint's step and how to resume (no cluster: Ray Train's own exception classes)."""

from __future__ import annotations

import json

from raykd.train.failures import training_failure


def _snapshot(run_dir, step: int) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps({"latest_checkpoint_result": {"metrics": {"step": step}}}))


def test_a_worker_error_names_the_exception_the_checkpoint_and_the_rerun(tmp_path):
    from ray.exceptions import OutOfMemoryError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    _snapshot(tmp_path / "s", 40)
    bad = WorkerGroupError("worker 1 failed:\nTraceback ...\n  gloo ...",
                           {1: UserExceptionWithTraceback(ValueError("row 3 is bad.\nmore"), "Traceback (most recent call last): ...")})
    message = str(training_failure("s", bad, tmp_path / "s", max_steps=80, max_failures=0))
    assert message == ("student s: training failed: worker 1: ValueError: row 3 is bad; the last checkpoint is step 40 "
                       "of 80: the same command resumes from it (train.max_failures=1 or more restarts it automatically)")
    oom = WorkerGroupError("x", {0: OutOfMemoryError("Task was killed due to the node running low on memory.")})
    message = str(training_failure("s", oom, tmp_path / "none", max_steps=80, max_failures=-1))
    assert "worker 0: OutOfMemoryError: " in message and "lower train.batch_size" in message
    assert message.endswith("no checkpoint was registered yet: the same command starts this student again")


def test_a_run_that_does_not_fit_beside_the_teacher_names_the_overrides_that_fit():
    from raykd.config import TrainConfig
    from raykd.train.trainer import fitting_overrides

    # labels.fill=live on 2 CPUs: one worker x 1 CPU + 0.25 for the cache reads, a teacher replica holding 1
    cfg = TrainConfig(num_workers=1, cpus_per_worker=1.0)
    assert fitting_overrides(cfg, 2.0, 1.0) == ["`train.cpus_per_worker=0.75`", "`ray.num_cpus=3` (a local Ray)"]
    assert fitting_overrides(TrainConfig(num_workers=2), 2.0, 1.5) == ["`ray.num_cpus=4` (a local Ray)"]  # 0.125 each: too little
