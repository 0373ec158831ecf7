"""Feature losses on hidden states: DistilBERT's cosine, PKD, TinyBERT, ALP-KD, RAIL-KD, Universal-KD.

Each is registered with ``kind="features"`` and follows the signature of
:mod:`raykd.losses.features`: ``fn(student, teacher, *, layer_map, projections, **hp)``, returning
a per-token ``[B, T]`` or per-sequence ``[B]`` loss (``[B]`` when only the first token is used).

Notation: ``h_s^i`` / ``h_t^j`` the ``[B, T, H]`` output of student block ``i`` / teacher block
``j``; ``(i, j)`` runs over the layer map's pairs; ``W`` a learned projection from the student's
width to the teacher's, present only when the widths differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raykd.losses.features import (
    Features,
    LayerMap,
    masked_token_mean,
    projection,
    relation_kl,
)
from raykd.losses.registry import Param, define_loss

FIRST_TOKEN_ONLY = Param(bool, meaning="match the first token ([CLS]) only; 0 on a decoder: the mean over its real tokens")
"""The ``first_token_only`` hyper-parameter the per-sequence feature losses share."""
EMBEDDINGS = Param(bool, meaning="also match the embedding layer (the input of block 0)")
"""The ``embeddings`` hyper-parameter of TinyBERT's and MobileBERT's feature-map transfer."""


def _tokens(x: Tensor, first_token_only: bool) -> Tensor:
    """``[B, T, H]`` -> itself, or the first token ``[B, H]`` ([CLS] of a BERT-style encoder)."""
    return x[:, 0] if first_token_only else x


@define_loss("distilbert_cos", kind="features", cached=True, measured_faster="cached", projections=("hidden",),
               description="1 - cos(h_s, h_t) of the last mapped hidden states (DistilBERT, Sanh et al. 2019)")
def distilbert_cos(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module]) -> Tensor:
    """DistilBERT's cosine embedding loss; Sanh et al. 2019, "DistilBERT, a distilled version of
    BERT: smaller, faster, cheaper and lighter". Used with KD and CE (``L = a L_ce + b L_kd +
    c L_cos``).

    Matches the direction of the hidden states of the layer map's *last* pair, per token:
    ``1 - cos(W h_s^i, h_t^j)``. The paper aligns the final hidden states; that is this loss when
    the map's last pair is ``(L_s - 1, L_t - 1)`` (the default map of a student built from teacher
    layers ``0, 2, 4`` of 6 ends at ``(2, 4)``, not at the teacher's last layer: give the pair
    explicitly for the paper's choice).

    Returns:
        ``[B, T]`` in ``[0, 2]``.
    """
    i, j = layer_map.last
    s = projection(projections, "hidden", student.hidden[i])
    return 1.0 - F.cosine_similarity(s.float(), teacher.hidden[j].float(), dim=-1)


@define_loss("pkd", kind="features", cached=True, measured_faster="cached", projections=("hidden",), params={"first_token_only": FIRST_TOKEN_ONLY},
               description="MSE of L2-normalised hidden states at the mapped layers (Patient KD, Sun et al. 2019)")
def pkd(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
        first_token_only: bool = True) -> Tensor:
    """Patient knowledge distillation; Sun et al. 2019, "Patient Knowledge Distillation for BERT
    Model Compression" (EMNLP).

    ``L_PT = sum_(i, j) || W h_s^i / ||W h_s^i|| - h_t^j / ||h_t^j|| ||_2^2`` over the layer map's
    pairs. The paper matches the [CLS] token (``first_token_only=True``, the default; a decoder
    has no [CLS]: give ``first_token_only=False`` for every token) at the intermediate layers
    chosen by PKD-Skip (every k-th layer, the stride) or PKD-Last (the last k); the last layer
    is left to KD. Here the layer map chooses the pairs: give the intermediate ones.

    Returns:
        ``[B]`` (first token) or ``[B, T]``, each in ``[0, 4 * pairs]``.
    """
    out = 0.0
    for i, j in layer_map.pairs:
        s = _tokens(projection(projections, "hidden", student.hidden[i]), first_token_only).float()
        t = _tokens(teacher.hidden[j], first_token_only).float()
        out = out + (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(-1)
    return out


def _check_heads(name: str, s: Tensor, t: Tensor) -> None:
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"{name} matches attention head by head: the student has {s.shape[1]} heads, the teacher "
                         f"{t.shape[1]}; use a student with as many heads (or minilmv2, which needs none)")


def state_mse(student: Features, teacher: Features, layer_map: LayerMap, projections: dict[str, nn.Module],
              embeddings: bool) -> Tensor:
    """``[B, T]``: the sum over the layer map's pairs ``(i, j)`` of ``MSE(W h_s^i, h_t^j)`` (mean
    over the width), plus ``MSE(W_e E_s, E_t)`` of the embeddings when ``embeddings``; the
    hidden-state part of TinyBERT and MobileBERT's feature-map transfer."""
    out = 0.0
    if embeddings:
        e = projection(projections, "embeddings", student.embeddings).float()
        out = out + (e - teacher.embeddings.float()).pow(2).mean(-1)
    for i, j in layer_map.pairs:
        h = projection(projections, "hidden", student.hidden[i]).float()
        out = out + (h - teacher.hidden[j].float()).pow(2).mean(-1)
    return out


def attention_kl_pair(name: str, student: Features, teacher: Features, i: int, j: int) -> Tensor:
    """``[B, T]``: per query token, the mean over heads of ``KL(A_t^j || A_s^i)`` of the attention
    distributions of student block ``i`` and teacher block ``j`` (keys a query may not see left
    out); the attention transfer of MobileBERT and SID.

    Raises:
        ValueError: the head counts differ (``name`` says which loss asked).
    """
    s, t = student.scores(i, masked=False), teacher.scores(j, masked=False)
    _check_heads(name, s, t)
    return relation_kl(t, s, teacher.key_mask(j)).mean(1)


def attention_score_mse(student: Features, teacher: Features, i: int, j: int) -> Tensor:
    """``[B, T]``: per query token, the mean over heads and allowed keys of the squared difference
    of the (unnormalised) attention scores of student block ``i`` and teacher block ``j``."""
    s, t = student.scores(i, masked=False), teacher.scores(j, masked=False)
    _check_heads("tinybert", s, t)
    allowed = teacher.key_mask(j).expand_as(t)
    sq = torch.where(allowed, (s - t).pow(2), 0.0)
    return sq.sum(-1).sum(1) / allowed.sum(-1).sum(1).clamp(min=1)


@define_loss("tinybert", kind="features", cached=True, measured_faster="cached", attention=True, projections=("embeddings", "hidden"),
               params={"embeddings": EMBEDDINGS},
               description="MSE of embeddings, hidden states and attention scores (TinyBERT, Jiao et al. 2020)")
def tinybert(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
             embeddings: bool = True) -> Tensor:
    """TinyBERT's intermediate-layer distillation; Jiao et al. 2020, "TinyBERT: Distilling BERT
    for Natural Language Understanding" (Findings of EMNLP).

    Per token, ``MSE(E_s W_e, E_t)`` (embedding layer, when ``embeddings``) plus, for every pair
    ``(i, j)`` of the layer map, ``MSE(h_s^i W_h, h_t^j)`` (mean over the width) and the mean
    over heads and keys of ``(A_s^i - A_t^j)^2``, ``A = Q K^T / sqrt(d)`` the attention scores
    before the softmax (the paper's choice, which it found to converge faster than the
    normalised distributions). Needs as many student heads as teacher heads.

    Unfaithful details: the paper's code also includes masked (padding) keys in the attention
    mean, with their scores set to 0 on both sides; here padding keys (and a decoder's future
    keys) are left out of the mean. The paper's prediction-layer loss is the ``forward_kl``
    term of the same objective; its two-stage (general, then task) schedule is not here.

    Returns:
        ``[B, T]``.
    """
    out = state_mse(student, teacher, layer_map, projections, embeddings)
    for i, j in layer_map.pairs:
        out = out + attention_score_mse(student, teacher, i, j)
    return out


@define_loss("alp_kd", kind="features", projections=("hidden",), params={"first_token_only": FIRST_TOKEN_ONLY},
               description="MSE to an attention-weighted mix of all teacher layers per student layer (ALP-KD, Passban et al. 2021)")
def alp_kd(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
           first_token_only: bool = True) -> Tensor:
    """Attention-based layer projection; Passban et al. 2021, "ALP-KD: Attention-Based Layer
    Projection for Knowledge Distillation" (AAAI).

    For each student layer ``i`` of the layer map (its teacher side is not used: every teacher
    layer takes part), ``alpha_j = softmax_j(<W h_s^i, h_t^j>)`` over all teacher blocks ``j``,
    ``c^i = sum_j alpha_j h_t^j`` and the loss ``sum_i MSE(W h_s^i, c^i)`` (mean over the width).
    The paper computes the weights and the loss on the [CLS] token (``first_token_only=True``);
    ``False`` does it per token.

    Unfaithful detail: the paper's weights use the raw dot product; so does this, so with wide
    models the softmax is close to one-hot on the most similar layer (as in the paper).

    Returns:
        ``[B]`` (first token) or ``[B, T]``, non-negative.
    """
    ts = torch.stack([_tokens(h, first_token_only).float() for h in teacher.hidden], dim=-2)  # [..., L_t, H]
    out = 0.0
    for i, _ in layer_map.pairs:
        s = _tokens(projection(projections, "hidden", student.hidden[i]), first_token_only).float()
        alpha = torch.softmax((ts @ s.unsqueeze(-1)).squeeze(-1), dim=-1)  # [..., L_t]
        mix = (alpha.unsqueeze(-1) * ts).sum(-2)
        out = out + (s - mix).pow(2).mean(-1)
    return out


def random_layer_map(student_layers: int, teacher_layers: int, epoch: int, seed: int = 0) -> LayerMap:
    """RAIL-KD's map of one epoch: ``student_layers`` teacher blocks drawn at random without
    replacement (seeded by ``(seed, epoch)``), sorted, matched to the student blocks in order.

    Raises:
        ValueError: the student has more blocks than the teacher.
    """
    if student_layers > teacher_layers:
        raise ValueError(f"a student of {student_layers} blocks cannot be mapped onto {teacher_layers} teacher blocks")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    picked = sorted(torch.randperm(teacher_layers, generator=g)[:student_layers].tolist())
    return LayerMap(tuple(enumerate(picked)), student_layers, teacher_layers)


@define_loss("rail_kd", kind="features", cached=True, projections=("hidden",), params={"first_token_only": FIRST_TOKEN_ONLY},
               description="normalised [CLS] MSE on a layer map re-drawn at random every epoch (RAIL-KD, Haidar et al. 2022)")
def rail_kd(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
            first_token_only: bool = True) -> Tensor:
    """Random intermediate layer mapping; Haidar et al. 2022, "RAIL-KD: RAndom Intermediate Layer
    Mapping for Knowledge Distillation" (Findings of NAACL).

    The loss of one step is PKD's on the layer map (``sum_(i, j) ||W h_s^i / ||.|| - h_t^j /
    ||.|| ||^2`` on [CLS]); what makes it RAIL-KD is the map, re-drawn every epoch by
    :func:`random_layer_map` (the training loop rebuilds the objective with it, e.g. through
    ``run_steps``' ``objective_at``; a fixed map is plain PKD).

    Unfaithful details: the paper's layer-wise variant projects both sides with separate linear
    maps to a common width before normalising; here only a width mismatch gets a projection
    (student -> teacher). The paper draws from the teacher's intermediate layers only; pass
    ``teacher_layers`` accordingly.

    Returns:
        ``[B]`` (first token) or ``[B, T]``, each in ``[0, 4 * pairs]``.
    """
    return pkd(student, teacher, layer_map=layer_map, projections=projections, first_token_only=first_token_only)


def _universal_kd_maps(student_width: int, teacher_width: int, layer_map: LayerMap, params: dict) -> nn.ModuleDict:
    """Universal-KD's learned maps into the common space of ``size`` (default: the student's width):
    ``s<k>`` for the layer map's k-th student block, ``t<j>`` for every teacher block ``j``."""
    size = int(params.get("size") or student_width)
    maps = {f"s{k}": nn.Linear(student_width, size, bias=False) for k in range(len(layer_map.pairs))}
    maps.update({f"t{j}": nn.Linear(teacher_width, size, bias=False) for j in range(layer_map.teacher_layers)})
    return nn.ModuleDict(maps)


def pooled(f: Features, layer: int, first_token_only: bool) -> Tensor:
    """``[B, H]``: block ``layer``'s first token ([CLS]) or its mean over the real tokens."""
    if first_token_only:
        return f.hidden[layer][:, 0].float()
    return masked_token_mean(f.hidden[layer].float(), f.token_mask)


@define_loss("universal_kd", kind="features", modules=_universal_kd_maps,
               params={"first_token_only": FIRST_TOKEN_ONLY,
                       "size": Param(int, low=0, meaning="width of the common space the maps project into; 0: the student's width")},
               description="KL of per-layer maps to an attention mix of all teacher layers (Universal-KD, Wu et al. 2021)")
def universal_kd(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
                 first_token_only: bool = True, size: int = 0) -> Tensor:
    """Attention-based output-grounded intermediate-layer distillation; Wu et al. 2021,
    "Universal-KD: Attention-based Output-Grounded Intermediate Layer Knowledge Distillation"
    (EMNLP).

    Each mapped student block ``i`` (the layer map's student side, k-th pair) and every teacher
    block ``j`` is pooled (``first_token_only``: the first token, [CLS]; else the mean over real
    tokens, the seed's ``universal_kd_avg``) and mapped by its own learned linear map into a common space of ``size`` (0: the
    student's width): ``s_k = W_s^k h_s^i``, ``t_j = W_t^j h_t^j``. The student layer attends
    over all teacher layers, ``alpha_kj = softmax_j(<s_k, t_j>)``, ``c_k = sum_j alpha_kj t_j``,
    and the loss is ``sum_k KL(softmax(c_k) || softmax(s_k))``, softmax over the common space's
    dimensions. The maps are the term's modules (:meth:`raykd.losses.Objective.parameters`):
    they train with the student and are dropped at export. Encoder or decoder (a decoder has no
    [CLS]: use ``first_token_only=False``).

    Unfaithful details: the paper grounds the intermediate layers in the *output* space (each
    layer's representation mapped to the prediction space before the attention and the KL); the
    seed (aitsc/GLMKD ``Universal_KD``) maps them with bias-free linear maps into a space of the
    hidden width and applies the softmax over that width; this follows the seed (give ``size``
    = the number of classes for a space of the output's size; the maps stay learned, not the
    model's head). Gradients flow into both sides' maps and the attention weights, as in the
    seed. The seed matches the inputs of blocks 1.. (the outputs of all but the last block) or,
    with ``universal_kd_cg``, the final output only; here the layer map's student blocks against
    every teacher block. The seed's token mean counts padding; here only real tokens.

    Returns:
        ``[B]`` per sequence, non-negative.
    """
    del size  # sizes the maps (their factory reads it)
    ts = torch.stack([projections[f"t{j}"](pooled(teacher, j, first_token_only)) for j in range(teacher.num_layers)], dim=1)
    out = 0.0
    for k, (i, _) in enumerate(layer_map.pairs):
        s = projections[f"s{k}"](pooled(student, i, first_token_only))  # [B, size]
        alpha = torch.softmax((ts @ s.unsqueeze(-1)).squeeze(-1), dim=-1)  # [B, L_t]
        mix = (alpha.unsqueeze(-1) * ts).sum(1)
        out = out + F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(mix, -1), log_target=True,
                             reduction="none").sum(-1)
    return out
