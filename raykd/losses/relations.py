"""Feature losses on relations: self-attention relations (MiniLM, MiniLMv2) and relations among
token, span, sample and layer representations (CKD, MGSKD).

Registered with ``kind="features"``, signature as in :mod:`raykd.losses.features`. A self-attention
relation is a ``[B, heads, T, T]`` distribution over the keys
of each query token; padding keys (and a decoder's future keys) are left out of it, following the
attention mask of the block it comes from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raykd.losses.features import Features, LayerMap, masked_token_mean, relation_kl, scaled_relation, split_heads
from raykd.losses.hidden import _check_heads
from raykd.losses.registry import Param, define_loss


@define_loss("minilm", kind="features", cached=True, attention=True,
               params={"value_relation": Param(bool, meaning="add the value-value relation to the attention KL")},
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


@define_loss("minilmv2", kind="features", cached=True, measured_faster="cached", attention=True,
               params={"relation_heads": Param(int, low=1, meaning="heads the concatenated queries, keys and values are split "
                                                                  "into; it must also divide both models' widths"),
                       "teacher_layer": Param(int, low=0, optional=True,
                                              meaning="teacher block matched; None: the layer map's last pair")},
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
    j = layer_map.last[1] if teacher_layer is None else int(teacher_layer)
    if not 0 <= j < teacher.num_layers:
        raise ValueError(f"minilmv2 teacher_layer={j} out of range 0..{teacher.num_layers - 1}")
    allowed = teacher.key_mask(j)
    out = 0.0
    for s, t in ((student.queries[i], teacher.queries[j]), (student.keys[i], teacher.keys[j]),
                 (student.values[i], teacher.values[j])):
        rs, rt = scaled_relation(split_heads(s, relation_heads)), scaled_relation(split_heads(t, relation_heads))
        out = out + relation_kl(rt, rs, allowed).mean(1)
    return out


def _cosine_matrix(x: Tensor) -> Tensor:
    """``[..., N, H]`` -> ``[..., N, N]`` pairwise cosine similarities."""
    x = F.normalize(x.float(), dim=-1)
    return x @ x.transpose(-1, -2)


def _huber(a: Tensor, b: Tensor) -> Tensor:
    return F.smooth_l1_loss(a, b, reduction="none", beta=1.0)


def _pair_mask(token_mask: Tensor) -> Tensor:
    return token_mask[:, :, None] & token_mask[:, None, :]


@define_loss("ckd", kind="features",
               params={"word_weight": Param(float, low=0, meaning="weight of the word-relation term"),
                       "layer_weight": Param(float, low=0, meaning="weight of the layer-transforming term")},
               description="Huber loss on word relations and layer-transforming relations (CKD, Park et al. 2021)")
def ckd(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
        word_weight: float = 1.0, layer_weight: float = 1.0) -> Tensor:
    """Contextual knowledge distillation; Park et al. 2021, "Distilling Linguistic Context for
    Language Model Compression" (EMNLP).

    Per token ``i``, with ``psi`` the cosine similarity and ``l`` the Huber loss (delta 1):

    - word relation: for every pair ``(a, b)`` of the layer map, the mean over the real tokens
      ``k`` of ``l(psi(h_s^a_i, h_s^a_k), psi(h_t^b_i, h_t^b_k))``;
    - layer-transforming relation: the mean over pairs of mapped layers ``m < n`` of
      ``l(psi(h_s^m_i, h_s^n_i), psi(h_t^m'_i, h_t^n'_i))`` (the same token across layers).

    Relations are width-free: no projection. Unfaithful details: the paper adds triple-wise
    (angle) relations within a local window to both terms; only the pair-wise relations are here.

    Returns:
        ``[B, T]``, non-negative.
    """
    pairs = _pair_mask(teacher.token_mask)
    count = pairs.sum(-1).clamp(min=1)
    out = 0.0
    for i, j in layer_map.pairs:
        wr = _huber(_cosine_matrix(student.hidden[i]), _cosine_matrix(teacher.hidden[j]))
        out = out + word_weight * torch.where(pairs, wr, 0.0).sum(-1) / count
    if len(layer_map.pairs) > 1:
        s = _cosine_matrix(torch.stack([student.hidden[i] for i, _ in layer_map.pairs], dim=-2))  # [B, T, L, L]
        t = _cosine_matrix(torch.stack([teacher.hidden[j] for _, j in layer_map.pairs], dim=-2))
        upper = torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool, device=s.device).triu(1)
        out = out + layer_weight * _huber(s, t)[..., upper].mean(-1)
    return out


def _spans(h: Tensor, mask: Tensor, span: int) -> tuple[Tensor, Tensor]:
    """Mean of the real tokens of each window of ``span`` tokens: ``[B, T/span, H]`` and its mask."""
    b, t, d = h.shape
    pad = (-t) % span
    h = F.pad(h.float() * mask[..., None], (0, 0, 0, pad)).view(b, -1, span, d)
    m = F.pad(mask.float(), (0, pad)).view(b, -1, span)
    return h.sum(2) / m.sum(2, keepdim=True).clamp(min=1), m.sum(2) > 0


@define_loss("mgskd", kind="features",
               params={"span": Param(int, low=1, meaning="tokens per span window")},
               description="Huber loss on token, span and sample relations (MGSKD, Liu et al. 2022)")
def mgskd(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
          span: int = 4) -> Tensor:
    """Multi-granularity structural distillation; Liu et al. 2022, "Multi-Granularity Structural
    Knowledge Distillation for Language Model Compression" (ACL).

    For every pair ``(a, b)`` of the layer map, the Huber loss between the student's and the
    teacher's pair-wise cosine relations among (1) the tokens of a sequence, (2) its spans (the
    mean of each window of ``span`` tokens), and (3) the sequences of the batch (the mean of their
    tokens); each a mean over the valid pairs, summed.

    Unfaithful details: the paper's spans are phrases (whole words and n-grams found from the
    text), not fixed windows; it adds triple-wise (angle) relations; and it distils the
    granularities at different depths (tokens low, spans middle, samples high) where this sums
    all three at every mapped pair. Relations are width-free: no projection.

    Returns:
        ``[B]`` per sequence (the sample relation of row ``r`` is its row of the batch matrix).
    """
    mask = teacher.token_mask.bool()
    out = 0.0
    for i, j in layer_map.pairs:
        hs, ht = student.hidden[i].float(), teacher.hidden[j].float()
        tok = _pair_mask(mask)
        out = out + torch.where(tok, _huber(_cosine_matrix(hs), _cosine_matrix(ht)), 0.0).sum((1, 2)) / tok.sum((1, 2)).clamp(min=1)
        (ss, sm), (ts, _) = _spans(hs, mask, span), _spans(ht, mask, span)
        spn = _pair_mask(sm)
        out = out + torch.where(spn, _huber(_cosine_matrix(ss), _cosine_matrix(ts)), 0.0).sum((1, 2)) / spn.sum((1, 2)).clamp(min=1)
        ps, pt = masked_token_mean(hs, mask), masked_token_mean(ht, mask)
        out = out + _huber(_cosine_matrix(ps), _cosine_matrix(pt)).mean(-1)
    return out
