"""The one registry of distillation losses, looked up by name from the config.

A loss is a pure function with the signature::

    fn(student_logits [B, T, V], *, targets: TeacherTargets | None, labels [B, T],
       temperature: float, **hyper_params) -> per-token loss [B, T]

It returns the loss unreduced; masking and reduction happen once, in
:mod:`raykd.losses.reduction`. Losses are registered when :mod:`raykd.losses` imports the
modules that define them.

Feature (intermediate-layer) losses live in the same registry with ``kind="features"``: they
read the student's and the teacher's :class:`~raykd.losses.features.Features` instead of logits
(signature in :mod:`raykd.losses.features`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

LossFn = Callable[..., Tensor]
FORMS = ("sparse", "dense")
KINDS = ("logits", "features")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss.

    Attributes:
        name: registry name used in configs (``forward_kl``, ``ce``...).
        fn: the per-token loss function, see the module docstring.
        forms: teacher target forms it accepts (``"sparse"``, ``"dense"``); empty when the
            loss needs no teacher.
        needs_teacher: whether ``targets`` must be given.
        description: one line shown by ``raykd methods``.
        kind: ``"logits"`` (reads student logits and teacher targets) or ``"features"`` (reads
            student and teacher :class:`~raykd.losses.features.Features`).
        attention: a feature loss that needs the attention's queries, keys and values (the
            forward then runs eager attention and records them).
        projections: names of the learned projections (student width -> teacher width) a
            feature loss uses when the widths differ.
        modules: for a feature loss whose learned maps are not plain width projections,
            ``(student_width, teacher_width, layer_map, params) -> nn.ModuleDict`` building them
            (always, whatever the widths; Universal-KD's per-layer maps); they live with the
            projections (:meth:`raykd.losses.Objective.parameters`) and are dropped at export.
        interventions: a feature loss that reads the outputs of an interchange-intervened
            second forward of student and teacher (:class:`~raykd.losses.features.Intervened`,
            made by the shared step; DIITO); it needs the teacher online.
    """

    name: str
    fn: LossFn
    forms: tuple[str, ...]
    needs_teacher: bool
    description: str
    kind: str = "logits"
    attention: bool = False
    projections: tuple[str, ...] = ()
    modules: Callable[..., Any] | None = None
    interventions: bool = False


class UnknownLossError(KeyError):
    """A loss name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    forms: tuple[str, ...] | None = None,
    needs_teacher: bool = True,
    description: str,
    kind: str = "logits",
    attention: bool = False,
    projections: tuple[str, ...] = (),
    modules: Callable[..., Any] | None = None,
    interventions: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator that registers a loss function under ``name``.

    Args:
        name: registry name.
        forms: teacher target forms the loss accepts, a subset of ``("sparse", "dense")``
            (default: both for a logit loss, none for a feature loss).
        needs_teacher: False for losses on hard labels only; they must have ``forms=()``.
        description: one line for listings.
        kind, attention, projections, modules, interventions: see :class:`LossSpec`; a feature loss has ``forms=()``
            and ``needs_teacher=True`` (it needs the teacher's features, not its targets).

    Returns:
        The decorator; it returns the function unchanged.

    Raises:
        ValueError: ``name`` is already registered, or ``forms`` is invalid or does not
            agree with ``needs_teacher``.
    """
    forms = tuple(forms) if forms is not None else (FORMS if kind == "logits" else ())
    if name in _REGISTRY:
        raise ValueError(f"loss {name!r} is already registered")
    if kind not in KINDS:
        raise ValueError(f"loss {name!r}: kind {kind!r} must be one of {KINDS}")
    if any(f not in FORMS for f in forms):
        raise ValueError(f"loss {name!r}: forms {forms} must be a subset of {FORMS}")
    if kind == "features" and (forms or not needs_teacher):
        raise ValueError(f"feature loss {name!r} reads teacher features: give forms=() and needs_teacher=True")
    if kind == "logits" and (needs_teacher == (not forms) or attention or projections or modules or interventions):
        raise ValueError(f"loss {name!r}: a logit loss needs a teacher exactly when it accepts target forms, "
                         "and has no attention, projections, modules or interventions")

    def decorate(fn: LossFn) -> LossFn:
        _REGISTRY[name] = LossSpec(name, fn, forms, needs_teacher, description, kind, attention, tuple(projections),
                                   modules, interventions)
        return fn

    return decorate


def get_loss(name: str) -> LossSpec:
    """The registered loss called ``name``.

    Raises:
        KeyError: (an :class:`UnknownLossError`) ``name`` is not registered; the message
            lists the valid names, sorted.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY))
        raise UnknownLossError(f"unknown loss {name!r}; valid losses: {valid}") from None


def available_losses() -> dict[str, LossSpec]:
    """All registered losses by name, sorted (a copy)."""
    return dict(sorted(_REGISTRY.items()))
