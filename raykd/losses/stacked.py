"""Stacked internal distillation (SID); Aguilar et al. 2020, "Knowledge Distillation from Internal
Representations" (AAAI).

The student learns the teacher's internals one layer at a time, bottom up: at stage ``l`` the
first ``l`` pairs of the layer map are matched (KL of the self-attention distributions, plus
``1 - cos`` of the [CLS] states), the earlier pairs staying in the loss ("stacked"); the next
layer is unlocked when the cosine part falls below a threshold or after a share of the steps;
the logit terms (soft labels) come in only once every layer is unlocked. The terms here are the
per-step losses (registered with ``kind="features"``, signature of :mod:`raykd.losses.features`);
the stage is kept and advanced by :class:`raykd.train.schedule.StackedSchedule`, which sets their
``unlocked`` hyper-parameter every step.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from raykd.losses.features import Features, LayerMap, masked_token_mean
from raykd.losses.hidden import FIRST_TOKEN_ONLY, attention_kl_pair, pooled
from raykd.losses.registry import Param, define_loss

_SID_PARAMS = {"unlocked": Param(int, low=0, meaning="the first this many layer-map pairs are matched; 0: every pair"),
               "first_token_only": FIRST_TOKEN_ONLY,
               "threshold": Param(float, low=0, meaning="the [CLS] cosine loss below which a stage ends early; 0: never")}


def unlocked_pairs(layer_map: LayerMap, unlocked: int) -> tuple[tuple[int, int], ...]:
    """The first ``unlocked`` pairs of the map (``0``, or more than the map has: every pair)."""
    n = int(unlocked)
    return layer_map.pairs if n <= 0 or n >= len(layer_map.pairs) else layer_map.pairs[:n]


def _check_widths(student: Features, teacher: Features) -> None:
    if None not in (student.width, teacher.width) and student.width != teacher.width:
        raise ValueError(f"sid compares hidden states without a projection (as the paper and the seed do): the student's "
                         f"width {student.width} must equal the teacher's {teacher.width}")


@define_loss("sid_cos", kind="features", params=_SID_PARAMS,
               description="SID's [CLS] cosine of the unlocked pairs alone: its stage threshold (Aguilar et al. 2020)")
def sid_cos(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
            unlocked: int = 0, first_token_only: bool = True, threshold: float = 0.0) -> Tensor:
    """The hidden-state part of :func:`sid`: ``sum_(i, j) 1 - cos(h_s^i, h_t^j)`` on the [CLS] token
    (``first_token_only=False``: the mean over real tokens, for a decoder) over the first ``unlocked``
    pairs. :class:`~raykd.train.schedule.StackedSchedule` logs it at weight 0 and compares it to
    its threshold.

    ``threshold`` is the schedule's (see :func:`sid`); the loss does not read it.

    Returns:
        ``[B]``, each in ``[0, 2 * pairs]``.

    Raises:
        ValueError: student and teacher widths differ.
    """
    del threshold
    _check_widths(student, teacher)
    out = 0.0
    for i, j in unlocked_pairs(layer_map, unlocked):
        out = out + 1.0 - F.cosine_similarity(pooled(student, i, first_token_only), pooled(teacher, j, first_token_only), dim=-1)
    return out


@define_loss("sid", kind="features", attention=True, params=_SID_PARAMS,
               description="stacked internal distillation: attention KL + [CLS] cosine, layers unlocked in stages (SID, Aguilar et al. 2020)")
def sid(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
        unlocked: int = 0, first_token_only: bool = True, threshold: float = 0.0) -> Tensor:
    """Stacked internal distillation's loss at one stage; Aguilar et al. 2020, "Knowledge
    Distillation from Internal Representations" (AAAI), as the seed (aitsc/GLMKD ``SID``) runs it.

    Over the first ``unlocked`` pairs ``(i, j)`` of the layer map (0: every pair):
    ``KL(A_t^j || A_s^i)`` of the self-attention distributions (per query token, mean over heads,
    padding keys and a decoder's future keys left out; then the mean over the row's real query
    tokens) plus :func:`sid_cos` (``1 - cos`` of the [CLS] states). Needs as many student heads as
    teacher heads and equal widths (no projection, as in the paper and the seed).

    The stages (:class:`raykd.train.schedule.StackedSchedule`): stage ``l = 1..L`` matches the
    first ``l`` pairs with the logit terms off; stage ``L + 1`` drops this term and turns the
    logit terms on (the seed's ``pre_loss`` returns 0 until then, and its hooks are empty after).
    A stage ends when the cosine part falls below ``threshold`` (read by the schedule, not by the
    loss; the seed's ``sid_accumulate_t``, 0 by default, so never) or at step ``l * total / (L + 1)`` (``sid_lim_e=avg``).

    Unfaithful details: the paper measures the stage's loss per epoch on the training data and
    caps each stage by epochs; this (as the seed) checks every step's loss and caps by steps.
    The seed's last stage matches the final output (after the last norm) in place of the last
    block's state; here every pair is a block output.

    Returns:
        ``[B]`` per sequence, non-negative.

    Raises:
        ValueError: different head counts or widths.
    """
    del threshold
    out = sid_cos(student, teacher, layer_map=layer_map, projections=projections, unlocked=unlocked,
                  first_token_only=first_token_only)
    for i, j in unlocked_pairs(layer_map, unlocked):
        kl = attention_kl_pair("sid", student, teacher, i, j)  # [B, T] per query token
        out = out + masked_token_mean(kl, teacher.token_mask)
    return out
