"""OpenAI response bodies of the teacher's completions and chat routes, plain or streamed.

Pure functions over an engine completion (``text``, ``token_ids`` ``[N]``, ``topk_ids`` /
``topk_logprobs`` ``[N, K]``, ``logprobs`` ``[N]``) and the teacher's tokenizer; no Ray, no
FastAPI. The token list a client sees is the returned text's: a closing EOS (``<|im_end|>``)
or a stop string's tokens are not in ``logprobs``, ``text_offset`` or the streamed chunks,
as OpenAI's own API does.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np


def jsonable(a: Any) -> list:
    """Nested lists of an array; non-finite floats (``-inf`` tail mass) become None."""
    a = np.asarray(a)
    if a.dtype.kind != "f" or np.isfinite(a).all():
        return a.tolist()
    out = a.astype(np.float64).astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()


def finish_reason(out: dict[str, Any], tok: Any) -> str:
    """OpenAI's ``finish_reason``: ``stop`` at EOS or a stop string, else ``length``."""
    ids = out["token_ids"]
    return "stop" if out.get("stop") or (ids and ids[-1] == tok.eos_token_id) else "length"


def visible_tokens(out: dict[str, Any], tok: Any) -> int:
    """Generated tokens that belong to the returned text (a closing EOS does not)."""
    ids = out["token_ids"]
    return len(ids) - 1 if ids and ids[-1] == tok.eos_token_id else len(ids)


def token_pieces(out: dict[str, Any], tok: Any) -> list[str]:
    """The text each visible token adds, so that ``"".join(pieces) == out["text"]`` (what a
    multi-byte character's first tokens add is empty; a stop cut's leftover joins the last piece)."""
    ids = out["token_ids"][: visible_tokens(out, tok)]
    pieces, done = [], ""
    for i in range(len(ids)):
        text = tok.decode(ids[: i + 1], skip_special_tokens=True)
        pieces.append(text[len(done):] if text.startswith(done) else "")
        done = text if text.startswith(done) else done
    rest = out["text"][len(done):] if out["text"].startswith(done) else ""
    if rest:
        if pieces:
            pieces[-1] += rest
        else:
            pieces.append(rest)
    return pieces


def token_logprobs(out: dict[str, Any], tok: Any, top: int) -> list[tuple[str, float | None, list[tuple[str, float | None]]]]:
    """Per visible token: its text, log-probability, and the ``top`` alternatives as
    ``(text, logprob)`` (``-inf`` becomes None)."""
    n = visible_tokens(out, tok)
    chosen = jsonable(np.asarray(out["logprobs"])[:n])
    alt_ids = np.asarray(out["topk_ids"])[:n, :top].tolist()
    alt_lps = jsonable(np.asarray(out["topk_logprobs"])[:n, :top])
    return [(tok.decode([t]), lp, [(tok.decode([a]), alp) for a, alp in zip(ids, lps)])
            for t, lp, ids, lps in zip(out["token_ids"][:n], chosen, alt_ids, alt_lps)]


def chat_logprob(token: str, logprob: float | None) -> dict[str, Any]:
    """One token of OpenAI's chat ``logprobs.content`` (``bytes``: its UTF-8 bytes)."""
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def completion_logprobs(out: dict[str, Any], tok: Any, top: int, prompt_chars: int) -> dict[str, Any]:
    """Legacy completions' ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` and
    ``text_offset`` (each token's character offset in prompt + completion)."""
    rows = token_logprobs(out, tok, top)
    offsets, at = [], prompt_chars
    for piece in token_pieces(out, tok)[: len(rows)]:
        offsets.append(at)
        at += len(piece)
    return {"tokens": [t for t, _, _ in rows], "token_logprobs": [lp for _, lp, _ in rows],
            "top_logprobs": [{t: lp for t, lp in alts} for _, _, alts in rows] if top > 0 else None,
            "text_offset": offsets}


def chat_content_logprobs(out: dict[str, Any], tok: Any, top: int) -> dict[str, Any]:
    """Chat ``logprobs``: ``content[i] = {token, logprob, bytes, top_logprobs}``."""
    rows = token_logprobs(out, tok, top)
    content = [chat_logprob(t, lp) | {"top_logprobs": [chat_logprob(*a) for a in alts]} for t, lp, alts in rows]
    return {"content": content, "refusal": None}


def envelope(kind: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None, rid: str | None = None) -> dict[str, Any]:
    """The body around ``choices``: ``id``, ``object``, ``created``, ``model`` (and ``usage``)."""
    prefix = "cmpl" if kind.startswith("text_completion") else "chatcmpl"
    body = {"id": rid or f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def sse(body: dict[str, Any] | str) -> str:
    """One server-sent event (``data: <json>``, or ``data: [DONE]``)."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def stream_chat(out: dict[str, Any], tok: Any, model: str, *, top: int | None, usage: dict[str, int] | None) -> Iterator[str]:
    """``chat.completion.chunk`` events of one completed reply: the role, one per token (with
    its logprobs when ``top`` is not None), the finish reason, ``usage`` if asked, ``[DONE]``."""
    rid = f"chatcmpl-{uuid.uuid4().hex}"

    def chunk(delta: dict[str, Any], reason: str | None = None, logprobs: Any = None) -> str:
        return sse(envelope("chat.completion.chunk", model, [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                             "finish_reason": reason}], None, rid))

    yield chunk({"role": "assistant", "content": ""})
    rows = token_logprobs(out, tok, top) if top is not None else None
    for i, piece in enumerate(token_pieces(out, tok)):
        lp = None
        if rows is not None and i < len(rows):
            t, p, alts = rows[i]
            lp = {"content": [chat_logprob(t, p) | {"top_logprobs": [chat_logprob(*a) for a in alts]}], "refusal": None}
        yield chunk({"content": piece}, logprobs=lp)
    yield chunk({}, finish_reason(out, tok))
    if usage is not None:
        yield sse(envelope("chat.completion.chunk", model, [], usage, rid))
    yield sse("[DONE]")


def stream_completion(outs: list[dict[str, Any]], tok: Any, model: str, *, usage: dict[str, int] | None) -> Iterator[str]:
    """``text_completion`` events: one per token of each prompt's completion (``choices[0].index``
    is the prompt), a last one per prompt with its finish reason, ``usage`` if asked, ``[DONE]``."""
    rid = f"cmpl-{uuid.uuid4().hex}"
    for i, out in enumerate(outs):
        for piece in token_pieces(out, tok):
            yield sse(envelope("text_completion", model, [{"index": i, "text": piece, "logprobs": None, "finish_reason": None}], None, rid))
        yield sse(envelope("text_completion", model, [{"index": i, "text": "", "logprobs": None,
                                                       "finish_reason": finish_reason(out, tok)}], None, rid))
    if usage is not None:
        yield sse(envelope("text_completion", model, [], usage, rid))
    yield sse("[DONE]")
