"""GLMD vocabulary compression: a student over a smaller, mapped vocabulary.

Following the vocabulary compression of GLMD (Tan et al. 2023, "Are Intermediate Layers and
Labels Really Necessary? A General Language Model Distillation Method"), the teacher's V ids are
mapped to N << V entries: the N - 1 ids most frequent in the train split keep an entry each, and
every other id shares the last entry, ``OTHER = N - 1``. The student gets an N-row embedding and
LM head (kept rows copied from the teacher, the OTHER row the frequency-weighted mean of the rows
it replaces); inputs, hard labels and the teacher's top-k soft labels are mapped on the fly
(merged ids sum their mass; the tail stays the tail), so the cache is the ordinary one.

Evaluation stays comparable with full-vocabulary students: the student's distribution is mapped
back to the V teacher ids, ``q(id) = q_c(id)`` for a kept id and ``q_c(OTHER) * f(id)`` for an
id in OTHER, where ``f`` is the add-one-smoothed train frequency of the ids inside OTHER. That is
a proper distribution over V, so perplexity is over the same tokens and vocabulary; top-1
agreement maps the student's argmax back the same way (OTHER -> its most frequent id).

The map is saved as ``vocab_map.json`` next to the student's weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from raykd.losses.targets import TeacherTargets, merge_duplicate_ids

VOCAB_MAP_FILE = "vocab_map.json"


@dataclass(frozen=True)
class VocabMap:
    """Teacher ids -> compressed ids.

    Attributes:
        kept_ids: [N - 1] teacher ids with their own entry; compressed id ``i`` is ``kept_ids[i]``.
        counts: [V] train-split frequency of every teacher id.
    """

    kept_ids: np.ndarray
    counts: np.ndarray

    @property
    def size(self) -> int:
        """N, the compressed vocabulary (kept ids + the OTHER entry)."""
        return len(self.kept_ids) + 1

    @property
    def other(self) -> int:
        return len(self.kept_ids)

    def to_compressed(self) -> Tensor:
        """[V] int64 lookup table: compressed id of each teacher id."""
        table = torch.full((len(self.counts),), self.other, dtype=torch.long)
        table[torch.as_tensor(self.kept_ids, dtype=torch.long)] = torch.arange(self.other)
        return table

    def other_log_freq(self) -> Tensor:
        """[V] ``log f(id)`` inside OTHER (add-one smoothed), 0 for kept ids."""
        c = torch.as_tensor(self.counts, dtype=torch.float64) + 1.0
        inside = self.to_compressed() == self.other
        logf = torch.where(inside, c.log() - c[inside].sum().log(), 0.0)
        return logf.float()

    def save(self, folder: Path) -> None:
        (Path(folder) / VOCAB_MAP_FILE).write_text(json.dumps(
            {"kept_ids": self.kept_ids.tolist(), "counts": self.counts.tolist()}))

    @classmethod
    def load(cls, folder: Path) -> VocabMap | None:
        """The map saved in ``folder``, or None for a full-vocabulary model."""
        path = Path(folder) / VOCAB_MAP_FILE
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        return cls(np.asarray(d["kept_ids"], dtype=np.int64), np.asarray(d["counts"], dtype=np.int64))


def build_vocab_map(counts: np.ndarray, size: int) -> VocabMap:
    """Keep the ``size - 1`` most frequent ids (ties: lower id first) plus one OTHER entry.

    Args:
        counts: [V] token frequencies of the train split.
        size: N, the compressed vocabulary size, 2 <= N < V.

    Raises:
        ValueError: ``size`` out of range.
    """
    if not 2 <= size < len(counts):
        raise ValueError(f"student.vocab_size={size} must be in [2, {len(counts)}) (the teacher vocabulary)")
    order = np.lexsort((np.arange(len(counts)), -counts))
    return VocabMap(np.sort(order[: size - 1]), np.asarray(counts, dtype=np.int64))


def token_counts(shard_files: list[str], vocab_size: int) -> np.ndarray:
    """[V] frequency of each id in the ``input_ids`` of a cache (real tokens only)."""
    import pyarrow.parquet as pq

    counts = np.zeros(vocab_size, dtype=np.int64)
    for f in shard_files:
        t = pq.read_table(f, columns=["input_ids", "attention_mask"])
        ids = t.column("input_ids").combine_chunks().flatten().to_numpy()
        real = t.column("attention_mask").combine_chunks().flatten().to_numpy().astype(bool)
        counts += np.bincount(ids[real], minlength=vocab_size)[:vocab_size]
    return counts


@torch.no_grad()
def compress_vocabulary(model: nn.Module, vmap: VocabMap) -> nn.Module:
    """Give ``model`` an N-row embedding and LM head over the compressed vocabulary (in place).

    Kept rows are copied; the OTHER row is the frequency-weighted mean of the rows it replaces.
    Tied embeddings stay tied.
    """
    table = vmap.to_compressed()
    w_other = torch.as_tensor(vmap.counts, dtype=torch.float32) + 1.0
    w_other = torch.where(table == vmap.other, w_other, 0.0)
    w_other = w_other / w_other.sum()

    def shrink(weight: Tensor) -> Tensor:
        kept = weight[torch.as_tensor(vmap.kept_ids, dtype=torch.long)]
        return torch.cat([kept, (w_other[:, None] * weight.float()).sum(0, keepdim=True).to(weight.dtype)])

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    new_emb = nn.Embedding(vmap.size, emb.weight.shape[1], dtype=emb.weight.dtype)
    new_emb.weight.copy_(shrink(emb.weight))
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = nn.Linear(head.in_features, vmap.size, bias=head.bias is not None, dtype=head.weight.dtype)
        if tied:
            new_head.weight = new_emb.weight
        else:
            new_head.weight.copy_(shrink(head.weight))
        if head.bias is not None:
            new_head.bias.copy_(torch.cat([head.bias[torch.as_tensor(vmap.kept_ids)], head.bias.mean().view(1)]))
        model.set_output_embeddings(new_head)
    model.config.vocab_size = vmap.size
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # special ids move with the map
        tid = getattr(model.config, name, None)
        if isinstance(tid, int):
            setattr(model.config, name, int(table[tid]))
    return model


def map_targets(targets: TeacherTargets, table: Tensor) -> TeacherTargets:
    """Sparse teacher targets over V mapped into the compressed vocabulary: ids through ``table``
    ([V] int64), the mass of ids that land on one entry summed, the tail unchanged."""
    if targets.form != "sparse":
        raise ValueError("vocabulary compression maps sparse soft labels (top-k ids from the cache)")
    ids = torch.where(targets.topk_ids >= 0, table.to(targets.topk_ids.device)[targets.topk_ids.clamp(min=0)], -1)
    merged, probs = merge_duplicate_ids(ids, targets.topk_logprobs.float().exp())
    return TeacherTargets.sparse(merged, probs.log(), targets.tail_logmass)


def map_ids(ids: Tensor, table: Tensor) -> Tensor:
    """Token ids (or labels; negative ids such as -100 are kept) into the compressed vocabulary."""
    return torch.where(ids >= 0, table.to(ids.device)[ids.clamp(min=0)], ids)


def compress_student_folder(folder: Path, train_files: list[str], size: int) -> VocabMap:
    """Compress the vocabulary of the model saved in ``folder`` (in place) to ``size`` entries
    chosen by frequency in ``train_files``; the map is saved next to the weights.

    Raises:
        ValueError: ``size`` is not smaller than the model's vocabulary.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    vmap = build_vocab_map(token_counts(train_files, model.config.vocab_size), size)
    compress_vocabulary(model, vmap).save_pretrained(folder)
    vmap.save(folder)
    return vmap
