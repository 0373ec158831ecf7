"""What a feature (intermediate-layer) loss sees: the inside of a forward pass, a checked layer
mapping, learned projections, and the reduction of a feature loss to the objective's positions.

A feature loss is registered in the one loss registry (:func:`raykd.losses.define_loss` with
``kind="features"``) and has the signature::

    fn(student: Features, teacher: Features, *, layer_map: LayerMap,
       projections: dict[str, nn.Module], **hyper_params) -> [B, T] per-token or [B] per-sequence

It returns the loss unreduced; :func:`to_positions` turns it into the objective's ``[B, P]``
(``P = T`` for a causal LM, ``P = 1`` for a classifier), and :class:`~raykd.losses.Objective`
masks, sums and weighs it with the logit terms. Pure torch: how the features are read from a
model lives in :mod:`raykd.train.features`.

Layer numbering: layer ``i`` is the output of transformer block ``i`` (0-based), before any
final norm; the embeddings are the input of block 0 (:attr:`Features.embeddings`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(eq=False)
class Features:
    """The features of one forward pass over a batch ``[B, T]``.

    Attributes:
        embeddings: ``[B, T, H]`` input of block 0 (word + position embeddings, after any
            embedding norm).
        hidden: one ``[B, T, H]`` per block, its output.
        queries, keys, values: one ``[B, heads, T, d]`` per block, as the attention used them
            (a decoder's queries and keys after the rotary embedding; keys and values with the
            model's key-value heads, fewer than ``heads`` under grouped-query attention);
            empty when attention was not captured.
        attention_masks: one additive ``[B, 1, T, T]`` mask per block (0 where a key may be
            seen, a very negative number where not: padding, and the future in a decoder), or
            ``None`` entries for no mask.
        scaling: the score scale of the attention (``1 / sqrt(d)``).
        token_mask: ``[B, T]`` bool, True at real (non-padding) tokens.
        causal: where a block's mask is None, whether a query sees only the keys up to itself
            (a compact cached form drops the ``[B, 1, T, T]`` masks and keeps this flag).

    A compact cached form may hold ``None`` for the blocks a method does not read
    (:func:`raykd.train.features.compact`).
    """

    embeddings: Tensor | None
    hidden: list[Tensor]
    token_mask: Tensor
    queries: list[Tensor] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    attention_masks: list[Tensor | None] = field(default_factory=list)
    scaling: float | None = None
    causal: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.hidden)

    @property
    def width(self) -> int | None:
        """Hidden width ``H`` (None for a compact form that kept no hidden state)."""
        kept = [h for h in (*self.hidden, self.embeddings) if h is not None]
        return kept[0].shape[-1] if kept else None

    def has_attention(self) -> bool:
        return len(self.queries) == len(self.hidden) > 0 and any(q is not None for q in self.queries)

    def scores(self, layer: int, masked: bool = True) -> Tensor:
        """Attention scores ``[B, heads, T, T]`` of block ``layer``: ``q k^T * scaling`` (keys
        repeated over grouped-query heads); with ``masked``, keys a query may not see (:meth:`key_mask`)
        set to the fp32 minimum."""
        q, k = self.queries[layer], _repeat_heads(self.keys[layer], self.queries[layer].shape[1])
        s = (q.float() @ k.float().transpose(-1, -2)) * self.scaling
        if not masked:
            return s
        return s.masked_fill(~self.key_mask(layer), torch.finfo(torch.float32).min)

    def probs(self, layer: int) -> Tensor:
        """Attention distributions ``[B, heads, T, T]`` of block ``layer`` (softmax of the scores)."""
        return torch.softmax(self.scores(layer), dim=-1)

    def key_mask(self, layer: int) -> Tensor:
        """``[B, 1, T, T]`` bool: True where query ``i`` may attend to key ``j`` in block ``layer``
        (padding keys out; a decoder's future keys out)."""
        mask = self.attention_masks[layer] if self.attention_masks else None
        b, t = self.token_mask.shape
        if mask is None:
            keys = self.token_mask[:, None, None, :].expand(b, 1, t, t)
            return keys & torch.ones(t, t, dtype=torch.bool, device=keys.device).tril() if self.causal else keys
        return mask[..., :t] > torch.finfo(mask.dtype).min / 2

    def slice(self, rows: Tensor | slice) -> Features:
        """The features of batch rows ``rows`` (e.g. a micro-batch of cached features)."""
        pick = lambda xs: [x[rows] if x is not None else None for x in xs]  # noqa: E731
        return Features(None if self.embeddings is None else self.embeddings[rows], pick(self.hidden),
                        self.token_mask[rows], pick(self.queries), pick(self.keys), pick(self.values),
                        pick(self.attention_masks), self.scaling, self.causal)


def _repeat_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, kv, T, d]`` -> ``[B, heads, T, d]`` (grouped-query attention shares each kv head)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


@dataclass(frozen=True)
class LayerMap:
    """An explicit, checked ``(student layer, teacher layer)`` list.

    Student layers strictly increase, and so do their teacher layers (a layer is never matched
    to an earlier teacher layer than the one before it). The default for a layer-dropped student
    is :meth:`from_keep_layers`: student layer ``i`` matches the teacher layer it was copied from.
    Nothing maps ``(i, i)`` silently (DistillKit's ``layer_mapping: all`` does, and matches the
    wrong layers of a layer-dropped student).

    Attributes:
        pairs: ``((s, t), ...)``, 0-based block indices.
        student_layers, teacher_layers: the two models' block counts.

    Raises:
        ValueError: an empty list, an index out of range, a student layer named twice, or
            indices that do not increase (the message names the pair and the ranges).
    """

    pairs: tuple[tuple[int, int], ...]
    student_layers: int
    teacher_layers: int

    def __post_init__(self):
        pairs = tuple((int(s), int(t)) for s, t in self.pairs)
        object.__setattr__(self, "pairs", pairs)
        if not pairs:
            raise ValueError("the layer map is empty; give (student layer, teacher layer) pairs")
        if len(pairs) > self.student_layers:
            raise ValueError(f"layer map has {len(pairs)} pairs for a student of {self.student_layers} layers; "
                             "give at most one pair per student layer")
        for s, t in pairs:
            if not (0 <= s < self.student_layers and 0 <= t < self.teacher_layers):
                raise ValueError(f"layer pair {(s, t)} is out of range: student layers 0..{self.student_layers - 1}, "
                                 f"teacher layers 0..{self.teacher_layers - 1}")
        for (s0, t0), (s1, t1) in zip(pairs, pairs[1:]):
            if not (s1 > s0 and t1 > t0):
                raise ValueError(f"layer map {list(pairs)}: pairs must increase in both layers, got {(s0, t0)} then {(s1, t1)}")

    @classmethod
    def from_keep_layers(cls, keep_layers: Sequence[int], teacher_layers: int) -> LayerMap:
        """Student layer ``i`` <-> teacher layer ``keep_layers[i]`` (the stride a layer-dropped
        student was built from, :func:`raykd.students.build.layer_drop`)."""
        bad = [i for i in keep_layers if not -teacher_layers <= i < teacher_layers]
        if bad:
            raise ValueError(f"keep_layers={list(keep_layers)}: {bad} out of range for a teacher of {teacher_layers} layers")
        idx = [i % teacher_layers for i in keep_layers]
        return cls(tuple(enumerate(idx)), len(idx), teacher_layers)

    @classmethod
    def for_student(cls, pairs: Sequence[Sequence[int]] | None, keep_layers: Sequence[int] | None, student_layers: int,
                    teacher_layers: int) -> LayerMap:
        """The layer map of a training run: the explicit ``pairs`` when given, else the stride the
        layer-dropped student was built from (:meth:`from_keep_layers`).

        Args:
            pairs: ``[(student layer, teacher layer), ...]`` (``train.layer_map``) or None.
            keep_layers: the teacher layers a layer-dropped student kept (``student.keep_layers``),
                or None for a student that was not built by layer drop.
            student_layers, teacher_layers: the two models' block counts.

        Raises:
            ValueError: neither is given, ``keep_layers`` does not match the student's block count,
                or the map is invalid (see the class).
        """
        if pairs is not None:
            return cls(tuple(tuple(p) for p in pairs), student_layers, teacher_layers)
        if keep_layers is None:
            raise ValueError("feature terms need a layer map: give train.layer_map: [[student layer, teacher layer], ...] "
                             "(only a student layer-dropped from the teacher itself has a default stride)")
        if len(keep_layers) != student_layers:
            raise ValueError(f"student.keep_layers={list(keep_layers)} names {len(keep_layers)} layers, the student has "
                             f"{student_layers}; give train.layer_map explicitly")
        return cls.from_keep_layers(keep_layers, teacher_layers)

    @property
    def last(self) -> tuple[int, int]:
        """The deepest pair (what last-layer methods such as DistilBERT and MiniLM match)."""
        return self.pairs[-1]

    def check(self, student: Features, teacher: Features) -> None:
        """Raise ``ValueError`` unless the features have the layer counts this map was built for."""
        if (student.num_layers, teacher.num_layers) != (self.student_layers, self.teacher_layers):
            raise ValueError(f"layer map built for {self.student_layers} student / {self.teacher_layers} teacher layers, "
                             f"got features of {student.num_layers} / {teacher.num_layers}; rebuild it for these models")


def projection(projections: dict[str, nn.Module], name: str, x: Tensor) -> Tensor:
    """``projections[name](x)`` (a learned linear map student width -> teacher width) when the
    term has one, else ``x`` (widths equal)."""
    proj = projections.get(name)
    return x if proj is None else proj(x)


def build_projections(names: Sequence[str], student_width: int, teacher_width: int) -> nn.ModuleDict:
    """``nn.Linear(student_width, teacher_width)`` per name, only when the widths differ (else empty)."""
    if student_width == teacher_width:
        return nn.ModuleDict()
    return nn.ModuleDict({n: nn.Linear(student_width, teacher_width) for n in names})


def term_modules(spec, widths: tuple[int, int] | None, layer_map: LayerMap | None,
                 params: dict[str, Any] | None = None) -> nn.ModuleDict | None:
    """The learned maps of one feature term: its ``modules`` factory's (always built, e.g.
    Universal-KD's per-layer maps), else its width projections (only when the widths differ,
    :func:`build_projections`). None when the term has neither, or the widths are unknown.

    Args:
        spec: the term's :class:`~raykd.losses.registry.LossSpec`.
        widths: ``(student width, teacher width)``.
        layer_map: the run's layer map (the factory sizes per-layer maps from it).
        params: the term's hyper-parameters (the factory reads the ones it needs).
    """
    if widths is None:
        return None
    if spec.modules is not None:
        return spec.modules(*widths, layer_map, dict(params or {}))
    return build_projections(spec.projections, *widths) if spec.projections else None


@dataclass(eq=False)
class Intervened:
    """The outputs of an interchange-intervened second forward of student and teacher (DIITO,
    :mod:`raykd.train.interventions`): at the aligned pair's blocks, the states at ``mask`` were
    replaced by the dual example's (the batch rolled by one row) states at ``dual_mask``.

    Attributes:
        student_logits, teacher_logits: ``[B, P, V]`` logits of the intervened forwards.
        student, teacher: their features (block outputs).
        pair: the aligned ``(student block, teacher block)``.
        mask, dual_mask: ``[B, T]`` bool, the replaced positions of each row and the dual row's
            positions they were taken from (the same count per row).
    """

    student_logits: Tensor
    teacher_logits: Tensor
    student: Features
    teacher: Features
    pair: tuple[int, int]
    mask: Tensor
    dual_mask: Tensor


def to_positions(loss: Tensor, token_mask: Tensor, positions: int) -> Tensor:
    """A feature loss, per token ``[B, T]`` or per sequence ``[B]``, as the objective's ``[B, P]``.

    - per token, ``P = T`` (causal LM): unchanged, padding set to 0;
    - per token, ``P = 1`` (classifier): its mean over the row's real tokens;
    - per sequence, ``P = 1``: one value per row;
    - per sequence, ``P = T``: spread evenly over the row's real tokens (so the row's tokens sum
      to the sequence loss).

    Raises:
        ValueError: ``P`` is neither 1 nor ``T``, or the shapes disagree.
    """
    mask = token_mask.bool()
    b, t = mask.shape
    if positions not in (1, t):
        raise ValueError(f"a feature loss needs P = 1 (classifier) or P = T = {t} (causal LM) positions, got {positions}")
    if loss.dim() == 2:
        if loss.shape != mask.shape:
            raise ValueError(f"per-token feature loss {tuple(loss.shape)} != token mask {tuple(mask.shape)}")
        loss = torch.where(mask, loss, 0.0)
        if positions == t:
            return loss
        return (loss.sum(1) / mask.sum(1).clamp(min=1))[:, None]
    if loss.shape != (b,):
        raise ValueError(f"per-sequence feature loss must be [B] = [{b}], got {tuple(loss.shape)}")
    if positions == 1:
        return loss[:, None]
    return mask * (loss / mask.sum(1).clamp(min=1))[:, None]


def masked_token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``[B, T, ...]`` -> ``[B, ...]``: mean over the real tokens of each row."""
    m = mask.to(x.dtype).view(*mask.shape, *([1] * (x.dim() - 2)))
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def relation_kl(teacher_logits: Tensor, student_logits: Tensor, allowed: Tensor) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) over the last axis, restricted to ``allowed``.

    Args:
        teacher_logits, student_logits: ``[..., T]`` unnormalised scores.
        allowed: bool, broadcastable: True where an entry takes part (e.g. non-padding keys).

    Returns:
        ``[...]`` KL per row (0 for a row with no allowed entry).
    """
    neg = torch.finfo(torch.float32).min
    log_p = torch.log_softmax(teacher_logits.float().masked_fill(~allowed, neg), -1)
    log_q = torch.log_softmax(student_logits.float().masked_fill(~allowed, neg), -1)
    p = log_p.exp()
    return torch.where(allowed & (p > 0), p * (log_p - log_q), 0.0).sum(-1)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, h, T, d]`` -> ``[B, heads, T, h * d / heads]`` (the heads concatenated, then split
    again into ``heads`` relation heads, as MiniLMv2 does).

    Raises:
        ValueError: the width ``h * d`` is not divisible by ``heads``.
    """
    b, h, t, d = x.shape
    heads = int(heads)  # config values arrive as floats (train.loss_params)
    if (h * d) % heads:
        raise ValueError(f"width {h * d} is not divisible by {heads} relation heads; choose relation_heads dividing "
                         "both the student's and the teacher's query/key/value widths")
    return x.transpose(1, 2).reshape(b, t, heads, h * d // heads).transpose(1, 2)


def scaled_relation(x: Tensor) -> Tensor:
    """``[B, h, T, d]`` -> ``[B, h, T, T]``: ``x x^T / sqrt(d)`` (a self-relation's scores)."""
    x = x.float()
    return x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])


@dataclass(frozen=True)
class FeatureLayout:
    """Which teacher tensors a cache keeps (what the run's feature terms read).

    Attributes:
        hidden: teacher blocks whose outputs are kept.
        attention: teacher blocks whose queries, keys and values are kept.
        embeddings: keep the input of block 0.
    """

    hidden: tuple[int, ...] = ()
    attention: tuple[int, ...] = ()
    embeddings: bool = False

    def columns(self) -> list[str]:
        return ((["embeddings"] if self.embeddings else []) + [f"hidden.{j}" for j in self.hidden]
                + [f"{x}.{j}" for j in self.attention for x in ("query", "key", "value")])


def features_from_batch(batch: dict, layout: FeatureLayout, shapes: dict[str, Any]):
    """The teacher :class:`~raykd.losses.features.Features` of a decoded training batch (the
    columns :func:`decode_features` gives, prefixed ``f.``), blocks not kept as None."""
    n = shapes["layers"]
    get = lambda name: batch[f"f.{name}"].float()  # noqa: E731
    hidden = [get(f"hidden.{j}") if j in layout.hidden else None for j in range(n)]
    att = [[get(f"{x}.{j}") if j in layout.attention else None for j in range(n)] for x in ("query", "key", "value")] \
        if layout.attention else [[], [], []]
    return Features(get("embeddings") if layout.embeddings else None, hidden, batch["f.token_mask"].bool(), *att,
                    [None] * n if layout.attention else [], shapes["scaling"], True)
