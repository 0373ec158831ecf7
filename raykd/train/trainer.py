"""Driver side of student training: a Ray Data view of the cache and a ``TorchTrainer``."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs

from raykd import console, storage
from raykd.config import TeacherConfig, TrainConfig
from raykd.train.datasets import DATA_CPUS, decoded, in_order, soft_label_dataset
from raykd.train.entry import train_loop_per_worker
from raykd.train.failures import training_failure
from raykd.train.loop import HISTORY_FILE, RESUMES_FILE, LoopConfig
from raykd.train.parallel import SHARDED_DIR, export_sharded
from raykd.train.run import OnPolicyPart, StudentRun
from raykd.watchdog import StallWatchdog

log = logging.getLogger(__name__)

TRAIN_HEALTH_CHECK_S = 0.5
"""Seconds between Ray Train's checks of a run's workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``,
Ray's default 2): a finished run is noticed that much sooner."""


class InsufficientResourcesError(RuntimeError):
    """The cluster cannot give a training run its workers and data tasks (it would wait forever)."""


@dataclass
class TrainResult:
    """A finished student run."""

    name: str
    model_dir: Path
    history: list[dict[str, Any]]
    """One row per step ``1..steps`` of the run's surviving timeline (a step retrained after a
    restart appears once, as retrained)."""
    seconds: float
    steps: int
    resumed_from: list[int] = field(default_factory=list)
    """The step of the checkpoint each restart continued from, in order: a worker failure Ray
    Train recovered from (``train.max_failures``) or a rerun under the same name; empty for a
    run that never restarted."""


def _ordered_ingest():
    """Ray Train's default ingest options with ``preserve_order`` (see :func:`in_order`)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _train_dataset(run: StudentRun, loop: LoopConfig):
    """The run's rows: a live fill's, or the cache's soft labels with their cached teacher
    features beside them when the feature terms read them."""
    if run.rows is not None:
        return decoded(run.rows)
    if loop.feature_layout:
        from raykd.soft_labels.feature_cache import paired_dataset  # lazy: keeps pyarrow and Ray Data out of import time

        return paired_dataset(run.features.cache["pairs"], run.train.shuffle, run.train.seed)
    return soft_label_dataset(run.shard_files, run.train.shuffle, run.train.seed, loop.num_teachers)


def check_student_gpus(cfg: TrainConfig, node_gpus: list[float]) -> None:
    """Refuse ``train.use_gpu`` on a cluster without GPUs before any work (Ray would queue the
    workers forever).

    Args:
        cfg: the training settings.
        node_gpus: GPUs of each alive node (e.g. :func:`raykd.teacher.apps.cluster_node_gpus`).

    Raises:
        ValueError: ``use_gpu`` with workers, and no node has a GPU.
    """
    if cfg.use_gpu and cfg.num_workers and sum(node_gpus) <= 0:
        raise ValueError(f"train.use_gpu=true, but the Ray cluster has no GPU ({len(node_gpus)} node(s)); "
                         "set train.use_gpu=false or add GPU nodes")


def check_training_resources(cfg: TrainConfig, name: str, wait_s: float = 30.0) -> None:
    """Refuse a training run that can never get its resources, instead of queueing it forever.

    A run needs ``num_workers x cpus_per_worker`` CPUs (and a GPU per worker with ``use_gpu``)
    plus :data:`DATA_CPUS` for the tasks reading the cache. When they are not free, this waits
    up to ``wait_s`` seconds (a teacher replica may still be shutting down). If they are still
    not free and the cluster *minus what running Serve replicas (teachers) hold* is too small,
    the run could never start: e.g. a 2-CPU laptop where a kept-alive teacher holds one CPU and
    the worker the other. Otherwise other jobs hold them and Ray queues the run until they finish.

    Raises:
        InsufficientResourcesError: what is needed, free and held by Serve, and what to change.
    """
    import ray

    need = {"CPU": cfg.num_workers * cfg.cpus_per_worker + DATA_CPUS}
    if cfg.use_gpu and cfg.num_workers:
        need["GPU"] = float(cfg.num_workers)
    if cfg.num_workers:  # custom resources (e.g. a node's `train_node`): none on any node would wait forever
        need.update({r: a * cfg.num_workers for r, a in cfg.resources_per_worker.items()})
    deadline = time.monotonic() + wait_s
    while (short := _short(need, ray.available_resources())) and time.monotonic() < deadline:
        time.sleep(1.0)  # polling the scheduler's view: there is no event for "resources released"
    if not short:
        return
    total, serve_held = ray.cluster_resources(), _serve_held()
    never = _short(need, {r: total.get(r, 0.0) - serve_held.get(r, 0.0) for r in need})
    if not never:
        log.warning("student %s: %s not free now; other jobs hold them, Ray queues the run", name, short)
        return
    have = ", ".join(f"{r}: needs {n:g}, cluster has {total.get(r, 0.0):g}, Serve replicas hold {serve_held.get(r, 0.0):g}"
                     for r, n in never.items())
    fits = fitting_overrides(cfg, total.get("CPU", 0.0), serve_held.get("CPU", 0.0)) if set(never) == {"CPU"} else []
    raise InsufficientResourcesError(
        f"cannot train student {name!r} ({have}; {cfg.num_workers} worker(s) x {cfg.cpus_per_worker:g} CPU + "
        f"{DATA_CPUS:g} CPU to read the soft-label cache). Serve applications running: {_serve_apps()}. "
        + (f"It fits with {' or '.join(fits)}. " if fits else "")
        + "Stop a teacher you do not need (`raykd teacher down NAME`), give teachers fewer (`teacher.num_cpus`), lower "
        "`train.cpus_per_worker` / `train.num_workers`, or start Ray with more (`ray.num_cpus`). The soft-label "
        "caches are written; a rerun reuses them.")


def check_room_beside_teacher(cfg: TrainConfig, teacher: TeacherConfig, why: str) -> None:
    """Refuse, before the teacher starts, a run whose teacher serves during training (on-policy,
    ``labels.fill=live``) when the teacher's replicas and the Train workers cannot both fit.

    A teacher of that name already running holds its CPUs already (counted with the other Serve
    replicas); else this run's ``teacher.num_cpus`` times its replicas at start are added.

    Raises:
        InsufficientResourcesError: the CPUs needed, what the cluster has and Serve holds, and
            the overrides that make the run fit.
    """
    import ray

    from raykd.teacher.apps import running_teacher  # lazy: keeps ray out of import time

    total, held = ray.cluster_resources().get("CPU", 0.0), _serve_held().get("CPU", 0.0)
    replicas = (teacher.num_replicas if teacher.autoscaling is None else
                max(1, teacher.autoscaling.initial_replicas or teacher.autoscaling.min_replicas))
    starting = 0.0 if running_teacher(teacher.name) is not None else teacher.num_cpus * replicas
    need = cfg.num_workers * cfg.cpus_per_worker + DATA_CPUS
    if total - held - starting + 1e-6 >= need:
        return
    fits = fitting_overrides(cfg, total, held + starting)
    if starting and total - held >= need + 0.1 * replicas:  # a smaller teacher reservation fits too
        fits.append(f"`teacher.num_cpus={math.floor((total - held - need) / replicas * 100) / 100:g}`")
    raise InsufficientResourcesError(
        f"{why}: the teacher serves during training and cannot share the cluster with the Train workers (CPU: "
        f"{cfg.num_workers} worker(s) x {cfg.cpus_per_worker:g} + {DATA_CPUS:g} to read the soft-label cache = {need:g}, "
        f"teacher {teacher.name!r} {'running' if not starting else f'{replicas} replica(s) x {teacher.num_cpus:g} = {starting:g}'}, "
        f"other Serve replicas {held:g}, cluster {total:g}). It fits with {' or '.join(fits)}. Nothing was started.")


def fitting_overrides(cfg: TrainConfig, total_cpus: float, serve_cpus: float) -> list[str]:
    """The overrides that make a run's CPUs fit beside what Serve replicas hold: the largest
    ``train.cpus_per_worker`` that fits (when at least 0.25 does: a worker's reservation is
    logical, its torch threads use the node's cores), and the ``ray.num_cpus`` of a local Ray
    that holds both.

    Args:
        cfg: the run's train settings.
        total_cpus: the cluster's CPUs.
        serve_cpus: the CPUs running Serve replicas (teachers) hold.
    """
    out = []
    spare = total_cpus - serve_cpus - DATA_CPUS
    if cfg.num_workers and spare / cfg.num_workers >= 0.25:
        out.append(f"`train.cpus_per_worker={math.floor(spare / cfg.num_workers * 100) / 100:g}`")
    need = serve_cpus + cfg.num_workers * cfg.cpus_per_worker + DATA_CPUS
    out.append(f"`ray.num_cpus={math.ceil(need - 1e-9)}` (a local Ray)")
    return out


def _short(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    return {r: n for r, n in need.items() if have.get(r, 0.0) + 1e-6 < n}


def _serve_held() -> dict[str, float]:
    """Resources reserved by live Serve replica actors (empty if the state API is unavailable)."""
    try:
        import ray
        from ray.util.state import list_actors

        # the connected cluster's state API (another local cluster on the machine must not answer)
        actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                             detail=True, limit=10_000, raise_on_missing_output=False)
    except Exception:  # noqa: BLE001  (no dashboard: assume nothing is held for good)
        return {}
    held: dict[str, float] = {}
    for a in actors:
        if a.class_name.startswith("ServeReplica"):
            for r, n in (a.required_resources or {}).items():
                held[r] = held.get(r, 0.0) + float(n)
    return held


def _serve_apps() -> str:
    try:
        from ray import serve

        return ", ".join(sorted(serve.status().applications)) or "none"
    except Exception:  # noqa: BLE001  (Serve not started)
        return "none"


def loop_config(run: StudentRun, checkpoint_root: str | None = None) -> LoopConfig:
    """The workers' settings of ``run`` (each feature's part as the loop's fields).

    Args:
        checkpoint_root: where Ray Train's local mode keeps its checkpoints (None with workers).
    """
    features = run.feature_part()
    cache = features.cache if features is not None else None
    return LoopConfig(
        run_label=run.name,
        student_path=str(run.student_path),
        weights=dict(run.weights),
        terms=run.terms(),
        loss_params={**run.train.loss_params, **(run.params or {})},
        temperature=run.temperature,
        train=run.train,
        mlflow_uri=run.mlflow_uri,
        mlflow_experiment=run.mlflow_experiment,
        checkpoint_root=checkpoint_root,
        online_teacher=str(run.online_teacher) if run.train.online_teacher else None,
        **(_on_policy_fields(run.on_policy) if run.on_policy is not None else {}),
        teacher_tokenizer=str(run.teacher_tokenizer) if run.teacher_tokenizer is not None else None,
        layer_map=[tuple(p) for p in features.layer_map] if features is not None else None,
        feature_teacher=str(features.teacher) if features is not None and cache is None else None,
        feature_layout=cache["layout"] if cache else None,
        feature_shapes=cache["shapes"] if cache else None,
        **(asdict(run.teachers) if run.teachers is not None else {}),
    )


def _on_policy_fields(part: OnPolicyPart) -> dict[str, Any]:
    return {"on_policy": part.config, "teacher_app": part.teacher_app, "teacher_k": part.teacher_k}


def train_student(run: StudentRun) -> TrainResult:
    """Train one student with Ray Train on a soft-label cache.

    Args:
        run: the student, its objective and data, and each method feature's part
            (:class:`raykd.train.run.StudentRun`).

    Returns:
        The final model folder (from the last checkpoint), the per-step loss history and the
        steps the run resumed from (worker failures recovered through ``train.max_failures``).

    Raises:
        ValueError: a feature's part is missing (:meth:`StudentRun.check`), before any work.
        InsufficientResourcesError: the cluster cannot give the run its workers (before training).
        raykd.train.failures.TrainingFailed: a worker failed more than ``train.max_failures`` times;
            one line naming its error, the last checkpoint's step and that a rerun resumes.
    """
    from ray.train import DataConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    cfg, name = run.train, run.name
    run.check()
    check_training_resources(cfg, name)
    fs, fs_path = storage.resolve(run.storage_path, setting="train.checkpoint_dir")
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    if not local and not cfg.num_workers:
        raise storage.StorageError(f"train.checkpoint_dir={run.storage_path!r} is on object storage, which Ray Train's "
                                   "local mode (train.num_workers=0) cannot write; set train.num_workers >= 1")
    loop = loop_config(run, None if cfg.num_workers else str(Path(fs_path) / name))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.model_dump(),
        scaling_config=_scaling_config(cfg),
        run_config=_run_config(name, cfg, fs_path, None if local else fs),
        datasets={"train": in_order(_train_dataset(run, loop))},
        dataset_config=DataConfig(execution_options=_ordered_ingest()),
    )
    start = time.perf_counter()
    # Ray Train's controller checks its workers every 2 s by default, so a finished run waits up to
    # two checks before fit() returns (~5 s measured on a 1-worker run); every 0.5 s it is ~2 s.
    # Ray passes the driver's value to the controller; a user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_HEALTH_CHECK_S))
    try:
        with StallWatchdog(lambda: console.progress_count(name), f"student {name!r}"):
            result = trainer.fit()
    except TrainingFailedError as e:  # one line on the console; the worker's traceback goes to raykd.log
        raise training_failure(name, e, storage.join(str(run.storage_path), name), max_steps=cfg.max_steps,
                               max_failures=cfg.max_failures) from e
    return _finished(run, result, local, time.perf_counter() - start)


def _scaling_config(cfg: TrainConfig):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker}
                         if cfg.num_workers else None)


def _run_config(name: str, cfg: TrainConfig, fs_path: str, fs: pyarrow.fs.FileSystem | None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name,
        storage_path=fs_path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=[console.train_progress(name, cfg.max_steps)],  # this student's progress bar on the driver
    )


def _finished(run: StudentRun, result, local: bool, seconds: float) -> TrainResult:
    """The run's final model folder (exported from a sharded checkpoint), history and restarts."""
    name = run.name
    if result.checkpoint is None:
        raise RuntimeError(f"student {name} finished without a checkpoint")
    model_dir = (Path(result.checkpoint.path) if local
                 else Path(result.checkpoint.to_directory(tempfile.mkdtemp(prefix=f"raykd-{name}-"))))
    if (model_dir / SHARDED_DIR).is_dir() and not (model_dir / "model.safetensors").exists():
        export_sharded(model_dir / SHARDED_DIR, run.student_path, model_dir)  # the Hugging Face folder evaluation reads
    history = json.loads((model_dir / HISTORY_FILE).read_text())
    resumes = model_dir / RESUMES_FILE  # absent in checkpoints written before restarts were recorded
    resumed_from = json.loads(resumes.read_text()) if resumes.exists() else []
    if resumed_from:
        log.info("student %s resumed from the checkpoint(s) of step(s) %s", name, resumed_from)
    final = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("step", "lr", "temperature")}
    console.finish_progress(name, final, steps=len(history))  # the bar's last state: steps, time, final loss terms
    return TrainResult(name=name, model_dir=model_dir, history=history, seconds=seconds, steps=len(history),
                       resumed_from=resumed_from)
