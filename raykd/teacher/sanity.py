"""A check of the teacher on real text before it labels anything.

A teacher scored without the BOS token it was trained with (GGUF-converted tokenizers often
lose it), with the wrong tokenizer or with broken weights still produces soft labels, and a run
trains on them without complaint. Its perplexity on a few of the run's own documents shows it:
SmolLM2-135M scores about 23 on BBC articles with its BOS and thousands without.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

IMPLAUSIBLE_PPL = 1000.0
"""Teacher perplexity on real text above which the run warns (the teacher is probably scored wrong)."""


def perplexity(label_logprobs: np.ndarray, loss_mask: np.ndarray) -> float:
    """``exp`` of the mean negative log-probability of the real next tokens.

    Args:
        label_logprobs: ``[B, T]`` log-probabilities of the next tokens (a ``score`` answer).
        loss_mask: ``[B, T]`` 1 where the next token is real.
    """
    m = loss_mask.astype(bool)
    return math.exp(-float(label_logprobs[m].astype(np.float64).sum()) / max(int(m.sum()), 1))


def check_teacher_perplexity(score, tokenizer: Any, texts: list[str], *, seq_len: int,
                             limit: float = IMPLAUSIBLE_PPL) -> float | None:
    """Score a few real texts with the teacher and warn when its perplexity is implausible.

    The texts are cut into blocks exactly as the labeling pipeline cuts them
    (:func:`raykd.data.blocks.tokenize_to_blocks`, BOS prepended where the tokenizer has one).
    Above ``limit`` the blocks are scored once more the other way (:func:`bos_comparison`): the
    warning then says whether the BOS token is the cause (the teacher does much better the other
    way) or the teacher itself is weak (no better either way).

    Args:
        score: ``(input_ids [B, T], attention_mask [B, T]) -> score answer`` (the teacher's
            ``score``, e.g. through its Serve handle).
        tokenizer: the teacher's tokenizer.
        texts: a few documents of the run (4 are enough).
        seq_len: block length ``T`` of the run.
        limit: the perplexity above which to warn.

    Returns:
        The perplexity, or None when the texts give no block.
    """
    # lazy: keeps pyarrow out of import time
    from raykd.data.blocks import tokenize_to_blocks

    batch = {"doc_id": np.array([str(i) for i in range(len(texts))], dtype=object), "text": np.array(texts, dtype=object)}
    blocks = tokenize_to_blocks(batch, tokenizer, seq_len=seq_len, max_blocks_per_doc=1, min_tokens=min(8, seq_len))
    if not len(blocks["input_ids"]):
        return None
    out = score(blocks["input_ids"], blocks["attention_mask"])
    ppl = perplexity(np.asarray(out["label_logprobs"]), blocks["loss_mask"])
    if ppl <= limit:
        log.info("teacher perplexity on %d documents of the run: %.1f", len(blocks["input_ids"]), ppl)
        return ppl
    what, as_labeled, other = bos_comparison(score, tokenizer, blocks, np.asarray(out["label_logprobs"]))
    if other < as_labeled / 2:
        cause = (f"it scores {other:.0f} {what} against {as_labeled:.0f} as labeled: the BOS token is the cause; "
                 "fix the tokenizer's bos_token (and add_bos_token) in the teacher's folder")
    else:
        cause = (f"{what} it scores {other:.0f} (as labeled {as_labeled:.0f}): the BOS token is not the cause, the "
                 "teacher itself predicts this text badly (an untrained, layer-dropped or mismatched model?)")
    log.warning("the teacher's perplexity on %d of this run's documents is %.0f (above %.0f); %s. Check "
                "teacher.model before trusting these soft labels.", len(blocks["input_ids"]), ppl, limit, cause)
    return ppl


def bos_comparison(score, tokenizer: Any, blocks: dict[str, np.ndarray], label_logprobs: np.ndarray) -> tuple[str, float, float]:
    """Score ``blocks`` once more with the BOS the other way, on the same predicted tokens.

    Blocks that start with the tokenizer's BOS are scored without it; otherwise the EOS token
    (which a tokenizer that lost its BOS often had as one) is prepended.

    Args:
        score, tokenizer: as for :func:`check_teacher_perplexity`.
        blocks: the checked blocks (``input_ids``, ``attention_mask``, ``loss_mask``, ``[B, T]``).
        label_logprobs: ``[B, T]`` the teacher's answer on ``blocks`` as they are.

    Returns:
        ``(what was changed, in words; perplexity as labeled; perplexity the other way)``, both
        over the same next tokens.
    """
    ids, am, lm = blocks["input_ids"], blocks["attention_mask"], blocks["loss_mask"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (ids[:, 0] == bos).all():  # drop it: position t + 1 now sits at t
        other = np.asarray(score(ids[:, 1:], am[:, 1:])["label_logprobs"])
        return (f"without its BOS token {tokenizer.bos_token!r}", perplexity(label_logprobs[:, 1:], lm[:, 1:]),
                perplexity(other, lm[:, 1:]))
    eos = getattr(tokenizer, "eos_token_id", None)
    prefix = np.full((len(ids), 1), 0 if eos is None else eos, dtype=ids.dtype)
    other = np.asarray(score(np.concatenate([prefix, ids], 1), np.concatenate([np.ones_like(prefix, dtype=am.dtype), am], 1))
                       ["label_logprobs"])
    what = f"with {getattr(tokenizer, 'eos_token', None)!r} prepended as a BOS (its tokenizer has none)"
    return what, perplexity(label_logprobs, lm), perplexity(other[:, 1:], lm)
