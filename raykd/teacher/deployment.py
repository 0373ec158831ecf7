"""The teacher as a Ray Serve deployment (how callers start or find it: :mod:`raykd.teacher.apps`).

One Serve application per named teacher (application name = ``TeacherConfig.name``), holding
one :class:`TeacherDeployment` whose replicas each own an engine. Callers inside Ray (Ray Data
labelers, Train workers, Tune trials, other jobs) use the deployment handle:
``handle.score.remote(input_ids, attention_mask, k=..., temperature=...).result()``.

The calls an application answered are counted in one small named actor per application
(:class:`~raykd.teacher.counter.TeacherCallCounter`), not in the replicas: a replica that Serve restarts starts empty,
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

from raykd.teacher.batching import Call, FairBatcher
from raykd.teacher.counter import call_counter
from raykd.teacher.engines import build_engine
from raykd.teacher.engines.base import cut_at_stop
from raykd.teacher.merges import MERGES, run_group

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "Teacher"
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
