"""Ray Train students on the cache: local mode, DDP and FSDP train alike; a run resumes from its checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from raykd.soft_labels.cache import shard_paths
from raykd.students import build_student
from raykd.train.run import StudentRun
from raykd.train.trainer import train_student

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def setup(tiny_labeled, tmp_path_factory):
    cfg, plan, caches, _ = tiny_labeled
    folder, manifest = caches["train"]
    init = build_student(cfg.student, plan.teacher_path, tmp_path_factory.mktemp("init") / "student")
    return cfg, shard_paths(folder, manifest), init, tmp_path_factory.mktemp("runs")


def _train(setup, name, rows=None, mlflow_uri=None, **overrides):
    cfg, files, init, runs = setup
    train_cfg = cfg.train.model_copy(update={"shuffle": False, "num_workers": 1, **overrides})
    return train_student(StudentRun(name=name, student_path=init, shard_files=None if rows is not None else files,
                                    rows=rows, weights={"forward_kl": 0.5, "ce": 0.5}, temperature=1.0, train=train_cfg,
                                    storage_path=runs, mlflow_uri=mlflow_uri, mlflow_experiment="raykd-test"))


def _in_blocks(files: list[str], rows: int, block_rows: int):
    """The cache's first ``rows`` undecoded rows as a Ray Dataset of ``block_rows``-row blocks, in
    the cache's order. With ``preserve_order``, Ray Train's split hands whole blocks to the worker
    with the fewest rows so far (Ray Data's ``OutputSplitter``): blocks of one micro-batch go to
    the workers in turn, so step ``k`` of 2 workers reads the rows of step ``k`` in local mode."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from raykd.soft_labels.join import LABEL_COLUMNS

    table = pa.concat_tables(pq.read_table(f, columns=["input_ids", "attention_mask", "loss_mask", *LABEL_COLUMNS])
                             for f in files).slice(0, rows)
    assert table.num_rows == rows
    return ray.data.from_arrow([table.slice(i, block_rows) for i in range(0, rows, block_rows)])


def test_local_mode_ddp_and_fsdp_train_alike_and_a_sharded_run_resumes_on_other_workers(setup, tmp_path, monkeypatch):
    """Same rows in every step: ``train.num_workers=0`` (Ray Train's local mode, used by most
    tests) and two DDP workers give the same loss curve (every position weighs 1/N of the step,
    however the step is split); FSDP over the same 2 workers (gloo on CPU) trains as DDP, with
    sharded (DCP) checkpoints. That run, continued with a larger budget in local mode (one
    process), resumes from its last checkpoint: DCP reshards the weights and the optimizer state
    for the new worker count. The DDP run reports to MLflow (``tracking.mlflow_uri``, a local file store) through
    Ray's integration: one MLflow run with every step's loss. (One test: each Ray Train run costs
    ~15 s of start-up.)"""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for an opt-in to read a file store
    uri = (tmp_path / "mlruns").as_uri()
    steps, batch = 8, setup[0].train.batch_size
    files = setup[1]
    local = _train(setup, "w0", rows=_in_blocks(files, steps * batch, batch // 2), num_workers=0, max_steps=steps,
                   checkpoint_every=4)
    assert local.model_dir.name == "checkpoint_000008" and (local.model_dir / "model.safetensors").exists()
    two = _train(setup, "w2", rows=_in_blocks(files, steps * batch, batch // 2), num_workers=2, max_steps=steps,
                 checkpoint_every=8, cpus_per_worker=0.5, mlflow_uri=uri)
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("raykd-test").experiment_id])
    assert run.info.run_name == "w2"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert losses == pytest.approx([r["loss"] for r in two.history])
    a = np.array([r["loss"] for r in local.history])
    b = np.array([r["loss"] for r in two.history])
    assert len(a) == len(b) == steps
    assert a[-1] < a[0] and b[-1] < b[0]  # both learn
    np.testing.assert_allclose(a, b, rtol=1e-6)

    sharded = _train(setup, "f2", rows=_in_blocks(files, steps * batch, batch // 2), num_workers=2, strategy="fsdp",
                     max_steps=steps, checkpoint_every=4, cpus_per_worker=0.5, checkpoint_format="sharded")
    np.testing.assert_allclose([r["loss"] for r in sharded.history], b, rtol=1e-4)  # same data split, same maths
    dcp_files = sorted(p.name for p in (sharded.model_dir / "sharded").iterdir())
    assert dcp_files == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # both workers' shards, merged by Ray Train
    ddp_weights, fsdp_weights = (load_file(r.model_dir / "model.safetensors") for r in (two, sharded))
    assert ddp_weights.keys() == fsdp_weights.keys()  # the whole model, exported on the driver from the shards
    for name, w in ddp_weights.items():
        torch.testing.assert_close(fsdp_weights[name], w, rtol=1e-3, atol=1e-4)

    # the same run name and storage with a larger budget continues at step 9 in local mode (one process,
    # no process group), not from scratch. (Ray Train's own resume of a run on its workers, through its
    # checkpoint manager: tests/ray/test_faults.py.)
    resumed = _train(setup, "f2", max_steps=10, checkpoint_every=2, num_workers=0)
    assert [r["step"] for r in resumed.history] == list(range(1, 11))
    assert resumed.history[:8] == sharded.history and resumed.resumed_from == [8]
    # the trained weights came back: a fresh student's first loss is far above step 9's
    assert resumed.history[8]["loss"] < sharded.history[0]["loss"] - 0.1
    saved = torch.load(resumed.model_dir / "train_state.pt", weights_only=False)["optim"]
    assert saved["by_name"] and "model.embed_tokens.weight" in saved["state"]  # full checkpoints again


def test_grad_accumulation_and_the_chunked_loss_match_one_big_batch(setup, monkeypatch):
    """The worker's step with ``grad_accum=2``, and with it the chunked loss
    (``train.loss_chunk_positions``, 7 positions per chunk), trains as one big batch does."""
    from raykd.losses import Objective

    chunked_calls = []
    from_hidden = Objective.from_hidden
    monkeypatch.setattr(Objective, "from_hidden", lambda self, *a, **k: chunked_calls.append(1) or from_hidden(self, *a, **k))
    plain = _train(setup, "acc1", num_workers=0, max_steps=3, checkpoint_every=3)
    accum = _train(setup, "acc2", num_workers=0, max_steps=3, checkpoint_every=3, grad_accum=2)
    assert not chunked_calls
    chunked = _train(setup, "acc3", num_workers=0, max_steps=3, checkpoint_every=3, grad_accum=2, loss_chunk_positions=7)
    assert len(chunked_calls) == 3 * 2  # local mode runs the loop in this process: every micro-batch chunked
    a = np.array([r["loss"] for r in plain.history])
    b = np.array([r["loss"] for r in accum.history])
    c = np.array([r["loss"] for r in chunked.history])
    np.testing.assert_allclose(a, b, rtol=1e-4)  # same rows, same order: equal up to float error
    np.testing.assert_allclose(a, c, rtol=1e-4)
    assert chunked.history[0]["forward_kl"] == pytest.approx(plain.history[0]["forward_kl"], rel=1e-4)


def test_a_run_that_can_never_get_its_cpus_is_refused_naming_the_serve_teacher(setup, ray_start):
    """A Serve replica holding the CPUs for good is refused at once; a plain job's actor holding
    them is only waited for (Ray queues the run until it ends)."""
    import ray
    from ray import serve

    from raykd.train.trainer import InsufficientResourcesError, check_training_resources

    cfg = setup[0].train.model_copy(update={"num_workers": 1, "cpus_per_worker": 1.0})
    hog_cpus = ray.cluster_resources()["CPU"] - 0.5

    @serve.deployment(ray_actor_options={"num_cpus": hog_cpus})
    class Hog:
        def __call__(self) -> str:
            return "busy"

    serve.run(Hog.bind(), name="cpu-hog-teacher", route_prefix=None)
    try:
        with pytest.raises(InsufficientResourcesError, match="cpu-hog-teacher.*raykd teacher down"):
            check_training_resources(cfg, "student_kd", wait_s=0)
    finally:
        serve.delete("cpu-hog-teacher")

    @ray.remote(num_cpus=hog_cpus)
    class Job:
        def ready(self) -> bool:
            return True

    job = Job.remote()
    ray.get(job.ready.remote())
    try:
        check_training_resources(cfg, "student_kd", wait_s=0)  # not refused: the job will end
    finally:
        ray.kill(job)


