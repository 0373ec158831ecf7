"""Driver side of student training: a Ray Data view of the cache and a ``TorchTrainer``."""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs

from raykd import console, storage
from raykd.config import OnPolicyConfig, TeacherConfig, TrainConfig
from raykd.losses import get_loss
from raykd.soft_labels.feature_cache import paired_dataset
from raykd.soft_labels.join import LABEL_COLUMNS, decode_joined, teacher_column
from raykd.soft_labels.schema import decode_batch
from raykd.train.loop import (
    HISTORY_FILE,
    RESUMES_FILE,
    LoopConfig,
    train_loop_per_worker,
)
from raykd.train.failures import training_failure
from raykd.train.parallel import SHARDED_DIR, export_sharded
from raykd.watchdog import StallWatchdog

log = logging.getLogger(__name__)

DATA_CPUS = 0.25
"""CPUs of each Ray Data task that reads and decodes the soft-label cache for training."""


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


def soft_label_dataset(shard_files: list[str], shuffle: bool, seed: int, num_teachers: int = 1):
    """Ray Dataset of decoded soft-label rows (numpy ``[T]`` / ``[T, K]`` tensors per row).

    With ``num_teachers > 1`` the shards are joined caches (:mod:`raykd.soft_labels.join`) and
    each teacher's label columns are decoded too. Shards may be local paths or URIs of one
    filesystem (``s3://``, ``gs://``): the filesystem object is resolved once here and travels to
    the read tasks with its endpoint and credentials (:mod:`raykd.storage`).
    """
    import ray

    columns = ["input_ids", "attention_mask", "loss_mask"] + [
        teacher_column(i, name) for i in range(num_teachers) for name in LABEL_COLUMNS]
    fs, _ = storage.resolve(shard_files[0], setting="labels.cache_dir")
    paths = [storage.resolve(f)[1] for f in shard_files]
    # One block per shard, read by a task of DATA_CPUS. Not `ray.data.read_parquet`: from Ray 2.60 it
    # first runs a `ListFiles` task that always reserves 1 CPU whatever `num_cpus` says, and on a
    # 2-CPU node whose teacher serves during training (on-policy, live fill) beside a 1-CPU worker
    # that task never schedules and step 0 waits forever. The shards are known from the manifest,
    # so nothing needs listing.
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths)).map_batches(
        functools.partial(_read_shards, columns=columns, filesystem=fs), batch_size=None,
        batch_format="pyarrow", num_cpus=DATA_CPUS)
    if shuffle:
        ds = ds.randomize_block_order(seed=seed)
    return decoded(ds, num_teachers)


def _read_shards(batch, columns: list[str], filesystem) -> "pyarrow.Table":
    """The rows of the shards named in ``batch["path"]``, in order (a Ray Data map function)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p, columns=columns, filesystem=filesystem)
                             for p in batch.column("path").to_pylist()])


def decoded(rows, num_teachers: int = 1):
    """A Ray Dataset of undecoded cache rows (e.g. a cache filled live,
    :mod:`raykd.soft_labels.live`) -> decoded rows, as :func:`soft_label_dataset` gives them."""
    decode = decode_batch if num_teachers == 1 else functools.partial(decode_joined, num_teachers=num_teachers)
    return rows.map_batches(decode, batch_format="pyarrow", num_cpus=DATA_CPUS)


def in_order(ds):
    """``ds`` set to yield its rows in the dataset's order (Ray Data's ``preserve_order``) in
    Ray Train's local mode; :func:`train_student` asks the same of the workers' shards. The
    training order is then the cache's (or its seeded shuffle): a rerun, or a run whose cache
    is filled live, sees the rows in the same order."""
    ds.context.execution_options.preserve_order = True
    return ds


def _ordered_ingest():
    """Ray Train's default ingest options with ``preserve_order`` (see :func:`in_order`)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _train_dataset(shard_files: list[str], cfg: TrainConfig, teachers: dict[str, Any] | None,
                   feature_cache: dict[str, Any] | None):
    """The soft-label rows, with their cached teacher features beside them when given."""
    if feature_cache is not None:
        return paired_dataset(feature_cache["pairs"], cfg.shuffle, cfg.seed)
    return soft_label_dataset(shard_files, cfg.shuffle, cfg.seed, (teachers or {}).get("num_teachers", 1))


def check_student_gpus(cfg: TrainConfig, node_gpus: list[float]) -> None:
    """Refuse ``train.use_gpu`` on a cluster without GPUs before any work (Ray would queue the
    workers forever).

    Args:
        cfg: the training settings.
        node_gpus: GPUs of each alive node (e.g. :func:`raykd.teacher.deployment.cluster_node_gpus`).

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

    from raykd.teacher.deployment import running_teacher  # lazy: keeps ray out of import time

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


def train_student(
    name: str,
    *,
    student_path: Path,
    shard_files: list[str] | None,
    weights: dict[str, float],
    temperature: float,
    cfg: TrainConfig,
    storage_path: str | Path,
    params: dict[str, dict[str, float]] | None = None,
    teachers: dict[str, Any] | None = None,
    mlflow_uri: str | None = None,
    mlflow_experiment: str = "raykd",
    online_teacher: str | Path | None = None,
    on_policy: OnPolicyConfig | None = None,
    teacher_app: str | None = None,
    teacher_k: int = 32,
    rows: Any = None,
    teacher_tokenizer: str | Path | None = None,
    layer_map: list[tuple[int, int]] | None = None,
    feature_cache: dict[str, Any] | None = None,
) -> TrainResult:
    """Train one student with Ray Train on a soft-label cache.

    Args:
        name: run name (also the Ray Train run folder under ``storage_path``; running again
            with the same name and storage resumes from the last checkpoint).
        student_path: initial weights folder (see :func:`raykd.students.build_student`).
        shard_files: Parquet shards of the cache (None with ``rows``).
        weights: objective ``{loss name: weight}``.
        temperature: the cache's soft-label temperature.
        cfg: workers, devices, batch, steps, optimizer.
        storage_path: Ray Train storage (checkpoints): a local folder or a URI (``s3://``,
            ``gs://``) resolved through :mod:`raykd.storage`; from object storage the final
            checkpoint is downloaded into a local folder for evaluation and export.
        online_teacher: with ``cfg.online_teacher``, the teacher folder each worker loads for
            dense targets (the cache then supplies only the blocks); with feature terms, the
            teacher each worker runs for their features.
        layer_map: the feature terms' checked ``(student layer, teacher layer)`` pairs
            (:attr:`raykd.soft_labels.plan.Plan.layer_map`); required when an objective has one.
        feature_cache: the feature terms' teacher features from the feature cache instead of an
            online teacher: ``pairs`` (soft-label shard, feature shard) per part, ``layout`` and
            ``shapes`` (:func:`raykd.soft_labels.feature_cache.ensure_teacher_features`).
        on_policy: on-policy steps (:mod:`raykd.train.on_policy`), scored by the running teacher
            application ``teacher_app`` at top-``teacher_k`` and the cache's ``temperature``.
        teacher_tokenizer: the teacher's folder when the student's tokenizer differs from it
            (``student.tokenizer_alignment``): every batch is re-tokenised and aligned in the worker.
        params: loss hyper-parameters on top of ``cfg.loss_params``.
        rows: instead of ``shard_files``, a Ray Dataset of the cache's undecoded rows in training
            order (a cache filled live: :meth:`raykd.soft_labels.live.LiveFill.rows`).
        teachers: for joined multi-teacher shards, ``combine`` (the method's rule),
            ``num_teachers``, ``weight_temperature`` and ``policy_lr``.
        mlflow_uri: also log every step's metrics to this MLflow tracking URI (experiment
            ``mlflow_experiment``, one run per student) through Ray's MLflow integration.

    Returns:
        The final model folder (from the last checkpoint), the per-step loss history and the
        steps the run resumed from (worker failures recovered through ``cfg.max_failures``).

    Raises:
        InsufficientResourcesError: the cluster cannot give the run its workers (before training).
        raykd.train.failures.TrainingFailed: a worker failed more than ``cfg.max_failures`` times;
            one line naming its error, the last checkpoint's step and that a rerun resumes.
    """
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    if cfg.online_teacher and online_teacher is None:
        raise ValueError("train.online_teacher is set but no teacher folder was given to train_student")
    if on_policy is not None and teacher_app is None:
        raise ValueError("on_policy training needs a running teacher: pass teacher_app (its Serve application name)")
    terms = sorted(set(weights) | cfg.phase_terms())

    has_features = any(get_loss(n).kind == "features" for n in terms)
    if has_features and (layer_map is None or (online_teacher is None and feature_cache is None)):
        raise ValueError(f"student {name!r} has feature terms: pass layer_map and the teacher folder (online_teacher) "
                         "or its cached features (feature_cache)")
    layer_map = layer_map if has_features else None  # a student without feature terms runs no teacher for them
    check_training_resources(cfg, name)
    fs, fs_path = storage.resolve(storage_path, setting="train.checkpoint_dir")
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    if not local and not cfg.num_workers:
        raise storage.StorageError(f"train.checkpoint_dir={storage_path!r} is on object storage, which Ray Train's local "
                                   "mode (train.num_workers=0) cannot write; set train.num_workers >= 1")
    loop = LoopConfig(
        run_label=name,
        student_path=str(student_path),
        weights=dict(weights),
        terms=terms,
        loss_params={**cfg.loss_params, **(params or {})},
        temperature=temperature,
        train=cfg,
        mlflow_uri=mlflow_uri,
        mlflow_experiment=mlflow_experiment,
        checkpoint_root=None if cfg.num_workers else str(Path(fs_path) / name),
        online_teacher=str(online_teacher) if cfg.online_teacher else None,
        on_policy=on_policy,
        teacher_app=teacher_app,
        teacher_k=teacher_k,
        teacher_tokenizer=str(teacher_tokenizer) if teacher_tokenizer is not None else None,
        layer_map=[tuple(p) for p in layer_map] if layer_map is not None else None,
        feature_teacher=str(online_teacher) if layer_map is not None and feature_cache is None else None,
        feature_layout=feature_cache["layout"] if layer_map is not None and feature_cache else None,
        feature_shapes=feature_cache["shapes"] if layer_map is not None and feature_cache else None,
        **(teachers or {}),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.model_dump(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker} if cfg.num_workers else None),
        run_config=RunConfig(
            name=name,
            storage_path=fs_path,
            storage_filesystem=None if local else fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[console.train_progress(name, cfg.max_steps)],  # this student's progress bar on the driver
        ),
        datasets={"train": in_order(decoded(rows) if rows is not None else
                                    _train_dataset(shard_files, cfg, teachers, feature_cache if loop.feature_layout else None))},
        dataset_config=DataConfig(execution_options=_ordered_ingest()),
    )
    start = time.perf_counter()
    try:
        with StallWatchdog(lambda: console.progress_count(name), f"student {name!r}"):
            result = trainer.fit()
    except TrainingFailedError as e:  # one line on the console; the worker's traceback goes to raykd.log
        raise training_failure(name, e, storage.join(str(storage_path), name), max_steps=cfg.max_steps,
                               max_failures=cfg.max_failures) from e
    seconds = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError(f"student {name} finished without a checkpoint")
    model_dir = (Path(result.checkpoint.path) if local
                 else Path(result.checkpoint.to_directory(tempfile.mkdtemp(prefix=f"raykd-{name}-"))))
    if (model_dir / SHARDED_DIR).is_dir() and not (model_dir / "model.safetensors").exists():
        export_sharded(model_dir / SHARDED_DIR, student_path, model_dir)  # the Hugging Face folder evaluation reads
    history = json.loads((model_dir / HISTORY_FILE).read_text())
    resumes = model_dir / RESUMES_FILE  # absent in checkpoints written before restarts were recorded
    resumed_from = json.loads(resumes.read_text()) if resumes.exists() else []
    if resumed_from:
        log.info("student %s resumed from the checkpoint(s) of step(s) %s", name, resumed_from)
    final = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("step", "lr", "temperature")}
    console.finish_progress(name, final, steps=len(history))  # the bar's last state: steps, time, final loss terms
    return TrainResult(name=name, model_dir=model_dir, history=history, seconds=seconds, steps=len(history),
                       resumed_from=resumed_from)
