"""How the calls of several callers merge into one engine call, and how the answer splits back.

Each teacher method that labelers call has a :class:`Merge`: the group key (calls of one group
share a forward), the size of a call (rows and padded width, for the batch budget), and
``run(engine, group, payloads)``, which makes one engine call for every payload and returns
one answer per payload, equal to what the payload alone would have got:

- ``score``: rows of every call, right-padded to the longest ``T`` with attention mask 0; a
  causal LM's positions before the padding do not see it, so each caller's ``[b, T_i]`` slice
  equals its unbatched answer (up to fp32 summation order). Grouped by ``(k, temperature)`` and
  how the call draws sampled soft labels, if it does (``seeds``, one per row, travel with their
  rows; ``draws`` is the scheme).
- ``generate``: prompts of every call in one ``generate`` (left-padded by the engine).
  Grouped by ``max_new_tokens``, ``temperature``, ``k``, ``top_p``; seeded sampling is not
  merged (its draws would depend on the batch).
- ``complete`` / ``score_continuations``: prompts (texts) of every call, grouped by their
  shared arguments.
- ``score_mc``: never merged (Monte-Carlo dropout masks are drawn per batch and seeded per call).

Pure numpy; the engine is any :class:`~raykd.teacher.engines.base.TeacherEngine`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

PER_POSITION = ("topk_ids", "topk_logprobs", "tail_logmass", "label_logprobs")
"""``score`` answers with a time axis ``[B, T, ...]``, cut back to each caller's ``T``."""


@dataclass(frozen=True)
class Merge:
    """One method's merge rule (see the module docstring).

    Attributes:
        group: ``group(payload) -> key``; calls with equal keys may share a batch.
        size: ``size(payload) -> (rows, width)`` for the batch budget.
        run: ``run(engine, group, payloads) -> answers`` (one engine call, split per payload).
        mergeable: ``mergeable(payload) -> bool``; False runs the call alone.
    """

    group: Callable[[Any], Hashable]
    size: Callable[[Any], tuple[int, int]]
    run: Callable[[Any, Hashable, list[Any]], list[Any]]
    mergeable: Callable[[Any], bool] = lambda payload: True


# --- score ---------------------------------------------------------------------------------------


def pad_rows(blocks: list[tuple[np.ndarray, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack ``[b_i, T_i]`` id blocks (with optional 0/1 masks) into ``[sum b_i, max T_i]``.

    Padding is id 0 with mask 0 on the right. The mask is None when no block needs one (every
    ``T_i`` equal and no block sent a mask), so the engine takes its unmasked path as it would
    for a single caller.
    """
    width = max(ids.shape[1] for ids, _ in blocks)
    need_mask = any(m is not None or ids.shape[1] != width for ids, m in blocks)
    ids_out = np.zeros((sum(ids.shape[0] for ids, _ in blocks), width), dtype=np.int64)
    mask_out = np.zeros_like(ids_out) if need_mask else None
    r = 0
    for ids, m in blocks:
        b, t = ids.shape
        ids_out[r : r + b, :t] = ids
        if mask_out is not None:
            mask_out[r : r + b, :t] = 1 if m is None else m
        r += b
    return ids_out, mask_out


def split_rows(out: dict[str, np.ndarray], shapes: list[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
    """Split a merged ``score`` answer back per call: rows ``[r_i : r_i + b_i]`` and, for the
    per-position arrays (:data:`PER_POSITION`), the first ``T_i`` positions."""
    answers, r = [], 0
    for b, t in shapes:
        answers.append({name: (a[r : r + b, :t] if name in PER_POSITION else a[r : r + b]).copy() for name, a in out.items()})
        r += b
    return answers


def _run_score(engine: Any, group: Hashable, payloads: list[Any]) -> list[Any]:
    _, k, temperature, draws = group
    ids, mask = pad_rows([(p[0], p[1]) for p in payloads])
    seeds = {"seeds": np.concatenate([p[4] for p in payloads]), "draws": draws} if draws else {}
    out = engine.score(ids, mask, k=k, temperature=temperature, **seeds)
    return split_rows(out, [p[0].shape for p in payloads])


SCORE = Merge(
    group=lambda p: ("score", p[2], float(p[3]), None if p[4] is None else p[5]),
    size=lambda p: p[0].shape,
    run=_run_score,
)
"""Payload ``(input_ids [b, T], attention_mask [b, T] | None, k, temperature, seeds [b] | None, draws)``."""


# --- generate ------------------------------------------------------------------------------------


def _generate_group(p: Any) -> Hashable:
    prompts, kw = p
    return ("generate", tuple(sorted(kw.items())))


def _prompt_lists(method: str) -> Callable[[Any, Hashable, list[Any]], list[Any]]:
    """``run`` of a method taking ``(prompts, kwargs)``: every call's prompts in one engine call
    with the group's kwargs, the list of outputs split back per call."""

    def run(engine: Any, group: Hashable, payloads: list[Any]) -> list[Any]:
        outs = getattr(engine, method)([x for p in payloads for x in p[0]], **dict(group[1]))
        answers, r = [], 0
        for p in payloads:
            answers.append(outs[r : r + len(p[0])])
            r += len(p[0])
        return answers

    return run


GENERATE = Merge(
    group=_generate_group,
    size=lambda p: (len(p[0]), p[1].get("max_new_tokens", 64) + max(_prompt_chars(x) for x in p[0]) // 4),
    run=_prompt_lists("generate"),
    mergeable=lambda p: not (p[1].get("temperature", 0.0) > 0 and p[1].get("seed") is not None),
)
"""Payload ``(prompts, engine kwargs)``; the kwargs (``max_new_tokens``, ``temperature``, ``k``,
``top_p``, ``seed``) are the group. The width is a rough token count (characters / 4 of the
longest prompt plus the new tokens): it bounds the batch, it need not be exact."""


def _prompt_chars(prompt: Any) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(str(m.get("content", ""))) for m in prompt)


# --- complete and score_continuations --------------------------------------------------------------


COMPLETE = Merge(
    group=lambda p: ("complete", tuple(sorted(p[1].items()))),
    size=lambda p: (len(p[0]), p[1].get("max_new_tokens", 32) + max(_prompt_chars(x) for x in p[0]) // 4),
    run=_prompt_lists("complete"),
)
"""Payload ``(prompts, kwargs)``."""


def _run_continuations(engine: Any, group: Hashable, payloads: list[Any]) -> list[Any]:
    _, prefix, continuations, kw = group
    out = engine.score_continuations(prefix, [t for p in payloads for t in p[0]], list(continuations), **dict(kw))
    answers, r = [], 0
    for p in payloads:
        n = len(p[0])
        answers.append({"scores": out["scores"][r : r + n], "tokens": out["tokens"][r : r + n], "prefix_tokens": out["prefix_tokens"]})
        r += n
    return answers


CONTINUATIONS = Merge(
    group=lambda p: ("score_continuations", p[1], tuple(p[2]), tuple(sorted(p[3].items()))),
    size=lambda p: (len(p[0]), max(len(t) for t in p[0]) // 4 + 1),
    run=_run_continuations,
)
"""Payload ``(texts, prefix, continuations, kwargs)``."""


# --- score_mc -------------------------------------------------------------------------------------

SCORE_MC = Merge(
    group=lambda p: ("score_mc",),
    size=lambda p: p[0].shape,
    run=lambda engine, group, payloads: [engine.score_mc(payloads[0][0], payloads[0][1], **payloads[0][2])],
    mergeable=lambda p: False,
)
"""Payload ``(input_ids, attention_mask, kwargs)``; runs alone."""

MERGES: dict[str, Merge] = {"score": SCORE, "generate": GENERATE, "complete": COMPLETE,
                            "score_continuations": CONTINUATIONS, "score_mc": SCORE_MC}
"""The merge rule of each batched teacher method."""


def run_group(engine: Any, group: Hashable, payloads: list[Any]) -> list[Any]:
    """Run one batch of ``group`` (the method is the key's first element) on ``engine``."""
    return MERGES[group[0]].run(engine, group, payloads)
