"""GLMD vocabulary compression: a student over a smaller, mapped vocabulary.

Following the vocabulary compression of GLMD (Tan et al. 2023, "Are Intermediate Layers and
Labels Really Necessary? A General Language Model Distillation Method", Findings of ACL; the
seed's ``build_map_vocab_for_student`` in ``aitsc/GLMKD`` ``distill/prepare.py``), the teacher's
V ids are mapped many-to-one onto N << V entries, ranked by frequency in the train split. Two
kinds of map (``student.vocab_map``):

- ``decoder`` / ``cosine`` / ``euclidean`` (the seed's ``student_map_vocab_method``): the N most
  frequent ids keep an entry each and every other id joins the kept id whose teacher input
  embedding scores highest against its own: largest dot product (``decoder``, the score a tied
  LM head gives), largest cosine, or smallest Euclidean distance. Each entry is headed by its
  kept id and the student's rows are the kept ids' teacher rows.
- ``bucket``: the N - 1 most frequent ids keep an entry and every other id shares one headless
  entry, ``OTHER = N - 1``, whose row is the frequency-weighted mean of the rows it replaces.

The student gets an N-row embedding and LM head; inputs, hard labels and the teacher's top-k soft
labels are mapped on the fly (ids that land on one entry sum their mass; the tail stays the tail),
so the cache is the ordinary one. Deviation from the seed: the seed restricts the teacher's logits
to the kept ids and renormalises them (``distill_logit_mask_map``), dropping the mass of the
mapped ids; a top-k cache has no logits for ids outside its top k, so here that mass moves onto
the entry the ids are mapped to instead.

Evaluation stays comparable with full-vocabulary students: the student's distribution is mapped
back to the V teacher ids, ``q(id) = q_c(g) * f(id | g)`` for the entry ``g`` of ``id``, where
``f`` is the add-one-smoothed train frequency share of ``id`` inside its entry's group (1 for an
id alone in its entry). That is a proper distribution over V, so perplexity is over the same
tokens and vocabulary; top-1 agreement maps the student's argmax back to the most frequent id of
the entry's group.

The map is saved as ``vocab_map.json`` next to the student's weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raykd.config import VocabMapping
from raykd.losses.targets import TeacherTargets, merge_duplicate_ids

VOCAB_MAP_FILE = "vocab_map.json"
SIMILARITY_MAPPINGS = ("decoder", "cosine", "euclidean")
MIN_VOCAB_SIZE = 8


@dataclass(frozen=True)
class VocabMap:
    """Teacher ids -> compressed ids, many to one.

    Attributes:
        table: [V] compressed id of each teacher id; every entry ``0..N-1`` has at least one.
        counts: [V] train-split frequency of every teacher id.
        heads: [N] the teacher id whose rows each entry takes (it maps to that entry), or -1
            for a headless entry (``bucket``'s OTHER) whose rows average its group's.
        mapping: how the map was built (a :data:`VocabMapping`).

    Raises:
        ValueError: the arrays do not describe one map (e.g. a corrupt ``vocab_map.json``).
    """

    table: np.ndarray
    counts: np.ndarray
    heads: np.ndarray
    mapping: str = "bucket"

    def __post_init__(self) -> None:
        v, n = len(self.table), len(self.heads)
        headed = self.heads >= 0
        ok = len(self.counts) == v and self.table.min(initial=0) >= 0 and self.table.max(initial=0) < n \
            and np.bincount(self.table, minlength=n).min(initial=1) > 0 and self.heads.max(initial=-1) < v \
            and (self.table[self.heads[headed]] == np.flatnonzero(headed)).all()
        if not ok:
            raise ValueError(f"inconsistent vocabulary map: {v} ids, {len(self.counts)} counts and {n} entries must "
                             "give every entry an id and map each head to its own entry; rebuild the student")

    @property
    def size(self) -> int:
        """N, the compressed vocabulary."""
        return len(self.heads)

    def to_compressed(self) -> Tensor:
        """[V] int64 lookup table: compressed id of each teacher id."""
        return torch.as_tensor(self.table, dtype=torch.long)

    def group_log_freq(self) -> Tensor:
        """[V] ``log f(id | group)``: the id's add-one-smoothed share of its entry's train
        frequency (0 for an id alone in its entry)."""
        c = torch.as_tensor(self.counts, dtype=torch.float64) + 1.0
        table = self.to_compressed()
        total = torch.zeros(self.size, dtype=torch.float64).index_add_(0, table, c)
        return (c.log() - total[table].log()).float()

    def group_top_ids(self) -> Tensor:
        """[N] int64 the most frequent teacher id of each entry (ties: lower id), where a
        compressed top-1 maps back to."""
        order = np.lexsort((np.arange(len(self.counts)), -self.counts))
        _, first = np.unique(self.table[order], return_index=True)
        return torch.as_tensor(order[first], dtype=torch.long)

    def save(self, folder: Path) -> None:
        (Path(folder) / VOCAB_MAP_FILE).write_text(json.dumps({
            "mapping": self.mapping, "table": self.table.tolist(), "heads": self.heads.tolist(),
            "counts": self.counts.tolist()}))

    @classmethod
    def load(cls, folder: Path) -> VocabMap | None:
        """The map saved in ``folder``, or None for a full-vocabulary model. Files written before
        many-to-one maps (``kept_ids`` + ``counts``) load as ``bucket`` maps."""
        path = Path(folder) / VOCAB_MAP_FILE
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        counts = np.asarray(d["counts"], dtype=np.int64)
        if "table" not in d:
            return _bucket_map(np.asarray(d["kept_ids"], dtype=np.int64), counts)
        return cls(np.asarray(d["table"], dtype=np.int64), counts, np.asarray(d["heads"], dtype=np.int64), d["mapping"])


def _bucket_map(kept_ids: np.ndarray, counts: np.ndarray) -> VocabMap:
    """``kept_ids`` (sorted) keep entries ``0..N-2``; every other id goes to OTHER = N - 1."""
    table = np.full(len(counts), len(kept_ids), dtype=np.int64)
    table[kept_ids] = np.arange(len(kept_ids))
    return VocabMap(table, counts, np.append(kept_ids, -1), "bucket")


def resolve_vocab_size(size: int | float, vocab_size: int) -> int:
    """N for ``student.vocab_size``: a count, or a fraction in (0, 1) of the teacher vocabulary
    (rounded down, as the seed's ``map_vocab_size``).

    Raises:
        ValueError: N is not in ``[8, vocab_size)``.
    """
    n = int(size * vocab_size) if isinstance(size, float) else int(size)
    if not MIN_VOCAB_SIZE <= n < vocab_size or (isinstance(size, float) and not 0 < size < 1):
        raise ValueError(f"student.vocab_size={size} gives {n} entries; it must give {MIN_VOCAB_SIZE} to "
                         f"{vocab_size - 1} (fewer than the teacher's {vocab_size} ids): a count, or a "
                         "fraction in (0, 1)")
    return n


def build_vocab_map(counts: np.ndarray, size: int, mapping: str = "bucket", embeddings: Tensor | None = None,
                    *, chunk_bytes: int = 32 << 20) -> VocabMap:
    """Rank ids by train frequency (ties: lower id first) and map them onto ``size`` entries.

    Args:
        counts: [V] token frequencies of the train split.
        size: N, the compressed vocabulary size, ``2 <= N < V``.
        mapping: ``bucket`` (N - 1 kept ids + one OTHER entry) or ``decoder`` / ``cosine`` /
            ``euclidean`` (N kept ids, every other id joins its nearest kept id; see
            :func:`nearest_kept_ids`).
        embeddings: [V, H] the teacher's input embedding matrix (needed by the similarity mappings).
        chunk_bytes: memory for one chunk of similarity scores.

    Raises:
        ValueError: an unknown ``mapping``, ``size`` out of range, or ``embeddings`` missing or
            not [V, H].
    """
    v = len(counts)
    if mapping not in get_args(VocabMapping):
        raise ValueError(f"unknown student.vocab_map={mapping!r}; use one of {list(get_args(VocabMapping))}")
    if not 2 <= size < v:
        raise ValueError(f"student.vocab_size={size} must be in [2, {v}) (the teacher vocabulary)")
    counts = np.asarray(counts, dtype=np.int64)
    order = np.lexsort((np.arange(v), -counts))
    if mapping == "bucket":
        return _bucket_map(np.sort(order[: size - 1]), counts)
    if embeddings is None or embeddings.ndim != 2 or embeddings.shape[0] != v:
        got = "none" if embeddings is None else list(embeddings.shape)
        raise ValueError(f"student.vocab_map={mapping!r} needs the teacher's [{v}, H] input embeddings, got {got}")
    kept, dropped = np.sort(order[:size]), order[size:]
    table = np.empty(v, dtype=np.int64)
    table[kept] = np.arange(size)
    table[dropped] = nearest_kept_ids(embeddings, torch.as_tensor(kept), torch.as_tensor(dropped), mapping,
                                      chunk_bytes=chunk_bytes).numpy()
    return VocabMap(table, counts, kept, mapping)


@torch.no_grad()
def nearest_kept_ids(embeddings: Tensor, kept: Tensor, dropped: Tensor, mapping: str, *,
                     chunk_bytes: int = 32 << 20) -> Tensor:
    """For each dropped id, the index into ``kept`` of the kept id most similar to it (GLMD's
    ``student_map_vocab_method``; ties: the first kept id).

    ``decoder`` scores ``e_d . e_k``, ``cosine`` ``e_d . e_k / (|e_d| |e_k|)``, ``euclidean``
    ``-|e_d - e_k|^2``. The [M, N] scores are computed ``chunk_bytes`` at a time, so memory stays
    at the kept rows plus one chunk (49,152 -> 8,192 ids of SmolLM2: 19 MB + 32 MB).

    Args:
        embeddings: [V, H] input embedding matrix.
        kept: [N] kept teacher ids; dropped: [M] the others.

    Returns:
        [M] int64 indices into ``kept``.
    """
    keys = embeddings[kept].float()
    if mapping == "cosine":
        keys = F.normalize(keys, dim=-1)
    key_sq = (keys * keys).sum(-1)

    def best(ids: Tensor) -> Tensor:  # one chunk; its scores are freed before the next is made
        q = embeddings[ids].float()
        scores = (F.normalize(q, dim=-1) if mapping == "cosine" else q) @ keys.T
        if mapping == "euclidean":  # -|q - k|^2 = 2 q.k - |k|^2 - |q|^2, the last constant per row
            scores.mul_(2).sub_(key_sq)
        return scores.argmax(-1)

    rows = max(1, chunk_bytes // (4 * len(kept)))
    return torch.cat([best(dropped[i:i + rows]) for i in range(0, len(dropped), rows)] or [torch.zeros(0, dtype=torch.long)])


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


def _shrink(weight: Tensor, vmap: VocabMap) -> Tensor:
    """[V, H] rows -> [N, H]: a headed entry takes its head's row, a headless one the add-one
    frequency-weighted mean of its group's rows."""
    heads = torch.as_tensor(vmap.heads)
    out = weight[heads.clamp(min=0)].clone()
    headless = heads < 0
    if headless.any():
        table = vmap.to_compressed()
        member = headless[table]
        w = torch.as_tensor(vmap.counts, dtype=torch.float32)[member] + 1.0
        sums = torch.zeros(vmap.size, weight.shape[1]).index_add_(0, table[member], w[:, None] * weight[member].float())
        mass = torch.zeros(vmap.size).index_add_(0, table[member], w)
        out[headless] = (sums[headless] / mass[headless, None]).to(weight.dtype)
    return out


@torch.no_grad()
def compress_vocabulary(model: nn.Module, vmap: VocabMap) -> nn.Module:
    """Give ``model`` an N-row embedding and LM head over the compressed vocabulary (in place).

    A headed entry's rows (and bias) are its head's; a headless entry's are the add-one
    frequency-weighted mean of the rows it replaces. Tied embeddings stay tied; the special
    token ids of the config move with the map.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    new_emb = nn.Embedding(vmap.size, emb.weight.shape[1], dtype=emb.weight.dtype)
    new_emb.weight.copy_(_shrink(emb.weight, vmap))
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = nn.Linear(head.in_features, vmap.size, bias=head.bias is not None, dtype=head.weight.dtype)
        if tied:
            new_head.weight = new_emb.weight
        else:
            new_head.weight.copy_(_shrink(head.weight, vmap))
        if head.bias is not None:
            new_head.bias.copy_(_shrink(head.bias[:, None], vmap)[:, 0])
        model.set_output_embeddings(new_head)
    model.config.vocab_size = vmap.size
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        tid = getattr(model.config, name, None)
        if isinstance(tid, int):
            setattr(model.config, name, int(vmap.table[tid]))
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


def input_embeddings(model_dir: Path) -> Tensor:
    """[V, H] float32 input embedding matrix of the causal LM saved in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.get_input_embeddings().weight.detach()


def compress_student_folder(folder: Path, train_files: list[str], size: int | float, mapping: str = "bucket",
                            teacher_dir: Path | None = None) -> VocabMap:
    """Compress the vocabulary of the model saved in ``folder`` (in place) to ``size`` entries
    chosen by frequency in ``train_files``; the map is saved next to the weights.

    Args:
        size: N, or a fraction in (0, 1) of the model's vocabulary (:func:`resolve_vocab_size`).
        mapping: see :func:`build_vocab_map`; a similarity mapping reads the input embeddings of
            the teacher in ``teacher_dir``.

    Raises:
        ValueError: ``size`` is not smaller than the model's vocabulary, an unknown ``mapping``,
            or a similarity mapping without ``teacher_dir``.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    n = resolve_vocab_size(size, model.config.vocab_size)
    similar = mapping in SIMILARITY_MAPPINGS
    if similar and teacher_dir is None:
        raise ValueError(f"student.vocab_map={mapping!r} compares teacher embeddings: pass the teacher's folder")
    embeddings = input_embeddings(teacher_dir) if similar else None
    vmap = build_vocab_map(token_counts(train_files, model.config.vocab_size), n, mapping, embeddings)
    compress_vocabulary(model, vmap).save_pretrained(folder)
    vmap.save(folder)
    return vmap
