"""DIITO, the distillation interchange intervention training objective; Wu et al. 2022, "Causal
Distillation for Language Models" (NAACL). Registered with ``kind="features"`` and
``interventions=True``: besides the plain forward's features it reads the intervened forwards
(:class:`~raykd.losses.features.Intervened`) that the shared step runs for it
(:func:`raykd.train.interventions.interchange_forwards`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from raykd.losses.features import Features, Intervened, LayerMap, masked_token_mean, projection
from raykd.losses.kd import forward_kl
from raykd.losses.registry import Param, define_loss
from raykd.losses.targets import TeacherTargets

ALIGNMENTS = ("full", "middle", "late")
"""How DIITO picks the aligned layer pair (see :func:`diito`)."""


def check_interchange_params(params: dict) -> None:
    """Check DIITO's plan before any step: ``alignment`` in :data:`ALIGNMENTS`, ``interchange_prop``
    in ``(0, 1]``, ``max_tokens`` -1 or >= 1.

    Raises:
        ValueError: a value out of range (the message names it and the valid ones).
    """
    if params["alignment"] not in ALIGNMENTS:
        raise ValueError(f"diito alignment must be one of {ALIGNMENTS}, got {params['alignment']!r}")
    if not 0 < float(params["interchange_prop"]) <= 1:
        raise ValueError(f"diito interchange_prop is the share of tokens swapped, in (0, 1]; got {params['interchange_prop']}")
    if int(params["max_tokens"]) != -1 and int(params["max_tokens"]) < 1:
        raise ValueError(f"diito max_tokens must be -1 (no cap) or >= 1, got {params['max_tokens']}")


def _last_cos(student: Features, teacher: Features, projections: dict[str, nn.Module]) -> Tensor:
    """``[B, T]``: ``1 - cos(W h_s^last, h_t^last)`` of the two models' last block outputs."""
    s = projection(projections, "hidden", student.hidden[-1]).float()
    return 1.0 - F.cosine_similarity(s, teacher.hidden[-1].float(), dim=-1)


@define_loss("diito", kind="features", projections=("hidden",), interventions=True, params={
    "cos_weight": Param(float, low=0, meaning="weight of the last-state cosine"),
    "causal_cos_weight": Param(float, low=0, meaning="weight of the intervened last-state cosine"),
    "alignment": Param(str, choices=ALIGNMENTS, meaning="how the aligned layer pair is picked"),
    "interchange_prop": Param(float, low=0, high=1, low_open=True, meaning="share of the tokens swapped"),
    "max_tokens": Param(int, low=1, choices=(-1,), meaning="most tokens swapped; -1: no cap")},
               description="KD between interchange-intervened forwards of student and teacher (DIITO, Wu et al. 2022)")
def diito(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
          intervened: Intervened, temperature: float, cos_weight: float = 1.0, causal_cos_weight: float = 0.0,
          alignment: str = "full", interchange_prop: float = 0.3, max_tokens: int = -1) -> Tensor:
    """Distillation interchange intervention training objective; Wu et al. 2022, "Causal
    Distillation for Language Models" (NAACL), as the seed (aitsc/GLMKD ``DIITO``) runs it.

    The step picks an aligned ``(student block, teacher block)`` pair (``alignment``: ``full`` a
    random pair of the layer map per step, ``middle`` its middle pair, ``late`` its last pair),
    samples per row a consecutive span of ``interchange_prop`` of the shorter row's real tokens
    (at most ``max_tokens``, -1: no cap), and runs student and teacher again with the pair's block
    outputs at the span replaced by the dual example's (the next row's) states at a span of the
    same length. The loss per position is

        ``tau^2 KL(p_t^int || q_s^int)`` (KD between the intervened outputs at temperature tau)
        ``+ cos_weight (1 - cos(h_s^last, h_t^last))`` (the plain forward's last block states)
        ``+ causal_cos_weight (1 - cos)`` of the intervened forward's last block states,

    the cosines averaged over a row's real tokens when the objective has one position per row (a
    classifier). The plain KD and CE are the objective's other terms. With the seed's weights
    (``diito_alpha_mlm = alpha_ce = alpha_causal_ce = alpha_cos = 0.25``, ``alpha_causal_cos = 0``)
    an objective ``{ce: w, forward_kl: w, diito: w}`` with ``cos_weight=1`` gives the same ratios.
    A learned projection maps the student's width onto the teacher's when they differ. Encoders
    and decoders alike (in a decoder the swap changes the positions from the span onwards).

    Unfaithful details: the seed aligns a student layer with every teacher layer of its block
    (``full``) and intervenes on the layer's input after its norm; here one teacher block of the
    layer map, at its output. ``middle`` and ``late`` take the layer map's middle and last pair
    instead of the seed's layer indices. The seed's cosine counts padding rows as zero vectors;
    here only real tokens.

    Args:
        intervened: the step's intervened forwards; temperature: tau of the KD.
        alignment, interchange_prop, max_tokens: read by the step when it plans the interchange.

    Returns:
        ``[B, T]`` per token (a causal LM: ``P = T``) or ``[B]`` per row (a classifier), non-negative.
    """
    del alignment, interchange_prop, max_tokens  # the step's plan (Objective.intervention_params)
    s_logits, t_logits = intervened.student_logits, intervened.teacher_logits
    kd = forward_kl(s_logits, targets=TeacherTargets.dense(t_logits), labels=None, temperature=temperature)  # [B, P]
    cos = cos_weight * _last_cos(student, teacher, projections) if cos_weight else 0.0
    if causal_cos_weight:
        cos = cos + causal_cos_weight * _last_cos(intervened.student, intervened.teacher, projections)
    if kd.shape[1] == 1:  # one position per row
        return kd[:, 0] + (masked_token_mean(cos, student.token_mask) if cos_weight or causal_cos_weight else 0.0)
    return kd + cos
