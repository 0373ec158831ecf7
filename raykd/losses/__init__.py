"""Distillation losses: one registry of per-token losses, and the weighted objective.

Pure torch, importable without Ray. Importing this package registers the losses of
:mod:`raykd.losses.kd` (and the other loss modules; the feature losses of
:mod:`raykd.losses.hidden` and :mod:`raykd.losses.relations` read intermediate layers).
"""

from raykd.losses import kd  # noqa: F401  (registers the losses)
from raykd.losses import muki  # noqa: F401  (registers muki_kd, uhc_kl)
from raykd.losses import contrastive, hidden, interchange, layerwise, relations, stacked  # noqa: F401  (registers the feature losses)
from raykd.losses.objective import Objective, ObjectiveOutput, validate_params, validate_weights
from raykd.losses.registry import LossSpec, available_losses, get_loss, register_loss
from raykd.losses.targets import TeacherTargets

__all__ = [
    "LossSpec",
    "Objective",
    "ObjectiveOutput",
    "TeacherTargets",
    "available_losses",
    "get_loss",
    "register_loss",
    "validate_params",
    "validate_weights",
]
