"""Request models and limits of the teacher's HTTP API (pure pydantic: importable without Ray).

The models check the shape of a request (``extra="forbid"``, non-empty, rectangular);
:func:`check_limits` checks it against the sizes one deployment accepts
(:class:`HTTPConfig`). Checks that need the model (token ids inside the vocabulary, the
model's context length) stay in the engine, see :meth:`raykd.teacher.engines.hf.HFEngine.score`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from raykd.config import Strict

TokenId = Annotated[int, Field(ge=-(2**31), lt=2**31)]
"""A token id as JSON carries it; the vocabulary range is the engine's check (HTTP 400)."""



class CallerToken(Strict):
    """One named bearer token of the HTTP API and its caller's share of the teacher.

    The name is the caller's identity: the teacher shares every batch round robin between
    callers (:class:`raykd.teacher.batching.FairBatcher`), logs it and counts its calls.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9._:-]+$")
    """Caller name (in logs, per-caller call counts, and the fair share)."""
    token: str | None = None
    """The bearer token itself; prefer ``token_env`` in files."""
    token_env: str | None = None
    """Environment variable ``raykd teacher up`` reads the token from when ``token`` is unset."""
    max_concurrent: int = Field(default=8, ge=1)
    """Requests of this caller the teacher works on at once (its quota)."""
    max_waiting: int = Field(default=64, ge=0)
    """Requests of this caller that wait for a free slot of its quota; beyond them the next is
    answered 503 with ``Retry-After`` at once."""
    priority: int = Field(default=0, ge=0, le=9)
    """0: bulk. Higher: interactive; the teacher forms batches of the highest priority queued
    first, without lower-priority calls filling them (:class:`raykd.teacher.batching.Call`)."""

    @model_validator(mode="after")
    def _one_source(self) -> CallerToken:
        if (self.token is None) == (self.token_env is None):
            raise ValueError(f"token {self.name!r}: set exactly one of token and token_env")
        return self


class HTTPConfig(Strict):
    """The HTTP JSON API in front of one teacher (see :mod:`raykd.teacher.http`)."""

    enabled: bool = True
    """Expose this teacher over HTTP; False keeps it reachable by Serve handle only."""
    route_prefix: str | None = None
    """URL prefix of the teacher's routes (None: ``/teachers/<name>``)."""
    token: str | None = None
    """Bearer token every route except ``/healthz`` requires. Prefer ``token_env`` in files."""
    token_env: str | None = "RAYKD_TEACHER_TOKEN"
    """Environment variable read by ``raykd teacher up`` for the token when ``token`` is unset;
    when neither is set (and ``tokens`` is empty) the API is open."""
    token_name: str = "default"
    """Caller name of requests that present ``token`` (or come in on an open API)."""
    tokens: list[CallerToken] = Field(default_factory=list)
    """More named tokens, each with its own quota (see :class:`CallerToken`); each caller's name
    is its identity for the fair share of the teacher's batches."""
    max_concurrent: int = Field(default=64, ge=1)
    """Quota (requests at once) of the ``token`` caller."""
    max_waiting: int = Field(default=256, ge=0)
    """Requests of the ``token`` caller waiting for its quota before 503."""
    max_batch_size: int | None = Field(default=None, ge=1)
    """Most sequences (``score``) or prompts (``generate``) per request (None: the teacher's
    ``max_batch_size``)."""
    max_seq_len: int = Field(default=2048, ge=1)
    """Most tokens per sequence on every route: a ``score`` row ``T``; a prompt plus its
    ``max_tokens`` / ``max_new_tokens`` on ``generate``, ``completions`` and ``chat.completions``."""
    max_k: int = Field(default=256, ge=1)
    """Largest top-k ``K`` a request may ask for."""
    max_new_tokens: int = Field(default=512, ge=1)
    """Most new tokens per ``generate`` or ``completions`` request."""
    max_ongoing_requests: int = Field(default=256, ge=1)
    """Requests one HTTP ingress replica handles at once (it only waits on the teacher: the
    per-caller quotas and the teacher's fair queue do the limiting)."""
    max_queued_requests: int = Field(default=64, ge=-1)
    """Requests the HTTP proxy queues for the ingress before answering 503 (-1: unbounded)."""

    @model_validator(mode="after")
    def _prefix_form(self) -> HTTPConfig:
        p = self.route_prefix
        if p is not None and (not p.startswith("/") or (len(p) > 1 and p.endswith("/"))):
            raise ValueError(f"route_prefix must start with '/' and not end with one, got {p!r}")
        names = [self.token_name] + [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError(f"tokens: every name must be unique (token_name included), got {names}")
        return self


class TextPart(Strict):
    """One part of a list-form message ``content`` (OpenAI's ``{"type": "text", "text": ...}``)."""

    type: Literal["text"]
    """Part type; only ``"text"`` (the teacher reads text only)."""
    text: str
    """The part's text."""


class ChatMessage(Strict):
    """One turn of a chat conversation (the chat template of the teacher's tokenizer renders it).

    ``content`` is a string or a list of text parts (joined in order); other part types (images,
    audio) are refused with 422, since the teacher reads text only.
    """

    role: str
    """Speaker of the turn (``system``, ``user``, ``assistant``, ...), passed to the chat template."""
    content: str | list[TextPart]
    """The turn's text, or a list of text parts joined in order."""
    name: str | None = None
    """Accepted as OpenAI clients send it; not rendered."""

    def render(self) -> dict[str, str]:
        """``{"role", "content"}`` with the content as one string."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ScoreRequest(Strict):
    """``POST /v1/score``: teacher-forced top-k soft labels of a right-padded batch ``[B, T]``."""

    input_ids: list[list[TokenId]] = Field(min_length=1)
    """Token ids ``[B, T]``; every row has the same length."""
    attention_mask: list[list[int]] | None = None
    """0/1 mask ``[B, T]`` (1 = real token), or None for no padding."""
    k: int = Field(default=32, ge=1)
    """Top-k size ``K``."""
    temperature: float = Field(default=1.0, gt=0)
    """Softmax temperature of ``topk_logprobs`` and ``tail_logmass``."""

    @model_validator(mode="after")
    def _rectangular(self) -> ScoreRequest:
        lengths = sorted({len(row) for row in self.input_ids})
        if lengths[0] == 0:
            raise ValueError("input_ids: rows must not be empty")
        if len(lengths) > 1:
            raise ValueError(f"input_ids is ragged (row lengths {lengths}): right-pad every row to one length and send attention_mask")
        if self.attention_mask is not None:
            shape = (len(self.input_ids), lengths[0])
            if len(self.attention_mask) != shape[0] or any(len(row) != shape[1] for row in self.attention_mask):
                raise ValueError(f"attention_mask must have the shape of input_ids {list(shape)}")
            if any(v not in (0, 1) for row in self.attention_mask for v in row):
                raise ValueError("attention_mask values must be 0 or 1")
        return self


class GenerateRequest(Strict):
    """``POST /v1/generate``: completions with per-token top-k log-probabilities."""

    prompts: list[str | list[ChatMessage]] = Field(min_length=1)
    """Text prompts, or chat conversations (lists of ``{"role", "content"}``)."""
    max_new_tokens: int = Field(default=64, ge=1)
    """Most new tokens per completion (>= 1)."""
    temperature: float = Field(default=0.0, ge=0)
    """0 is greedy decoding."""
    k: int = Field(default=8, ge=1)
    """Top-k size ``K`` of the returned log-probabilities."""
    seed: int | None = None
    """Sampling seed (None: unseeded; no effect when greedy)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass (1: off; ignored when greedy)."""
    stop: list[str] | None = None
    """Strings that end a completion (the first match and what follows are cut)."""


class CompletionRequest(Strict):
    """``POST /v1/completions`` (the OpenAI legacy completions API, the fields raykd supports)."""

    model: str | None = None
    """Must be the teacher's name when given."""
    prompt: str | list[str]
    """One prompt or a non-empty list of prompts (one choice each)."""
    max_tokens: int = Field(default=16, ge=1)
    """Most new tokens per completion (>= 1)."""
    temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature (>= 0; 0 is greedy decoding)."""
    logprobs: int | None = Field(default=None, ge=0)
    """Top log-probabilities returned per generated token (None: no logprobs)."""
    seed: int | None = None
    """Sampling seed (None: unseeded; no effect when greedy)."""
    stop: str | list[str] | None = None
    """Up to 4 strings; the completion ends before the first one (which is not returned)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass (1: off; ignored when greedy)."""
    user: str | None = None
    """The end user's id, as OpenAI clients send it: logged with the caller name."""
    stream: bool = False
    """Answer as server-sent events, one chunk per token, then ``data: [DONE]``."""
    stream_options: dict[str, bool] | None = None
    """``{"include_usage": true}`` adds a last chunk with ``usage``."""
    n: int = 1
    """Choices per prompt: only 1 is supported."""

    @model_validator(mode="after")
    def _non_empty(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: the list of prompts must not be empty")
        _check_common(self)
        return self

    @property
    def new_tokens(self) -> int:
        """Most new tokens to generate."""
        return self.max_tokens

    @property
    def stops(self) -> list[str]:
        """``stop`` as a list."""
        return _stops(self.stop)


class ChatCompletionRequest(Strict):
    """``POST /v1/chat/completions`` (the OpenAI chat completions API, the fields raykd supports).

    The conversation is rendered by the teacher tokenizer's chat template (with a generation
    prompt) in the engine, as ``/v1/generate`` does for chat prompts.
    """

    model: str | None = None
    """Must be the teacher's name when given."""
    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation so far (at least one message), rendered by the teacher's chat template."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most new tokens (OpenAI's older name of ``max_completion_tokens``)."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Most new tokens (None and ``max_tokens`` None: 16, as ``/v1/completions``)."""
    temperature: float = Field(default=1.0, ge=0)
    """0 is greedy decoding."""
    seed: int | None = None
    """Sampling seed (None: unseeded; no effect when greedy)."""
    logprobs: bool = False
    """Return the log-probability of each generated token."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """Alternatives returned per generated token (0-20, as OpenAI; needs ``logprobs``)."""
    n: int = 1
    """Choices per request: only 1 is supported."""
    stream: bool = False
    """Answer as server-sent events (``chat.completion.chunk``), one per token, then ``[DONE]``."""
    stream_options: dict[str, bool] | None = None
    """``{"include_usage": true}`` adds a last chunk with ``usage``."""
    stop: str | list[str] | None = None
    """Up to 4 strings; the reply ends before the first one (which is not returned)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass (1: off; ignored when greedy)."""
    user: str | None = None
    """The end user's id, as OpenAI clients send it: logged with the caller name."""

    @property
    def stops(self) -> list[str]:
        """``stop`` as a list."""
        return _stops(self.stop)

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        _check_common(self)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ: send only one of them")
        return self

    @property
    def new_tokens(self) -> int:
        """Most new tokens to generate."""
        return self.max_completion_tokens or self.max_tokens or 16


def _stops(stop: str | list[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def _check_common(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Checks both OpenAI routes share: ``n`` and ``stop``."""
    if req.n != 1:
        raise ValueError(f"n: only n=1 is supported, got n={req.n}; send one request per choice (vary seed to sample)")
    stops = _stops(req.stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError(f"stop: up to 4 non-empty strings, got {stops}")


def check_limits(req: ScoreRequest | GenerateRequest | CompletionRequest | ChatCompletionRequest, cfg: HTTPConfig) -> None:
    """Check a parsed request against the sizes this deployment accepts.

    Args:
        req: a parsed request.
        cfg: the deployment's HTTP limits (``max_batch_size`` None: left to the teacher).

    Raises:
        ValueError: naming the field, the value and the limit (answered as HTTP 422).
    """
    if isinstance(req, ScoreRequest):
        checks = [
            ("input_ids: batch of {} rows", len(req.input_ids), "max_batch_size", cfg.max_batch_size),
            ("input_ids: sequence length {}", len(req.input_ids[0]), "max_seq_len", cfg.max_seq_len),
            ("k={}", req.k, "max_k", cfg.max_k),
        ]
    elif isinstance(req, GenerateRequest):
        checks = [
            ("prompts: batch of {} prompts", len(req.prompts), "max_batch_size", cfg.max_batch_size),
            ("max_new_tokens={}", req.max_new_tokens, "max_new_tokens", cfg.max_new_tokens),
            ("k={}", req.k, "max_k", cfg.max_k),
        ]
    elif isinstance(req, ChatCompletionRequest):
        checks = [
            ("max_tokens={}", req.new_tokens, "max_new_tokens", cfg.max_new_tokens),
            ("top_logprobs={}", req.top_logprobs or 0, "max_k", cfg.max_k),
        ]
    else:
        n = 1 if isinstance(req.prompt, str) else len(req.prompt)
        checks = [
            ("prompt: batch of {} prompts", n, "max_batch_size", cfg.max_batch_size),
            ("max_tokens={}", req.max_tokens, "max_new_tokens", cfg.max_new_tokens),
            ("logprobs={}", req.logprobs or 0, "max_k", cfg.max_k),
        ]
    for what, value, limit_name, limit in checks:
        if limit is not None and value > limit:
            raise ValueError(f"{what.format(value)} exceeds {limit_name}={limit}")
