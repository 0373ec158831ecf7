"""Contrastive feature loss: LRC-BERT (registered with ``kind="features"``, signature as in
:mod:`raykd.losses.features`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raykd.losses.features import Features, LayerMap, masked_token_mean, projection
from raykd.losses.registry import Param, define_loss


@define_loss("lrc_bert", kind="features", cached=True, projections=("hidden",),
               params={"tau": Param(float, low=0, low_open=True, meaning="temperature of the contrastive softmax")},
               description="contrastive loss of pooled intermediate states, in-batch negatives (LRC-BERT, Fu et al. 2021)")
def lrc_bert(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
             tau: float = 0.1) -> Tensor:
    """Latent-representation contrastive distillation; Fu et al. 2021, "LRC-BERT: Latent-
    representation Contrastive Knowledge Distillation for Natural Language Understanding" (AAAI).

    For every pair ``(a, b)`` of the layer map, ``z_s^r`` the mean over the real tokens of row
    ``r``'s ``W h_s^a`` and ``z_t^r`` of its ``h_t^b``; the teacher's own row is the positive and
    the batch's other rows the negatives::

        L_r = sum_(a, b) -log( exp(cos(z_s^r, z_t^r) / tau) / sum_q exp(cos(z_s^r, z_t^q) / tau) )

    A loss of 0 needs no negatives (batch of 1) or perfectly separated rows; it is not 0 when
    student equals teacher (rows of one batch are never orthogonal), but then it is the lowest
    it can be for those teacher rows.

    Unfaithful details: the paper's COS-NCE measures the distance as ``1 - cos`` and contrasts
    negatives against it in a margin form; here it is InfoNCE over cosine similarities with
    temperature ``tau``. The paper's gradient-perturbation training and its two-stage schedule
    are not here. Pooling by the token mean is our choice (the paper uses the layer outputs).

    Returns:
        ``[B]`` per sequence, non-negative.
    """
    if not tau > 0:
        raise ValueError(f"lrc_bert tau must be > 0, got {tau}")
    mask = teacher.token_mask.bool()
    out = 0.0
    for i, j in layer_map.pairs:
        zs = F.normalize(masked_token_mean(projection(projections, "hidden", student.hidden[i]).float(), mask), dim=-1)
        zt = F.normalize(masked_token_mean(teacher.hidden[j].float(), mask), dim=-1)
        logits = zs @ zt.T / tau  # [B, B], the positive on the diagonal
        out = out + F.cross_entropy(logits, torch.arange(len(zs), device=zs.device), reduction="none")
    return out
