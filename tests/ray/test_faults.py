"""Faults in flight: a SIGKILLed Ray Train worker or Serve teacher replica in the middle of the
work. Training resumes from its last checkpoint and keeps one timeline; labeling loses and
duplicates no block, and the teacher's call count survives the restart (the count's sum over
replicas: ``test_teacher_replicas.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.soft_labels.cache import shard_paths
from raykd.students import build_student
from raykd.teacher.counter import COUNTER_NAMESPACE, counter_name
from raykd.teacher.deployment import DEPLOYMENT_NAME
from raykd.teacher.apps import stop_teacher
from raykd.train.run import StudentRun
from raykd.train.trainer import train_student
from tests.conftest import tiny_distill_config
from tests.faults import (
    TRAIN_WORKER_CLASS,
    KillWhen,
    alive_actor_pids,
    serve_replica_class,
)

pytestmark = pytest.mark.ray

MAX_STEPS = 16
CHECKPOINT_EVERY = 2


@pytest.fixture(scope="module")
def student_setup(tiny_labeled, tmp_path_factory):
    cfg, plan, caches, _ = tiny_labeled
    folder, manifest = caches["train"]
    init = build_student(cfg.student, plan.teacher_path, tmp_path_factory.mktemp("init") / "student")
    return cfg, shard_paths(folder, manifest), init, tmp_path_factory.mktemp("runs")


def _train(student_setup, name: str, **overrides):
    cfg, files, init, runs = student_setup
    train_cfg = cfg.train.model_copy(update={"shuffle": False, "num_workers": 1, "max_steps": MAX_STEPS,
                                             "checkpoint_every": CHECKPOINT_EVERY, "log_every": 1, **overrides})
    return train_student(StudentRun(name=name, student_path=init, shard_files=files, weights={"forward_kl": 0.5, "ce": 0.5},
                                    temperature=1.0, train=train_cfg, storage_path=runs))


def _registered_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the latest checkpoint Ray Train's controller has registered for the run in
    ``run_dir`` (the one a restarted worker group resumes from), or None."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return None
    return None if latest is None else int(latest["metrics"]["step"])


def _one(pids: list[int]) -> int | None:
    return pids[0] if len(pids) == 1 else None


def test_a_killed_train_worker_is_one_error_line_and_the_same_command_resumes(student_setup, monkeypatch):
    """SIGKILL the one worker once the controller has registered a checkpoint, with the shipped
    ``max_failures=0``: the run fails with one line naming the worker's error and the checkpoint's
    step, saying the same command resumes. Running it again resumes from that checkpoint, and the
    finished history is one timeline, steps 1..N each once, equal to a run that never failed."""
    from raykd.train.failures import TrainingFailed

    # Ray Train's controller polls its workers (reports, liveness) every 2 s by default: poll every
    # 0.1 s so the checkpoint is registered, and the dead worker noticed, with most steps still to run.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    run_dir = student_setup[3] / "killed"
    killer = KillWhen(victim=lambda: _one(alive_actor_pids(TRAIN_WORKER_CLASS)),
                      ready=lambda: _registered_checkpoint_step(run_dir), timeout_s=300,
                      what="the first registered checkpoint")
    killer.start()
    with pytest.raises(TrainingFailed) as failed:
        _train(student_setup, "killed", max_failures=0)
    victim = killer.join_checked()
    assert victim not in alive_actor_pids(TRAIN_WORKER_CLASS)
    message = str(failed.value)
    step = _registered_checkpoint_step(run_dir)
    assert "\n" not in message and message.startswith("student killed: training failed: worker 0: "), message
    assert message.endswith(f"the last checkpoint is step {step} of {MAX_STEPS}: the same command resumes from it "
                            "(train.max_failures=1 or more restarts it automatically)"), message

    killed = _train(student_setup, "killed", max_failures=0)  # the same command again
    steps = [row["step"] for row in killed.history]
    assert steps == list(range(1, MAX_STEPS + 1)), f"gap or repeat in the history after the restart: {steps}"
    assert killed.resumed_from == [step] and step % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= step < MAX_STEPS
    # The surviving timeline trains as a run that never failed (local mode trains as one worker,
    # see tests/ray/test_train.py): the restored data position, optimizer and scheduler make the
    # steps retrained after the restart the same steps.
    straight = _train(student_setup, "straight", num_workers=0)
    assert straight.resumed_from == []
    maths = lambda row: {k: v for k, v in row.items() if not k.endswith("_s")}  # noqa: E731  (timings, e.g. data_s, differ)
    for a, b in zip(straight.history, killed.history, strict=True):
        assert maths(b) == pytest.approx(maths(a), rel=1e-5), f"step {a['step']} differs after resuming at step {step}"


def _counter_totals(app: str) -> dict:
    import ray

    return ray.get(ray.get_actor(counter_name(app), namespace=COUNTER_NAMESPACE).totals.remote())


def _read_cache(folder: Path, manifest) -> dict[str, np.ndarray]:
    """The cache's rows decoded (dense ``[N, T]`` / ``[N, T, K]``), sorted by (doc_id, block_index)."""
    from raykd.soft_labels.schema import decode_batch

    table = pa.concat_tables([pq.read_table(f) for f in shard_paths(folder, manifest)])
    rows = decode_batch(table, with_ids=True)
    order = np.lexsort((rows["block_index"], rows["doc_id"].astype(str)))
    return {name: np.asarray(value)[order] for name, value in rows.items()}


def test_a_killed_teacher_replica_loses_and_duplicates_nothing(tiny_labeled, tiny_model, corpus_jsonl, tmp_path):
    """SIGKILL the teacher's only replica once it has answered a score call of a labeling run:
    Serve restarts it, the in-flight calls are sent again, and the finished caches hold every
    block exactly once, as the uninterrupted labeling of the same documents wrote them."""
    from raykd.soft_labels.plan import Plan, ensure_soft_labels

    _, _, reference, _ = tiny_labeled
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache")
    cfg.teacher.name = "tiny-teacher-killed"
    cfg.teacher.keep_alive = True  # read its call count after labeling
    cfg.labels.batch_size = 2  # many small calls, so the kill lands with most of them still to come
    plan = Plan(cfg)
    app = cfg.teacher.name

    def answered_a_call() -> bool:
        try:
            return _counter_totals(app)["calls"]["score"] >= 1
        except ValueError:  # no counter yet: the replica is still starting
            return False

    killer = KillWhen(victim=lambda: _one(alive_actor_pids(serve_replica_class(app, DEPLOYMENT_NAME))),
                      ready=answered_a_call, timeout_s=300, what="the replica's first answered score call")
    killer.start()
    try:
        caches, stats = ensure_soft_labels(plan)
        victim = killer.join_checked()
        totals = _counter_totals(app)
    finally:
        stop_teacher(app)

    assert stats["hit"] is False
    by_replica = totals["calls_by_replica"]
    assert len(by_replica) == 2 and all(c["score"] > 0 for c in by_replica.values()), (
        f"the kill (pid {victim}) did not land in the middle of labeling: {by_replica}")
    # the count survives the restart: the killed replica's answers are kept beside the new one's
    assert totals["calls"]["score"] == sum(c["score"] for c in by_replica.values())
    with pytest.raises(ValueError):  # the counter goes with its application
        _counter_totals(app)
    for split, (folder, manifest) in caches.items():
        got, want = _read_cache(folder, manifest), _read_cache(*reference[split])
        keys = list(zip(got["doc_id"], got["block_index"]))
        assert len(keys) == len(set(keys)), f"{split}: duplicated (doc_id, block_index) rows"
        assert manifest.rows == reference[split][1].rows == len(keys)
        assert keys == list(zip(want["doc_id"], want["block_index"])), f"{split}: lost or extra blocks"
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["loss_mask"], want["loss_mask"])
        # other batch shapes than the reference's: equal within one level of the stored 8-bit sqrt(p)
        # (schema v2) and fp16 label log-probs
        real = got["attention_mask"].astype(bool)
        np.testing.assert_allclose(np.exp(got["topk_logprobs"][real].astype(np.float64) / 2),
                                   np.exp(want["topk_logprobs"][real].astype(np.float64) / 2), atol=1.5 / 127)
        np.testing.assert_allclose(got["label_logprobs"], want["label_logprobs"], rtol=2e-3, atol=2e-3)
        assert (got["topk_ids"][real][:, 0] == want["topk_ids"][real][:, 0]).mean() > 0.99
