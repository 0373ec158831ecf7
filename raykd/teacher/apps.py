"""Starting, finding, owning and stopping teacher applications on a Serve cluster.

:func:`teacher_app` binds a :class:`~raykd.teacher.deployment.TeacherDeployment` for a
:class:`~raykd.config.TeacherConfig` (its Serve options, resources and engine arguments);
:func:`start_teacher` deploys it, or reuses the running application of that name;
:func:`running_teacher` finds one; :func:`stop_teacher` deletes one, its call counter with it.
Every application raykd deploys carries raykd's mark (:func:`owner_marked`), and an application
without it is never reused or deleted (:func:`check_ours`).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import serve

from raykd.config import TeacherConfig
from raykd.teacher.counter import COUNTER_NAMESPACE, counter_name
from raykd.teacher.deployment import DEPLOYMENT_NAME, TeacherDeployment
from raykd.teacher.engines import check_engine_request, resolve_engine

log = logging.getLogger(__name__)


def teacher_app(cfg: TeacherConfig, model_path: str, **extra_options: Any) -> serve.Application:
    """Bind a :class:`TeacherDeployment` for ``cfg`` (not yet running).

    Args:
        cfg: the teacher's config (engine, dtype, threads, replicas or autoscaling, CPUs/GPUs,
            tensor/pipeline parallel sizes).
        model_path: resolved local model folder.
        **extra_options: extra ``Deployment.options`` laid over :func:`deployment_options`
            (``max_ongoing_requests``, ``max_queued_requests``, ``autoscaling_config`` replacing
            ``num_replicas``).

    The replicas carry raykd's mark (:func:`owner_marked`) and finish the requests in flight for
    up to :data:`GRACEFUL_SHUTDOWN_S` when the application is deleted.

    Raises:
        ValueError: tensor/pipeline parallelism with an engine other than ``vllm``.
    """
    options = deployment_options(cfg)
    if "autoscaling_config" in extra_options:
        options.pop("num_replicas", None)
    options.update(extra_options)
    options["ray_actor_options"] = owner_marked(options["ray_actor_options"])
    options.setdefault("graceful_shutdown_timeout_s", GRACEFUL_SHUTDOWN_S)
    options.setdefault("graceful_shutdown_wait_loop_s", SHUTDOWN_POLL_S)
    engine = resolve_engine(cfg)
    check_engine_request(engine, cfg)
    return TeacherDeployment.options(**options).bind(model_path, engine, engine_kwargs(cfg, engine), cfg.max_batch_size,
                                                     cfg.max_batch_tokens, cfg.batch_wait_ms)


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
                      tensor_parallel_size=cfg.tensor_parallel_size, pipeline_parallel_size=cfg.pipeline_parallel_size,
                      asynchronous=True)  # a served vLLM teacher batches continuously (AsyncLLM)
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


OWNER_ENV = "RAYKD_OWNER"
"""Environment variable of a teacher replica that marks its application as deployed by raykd
(``teacher up`` or a run's own teacher); Serve shows it in the application's details, under
the deployment's ``ray_actor_options.runtime_env.env_vars``."""
OWNER = "raykd"
GRACEFUL_SHUTDOWN_S = 120.0
"""Seconds a teacher replica being deleted (``teacher down``, a run's end) keeps working on the
requests it has already accepted (Serve's ``graceful_shutdown_timeout_s``; it takes no new ones)."""
SHUTDOWN_POLL_S = 0.2
"""Seconds between a deleted replica's checks for requests still in flight (Serve's
``graceful_shutdown_wait_loop_s``, default 2: an idle teacher waited 2 s to stop)."""


def owner_marked(actor_options: dict[str, Any]) -> dict[str, Any]:
    """``ray_actor_options`` with raykd's mark (``runtime_env.env_vars[OWNER_ENV]``).

    Serve gives a deployment without a ``runtime_env`` of its own the driver's job runtime env,
    but one with its own only the job's ``working_dir``; so the job's runtime env (when Ray is
    initialised) is the base here, the deployment's own laid over it, then the mark.
    """
    base = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    env = {**base, **actor_options.get("runtime_env", {})}
    env["env_vars"] = {**base.get("env_vars", {}), **actor_options.get("runtime_env", {}).get("env_vars", {}), OWNER_ENV: OWNER}
    return {**actor_options, "runtime_env": env}


def deployed_by_raykd(app: Any) -> bool:
    """Whether the Serve application ``app`` (``ApplicationDetails``) carries raykd's mark."""
    dep = app.deployments.get(DEPLOYMENT_NAME)
    actor = dep.deployment_config.ray_actor_options if dep is not None and dep.deployment_config else None
    runtime_env = actor.get("runtime_env") if isinstance(actor, dict) else getattr(actor, "runtime_env", None)
    return ((runtime_env or {}).get("env_vars") or {}).get(OWNER_ENV) == OWNER


class ForeignAppError(ValueError):
    """A Serve application of the name raykd wants exists, but raykd did not deploy it."""


def serve_details() -> Any:
    """Serve's view of the connected cluster (``ServeInstanceDetails``: what ``serve status``
    shows), None if Serve is not running there."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    if not ray.is_initialized():  # Serve's client would otherwise start (or join) a Ray of its own
        return None
    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else ServeInstanceDetails(**client.get_serve_details())


def check_ours(name: str, app: Any) -> None:
    """Refuse to touch the application ``name`` unless raykd deployed it.

    Raises:
        ForeignAppError: ``app`` lacks raykd's mark (:data:`OWNER_ENV`).
    """
    if not deployed_by_raykd(app):
        raise ForeignAppError(
            f"the Serve application {name!r} on this cluster was not deployed by raykd (its {DEPLOYMENT_NAME!r} "
            f"deployment lacks the env var {OWNER_ENV}={OWNER}), so raykd leaves it alone: use another teacher.name, "
            "or remove it with Serve's own tools (`serve delete`) if it is yours")


def running_teacher(name: str) -> serve.handle.DeploymentHandle | None:
    """Handle of a running teacher application called ``name`` that raykd deployed, or None.

    Raises:
        ForeignAppError: an application of that name exists but raykd did not deploy it (raykd
            neither uses nor replaces it).
    """
    details = serve_details()
    app = details.applications.get(name) if details is not None else None
    if app is None:
        return None
    check_ours(name, app)
    if str(getattr(app.status, "value", app.status)) != "RUNNING":
        return None
    return teacher_handle(name)


def teacher_handle(app_name: str) -> Any:
    """The Serve handle (``DeploymentHandle``) of the teacher deployment in application
    ``app_name``, from any process of the cluster: the driver, a Ray Data or Ray Train worker.

    Serve caches its controller client once per process and reuses it unchecked. A worker process
    that Ray reuses across runs keeps that client after Serve restarted on the cluster (``serve
    shutdown``, then a new controller: e.g. ``raykd teacher up`` restarting Serve to add an HTTP
    proxy), and every handle taken through it then fails with the dead controller's
    ``ActorDiedError``. The cached client is checked first (one ``check_alive`` call, at most 5 s)
    and dropped when its controller is gone, so the handle comes from the running controller.
    """
    try:  # Serve's own check of its cached client (a private helper)
        from ray.serve.context import _check_cached_client_alive
    except ImportError:  # a Serve without it: the handle as Serve gives it
        pass
    else:
        _check_cached_client_alive()
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)


class TeacherNotRunningError(ValueError):
    """``teacher.start`` is false and no teacher of that name is running."""


def check_teacher_reachable(cfg: TeacherConfig, why: str) -> None:
    """Refuse, before any compute, a run that needs a teacher it may not start and cannot find.

    Args:
        cfg: the teacher's config; nothing is checked when ``cfg.start`` is true.
        why: what the run needs the teacher for (for the message).

    Raises:
        TeacherNotRunningError: ``teacher.start`` is false and no application ``cfg.name`` runs.
    """
    if not cfg.start and running_teacher(cfg.name) is None:
        raise TeacherNotRunningError(
            f"{why} needs the teacher {cfg.name!r}, which is not running, and teacher.start=false forbids starting "
            f"one: start it first (`raykd teacher up`, with the name {cfg.name!r}), set teacher.name to a running "
            "teacher, or set teacher.start=true (with teacher.start=false and no ray.address, the run looks for the "
            "teacher on the cluster `raykd teacher up` started)")


def start_teacher(cfg: TeacherConfig, model_path: str) -> tuple[serve.handle.DeploymentHandle, bool]:
    """Start the teacher application, or reuse a running one of the same name.

    Returns:
        ``(handle, started)``: ``started`` is False when an existing teacher was reused.

    Raises:
        ValueError: as :func:`check_cluster_resources` (checked before anything deploys).
        TeacherNotRunningError: none is running and ``cfg.start`` is false.
        ForeignAppError: an application named ``cfg.name`` that raykd did not deploy exists.
    """
    handle = running_teacher(cfg.name)
    if handle is not None:
        log.info("reusing running teacher %r", cfg.name)
        return handle, False
    check_teacher_reachable(cfg, "this run")
    check_cluster_resources(cfg, cluster_node_gpus())
    serve.start(proxy_location="Disabled")
    log.info("starting teacher %r from %s", cfg.name, model_path)
    handle = serve.run(teacher_app(cfg, model_path), name=cfg.name, route_prefix=None, blocking=False)
    return handle, True


def stop_teacher(name: str) -> None:
    """Delete the teacher application ``name`` and its call counter (no error if it is not running);
    returns once the counter's name is free, so a new application of that name counts from zero."""
    try:
        serve.delete(name)
    except Exception:  # noqa: BLE001
        pass
    import time

    try:
        ray.kill(ray.get_actor(counter_name(name), namespace=COUNTER_NAMESPACE))
    except ValueError:  # no counter: the application never started a replica
        return
    deadline = time.monotonic() + 10.0  # ray.kill returns before the name is released
    while time.monotonic() < deadline:
        try:
            ray.get_actor(counter_name(name), namespace=COUNTER_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
