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
    from raykd.data.blocks import tokenize_to_blocks

    batch = {"doc_id": np.array([str(i) for i in range(len(texts))], dtype=object), "text": np.array(texts, dtype=object)}
    blocks = tokenize_to_blocks(batch, tokenizer, seq_len=seq_len, max_blocks_per_doc=1, min_tokens=min(8, seq_len))
    if not len(blocks["input_ids"]):
        return None
    out = score(blocks["input_ids"], blocks["attention_mask"])
    ppl = perplexity(np.asarray(out["label_logprobs"]), blocks["loss_mask"])
    bos = getattr(tokenizer, "bos_token", None)
    if ppl > limit:
        log.warning("the teacher's perplexity on %d of this run's documents is %.0f (above %.0f): it is probably "
                    "scored wrong. %s Check teacher.model and its tokenizer before trusting these soft labels.",
                    len(blocks["input_ids"]), ppl, limit,
                    f"Its blocks start with the BOS token {bos!r}." if bos else
                    "Its tokenizer has no BOS token: a model trained with one scores badly without it.")
    else:
        log.info("teacher perplexity on %d documents of the run: %.1f", len(blocks["input_ids"]), ppl)
    return ppl
