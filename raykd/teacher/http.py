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
``model``; 503 the teacher is busy (its ``max_queued_requests`` is reached), retry later.
A value of ``-inf`` (``tail_logmass`` when ``K = V``) is sent as ``null``.
"""

# No ``from __future__ import annotations``: Serve rebuilds the route signatures of the class and
# FastAPI must see the request models as classes, not strings.
import asyncio
import hmac
import time
import uuid
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

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


async def _require_token(authorization: str | None = Header(default=None)) -> None:
    serve.get_replica_context().servable_object.authorize(authorization)


def _root_cause(err: BaseException) -> BaseException:
    while isinstance(err, RayTaskError) and err.cause is not None and err.cause is not err:
        err = err.cause
    return err


def _finish_reason(out: dict[str, Any], tok: Any) -> str:
    """OpenAI's ``finish_reason`` of one engine output: ``stop`` at EOS, else ``length``."""
    ids = out["token_ids"]
    return "stop" if ids and ids[-1] == tok.eos_token_id else "length"


def _token_logprobs(out: dict[str, Any], tok: Any, top: int) -> list[tuple[str, float | None, list[tuple[str, float | None]]]]:
    """Per generated token of one engine output: its text, its log-probability and the
    ``top`` most likely alternatives as ``(text, logprob)`` (``-inf`` becomes None)."""
    chosen = _jsonable(out["logprobs"])
    alt_ids = np.asarray(out["topk_ids"])[:, :top].tolist()
    alt_lps = _jsonable(np.asarray(out["topk_logprobs"])[:, :top])
    return [
        (tok.decode([t]), lp, [(tok.decode([a]), alp) for a, alp in zip(ids, lps)])
        for t, lp, ids, lps in zip(out["token_ids"], chosen, alt_ids, alt_lps)
    ]


def _chat_logprob(token: str, logprob: float | None) -> dict[str, Any]:
    """One token of OpenAI's chat ``logprobs.content`` (``bytes``: its UTF-8 bytes)."""
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _jsonable(a: Any) -> list:
    """Nested lists of an array; non-finite floats (``-inf`` tail mass) become None."""
    a = np.asarray(a)
    if a.dtype.kind != "f" or np.isfinite(a).all():
        return a.tolist()
    out = a.astype(np.float64).astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()


@serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class HTTPIngress:
    """Serve ingress that answers HTTP requests with the teacher behind ``teacher``.

    Args:
        teacher: handle of the :class:`~raykd.teacher.deployment.TeacherDeployment` (pass
            the bound teacher node; Serve turns it into a handle).
        cfg: limits and the bearer token (``cfg.token``; resolve ``token_env`` before binding,
            see :func:`raykd.teacher.service.served_teacher_app`).
    """

    def __init__(self, teacher: DeploymentHandle, cfg: HTTPConfig):
        self.teacher = teacher
        self.cfg = cfg
        self.name = serve.get_replica_context().app_name
        self._tokenizer = None
        self._created = int(time.time())

    def authorize(self, authorization: str | None) -> None:
        """Raise 401 unless ``authorization`` is ``Bearer <token>`` (or no token is set)."""
        if not self.cfg.token:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.cfg.token.encode()):
            raise HTTPException(
                401, detail="Authorization: missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _limits(self, req: ScoreRequest | GenerateRequest | CompletionRequest | ChatCompletionRequest) -> None:
        try:
            check_limits(req, self.cfg)
        except ValueError as e:
            raise HTTPException(422, detail=str(e)) from None

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
        return {"status": "ok", "teacher": self.name, **{k: info[k] for k in keep}, "limits": limits, "auth": bool(self.cfg.token)}

    @app.post("/v1/score", dependencies=[Depends(_require_token)])
    async def score(self, req: ScoreRequest) -> JSONResponse:
        """Top-k soft labels of ``input_ids`` ``[B, T]`` (see the module docstring)."""
        self._limits(req)
        mask = None if req.attention_mask is None else np.asarray(req.attention_mask, dtype=np.int64)
        out = await self._call("score", np.asarray(req.input_ids, dtype=np.int64), mask, k=req.k, temperature=req.temperature)
        return JSONResponse({name: _jsonable(value) for name, value in out.items()})

    @app.post("/v1/generate", dependencies=[Depends(_require_token)])
    async def generate(self, req: GenerateRequest) -> JSONResponse:
        """Completions with per-token top-k log-probabilities, one per prompt."""
        self._limits(req)
        prompts = [p if isinstance(p, str) else [m.model_dump() for m in p] for p in req.prompts]
        outs = await self._call(
            "generate", prompts, max_new_tokens=req.max_new_tokens, temperature=req.temperature, k=req.k, seed=req.seed
        )
        return JSONResponse({"completions": [{key: _jsonable(v) if key != "text" else v for key, v in o.items()} for o in outs]})

    async def _load_tokenizer(self):
        if self._tokenizer is None:
            from raykd.models import load_tokenizer

            info = await self._call("info")
            self._tokenizer = await asyncio.to_thread(load_tokenizer, info["model_path"])
        return self._tokenizer

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise HTTPException(404, detail=f"model: {model!r} is not served here; this route serves {self.name!r}")

    async def _openai_generate(self, prompts: list[Any], *, max_tokens: int, temperature: float, top: int, seed: int | None):
        """Generate for an OpenAI route: the engine's outputs, the tokenizer and the ``usage`` block."""
        outs = await self._call("generate", prompts, max_new_tokens=max_tokens, temperature=temperature, k=max(1, top), seed=seed)
        tok = await self._load_tokenizer()
        prompt_tokens = sum(len(ids) for ids in encode_prompts(tok, prompts))
        generated = sum(len(o["token_ids"]) for o in outs)
        return outs, tok, {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}

    def _openai_response(self, kind: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> JSONResponse:
        prefix = {"text_completion": "cmpl", "chat.completion": "chatcmpl"}[kind]
        return JSONResponse(
            {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": self.name,
             "choices": choices, "usage": usage}
        )

    @app.get("/v1/models", dependencies=[Depends(_require_token)])
    async def models(self) -> dict[str, Any]:
        """OpenAI model list: the one teacher this route serves."""
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self._created, "owned_by": "raykd"}]}

    @app.post("/v1/completions", dependencies=[Depends(_require_token)])
    async def completions(self, req: CompletionRequest) -> JSONResponse:
        """OpenAI-style text completions; ``logprobs=n`` adds the top-``n`` per token."""
        self._check_model(req.model)
        self._limits(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        outs, tok, usage = await self._openai_generate(
            prompts, max_tokens=req.max_tokens, temperature=req.temperature, top=req.logprobs or 0, seed=req.seed
        )
        choices = []
        for i, o in enumerate(outs):
            choice = {"index": i, "text": o["text"], "logprobs": None, "finish_reason": _finish_reason(o, tok)}
            if req.logprobs is not None:
                rows = _token_logprobs(o, tok, req.logprobs)
                top = [{t: lp for t, lp in alts} for _, _, alts in rows] if req.logprobs > 0 else None
                choice["logprobs"] = {"tokens": [t for t, _, _ in rows], "token_logprobs": [lp for _, lp, _ in rows], "top_logprobs": top}
            choices.append(choice)
        return self._openai_response("text_completion", choices, usage)

    @app.post("/v1/chat/completions", dependencies=[Depends(_require_token)])
    async def chat_completions(self, req: ChatCompletionRequest) -> JSONResponse:
        """OpenAI-style chat completion (one choice); ``logprobs`` / ``top_logprobs`` as OpenAI."""
        self._check_model(req.model)
        self._limits(req)
        conversation = [m.model_dump() for m in req.messages]
        (o,), tok, usage = await self._openai_generate(
            [conversation], max_tokens=req.new_tokens, temperature=req.temperature, top=req.top_logprobs or 0, seed=req.seed
        )
        logprobs = None
        if req.logprobs:
            rows = _token_logprobs(o, tok, req.top_logprobs or 0)
            content = [_chat_logprob(t, lp) | {"top_logprobs": [_chat_logprob(*a) for a in alts]} for t, lp, alts in rows]
            logprobs = {"content": content, "refusal": None}
        choice = {"index": 0, "message": {"role": "assistant", "content": o["text"]}, "logprobs": logprobs,
                  "finish_reason": _finish_reason(o, tok)}
        return self._openai_response("chat.completion", [choice], usage)
