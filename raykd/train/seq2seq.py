"""A causal LM trained on prompt -> target pairs (e.g. article body -> headline), no Ray.

The loss counts the target's tokens only: position ``t`` predicts token ``t + 1`` (the causal
LM convention of :func:`raykd.train.step.causal_lm_logits`), so label ``t`` is token ``t + 1``
where that token belongs to the target and -100 elsewhere. Training goes through the shared
:class:`~raykd.losses.Objective` and :func:`~raykd.train.step.run_steps` (a ``ce`` term on the
target tokens: sequence-level KD's hard targets, Kim & Rush 2016). ROUGE-L (Lin 2004) scores
generated text against references.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from raykd.losses import Objective
from raykd.soft_labels.pseudo_labels import first_line
from raykd.train.local import batch_indices, device_of
from raykd.train.step import StudentBatch, build_optimizer, causal_lm_logits, run_steps

PairData = dict[str, np.ndarray]
"""``input_ids`` / ``attention_mask`` / ``labels`` ``[N, T]`` (labels -100 off the target)."""


def pair_rows(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, prompt_tokens: int, target_tokens: int) -> PairData:
    """Tokenised ``prompt + target + EOS`` rows, right-padded to ``T = prompt_tokens + target_tokens + 1``.

    The prompt is encoded as :meth:`~raykd.teacher.engines.hf.HFEngine.generate` encodes it
    (special tokens added) and keeps its last ``prompt_tokens`` tokens (its cue); the target is
    cut to ``target_tokens``; the EOS after the target is learned too (the student learns to stop).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    n = len(prompts)
    # the prompt as a teacher engine's generate encodes it (special tokens added), cut from the left
    p_ids = [x[-prompt_tokens:] for x in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]] if n else []
    t_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"] if n else []
    width = prompt_tokens + target_tokens + len(eos)
    ids = np.full((n, width), pad, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), -100, dtype=np.int64)
    for i, (head, t) in enumerate(zip(p_ids, t_ids)):
        tail = t[:target_tokens] + eos
        row = head + tail
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, len(head) - 1 : len(row) - 1] = tail  # position t predicts token t + 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pair_batch(data: PairData, idx: np.ndarray, device: torch.device | str = "cpu") -> StudentBatch:
    """Rows ``idx`` as a :class:`~raykd.train.step.StudentBatch` (``P = T``, mask = target tokens)."""
    inputs = {k: torch.as_tensor(data[k][idx]).to(device) for k in ("input_ids", "attention_mask")}
    labels = torch.as_tensor(data["labels"][idx]).to(device)
    return StudentBatch(inputs, labels, labels != -100)


def train_on_pairs(model: nn.Module, data: PairData, *, steps: int, batch_size: int, lr: float, seed: int = 0,
                   on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[float]:
    """Train a causal LM on prompt -> target rows with the ``ce`` objective (AdamW, constant lr).

    Returns:
        The loss of every step (mean per target token).
    """
    objective = Objective({"ce": 1.0})
    optimizer, _ = build_optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches: Iterator[StudentBatch] = (pair_batch(data, idx, device_of(model))
                                       for idx in batch_indices(len(data["input_ids"]), batch_size, steps, seed))
    history = run_steps(model, optimizer, lambda _tau: [next(batches)], lambda _step: (objective, 1.0), max_steps=steps,
                        on_step=on_step, logits_fn=causal_lm_logits, max_grad_norm=1.0)
    return [h["loss"] for h in history]


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) of two texts on lower-cased word tokens (punctuation split off);
    in [0, 1], 0 when either is empty."""
    import re

    a, b = (re.findall(r"\w+", s.lower()) for s in (prediction, reference))
    if not a or not b:
        return 0.0
    lcs = _lcs(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over pairs (0 for none)."""
    scores = [rouge_l(p, r) for p, r in zip(predictions, references)]
    return float(np.mean(scores)) if scores else 0.0


@torch.no_grad()
def greedy_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions of ``prompts`` by an in-process causal LM (left-padded batches; the
    prompts encoded with special tokens, as the ``hf`` engine's ``generate`` does), each cut at
    EOS and at its first line break."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    model.eval()
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        encoded = tokenizer(list(prompts[s : s + batch_size]), add_special_tokens=True)["input_ids"]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :], mask[i, width - len(e) :] = torch.tensor(e), 1
        dev = device_of(model)
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)[:, width:]
        out += [first_line(tokenizer.decode(g, skip_special_tokens=True)) for g in gen.tolist()]
    return out

