"""Feature losses on self-attention relations: MiniLM and MiniLMv2.

Registered with ``kind="features"``, signature as in :mod:`raykd.losses.features`; every loss here
is per query token, ``[B, T]``. A relation is a ``[B, heads, T, T]`` distribution over the keys
of each query token; padding keys (and a decoder's future keys) are left out of it, following the
attention mask of the block it comes from.
"""

from __future__ import annotations

from torch import Tensor, nn

from raykd.losses.features import Features, LayerMap, relation_kl, scaled_relation, split_heads
from raykd.losses.hidden import _check_heads
from raykd.losses.registry import register_loss


@register_loss("minilm", kind="features", attention=True,
               description="KL of last-layer attention distributions + value relations (MiniLM, Wang et al. 2020)")
def minilm(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
           value_relation: bool = True) -> Tensor:
    """Deep self-attention distillation; Wang et al. 2020, "MiniLM: Deep Self-Attention
    Distillation for Task-Agnostic Compression of Pre-Trained Transformers" (NeurIPS).

    On the layer map's *last* pair ``(i, j)`` (the paper: the student's last layer and the
    teacher's last layer; give that pair for the paper's choice), per query token, the mean over
    heads of::

        KL(A_t^j || A_s^i)      A = softmax(Q K^T / sqrt(d))      (attention transfer)
      + KL(VR_t^j || VR_s^i)    VR = softmax(V V^T / sqrt(d_v))   (value relation, if value_relation)

    No projection is needed: relations are ``T x T`` whatever the width. Needs as many student
    heads as teacher heads (and key-value heads, for the value relation); MiniLMv2 does not.
    The paper is on encoders; on a decoder the relations follow its causal mask.

    Returns:
        ``[B, T]``, non-negative.
    """
    i, j = layer_map.last
    s, t = student.scores(i), teacher.scores(j)
    _check_heads("minilm", s, t)
    allowed = teacher.key_mask(j)
    out = relation_kl(t, s, allowed).mean(1)
    if value_relation:
        vs, vt = student.values[i], teacher.values[j]
        _check_heads("minilm's value relation", vs, vt)
        out = out + relation_kl(scaled_relation(vt), scaled_relation(vs), allowed).mean(1)
    return out


@register_loss("minilmv2", kind="features", attention=True,
               description="KL of Q-Q, K-K, V-V self-relations over relation heads (MiniLMv2, Wang et al. 2021)")
def minilmv2(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
             relation_heads: int = 12, teacher_layer: int | None = None) -> Tensor:
    """Multi-head self-attention relation distillation; Wang et al. 2021, "MiniLMv2: Multi-Head
    Self-Attention Relation Distillation for Compressing Pretrained Transformers" (Findings of ACL).

    The queries (and keys, and values) of all heads are concatenated and split again into
    ``relation_heads`` heads of width ``d_r``; the relation ``R = softmax(X X^T / sqrt(d_r))``.
    Per query token, the sum over ``X in {Q, K, V}`` of the mean over relation heads of
    ``KL(R_t || R_s)``, between the student's *last* layer and teacher layer ``teacher_layer``
    (default: the teacher side of the layer map's last pair; the paper takes an upper-middle
    teacher layer for large teachers, the last for base-size ones). The head counts and widths
    of student and teacher may differ; ``relation_heads`` must divide both widths.

    Unfaithful detail: on a grouped-query decoder (e.g. Llama) the keys and values have fewer
    heads than the queries; their concatenation is narrower and is split the same way.

    Returns:
        ``[B, T]``, non-negative.

    Raises:
        ValueError: ``relation_heads`` does not divide a width, or ``teacher_layer`` is out of range.
    """
    i = student.num_layers - 1
    j = layer_map.last[1] if teacher_layer is None else teacher_layer
    if not 0 <= j < teacher.num_layers:
        raise ValueError(f"minilmv2 teacher_layer={j} out of range 0..{teacher.num_layers - 1}")
    allowed = teacher.key_mask(j)
    out = 0.0
    for s, t in ((student.queries[i], teacher.queries[j]), (student.keys[i], teacher.keys[j]),
                 (student.values[i], teacher.values[j])):
        rs, rt = scaled_relation(split_heads(s, relation_heads)), scaled_relation(split_heads(t, relation_heads))
        out = out + relation_kl(rt, rs, allowed).mean(1)
    return out
