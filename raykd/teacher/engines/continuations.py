"""Log-probabilities of given continuations after a shared prefix: verbaliser scoring (no Ray).

A few-shot classifier built from a causal LM scores every class by the sum of the log-probs of
its verbaliser's tokens after ``prefix + text`` (Brown et al. 2020, "Language Models are
Few-Shot Learners"; the scoring of lm-evaluation-harness). The prefix (instruction and
demonstrations) is the same for every text, so its keys and values are computed once per call
and reused for every row; the text is then read once per row, and only the verbalisers' tokens
after their first are read once per class (their first token's log-prob is the text's last
position).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np


def _repeat(cache, n: int):
    """A copy of a ``[1, ...]`` KV cache with its batch repeated ``n`` times."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out


def continuation_logprobs(
    model,
    prefix_ids: Sequence[int],
    texts_ids: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    batch_size: int = 8,
) -> np.ndarray:
    """``log p(continuation_c | prefix + text_i)``, summed over the continuation's tokens.

    Args:
        model: a transformers causal LM (eval mode; its device is used).
        prefix_ids: token ids shared by every row (may be empty).
        texts_ids: ``B`` rows of token ids, each non-empty (e.g. the article and the cue
            ``"\\nTopic:"``).
        continuations: ``C`` non-empty token-id lists (the verbalisers, tokenised as they follow
            the text, e.g. ``" sport"``).
        pad_id: id written under padding (never attended to).
        batch_size: texts per forward.

    Returns:
        float32 ``[B, C]`` sums of log-probabilities (natural log).

    Raises:
        ValueError: an empty text or continuation.
    """
    import torch

    if any(len(t) == 0 for t in texts_ids):
        raise ValueError("every text must have at least one token (the prompt's cue)")
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation must have at least one token")
    device = next(model.parameters()).device
    p = len(prefix_ids)
    out = np.zeros((len(texts_ids), len(continuations)), dtype=np.float32)
    with torch.inference_mode():
        prefix_cache = _prefix_cache(model, prefix_ids, device)
        for s in range(0, len(texts_ids), batch_size):
            rows = [list(t) for t in texts_ids[s : s + batch_size]]
            out[s : s + len(rows)] = _score_rows(model, prefix_cache, p, rows, continuations, pad_id, device)
    return out


def _after_prefix(model, prefix_cache, p: int, rows: list[list[int]], pad_id: int, device):
    """Forward of a batch of texts left-padded after a shared prefix (its cache repeated per row).

    Returns:
        ``(output, mask [b, p + W], positions [b, W])``; padding is masked out and the positions
        skip it, so every row reads as ``prefix + text``.
    """
    import torch

    b, width = len(rows), max(len(r) for r in rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    text_mask = torch.zeros((b, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        text_mask[i, width - len(r) :] = 1
    mask = torch.cat([torch.ones((b, p), dtype=torch.long), text_mask], 1)
    positions = (p + text_mask.cumsum(1) - 1).clamp(min=p)
    past = _repeat(prefix_cache, b) if prefix_cache is not None else None
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                past_key_values=past, use_cache=True)
    return out, mask, positions


def _prefix_cache(model, prefix_ids: Sequence[int], device):
    import torch

    if not prefix_ids:
        return None
    return model(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True).past_key_values


def greedy_after_prefix(model, prefix_ids: Sequence[int], texts_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                        eos_id: int | None, pad_id: int = 0, batch_size: int = 8) -> list[list[int]]:
    """Greedy completions of ``prefix + text`` for every text, the prefix's keys and values
    computed once per call (few-shot generation: the demonstrations are the prefix).

    Args:
        model: a transformers causal LM (eval mode).
        prefix_ids: token ids shared by every row (may be empty).
        texts_ids: ``B`` non-empty rows of token ids.
        max_new_tokens: new tokens per row at most; eos_id: stops a row (not returned).

    Returns:
        The new token ids of each row.
    """
    import torch

    device = next(model.parameters()).device
    out_ids: list[list[int]] = []
    with torch.inference_mode():
        prefix_cache = _prefix_cache(model, prefix_ids, device)
        for s in range(0, len(texts_ids), batch_size):
            rows = [list(t) for t in texts_ids[s : s + batch_size]]
            out, mask, positions = _after_prefix(model, prefix_cache, len(prefix_ids), rows, pad_id, device)
            pos = positions[:, -1:]
            got = [[] for _ in rows]
            done = torch.zeros(len(rows), dtype=torch.bool)
            for _ in range(max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1).cpu()
                for i in range(len(rows)):
                    if not done[i]:
                        if eos_id is not None and int(nxt[i]) == eos_id:
                            done[i] = True
                        else:
                            got[i].append(int(nxt[i]))
                if bool(done.all()):
                    break
                mask, pos = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], 1), pos + 1
                out = model(input_ids=nxt[:, None].to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                            past_key_values=out.past_key_values, use_cache=True)
            out_ids += got
    return out_ids


def _score_rows(model, prefix_cache, p: int, rows: list[list[int]], continuations, pad_id: int, device) -> np.ndarray:
    """Scores ``[b, C]`` of one batch of texts (left-padded after the prefix)."""
    import torch

    out, mask, positions = _after_prefix(model, prefix_cache, p, rows, pad_id, device)
    b = len(rows)
    logp = torch.log_softmax(out.logits[:, -1].float(), -1).cpu()  # [b, V]: the token after each text
    first = torch.tensor([c[0] for c in continuations])
    scores = logp[:, first].clone()  # [b, C]
    rest = [list(c[1:]) for c in continuations]
    if not any(rest):
        return scores.numpy()
    # The continuations' later tokens: every row x class, the text's cache repeated per class.
    n_cls, longest = len(continuations), max(len(c) for c in continuations)
    cont = torch.full((b * n_cls, longest - 1), pad_id, dtype=torch.long)
    cont_mask = torch.zeros_like(cont)
    targets = torch.full((b * n_cls, longest - 1), -1, dtype=torch.long)
    for c, toks in enumerate(continuations):
        k = len(toks) - 1
        if k:
            cont[c::n_cls, :k] = torch.tensor(toks[:-1])
            cont_mask[c::n_cls, :k] = 1
            targets[c::n_cls, :k] = torch.tensor(toks[1:])
    past = out.past_key_values
    past.batch_repeat_interleave(n_cls)
    full_mask = torch.cat([mask.repeat_interleave(n_cls, 0), cont_mask.clamp(min=1)], 1)  # trailing pads are never read
    start = positions[:, -1:].repeat_interleave(n_cls, 0) + 1
    cont_pos = start + torch.arange(longest - 1)[None, :]
    logits = model(input_ids=cont.to(device), attention_mask=full_mask.to(device), position_ids=cont_pos.to(device),
                   past_key_values=past, use_cache=False).logits
    lp = torch.log_softmax(logits.float(), -1).cpu()
    picked = lp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets >= 0)
    return (scores + picked.sum(-1).view(b, n_cls)).numpy()


def calibrate(scores: np.ndarray, content_free: np.ndarray | None) -> np.ndarray:
    """Class log-probabilities ``[B, C]`` from verbaliser scores, with contextual calibration.

    The scores are first normalised over the classes (``log_softmax``); with ``content_free``
    (the scores ``[C]`` of a content-free input such as ``"N/A"``, Zhao et al. 2021,
    "Calibrate Before Use", ICML) its normalised log-probs are subtracted and the result is
    normalised again: ``q(c | x) ∝ p(c | x) / p(c | N/A)``, which maps the content-free input
    to the uniform distribution and removes any constant per-class bias.

    Args:
        scores: ``[B, C]`` summed verbaliser log-probs.
        content_free: ``[C]`` the same for the content-free input, or None (no calibration).

    Returns:
        float32 ``[B, C]`` log-probabilities (each row's ``exp`` sums to 1).
    """

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    out = log_softmax(np.asarray(scores, dtype=np.float64))
    if content_free is not None:
        out = log_softmax(out - log_softmax(np.asarray(content_free, dtype=np.float64))[None, :])
    return out.astype(np.float32)
