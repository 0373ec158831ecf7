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

Errors are JSON ``{"detail": "<field>: <problem>"}``: 401 missing or wrong bearer token;
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

from raykd.teacher.schemas import CompletionRequest, GenerateRequest, HTTPConfig, ScoreRequest, check_limits

INGRESS_NAME = "TeacherHTTP"

app = FastAPI(title="raykd teacher", description="Teacher soft labels and completions over HTTP.")


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
    return JSONResponse(status_code=422, content={"detail": "; ".join(problems)})


async def _require_token(authorization: str | None = Header(default=None)) -> None:
    serve.get_replica_context().servable_object.authorize(authorization)


def _root_cause(err: BaseException) -> BaseException:
    while isinstance(err, RayTaskError) and err.cause is not None and err.cause is not err:
        err = err.cause
    return err


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

    def _limits(self, req: ScoreRequest | GenerateRequest | CompletionRequest) -> None:
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

    @app.post("/v1/completions", dependencies=[Depends(_require_token)])
    async def completions(self, req: CompletionRequest) -> JSONResponse:
        """OpenAI-style text completions; ``logprobs=n`` adds the top-``n`` per token."""
        if req.model is not None and req.model != self.name:
            raise HTTPException(404, detail=f"model: {req.model!r} is not served here; this route serves {self.name!r}")
        self._limits(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        outs = await self._call(
            "generate", prompts, max_new_tokens=req.max_tokens, temperature=req.temperature, k=max(1, req.logprobs or 0), seed=req.seed
        )
        tok = await self._load_tokenizer()
        choices, generated = [], 0
        for i, o in enumerate(outs):
            ids = o["token_ids"]
            generated += len(ids)
            choice = {"index": i, "text": o["text"], "logprobs": None,
                      "finish_reason": "stop" if ids and ids[-1] == tok.eos_token_id else "length"}
            if req.logprobs is not None:
                top = None
                if req.logprobs > 0:
                    top = [
                        {tok.decode([int(t)]): float(lp) for t, lp in zip(row_ids[: req.logprobs], row_lp[: req.logprobs])}
                        for row_ids, row_lp in zip(o["topk_ids"], o["topk_logprobs"])
                    ]
                choice["logprobs"] = {"tokens": [tok.decode([t]) for t in ids], "token_logprobs": _jsonable(o["logprobs"]), "top_logprobs": top}
            choices.append(choice)
        prompt_tokens = sum(len(tok(p)["input_ids"]) for p in prompts)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}
        return JSONResponse(
            {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": self.name,
             "choices": choices, "usage": usage}
        )
