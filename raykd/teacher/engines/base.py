"""The teacher engine protocol and the helpers every engine shares (no Ray, no model loading).

An engine holds one model and answers two questions:

- :meth:`TeacherEngine.score` (teacher forcing): for token ids ``[B, T]``, the top-``K``
  next-token ids and log-probabilities at every position ``[B, T, K]``, the log of the
  probability mass outside the top-k ``[B, T]`` (the tail bucket of sparse KD), and the
  log-probability of the actual next token ``[B, T]`` (at temperature 1, for perplexity).
- :meth:`TeacherEngine.generate`: completions for text or chat prompts, with the per-token
  top-k log-probabilities of what was generated (sequence-level KD, pseudo-labels).

Position ``t`` always describes the distribution of token ``t + 1`` given tokens ``0..t``
(causal LM convention); the last position of a row describes the token after the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from raykd.models import tokenizer_fingerprint, weights_fingerprint

ScoreResult = dict[str, np.ndarray]
"""``topk_ids`` [B, T, K] (uint16 if V <= 65536 else int32), ``topk_logprobs`` [B, T, K]
float16, ``tail_logmass`` [B, T] float32, ``label_logprobs`` [B, T] float32 (0 at the last
position and at padding). Scored with ``seeds`` (sampled soft labels), the ``K`` slots hold ``K``
ids drawn with replacement from the whole distribution at the temperature, in ascending order,
with their log-probs, and ``tail_logmass`` is the log of the mass outside the distinct drawn ids."""


@dataclass(frozen=True)
class EngineInfo:
    """What identifies a teacher's numbers (goes into the soft-label cache key)."""

    engine: str
    model_path: str
    weights_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    dtype: str
    device: str
    max_k: int
    max_seq_len: int
    extra: dict[str, Any] = field(default_factory=dict)


def describe(engine: Any, *, max_k: int, extra: dict[str, Any]) -> EngineInfo:
    """The :class:`EngineInfo` of a built engine (its ``name``, ``model_path``, ``tokenizer``,
    ``vocab_size``, ``dtype``, ``device`` and ``max_seq_len``; fingerprints computed here)."""
    return EngineInfo(
        engine=engine.name,
        model_path=str(engine.model_path),
        weights_fingerprint=weights_fingerprint(engine.model_path),
        tokenizer_fingerprint=tokenizer_fingerprint(engine.tokenizer),
        vocab_size=engine.vocab_size,
        dtype=engine.dtype,
        device=engine.device,
        max_k=max_k,
        max_seq_len=engine.max_seq_len,
        extra=extra,
    )


def ids_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id: uint16 when V <= 65,536, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def topk_with_tail(logits, k: int, temperature: float):
    """Top-k log-probabilities and the log tail mass of ``softmax(logits / temperature)``.

    Args:
        logits: float tensor ``[..., V]`` (any float dtype; computed in fp32).
        k: ``K``, 1 <= K <= V.
        temperature: softmax temperature > 0.

    Returns:
        ``(topk_logprobs [..., K] fp32, topk_ids [..., K] int64, tail_logmass [...] fp32)``;
        ``tail_logmass`` is the exact log of the mass outside the top-k (``-inf`` when K = V).
    """
    import torch

    return topk_and_tail_of(torch.log_softmax(logits.float() / temperature, dim=-1), k)


def topk_and_tail_of(logp, k: int):
    """Top-k and log tail mass of log-probabilities ``logp`` ``[..., V]``, which it overwrites
    (the tail is a ``logsumexp`` over ``logp`` with the top-k set to ``-inf``, in place: no copy
    of the ``[..., V]`` tensor)."""
    top_lp, top_ids = logp.topk(k, dim=-1)
    tail = logp.scatter_(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_lp, top_ids, tail


def validate_score_request(
    input_ids: np.ndarray, k: int, temperature: float, *, vocab_size: int, max_seq_len: int, max_k: int,
    seeds: np.ndarray | None = None,
) -> None:
    """Check a ``score`` request against what an engine can answer.

    Args:
        input_ids: ``[B, T]`` token ids.
        k: requested ``K``; must lie in ``[1, max_k]`` and not exceed ``vocab_size``.
        temperature: must be > 0.
        seeds: None, or ``[B]`` integers in ``[0, 2^63)`` (one per row: sampled soft labels).

    Raises:
        ValueError: empty or non-2-D batch, ``T`` over the context, ids outside ``[0, V)``, bad
            ``k``, temperature or seeds; the message names the value and the limit.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [B, T] array, got shape {input_ids.shape}")
    if input_ids.shape[1] > max_seq_len:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the teacher's context {max_seq_len}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{lo}, {hi}]")
    if not 1 <= k <= min(max_k, vocab_size):
        raise ValueError(f"k={k} must lie in [1, {min(max_k, vocab_size)}] for this teacher engine")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if seeds is not None:
        seeds = np.asarray(seeds)
        if seeds.shape != input_ids.shape[:1] or seeds.dtype.kind not in "iu" or (seeds.size and seeds.min() < 0):
            raise ValueError(f"seeds must be {input_ids.shape[0]} non-negative integers (one per row), "
                             f"got {seeds.dtype} of shape {seeds.shape}")


def encode_prompts(tokenizer: Any, prompts: list[Any]) -> list[list[int]]:
    """Token ids of text prompts, or of chat conversations (the chat template is applied with a
    generation prompt).

    Raises:
        ValueError: an empty list or a prompt that is neither a string nor a list of messages.
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    encoded = []
    for p in prompts:
        if isinstance(p, str):
            encoded.append(tokenizer(p, add_special_tokens=True)["input_ids"])
        elif isinstance(p, list) and all(isinstance(m, dict) for m in p):
            encoded.append(list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)))
        else:
            raise ValueError("each prompt must be a string or a list of chat messages {'role', 'content'}")
    return encoded


def cut_at_stop(completion: dict[str, Any], stops: list[str], tokenizer: Any) -> dict[str, Any]:
    """Cut one :meth:`TeacherEngine.generate` completion before the first stop string, as the
    OpenAI API's ``stop`` does (the stop string itself is not returned).

    The text is cut at the earliest match; the per-token arrays keep the tokens whose text lies
    wholly before it. A completion without a match is returned as it is.

    Args:
        completion: ``text``, ``token_ids`` ``[N]``, ``topk_ids`` / ``topk_logprobs`` ``[N, K]``,
            ``logprobs`` ``[N]``.
        stops: stop strings (empty strings are ignored).
        tokenizer: the teacher's tokenizer (to find where each token's text ends).

    Returns:
        The completion, cut, with ``stop`` set to the matched string (else absent).
    """
    text = completion["text"]
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return completion
    at, matched = min(hits)
    ids = list(completion["token_ids"])
    n = 0
    while n < len(ids) and len(tokenizer.decode(ids[: n + 1], skip_special_tokens=True)) <= at:
        n += 1
    out = {key: (v[:n] if key in ("token_ids", "topk_ids", "topk_logprobs", "logprobs") else v) for key, v in completion.items()}
    out.update(text=text[:at], stop=matched)
    return out


LOGPROBS_MODE = "raw_logprobs"
"""What both LM engines return: log-softmax of the unprocessed logits (no penalties, top-p or
other sampling processors), at the requested temperature. Part of the soft-label cache key."""


@runtime_checkable
class TeacherEngine(Protocol):
    """What a served teacher does, whatever runs it (transformers, vLLM, a classifier).

    Engines are built as ``cls(model_path, **options)`` (:func:`raykd.teacher.engines.build_engine`)
    and are independent of Ray: the Serve deployment (:mod:`raykd.teacher.deployment`) wraps one.

    Attributes:
        name: registry name, also the ``engine`` field of the soft-label cache key.
        vocab_size: ``V`` (for a classifier, the number of classes ``C``).
    """

    name: str
    vocab_size: int

    def info(self) -> EngineInfo:
        """What identifies this teacher's numbers (fingerprints, dtype, device, limits)."""
        ...

    def validate_score_request(self, input_ids: np.ndarray, k: int, temperature: float) -> None:
        """Raise ``ValueError`` naming the problem for a request the engine cannot answer."""
        ...

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, k: int = 32,
              temperature: float = 1.0) -> dict[str, np.ndarray]:
        """Teacher-forced soft labels of ``input_ids`` ``[B, T]``: :data:`ScoreResult` for an LM
        teacher, ``logits`` ``[B, C]`` for a classifier. An engine that also takes ``seeds``
        (``[B]``; the ``hf`` engine) draws sampled soft labels with them.

        Raises:
            ValueError: a request the engine cannot answer (see :meth:`validate_score_request`).
        """
        ...

    def generate(self, prompts: list[Any], *, max_new_tokens: int = 64, temperature: float = 0.0, k: int = 8,
                 seed: int | None = None) -> list[dict[str, Any]]:
        """Completions with per-token top-k log-probabilities (LM engines; a classifier raises
        ``NotImplementedError``)."""
        ...
