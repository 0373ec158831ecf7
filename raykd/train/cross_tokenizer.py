"""A student whose tokenizer differs from the teacher's (``student.tokenizer_alignment``).

The soft-label cache stays keyed by the teacher: its blocks are the teacher's tokens and its
top-k ids are teacher ids. :class:`TokenizerAlignment` turns a batch of those rows into a batch
for the student, in the data loader of each Train worker:

1. the text of each block is rebuilt from the bytes its teacher tokens stand for, and
   re-tokenised with the student's tokenizer (its BOS prepended where the block starts with the
   teacher's, a document's first block: :func:`raykd.data.blocks.tokenize_to_blocks`);
2. student positions are aligned with teacher positions whose tokens end at the same byte
   offset (:func:`raykd.data.alignment.align_positions`);
3. at each aligned student position the teacher's targets of its teacher position are copied,
   with the top-k ids mapped to the student ids of the same bytes (:func:`vocabulary_map`); a
   teacher token the student has no entry for gets id -1, and its mass joins the tail bucket
   (:func:`raykd.losses.targets.teacher_buckets`).

So ``uld`` (sorted probabilities, ids unused) compares the teacher's whole top-k with the
student's, and ``forward_kl`` (and every bucket loss) is the exact KL over the matched tokens
plus one bucket for the rest: together GOLD's hybrid loss (Patiño et al. 2025, TRL). The loss
mask is the aligned positions that have a next student token, for every term (``ce`` too).

Why in the loader and not at labeling or in the cache: it costs a tokenizer call and a few
numpy passes per block (about a millisecond for a 128-token block, against hundreds of
milliseconds for the student's forward and backward on it, measured in
``benchmarks/results/cross_tokenizer_bbc.json``), and the cache stays one per teacher, usable
by students of any tokenizer; storing alignments would key the cache by the student too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raykd.data.alignment import (
    align_positions,
    common_prefix,
    token_ends,
    vocabulary_bytes,
    vocabulary_map,
)
from raykd.losses.kd import kl_divergence, uld
from raykd.losses.reduction import student_bucket_log_probs
from raykd.losses.targets import TeacherTargets, retemper, teacher_buckets
from raykd.models import load_tokenizer
from raykd.soft_labels.cache import iter_cache_batches
from raykd.train.step import StudentBatch


@dataclass
class AlignedRows:
    """A batch of teacher blocks re-tokenised for the student.

    Attributes:
        input_ids: ``[B, S]`` student ids (right-padded with the student's pad id).
        attention_mask: ``[B, S]`` 1 for real student tokens.
        labels: ``[B, S]`` the next student token, -100 where there is none.
        token_mask: ``[B, S]`` bool, positions with a next student token (perplexity).
        aligned_mask: ``[B, S]`` bool, ``token_mask`` and aligned with a teacher position that
            has targets (the teacher terms, and the loss mask of training).
        teacher_index: ``[B, S]`` the aligned teacher position, 0 where not aligned.
        next_bytes: ``[B, S]`` bytes of the next student token (bits per byte), 0 where none.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    token_mask: Tensor
    aligned_mask: Tensor
    teacher_index: Tensor
    next_bytes: Tensor


class TokenizerAlignment:
    """Re-tokenise teacher blocks for a student with another tokenizer and align them.

    Args:
        teacher_folder: folder holding the teacher's tokenizer (and ``config.json``).
        student_folder: folder holding the student's tokenizer (and ``config.json``).
    """

    def __init__(self, teacher_folder: str | Path, student_folder: str | Path):
        self.teacher_tok, self.student_tok = load_tokenizer(Path(teacher_folder)), load_tokenizer(Path(student_folder))
        t_size = max(len(self.teacher_tok), _config_vocab(teacher_folder))
        s_size = max(len(self.student_tok), _config_vocab(student_folder))
        t_bytes, s_bytes = vocabulary_bytes(self.teacher_tok, t_size), vocabulary_bytes(self.student_tok, s_size)
        self.teacher_bytes, self.student_bytes = t_bytes, s_bytes
        self.teacher_lengths = np.array([len(b or b"") for b in t_bytes], dtype=np.int64)
        self.student_lengths = np.array([len(b or b"") for b in s_bytes], dtype=np.int64)
        self.vocab_map = torch.from_numpy(vocabulary_map(t_bytes, s_bytes))
        self.student_bos = self.student_tok.bos_token_id
        pad = self.student_tok.pad_token_id if self.student_tok.pad_token_id is not None else self.student_tok.eos_token_id
        self.student_pad = int(pad or 0)

    @property
    def matched_share(self) -> float:
        """Share of the teacher's (non-special) vocabulary with a student counterpart."""
        real = sum(1 for b in self.teacher_bytes if b)
        return float((self.vocab_map >= 0).sum()) / max(real, 1)

    def _row(self, ids: np.ndarray, am: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(student ids, aligned teacher position per student position (-1: none), student ends)."""
        ids = ids[am.astype(bool)]
        text_bytes = b"".join(self.teacher_bytes[i] or b"" for i in ids.tolist())
        text = text_bytes.decode("utf-8", errors="ignore")
        student = self.student_tok(text, add_special_tokens=False)["input_ids"]
        # the student's BOS where the teacher's block has its own (a document's first block)
        starts_doc = self.teacher_tok.bos_token_id is None or (len(ids) > 0 and int(ids[0]) == self.teacher_tok.bos_token_id)
        if self.student_bos is not None and starts_doc:
            student = [int(self.student_bos), *student]
        s_ends = token_ends(student, self.student_lengths)
        s_all = b"".join(self.student_bytes[i] or b"" for i in student)
        # a SentencePiece student may prefix a space the text does not have: its offsets move by one
        shift = 1 if s_all[:1] == b" " and text_bytes[:1] != b" " else 0
        limit = common_prefix(text_bytes, s_all[shift:])  # a normaliser or a cut character: align before it only
        t_ends = token_ends(ids, self.teacher_lengths)
        return student, align_positions(t_ends, np.maximum(s_ends - shift, 0), limit=limit), s_ends

    def align(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor | None = None) -> AlignedRows:
        """Re-tokenise and align a batch of teacher blocks.

        Args:
            input_ids: ``[B, T]`` teacher ids; attention_mask: ``[B, T]`` 1 for real tokens.
            loss_mask: ``[B, T]`` unused (teacher targets exist at every real position).

        Returns:
            :class:`AlignedRows` on the device of ``input_ids``.
        """
        ids_np, am_np = input_ids.cpu().numpy(), attention_mask.cpu().numpy()
        rows = [self._row(i, a) for i, a in zip(ids_np, am_np)]
        width = max(max(len(r[0]) for r in rows), 2)
        b = len(rows)
        out = {k: np.zeros((b, width), dtype=np.int64) for k in ("ids", "am", "labels", "index", "next_bytes")}
        out["ids"][:] = self.student_pad
        out["labels"][:] = -100
        token_mask, aligned = np.zeros((b, width), bool), np.zeros((b, width), bool)
        for r, (student, index, ends) in enumerate(rows):
            n = len(student)
            out["ids"][r, :n], out["am"][r, :n] = student, 1
            out["labels"][r, : n - 1] = student[1:]
            token_mask[r, : n - 1] = True
            out["next_bytes"][r, : n - 1] = np.diff(ends)
            hit = index[: n - 1] >= 0
            aligned[r, : n - 1] = hit
            out["index"][r, : n - 1] = np.where(hit, index[: n - 1], 0)
        dev = input_ids.device
        t = {k: torch.from_numpy(v).to(dev) for k, v in out.items()}
        return AlignedRows(t["ids"], t["am"], t["labels"], torch.from_numpy(token_mask).to(dev),
                           torch.from_numpy(aligned).to(dev), t["index"], t["next_bytes"])

    def targets(self, batch: dict[str, Tensor], rows: AlignedRows) -> TeacherTargets:
        """The teacher's sparse targets at each student position (those of its aligned teacher
        position; arbitrary where not aligned), ids mapped into the student's vocabulary.

        Args:
            batch: decoded cache rows, ``topk_ids`` / ``topk_logprobs`` ``[B, T, K]`` and
                ``tail_logmass`` ``[B, T]``.
            rows: the batch's :class:`AlignedRows`.

        Returns:
            Sparse targets over ``[B, S]``: ids ``[B, S, K]`` (student ids, -1 unmatched).
        """
        idx = rows.teacher_index
        k = batch["topk_ids"].shape[-1]
        gather = idx.unsqueeze(-1).expand(-1, -1, k)
        ids = batch["topk_ids"].long().gather(1, gather)
        vmap = self.vocab_map.to(ids.device)
        mapped = torch.where(ids < len(vmap), vmap[ids.clamp(max=len(vmap) - 1)], -1)
        return TeacherTargets.sparse(mapped, batch["topk_logprobs"].float().gather(1, gather),
                                     batch["tail_logmass"].float().gather(1, idx))

    def student_batch(self, batch: dict[str, Tensor], cached_temperature: float, temperature: float):
        """A :class:`~raykd.train.step.StudentBatch` for the student from a batch of cache rows:
        the student's ids, its next tokens as labels, the aligned positions as the mask and the
        mapped teacher targets re-tempered to ``temperature``."""
        rows = self.align(batch["input_ids"], batch["attention_mask"])
        targets = retemper(self.targets(batch, rows), cached_temperature, temperature)
        labels = torch.where(rows.aligned_mask, rows.labels, torch.full_like(rows.labels, -100))
        return StudentBatch({"input_ids": rows.input_ids, "attention_mask": rows.attention_mask}, labels,
                            rows.aligned_mask, targets)


def _config_vocab(folder: str | Path) -> int:
    import json

    config = Path(folder) / "config.json"
    if not config.is_file():
        return 0
    data = json.loads(config.read_text())
    return int(data.get("vocab_size") or data.get("text_config", {}).get("vocab_size") or 0)


@torch.inference_mode()
def aligned_metrics(model, shard_files: list[str], alignment: TokenizerAlignment, batch_size: int = 16,
                    device: str = "cpu") -> dict[str, Any]:
    """Held-out numbers of a student with another tokenizer than the teacher's.

    Returns:
        ``ppl`` (exp of the mean NLL of every next student token: the student's own perplexity),
        ``bits_per_byte`` (the same NLL per byte of text, comparable across tokenizers),
        ``top1_agreement`` (aligned positions where the student's argmax is the student id of
        the teacher's top-1 token; a teacher top-1 without a student counterpart counts as a
        miss), ``kl`` (mean KL(teacher || student) over the matched top-k ids plus one bucket
        for the rest, at aligned positions), ``uld`` (mean sorted-probability L1 there),
        ``tokens`` (student positions counted for ppl), ``aligned`` (positions for the rest)
        and ``aligned_share``.
    """
    model.eval()
    nll, nbytes, agree, kl, ul, n, n_aligned = 0.0, 0, 0, 0.0, 0.0, 0, 0
    for raw in iter_cache_batches(shard_files, batch_size):
        b = {k: torch.as_tensor(raw[k], device=device) for k in ("input_ids", "attention_mask", "topk_ids", "topk_logprobs", "tail_logmass")}
        rows = alignment.align(b["input_ids"], b["attention_mask"])
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        tok_lp = logp.gather(-1, rows.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll -= float(tok_lp[rows.token_mask].double().sum())
        nbytes += int(rows.next_bytes[rows.token_mask].sum())
        n += int(rows.token_mask.sum())
        m = rows.aligned_mask
        targets = alignment.targets(b, rows)
        teacher_top1 = targets.topk_ids[..., 0]
        agree += int(((logits.argmax(-1) == teacher_top1) & (teacher_top1 >= 0))[m].sum())
        ids, log_p = teacher_buckets(targets, 1.0)
        kl += float(kl_divergence(log_p, student_bucket_log_probs(logp, ids))[m].double().sum())
        ul += float(uld(logits, targets=targets, labels=rows.labels, temperature=1.0)[m].double().sum())
        n_aligned += int(m.sum())
    return {"ppl": math.exp(nll / max(n, 1)), "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
            "top1_agreement": agree / max(n_aligned, 1), "kl": kl / max(n_aligned, 1), "uld": ul / max(n_aligned, 1),
            "tokens": n, "aligned": n_aligned, "aligned_share": n_aligned / max(n, 1)}


def teacher_bits_per_byte(shard_files: list[str], alignment: TokenizerAlignment) -> float:
    """The teacher's NLL of its own next tokens (the cache's ``label_logprobs``) per byte of text."""
    nll, nbytes = 0.0, 0
    for b in iter_cache_batches(shard_files, 256):
        m = b["loss_mask"].astype(bool)
        nll -= float(b["label_logprobs"][m].astype(np.float64).sum())
        nxt = np.zeros_like(b["input_ids"])
        nxt[:, :-1] = b["input_ids"][:, 1:]
        nbytes += int(alignment.teacher_lengths[nxt.astype(np.int64)][m].sum())
    return nll / math.log(2) / max(nbytes, 1)
