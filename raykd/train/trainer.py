"""Driver side of student training: a Ray Data view of the cache and a ``TorchTrainer``."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.config import TrainConfig
from raykd.soft_labels.join import LABEL_COLUMNS, decode_joined, teacher_column
from raykd.soft_labels.schema import decode_batch
from raykd.train.loop import HISTORY_FILE, train_loop_per_worker


@dataclass
class TrainResult:
    """A finished student run."""

    name: str
    model_dir: Path
    history: list[dict[str, Any]]
    seconds: float
    steps: int


def soft_label_dataset(shard_files: list[str], shuffle: bool, seed: int, num_teachers: int = 1):
    """Ray Dataset of decoded soft-label rows (numpy ``[T]`` / ``[T, K]`` tensors per row).

    With ``num_teachers > 1`` the shards are joined caches (:mod:`raykd.soft_labels.join`) and
    each teacher's label columns are decoded too.
    """
    import ray

    columns = ["input_ids", "attention_mask", "loss_mask"] + [
        teacher_column(i, name) for i in range(num_teachers) for name in LABEL_COLUMNS]
    ds = ray.data.read_parquet(shard_files, columns=columns)
    if shuffle:
        ds = ds.randomize_block_order(seed=seed)
    decode = decode_batch if num_teachers == 1 else functools.partial(decode_joined, num_teachers=num_teachers)
    return ds.map_batches(decode, batch_format="pyarrow", num_cpus=0.25)


def train_student(
    name: str,
    *,
    student_path: Path,
    shard_files: list[str],
    weights: dict[str, float],
    temperature: float,
    cfg: TrainConfig,
    storage_path: Path,
    params: dict[str, dict[str, float]] | None = None,
    teachers: dict[str, Any] | None = None,
) -> TrainResult:
    """Train one student with Ray Train on a soft-label cache.

    Args:
        name: run name (also the Ray Train run folder under ``storage_path``; running again
            with the same name and storage resumes from the last checkpoint).
        student_path: initial weights folder (see :func:`raykd.students.build_student`).
        shard_files: Parquet shards of the cache.
        weights: objective ``{loss name: weight}``.
        temperature: the cache's soft-label temperature.
        cfg: workers, devices, batch, steps, optimizer.
        storage_path: Ray Train storage (checkpoints).
        params: loss hyper-parameters on top of ``cfg.loss_params``.
        teachers: for joined multi-teacher shards, ``combine`` (the method's rule),
            ``num_teachers``, ``weight_temperature`` and ``policy_lr``.

    Returns:
        The final model folder (from the last checkpoint) and the per-step loss history.

    Raises:
        ray.train.TrainingFailedError: a worker failed more than ``cfg.max_failures`` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    terms = set(weights)
    for phase in cfg.phases:
        terms |= set(phase.weights or {}) | set(phase.weights_end or {})
    loop_config = {
        **cfg.model_dump(exclude={"students"}),
        "student_path": str(student_path),
        "weights": dict(weights),
        "terms": sorted(terms),
        "loss_params": {**cfg.loss_params, **(params or {})},
        "temperature": temperature,
        "run_label": name,
        **(teachers or {}),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": soft_label_dataset(shard_files, cfg.shuffle, cfg.seed, (teachers or {}).get("num_teachers", 1))},
    )
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError(f"student {name} finished without a checkpoint")
    model_dir = Path(result.checkpoint.path)
    history = json.loads((model_dir / HISTORY_FILE).read_text())
    if history:
        last = history[-1]
        print(f"[{name}] trained {len(history)} steps in {seconds:.0f} s; final "
              + " ".join(f"{k}={v:.4f}" for k, v in last.items() if k not in ("step", "lr", "temperature")), flush=True)
    return TrainResult(name=name, model_dir=model_dir, history=history, seconds=seconds, steps=len(history))
