"""The teacher as a Ray Serve deployment, and how callers start or find it.

One Serve application per named teacher (application name = ``TeacherConfig.name``), holding
one :class:`TeacherDeployment` whose replicas each own an engine. Callers inside Ray (Ray Data
labelers, Train workers, Tune trials, other jobs) use the deployment handle:
``handle.score.remote(input_ids, attention_mask, k=..., temperature=...).result()``.

The calls an application answered are counted in one small named actor per application
(:class:`TeacherCallCounter`), not in the replicas: a replica that Serve restarts starts empty,
so counts kept in it would lose every call the dead replica answered, and with several
replicas each one would know only its own share.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import ray
from ray import serve

from raykd.config import TeacherConfig
from raykd.teacher.batching import Call, FairBatcher
from raykd.teacher.engines import build_engine, check_engine_request, resolve_engine
from raykd.teacher.engines.base import cut_at_stop
from raykd.teacher.merges import MERGES, run_group

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "Teacher"
COUNTER_NAMESPACE = "raykd"
"""Ray namespace of the per-application :class:`TeacherCallCounter` actors (callers of any
namespace, Serve replicas included, find them by name there)."""


@ray.remote(num_cpus=0, max_restarts=-1)
class TeacherCallCounter:
    """The ``score`` / ``generate`` calls one teacher application answered, per replica.

    A detached actor named :func:`counter_name` that outlives the application's replicas: each
    replica sends ``add`` fire-and-forget after a call is answered (a local enqueue, off the
    request's critical path), and :meth:`TeacherDeployment.info` asks for :meth:`totals`.
    Chosen over Ray's metrics (``ray.util.metrics.Counter``) because those are exported to
    Prometheus every few seconds and read back only through a metrics server, while ``info()``
    must answer exactly, at once, on any cluster. :func:`stop_teacher` kills the counter with
    its application, so a new application of the same name counts from zero.

    Calls still in flight when a replica dies are not counted (they were never answered); the
    caller's resent call is counted once, on the replica that answers it. If the counter's own
    process dies, Ray restarts it empty.
    """

    def __init__(self) -> None:
        self.calls: dict[str, dict[str, int]] = {}
        self.by_caller: dict[str, dict[str, int]] = {}

    def add(self, replica: str, method: str, n: int = 1, caller: str = "anonymous") -> None:
        """Count ``n`` answered ``method`` calls of ``replica`` (a Serve replica id) from ``caller``."""
        for table, key in ((self.calls, replica), (self.by_caller, caller)):
            per = table.setdefault(key, {"score": 0, "generate": 0})
            per[method] = per.get(method, 0) + n

    def totals(self) -> dict[str, Any]:
        """``{"calls": {method: n}, "calls_by_replica": {replica: {method: n}}, "calls_by_caller":
        {caller: {method: n}}}``; ``calls`` sums every replica the application ever had, the dead
        ones included."""
        total = {"score": 0, "generate": 0}
        for per in self.calls.values():
            for method, n in per.items():
                total[method] = total.get(method, 0) + n
        return {"calls": total, "calls_by_replica": {r: dict(per) for r, per in self.calls.items()},
                "calls_by_caller": {c: dict(per) for c, per in self.by_caller.items()}}


def counter_name(app_name: str) -> str:
    """Actor name of the call counter of teacher application ``app_name``."""
    return f"teacher_calls:{app_name}"


def call_counter(app_name: str) -> ray.actor.ActorHandle:
    """The call counter of ``app_name``, created (detached, 0 CPUs) if it does not exist yet."""
    return TeacherCallCounter.options(name=counter_name(app_name), namespace=COUNTER_NAMESPACE,
                                      lifetime="detached", get_if_exists=True).remote()


DEFAULT_MAX_ONGOING_REQUESTS = 256
"""Requests one replica accepts at once. They wait in the replica's :class:`FairBatcher`
(which forms the batches and shares them between callers), not in Serve's router, so this is
large: a router queue is first come, first served and would put a bulk labeler's backlog
in front of an interactive caller."""


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS, health_check_period_s=30)
class TeacherDeployment:
    """Serve deployment that holds one teacher engine per replica and batches across callers.

    Every method labelers call (``score``, ``score_mc``, ``score_continuations``, ``generate``,
    ``complete``) is async: a call is checked, then queued in the replica's
    :class:`~raykd.teacher.batching.FairBatcher`, which merges concurrent calls of one group
    (e.g. ``score`` at the same ``k`` and temperature) into one engine call, one call per caller
    per round, bounded by ``max_batch_tokens`` padded tokens and ``max_batch_size`` rows
    (:mod:`raykd.teacher.merges` says how each method merges and splits). The engine runs in a
    worker thread, so the replica keeps accepting calls while a batch runs.

    The ``vllm`` engine is the exception: it runs vLLM's ``AsyncLLM``, whose scheduler batches
    continuously (a request joins the running batch at the next decoding step instead of waiting
    for the batch in flight to finish), so its calls skip the queue and go to the engine at once;
    ``priority`` becomes vLLM's request priority.

    Args:
        model_path: resolved local model folder (see :func:`raykd.models.resolve_model_path`).
        engine: engine name (``hf``, ``vllm``, ``classifier``; see :data:`raykd.teacher.engines.ENGINES`).
        engine_kwargs: passed to the engine (``dtype``, ``device``, ``num_threads``, and for
            ``vllm`` ``max_k`` and ``gpu_memory_utilization``).
        max_batch_size: largest ``B`` one call accepts, and most rows of one merged batch.
        max_batch_tokens: most padded tokens of one merged batch (a single larger call runs alone).
        batch_wait_ms: how long the first call of a batch waits for others (milliseconds).

    Every method takes ``caller`` (default ``"anonymous"``): the name fairness and the
    per-caller call counts use (a run's name, an HTTP token's name). ``score`` and ``generate``
    also take ``priority`` (default 0): interactive callers (on-policy Train workers) send 1, so
    their calls form small batches of their own ahead of bulk labeling.
    """

    def __init__(self, model_path: str, engine: str = "hf", engine_kwargs: dict[str, Any] | None = None,
                 max_batch_size: int = 64, max_batch_tokens: int = 8192, batch_wait_ms: float = 5.0):
        self.engine = build_engine(engine, model_path, **(engine_kwargs or {}))
        self.max_batch_size = max_batch_size
        self.batcher = FairBatcher(lambda group, payloads: run_group(self.engine, group, payloads),
                                   max_batch_tokens=max_batch_tokens, max_batch_rows=max_batch_size,
                                   batch_wait_s=batch_wait_ms / 1000)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.counter = call_counter(context.app_name)

    def _check_rows(self, n: int, what: str) -> None:
        if n > self.max_batch_size:
            raise ValueError(f"batch of {n} {what} exceeds max_batch_size={self.max_batch_size}")

    def _needs(self, method: str, fix: str) -> None:
        if not hasattr(self.engine, method):
            raise ValueError(f"the {type(self.engine).__name__} has no {method}; {fix}")

    async def _submit(self, method: str, payload: Any, caller: str | None, counted_as: str, priority: int = 0) -> Any:
        caller = caller or "anonymous"
        if getattr(self.engine, "continuous", False):
            out = await self._run_continuous(method, payload, priority)
        else:
            merge = MERGES[method]
            rows, width = merge.size(payload)
            call = Call(caller=caller, group=merge.group(payload), payload=payload, rows=int(rows),
                        width=int(width), mergeable=merge.mergeable(payload), priority=priority)
            out = await self.batcher.submit(call)
        self.counter.add.remote(self.replica, counted_as, caller=caller)  # fire-and-forget
        return out

    async def _run_continuous(self, method: str, payload: Any, priority: int) -> Any:
        """A call on an engine with its own continuous batching (vLLM's ``AsyncLLM``): no
        :class:`FairBatcher` in front, every row or prompt joins the engine's running batch at its
        next step, and ``priority`` goes to vLLM's priority scheduler. Only ``score`` and
        ``generate`` reach here (the vllm engine has no other method)."""
        if method == "score":
            input_ids, mask, k, temperature, *_ = payload
            return await self.engine.score_async(input_ids, mask, k=k, temperature=temperature, priority=priority)
        prompts, kwargs = payload
        return await self.engine.generate_async(prompts, priority=priority, **kwargs)

    async def score(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, k: int = 32,
                    temperature: float = 1.0, seeds: np.ndarray | None = None, draws: str = "independent",
                    caller: str | None = None, priority: int = 0) -> dict[str, np.ndarray]:
        """Top-k soft labels for ``input_ids`` ``[B, T]`` (with ``seeds`` ``[B]``: ``k`` draws per
        position, sampled soft labels, ``draws`` their scheme); see :meth:`raykd.teacher.engines.hf.HFEngine.score`.
        Concurrent calls at the same ``k`` and temperature share one forward; the answer equals
        the unbatched one (a row's draws depend only on its seed).

        Raises:
            ValueError: ``B`` above ``max_batch_size``, ``seeds`` for an engine that cannot draw
                them, or any engine validation error (checked before the call joins a batch, so
                it fails alone).
        """
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 2:
            self._check_rows(input_ids.shape[0], "rows")
        sampled = {} if seeds is None else {"seeds": np.asarray(seeds)}
        if sampled and "seeds" not in inspect.signature(self.engine.score).parameters:
            raise ValueError(f"the {self.engine.name} engine cannot draw sampled soft labels (it returns top-k logprobs "
                             "only): use teacher.engine=hf for labels.form=sampled")
        self.engine.validate_score_request(input_ids, k, temperature, **sampled)
        mask = None if attention_mask is None else np.asarray(attention_mask)
        return await self._submit("score", (input_ids, mask, k, temperature, sampled.get("seeds"), draws), caller, "score",
                                  priority)

    async def score_mc(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
                       caller: str | None = None, **kwargs: Any) -> dict[str, np.ndarray]:
        """Monte-Carlo dropout scoring of a classifier teacher (MUKI's uncertainty); see
        :meth:`raykd.teacher.engines.classifier.ClassifierEngine.score_mc`. Runs in a batch of
        its own (its dropout masks are seeded per call), in its caller's fair turn.

        Raises:
            ValueError: ``B`` above ``max_batch_size``, an engine without MC scoring (only the
                classifier engine has it), or the engine's own errors.
        """
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 2:
            self._check_rows(input_ids.shape[0], "rows")
        self._needs("score_mc", "use engine: classifier")
        return await self._submit("score_mc", (input_ids, attention_mask, kwargs), caller, "score_mc")

    async def score_continuations(self, prefix: str, texts: list[str], continuations: list[str], *,
                                  caller: str | None = None, **kwargs: Any) -> dict[str, np.ndarray]:
        """Summed log-probs of each continuation after ``prefix + text`` (verbaliser scoring of
        pseudo-labels); see :meth:`raykd.teacher.engines.hf.HFEngine.score_continuations`.
        Calls with the same prefix, continuations and options share a batch.

        Raises:
            ValueError: more texts than ``max_batch_size``, an engine without it (only LM
                engines have it), or the engine's own errors.
        """
        self._check_rows(len(texts), "texts")
        self._needs("score_continuations", "use engine: hf")
        return await self._submit("score_continuations", (list(texts), prefix, list(continuations), kwargs), caller, "score")

    async def complete(self, prompts: list[Any], *, caller: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        """Greedy completions of prompts sharing a prefix; see
        :meth:`raykd.teacher.engines.hf.HFEngine.complete`. Calls with the same options share a batch.

        Raises:
            ValueError: more prompts than ``max_batch_size``, an engine without it, or the
                engine's own errors.
        """
        self._check_rows(len(prompts), "prompts")
        self._needs("complete", "use engine: hf")
        return await self._submit("complete", (list(prompts), kwargs), caller, "generate")

    async def generate(self, prompts: list[Any], *, caller: str | None = None, stop: list[str] | None = None,
                       priority: int = 0, **kwargs: Any) -> list[dict[str, Any]]:
        """Completions with per-token top-k; see :meth:`raykd.teacher.engines.hf.HFEngine.generate`.
        Calls with the same options (``max_new_tokens``, ``temperature``, ``k``, ``top_p``) share
        a batch; seeded sampling runs alone. ``stop`` strings cut each completion after the fact
        (:func:`raykd.teacher.engines.base.cut_at_stop`).

        Raises:
            ValueError: more prompts than ``max_batch_size`` or the engine's own errors.
        """
        self._check_rows(len(prompts), "prompts")
        if not prompts:
            raise ValueError("prompts: the list of prompts must not be empty")
        if kwargs.get("temperature", 0.0) == 0:
            kwargs.pop("seed", None)  # greedy: the seed changes nothing, and would split groups
        outs = await self._submit("generate", (list(prompts), kwargs), caller, "generate", priority)
        if stop:
            outs = [cut_at_stop(o, stop, self.engine.tokenizer) for o in outs]
        return outs

    async def info(self) -> dict[str, Any]:
        """Engine identity (fingerprints, vocabulary, dtype, device) and call counts.

        Returns:
            The engine's info fields, plus ``calls`` (``{"score": n, "generate": n}`` answered by
            the whole application: every replica, including replicas Serve has since replaced),
            ``calls_by_replica`` (the same per replica id), ``calls_by_caller`` (the same per
            caller name), ``batches`` (engine calls this replica ran, each serving one or more
            merged calls), ``queued`` (calls waiting in its fair queue now), ``replica`` (the id of
            the replica answering) and ``pid`` (its process). This replica's own answered calls are always
            included (Ray runs one caller's actor calls in order); another replica's last calls
            may arrive a few milliseconds after its answers.
        """
        import os
        from dataclasses import asdict

        counts = await self.counter.totals.remote()
        return {**asdict(self.engine.info()), **counts, "batches": self.batcher.batches, "queued": self.batcher.pending(),
                "replica": self.replica, "pid": os.getpid()}


def default_caller() -> str:
    """The caller name of teacher calls made from this process: ``$RAYKD_CALLER`` when set, else
    ``job:<Ray job id>``, which every worker of one run (its labelers, Train workers, Tune
    trials) shares, so a run is one caller in the teacher's fair share."""
    import os

    name = os.environ.get("RAYKD_CALLER")
    if name:
        return name
    try:
        return f"job:{ray.get_runtime_context().get_job_id()}"
    except Exception:  # noqa: BLE001 - Ray not initialised in this process
        return "anonymous"


class ResentCall:
    """A teacher call that is sent again when the replica serving it dies before answering.

    ``score`` and ``info`` are pure functions of their arguments, so sending one again cannot
    duplicate or change anything: the caller keeps the one answer it receives (a resent sampled
    ``generate`` draws a new sample, still one). Serve routes the resent call to a live replica,
    or holds it until it has replaced the dead one. Errors the teacher raises (bad input) are
    not resent.

    Args:
        method: a deployment handle method, e.g. ``handle.score``.
        *args, **kwargs: the call's arguments (``caller`` defaults to :func:`default_caller`).
        attempts: sends in all (the first included) before the replica loss is raised.

    Example:
        ``ResentCall(handle.score, input_ids, attention_mask, k=32).result()``
    """

    def __init__(self, method: serve.handle.DeploymentHandle, *args: Any, attempts: int = 3, **kwargs: Any):
        if attempts < 1:
            raise ValueError(f"attempts={attempts}: a call needs at least one send")
        kwargs.setdefault("caller", default_caller())
        self.method, self.args, self.kwargs, self.attempts = method, args, kwargs, attempts
        self.sends = 1
        self.response = method.remote(*args, **kwargs)  # sent now: callers keep several in flight

    def result(self, timeout_s: float | None = None) -> Any:
        """The answer, waiting up to ``timeout_s`` seconds per send.

        Raises:
            ray.exceptions.RayActorError: the replicas died ``attempts`` times during this call.
            Exception: what the teacher raised (not resent) or Serve's timeout error.
        """
        while True:
            try:
                return self.response.result(timeout_s=timeout_s)
            except ray.exceptions.RayActorError as e:  # the replica died (or is unreachable) before answering
                if self.sends >= self.attempts:
                    raise
                log.warning("a teacher replica died during a call (%s); sending it again (send %d of %d)",
                            type(e).__name__, self.sends + 1, self.attempts)
                self.sends += 1
                self.response = self.method.remote(*self.args, **self.kwargs)


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
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=name)


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
