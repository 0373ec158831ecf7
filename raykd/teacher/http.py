"""An HTTP JSON API in front of a teacher: a Ray Serve ingress deployment on FastAPI.

The ingress is bound in the same Serve application as the teacher it fronts,
``HTTPIngress.bind(teacher_node, http_cfg)``, and calls it through a deployment handle, so
HTTP callers and in-cluster handle callers share the same replicas. Routes, under the
application's route prefix (``/teachers/<name>`` by default):

- ``GET /healthz`` (never needs the token): the teacher's identity (engine, fingerprints,
  ``vocab_size``, ``max_seq_len``, dtype, device, call counts) and this API's limits.
- ``POST /v1/score`` (:class:`~raykd.teacher.schemas.ScoreRequest`): ``topk_ids`` and
  ``topk_logprobs`` ``[B, T, K]``, ``tail_logmass`` and ``label_logprobs`` ``[B, T]`` as
  nested lists (see :meth:`raykd.teacher.engines.hf.HFEngine.score`).
- ``POST /v1/generate`` (:class:`~raykd.teacher.schemas.GenerateRequest`): ``completions``,
  one per prompt: ``text``, ``token_ids`` ``[N]``, ``topk_ids`` / ``topk_logprobs`` ``[N, K]``,
  ``logprobs`` ``[N]``.
- ``POST /v1/completions``: the OpenAI legacy completions API (``choices[].text``,
  ``choices[].logprobs`` with ``tokens`` / ``token_logprobs`` / ``top_logprobs``).
- ``POST /v1/chat/completions`` (:class:`~raykd.teacher.schemas.ChatCompletionRequest`): the
  OpenAI chat completions API, one choice (``n=1``), the chat template applied by the engine;
  ``logprobs=true`` and ``top_logprobs`` (0-20) give ``choices[0].logprobs.content[i]`` =
  ``{token, logprob, bytes, top_logprobs}``.
- ``GET /v1/models``: the OpenAI model list, the one teacher served here (its ``id`` is the
  ``model`` the OpenAI routes accept).

The OpenAI routes work with the ``openai`` client: ``OpenAI(base_url=f"{url}/v1", api_key=token)``.

Errors are JSON ``{"detail": "<field>: <problem>"}`` (repeated as ``error.message``, the
field OpenAI clients read): 401 missing or wrong bearer token;
422 malformed JSON, a bad shape, or a size over this API's limits; 400 a request the engine
rejects (token ids outside the vocabulary, longer than the model's context); 404 an unknown
``model``; 503 the teacher is busy (its ``max_queued_requests`` is reached) or the caller's
quota is full (``max_concurrent`` running and ``max_waiting`` waiting), retry after
``Retry-After`` seconds.

Callers are told apart by their token's name (``http.tokens``, or ``http.token_name`` for the
single ``token``); the name goes with every teacher call, so the replica shares its batches
round robin between callers, and is logged with the OpenAI ``user`` field.
A value of ``-inf`` (``tail_logmass`` when ``K = V``) is sent as ``null``.
"""

# No ``from __future__ import annotations``: Serve rebuilds the route signatures of the class and
# FastAPI must see the request models as classes, not strings.
import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from raykd.models import load_tokenizer
from raykd.teacher import openai_format as fmt
from raykd.teacher.engines.base import encode_prompts
from raykd.teacher.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    HTTPConfig,
    ScoreRequest,
    check_limits,
)

INGRESS_NAME = "TeacherHTTP"

log = logging.getLogger(__name__)

app = FastAPI(title="raykd teacher", description="Teacher soft labels and completions over HTTP.")


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error body both plain callers (``detail``) and OpenAI clients (``error.message``) read."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": detail, "type": kind, "param": None, "code": status}
    return JSONResponse(status_code=status, content={"detail": detail, "error": error}, headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable line per problem, each naming its field."""
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            problems.append(f"body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
            continue
        loc = ".".join(str(x) for x in err["loc"] if x != "body")
        msg = str(err["msg"]).removeprefix("Value error, ")
        problems.append(f"{loc}: {msg}" if loc else msg)
    return _error(422, "; ".join(problems))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every HTTP error (also an unknown route's 404) in the body of :func:`_error`."""
    return _error(exc.status_code, str(exc.detail), exc.headers)


async def _caller(authorization: str | None = Header(default=None)) -> str:
    """The caller's name from its bearer token (401 for a missing or wrong one)."""
    return serve.get_replica_context().servable_object.authorize(authorization)


def _root_cause(err: BaseException) -> BaseException:
    while isinstance(err, RayTaskError) and err.cause is not None and err.cause is not err:
        err = err.cause
    return err


@dataclass
class _Quota:
    """One caller's share of the ingress: ``max_concurrent`` requests at once, ``max_waiting`` in line."""

    slots: asyncio.Semaphore
    max_concurrent: int
    max_waiting: int
    waiting: int = 0


@serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class HTTPIngress:
    """Serve ingress that answers HTTP requests with the teacher behind ``teacher``.

    Args:
        teacher: handle of the :class:`~raykd.teacher.deployment.TeacherDeployment` (pass
            the bound teacher node; Serve turns it into a handle).
        cfg: limits and the bearer tokens (``cfg.token`` and each ``cfg.tokens[i].token``;
            resolve ``token_env`` before binding, see :func:`raykd.teacher.service.served_teacher_app`).
    """

    def __init__(self, teacher: DeploymentHandle, cfg: HTTPConfig):
        self.teacher = teacher
        self.cfg = cfg
        self.name = serve.get_replica_context().app_name
        self._tokenizer = None
        self._tokenizer_lock = asyncio.Lock()
        self._created = int(time.time())
        self.callers: dict[str, str] = {t.token: t.name for t in cfg.tokens if t.token}
        if cfg.token:
            self.callers[cfg.token] = cfg.token_name
        quotas = [(cfg.token_name, cfg.max_concurrent, cfg.max_waiting)] + [(t.name, t.max_concurrent, t.max_waiting) for t in cfg.tokens]
        self.quotas = {name: _Quota(asyncio.Semaphore(n), n, w) for name, n, w in quotas}
        self.priority = {t.name: t.priority for t in cfg.tokens}

    def authorize(self, authorization: str | None) -> str:
        """The caller name of ``authorization`` (``Bearer <token>``); 401 for a missing or wrong
        token, unless the API is open (no token configured: every caller is ``token_name``)."""
        if not self.callers:
            return self.cfg.token_name
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() == "bearer":
            for token, name in self.callers.items():
                if hmac.compare_digest(given.strip().encode(), token.encode()):
                    return name
        raise HTTPException(
            401, detail="Authorization: missing or wrong bearer token (send 'Authorization: Bearer <token>')",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @contextlib.asynccontextmanager
    async def _quota(self, caller: str):
        """Hold one of ``caller``'s slots; 503 with ``Retry-After`` when its line is full."""
        q = self.quotas[caller]
        if q.slots.locked() and q.waiting >= q.max_waiting:
            raise HTTPException(503, detail=f"caller {caller!r} is over its quota ({q.max_concurrent} requests running, "
                                            f"{q.max_waiting} waiting); retry later", headers={"Retry-After": "1"})
        q.waiting += 1
        try:
            await q.slots.acquire()
        finally:
            q.waiting -= 1
        try:
            yield
        finally:
            q.slots.release()

    def _limits(self, req: ScoreRequest | GenerateRequest | CompletionRequest | ChatCompletionRequest) -> None:
        try:
            check_limits(req, self.cfg)
        except ValueError as e:
            raise HTTPException(422, detail=str(e)) from None

    async def _check_lengths(self, prompts: list[Any], new_tokens: int, field: str) -> list[list[int]]:
        """422 when a prompt plus ``new_tokens`` exceeds ``max_seq_len``; returns the prompts' ids."""
        tok = await self._load_tokenizer()
        try:
            encoded = await asyncio.to_thread(encode_prompts, tok, prompts)
        except ValueError as e:  # e.g. a chat prompt for a tokenizer without a chat template
            raise HTTPException(400, detail=f"{field}: {e}") from None
        longest = max(len(e) for e in encoded)
        if longest + new_tokens > self.cfg.max_seq_len:
            raise HTTPException(422, detail=f"{field}: a prompt of {longest} tokens + {new_tokens} new tokens exceeds "
                                            f"max_seq_len={self.cfg.max_seq_len}")
        return encoded

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the teacher; backpressure -> 503, an engine ``ValueError`` -> 400."""
        try:
            return await getattr(self.teacher, method).remote(*args, **kwargs)
        except (BackPressureError, RayTaskError) as e:
            cause = _root_cause(e)
            if isinstance(cause, BackPressureError):
                raise HTTPException(503, detail=f"teacher {self.name!r} is busy: {cause}; retry later", headers={"Retry-After": "1"}) from None
            if isinstance(cause, ValueError):
                raise HTTPException(400, detail=str(cause)) from None
            raise

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Teacher identity and this API's limits; 503 when the teacher is busy."""
        info = await self._call("info")
        keep = ("engine", "weights_fingerprint", "tokenizer_fingerprint", "vocab_size", "max_seq_len", "dtype", "device", "calls")
        limits = self.cfg.model_dump(include={"max_batch_size", "max_seq_len", "max_k", "max_new_tokens"})
        return {"status": "ok", "teacher": self.name, **{k: info[k] for k in keep}, "limits": limits, "auth": bool(self.callers),
                "callers": sorted(self.quotas), "calls_by_caller": info.get("calls_by_caller", {})}

    @app.post("/v1/score")
    async def score(self, req: ScoreRequest, caller: str = Depends(_caller)) -> JSONResponse:
        """Top-k soft labels of ``input_ids`` ``[B, T]`` (see the module docstring)."""
        self._limits(req)
        mask = None if req.attention_mask is None else np.asarray(req.attention_mask, dtype=np.int64)
        async with self._quota(caller):
            out = await self._call("score", np.asarray(req.input_ids, dtype=np.int64), mask, k=req.k,
                                   temperature=req.temperature, caller=caller, priority=self.priority.get(caller, 0))
        return JSONResponse({name: fmt.jsonable(value) for name, value in out.items()})

    @app.post("/v1/generate")
    async def generate(self, req: GenerateRequest, caller: str = Depends(_caller)) -> JSONResponse:
        """Completions with per-token top-k log-probabilities, one per prompt."""
        self._limits(req)
        prompts = [p if isinstance(p, str) else [m.render() for m in p] for p in req.prompts]
        await self._check_lengths(prompts, req.max_new_tokens, "prompts")
        async with self._quota(caller):
            outs = await self._call("generate", prompts, max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                                    k=req.k, seed=req.seed, top_p=req.top_p, stop=req.stop, caller=caller,
                                    priority=self.priority.get(caller, 0))
        return JSONResponse({"completions": [{key: fmt.jsonable(v) if key not in ("text", "stop") else v for key, v in o.items()}
                                             for o in outs]})

    async def _load_tokenizer(self):
        """The teacher's tokenizer, loaded once (concurrent first requests wait for one load: a
        lazy ``transformers`` import raced from several threads fails)."""
        async with self._tokenizer_lock:
            if self._tokenizer is None:
                info = await self._call("info")
                self._tokenizer = await asyncio.to_thread(load_tokenizer, info["model_path"])
        return self._tokenizer

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise HTTPException(404, detail=f"model: {model!r} is not served here; this route serves {self.name!r}")

    async def _openai_generate(self, req: CompletionRequest | ChatCompletionRequest, prompts: list[Any], caller: str,
                               top: int | None):
        """Checks, then generates for an OpenAI route: the engine's outputs, the tokenizer and ``usage``.
        ``top``: the top log-probabilities per token the client asked for; None: no log-probabilities
        (the engine is asked for ``k=0`` and may skip computing them)."""
        self._check_model(req.model)
        self._limits(req)
        encoded = await self._check_lengths(prompts, req.new_tokens, "messages" if isinstance(req, ChatCompletionRequest) else "prompt")
        if req.user:
            log.info("teacher %r: request of caller %r for user %r", self.name, caller, req.user)
        async with self._quota(caller):
            outs = await self._call("generate", prompts, max_new_tokens=req.new_tokens, temperature=req.temperature,
                                    k=0 if top is None else max(1, top), seed=req.seed, top_p=req.top_p, stop=req.stops,
                                    caller=caller, priority=self.priority.get(caller, 0))
        tok = await self._load_tokenizer()
        prompt_tokens = sum(len(ids) for ids in encoded)
        generated = sum(len(o["token_ids"]) for o in outs)
        return outs, tok, {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}

    @app.get("/v1/models", dependencies=[Depends(_caller)])
    async def models(self) -> dict[str, Any]:
        """OpenAI model list: the one teacher this route serves."""
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self._created, "owned_by": "raykd"}]}

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest, caller: str = Depends(_caller)):
        """OpenAI-style text completions; ``logprobs=n`` adds the top-``n`` per token and
        ``text_offset``; ``stream=true`` answers server-sent events."""
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        outs, tok, usage = await self._openai_generate(req, prompts, caller, req.logprobs)
        if req.stream:
            with_usage = usage if (req.stream_options or {}).get("include_usage") else None
            return StreamingResponse(fmt.stream_completion(outs, tok, self.name, usage=with_usage), media_type="text/event-stream")
        choices = []
        for i, (prompt, o) in enumerate(zip(prompts, outs)):
            lp = None if req.logprobs is None else fmt.completion_logprobs(o, tok, req.logprobs, len(prompt))
            choices.append({"index": i, "text": o["text"], "logprobs": lp, "finish_reason": fmt.finish_reason(o, tok)})
        return JSONResponse(fmt.envelope("text_completion", self.name, choices, usage))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest, caller: str = Depends(_caller)):
        """OpenAI-style chat completion (one choice); ``logprobs`` / ``top_logprobs`` as OpenAI;
        ``stream=true`` answers ``chat.completion.chunk`` server-sent events."""
        conversation = [m.render() for m in req.messages]
        top = (req.top_logprobs or 0) if req.logprobs else None
        (o,), tok, usage = await self._openai_generate(req, [conversation], caller, top)
        if req.stream:
            with_usage = usage if (req.stream_options or {}).get("include_usage") else None
            return StreamingResponse(fmt.stream_chat(o, tok, self.name, top=top, usage=with_usage), media_type="text/event-stream")
        logprobs = fmt.chat_content_logprobs(o, tok, top) if top is not None else None
        choice = {"index": 0, "message": {"role": "assistant", "content": o["text"]}, "logprobs": logprobs,
                  "finish_reason": fmt.finish_reason(o, tok)}
        return JSONResponse(fmt.envelope("chat.completion", self.name, [choice], usage))
