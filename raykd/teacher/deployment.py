"""The teacher as a Ray Serve deployment, and how callers start or find it.

One Serve application per named teacher (application name = ``TeacherConfig.name``), holding
one :class:`TeacherDeployment` whose replicas each own an engine. Callers inside Ray (Ray Data
labelers, Train workers, Tune trials, other jobs) use the deployment handle:
``handle.score.remote(input_ids, attention_mask, k=..., temperature=...).result()``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ray import serve

from raykd.config import TeacherConfig
from raykd.teacher.engines import resolve_engine

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "Teacher"


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=4, health_check_period_s=30)
class TeacherDeployment:
    """Serve deployment that holds one teacher engine per replica.

    Args:
        model_path: resolved local model folder (see :func:`raykd.models.resolve_model_path`).
        engine: engine name (``hf``, ``vllm``, ``classifier``; see :data:`raykd.teacher.engines.ENGINES`).
        engine_kwargs: passed to the engine (``dtype``, ``device``, ``num_threads``, and for
            ``vllm`` ``max_k`` and ``gpu_memory_utilization``).
        max_batch_size: largest ``B`` one ``score`` call accepts.

    Requests beyond the replica's ``max_ongoing_requests`` queue in Serve's router; inside a
    replica the engine runs one forward at a time, so a second request in flight is ready
    the moment the first one finishes.
    """

    def __init__(self, model_path: str, engine: str = "hf", engine_kwargs: dict[str, Any] | None = None, max_batch_size: int = 64):
        from raykd.teacher.engines import build_engine

        self.engine = build_engine(engine, model_path, **(engine_kwargs or {}))
        self.max_batch_size = max_batch_size
        self.calls = {"score": 0, "generate": 0}

    def score(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, k: int = 32, temperature: float = 1.0
    ) -> dict[str, np.ndarray]:
        """Top-k soft labels for ``input_ids`` ``[B, T]``; see :meth:`raykd.teacher.engines.hf.HFEngine.score`.

        Raises:
            ValueError: ``B`` above ``max_batch_size`` or any engine validation error.
        """
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 2 and input_ids.shape[0] > self.max_batch_size:
            raise ValueError(f"batch of {input_ids.shape[0]} exceeds max_batch_size={self.max_batch_size}")
        self.calls["score"] += 1
        return self.engine.score(input_ids, attention_mask, k=k, temperature=temperature)

    def generate(self, prompts: list[Any], **kwargs: Any) -> list[dict[str, Any]]:
        """Completions with per-token top-k; see :meth:`raykd.teacher.engines.hf.HFEngine.generate`."""
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch_size={self.max_batch_size}")
        self.calls["generate"] += 1
        return self.engine.generate(prompts, **kwargs)

    def info(self) -> dict[str, Any]:
        """Engine identity (fingerprints, vocabulary, dtype, device) and call counts."""
        from dataclasses import asdict

        import os

        replica = serve.get_replica_context().replica_id.unique_id
        return {**asdict(self.engine.info()), "calls": dict(self.calls), "replica": replica, "pid": os.getpid()}


def teacher_app(cfg: TeacherConfig, model_path: str, **deployment_options: Any) -> serve.Application:
    """Bind a :class:`TeacherDeployment` for ``cfg`` (not yet running).

    Args:
        cfg: the teacher's config (engine, dtype, threads, replicas, CPUs/GPUs).
        model_path: resolved local model folder.
        **deployment_options: extra ``Deployment.options`` (``max_ongoing_requests``,
            ``max_queued_requests``, ``autoscaling_config`` replacing ``num_replicas``).
    """
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}}
    if "autoscaling_config" not in deployment_options:
        options["num_replicas"] = cfg.num_replicas
    options.update(deployment_options)
    engine = resolve_engine(cfg)
    return TeacherDeployment.options(**options).bind(model_path, engine, engine_kwargs(cfg, engine), cfg.max_batch_size)


def engine_kwargs(cfg: TeacherConfig, engine: str) -> dict[str, Any]:
    """Keyword arguments of the ``engine`` class taken from the teacher config."""
    kwargs: dict[str, Any] = {"dtype": cfg.dtype, "device": cfg.device, "num_threads": cfg.num_threads}
    if engine == "vllm":
        kwargs.update(max_k=cfg.max_k, gpu_memory_utilization=cfg.gpu_memory_utilization)
    return kwargs


def running_teacher(name: str) -> serve.handle.DeploymentHandle | None:
    """Handle of a running teacher application called ``name``, or None."""
    try:
        status = serve.status()
    except Exception:  # noqa: BLE001 - Serve not started on this cluster
        return None
    app = status.applications.get(name)
    if app is None or str(app.status) not in ("RUNNING", "ApplicationStatus.RUNNING"):
        return None
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=name)


def start_teacher(cfg: TeacherConfig, model_path: str) -> tuple[serve.handle.DeploymentHandle, bool]:
    """Start the teacher application, or reuse a running one of the same name.

    Returns:
        ``(handle, started)``: ``started`` is False when an existing teacher was reused.
    """
    handle = running_teacher(cfg.name)
    if handle is not None:
        log.info("reusing running teacher %r", cfg.name)
        return handle, False
    serve.start(proxy_location="Disabled")
    log.info("starting teacher %r from %s", cfg.name, model_path)
    handle = serve.run(teacher_app(cfg, model_path), name=cfg.name, route_prefix=None, blocking=False)
    return handle, True


def stop_teacher(name: str) -> None:
    """Delete the teacher application ``name`` (no error if it is not running)."""
    try:
        serve.delete(name)
    except Exception:  # noqa: BLE001
        pass
