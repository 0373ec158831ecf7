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
from raykd.teacher.engines import check_engine_request, resolve_engine

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


def teacher_app(cfg: TeacherConfig, model_path: str, **extra_options: Any) -> serve.Application:
    """Bind a :class:`TeacherDeployment` for ``cfg`` (not yet running).

    Args:
        cfg: the teacher's config (engine, dtype, threads, replicas or autoscaling, CPUs/GPUs,
            tensor/pipeline parallel sizes).
        model_path: resolved local model folder.
        **extra_options: extra ``Deployment.options`` laid over :func:`deployment_options`
            (``max_ongoing_requests``, ``max_queued_requests``, ``autoscaling_config`` replacing
            ``num_replicas``).

    Raises:
        ValueError: tensor/pipeline parallelism with an engine other than ``vllm``.
    """
    options = deployment_options(cfg)
    if "autoscaling_config" in extra_options:
        options.pop("num_replicas", None)
    options.update(extra_options)
    engine = resolve_engine(cfg)
    check_engine_request(engine, cfg)
    return TeacherDeployment.options(**options).bind(model_path, engine, engine_kwargs(cfg, engine), cfg.max_batch_size)


def deployment_options(cfg: TeacherConfig) -> dict[str, Any]:
    """The Serve ``Deployment.options`` of the teacher in ``cfg`` (pure: starts nothing).

    - Replicas: ``autoscaling_config`` from ``cfg.autoscaling`` as given when set (then
      ``num_replicas`` is not passed: Serve refuses both), else ``num_replicas``.
    - Resources: with ``tensor_parallel_size * pipeline_parallel_size = N > 1`` a placement group
      per replica, ``STRICT_PACK`` (one node), of one bundle ``{"CPU": num_cpus}`` for the
      replica actor and ``N`` bundles ``{"GPU": 1}`` for vLLM's workers (as Ray Serve LLM
      does); the replica actor itself takes no GPU. Else ``num_cpus`` / ``num_gpus`` on the
      replica actor.
    """
    parallel = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    options: dict[str, Any] = {}
    if parallel > 1:
        options["ray_actor_options"] = {"num_cpus": cfg.num_cpus, "num_gpus": 0}
        options["placement_group_bundles"] = [{"CPU": cfg.num_cpus}] + [{"GPU": 1} for _ in range(parallel)]
        options["placement_group_strategy"] = "STRICT_PACK"
    else:
        options["ray_actor_options"] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.serve_config()
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def engine_kwargs(cfg: TeacherConfig, engine: str) -> dict[str, Any]:
    """Keyword arguments of the ``engine`` class taken from the teacher config."""
    kwargs: dict[str, Any] = {"dtype": cfg.dtype, "device": cfg.device, "num_threads": cfg.num_threads}
    if engine == "vllm":
        kwargs.update(max_k=cfg.max_k, gpu_memory_utilization=cfg.gpu_memory_utilization,
                      tensor_parallel_size=cfg.tensor_parallel_size, pipeline_parallel_size=cfg.pipeline_parallel_size)
    return kwargs


def check_cluster_resources(cfg: TeacherConfig, node_gpus: list[float]) -> None:
    """Refuse a teacher the cluster can never place, before any model loads (instead of the
    replica queueing forever for resources).

    Args:
        cfg: the teacher's config.
        node_gpus: GPUs of each alive node (plain numbers, e.g. from :func:`cluster_node_gpus`).

    Raises:
        ValueError: the teacher asks for GPUs (``num_gpus > 0``, ``device=cuda``, or tensor/pipeline
            parallelism) on a cluster without any, or one replica needs more GPUs than the
            largest node has (a parallel replica's ``STRICT_PACK`` group must fit on one node).
    """
    most = max(node_gpus, default=0.0)
    need = cfg.gpus_per_replica
    parallel = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    wants_gpu = need > 0 or cfg.device == "cuda"
    if wants_gpu and most <= 0:
        why = (f"num_gpus={cfg.num_gpus}" if cfg.num_gpus > 0 and parallel == 1
               else f"{need:g} GPUs (tensor x pipeline parallel)" if parallel > 1 else "device='cuda'")
        raise ValueError(f"teacher {cfg.name!r} asks for {why}, but the Ray cluster has no GPU "
                         f"(nodes: {len(node_gpus)}); use teacher.num_gpus=0 and device=cpu, or add GPU nodes")
    if need > most:
        what = (f"tensor_parallel_size={cfg.tensor_parallel_size} x pipeline_parallel_size="
                f"{cfg.pipeline_parallel_size} = {parallel} GPUs on one node" if parallel > 1 else f"num_gpus={cfg.num_gpus:g}")
        raise ValueError(f"teacher {cfg.name!r} needs {what}, but the largest node has {most:g} GPUs; "
                         "lower the parallel size or num_gpus")


def cluster_node_gpus() -> list[float]:
    """GPUs of each alive node of the connected Ray cluster (``ray.nodes()``)."""
    import ray

    return [float(n.get("Resources", {}).get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


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

    Raises:
        ValueError: as :func:`check_cluster_resources` (checked before anything deploys).
    """
    handle = running_teacher(cfg.name)
    if handle is not None:
        log.info("reusing running teacher %r", cfg.name)
        return handle, False
    check_cluster_resources(cfg, cluster_node_gpus())
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
