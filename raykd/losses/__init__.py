"""Distillation losses: one registry of per-token losses, and the weighted objective.

Pure torch, importable without Ray. The losses of every loss module below are registered here,
in one place: the logit losses of :mod:`raykd.losses.kd` and :mod:`raykd.losses.muki`, the
feature losses (they read intermediate layers) of the others. The objective's logit terms can
also run on chunks of positions with the LM head inside the chunk (:mod:`raykd.losses.chunked`).
"""

from raykd.losses import contrastive, hidden, interchange, kd, layerwise, muki, relations, stacked
from raykd.losses.chunked import chunked_head_loss
from raykd.losses.objective import Objective, ObjectiveOutput, validate_params, validate_weights
from raykd.losses.registry import LOSSES, LossSpec, available_losses, define_loss, feature_terms, get_loss, register_losses
from raykd.losses.targets import TeacherTargets

for _module in (kd, muki, contrastive, hidden, interchange, layerwise, relations, stacked):
    register_losses(_module)

__all__ = [
    "LOSSES",
    "LossSpec",
    "Objective",
    "ObjectiveOutput",
    "TeacherTargets",
    "available_losses",
    "chunked_head_loss",
    "define_loss",
    "feature_terms",
    "get_loss",
    "validate_params",
    "validate_weights",
]
