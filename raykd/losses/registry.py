"""The one registry of distillation losses, looked up by name from the config.

A loss is a pure function with the signature::

    fn(student_logits [B, T, V], *, targets: TeacherTargets | None, labels [B, T],
       temperature: float, **hyper_params) -> per-token loss [B, T]

It returns the loss unreduced; masking and reduction happen once, in
:mod:`raykd.losses.reduction`. Losses are registered when :mod:`raykd.losses` imports the
modules that define them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

LossFn = Callable[..., Tensor]
FORMS = ("sparse", "dense")


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
    """

    name: str
    fn: LossFn
    forms: tuple[str, ...]
    needs_teacher: bool
    description: str


class UnknownLossError(KeyError):
    """A loss name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    forms: tuple[str, ...] = FORMS,
    needs_teacher: bool = True,
    description: str,
) -> Callable[[LossFn], LossFn]:
    """Decorator that registers a loss function under ``name``.

    Args:
        name: registry name.
        forms: teacher target forms the loss accepts, a subset of ``("sparse", "dense")``.
        needs_teacher: False for losses on hard labels only; they must have ``forms=()``.
        description: one line for listings.

    Returns:
        The decorator; it returns the function unchanged.

    Raises:
        ValueError: ``name`` is already registered, or ``forms`` is invalid or does not
            agree with ``needs_teacher``.
    """
    forms = tuple(forms)
    if name in _REGISTRY:
        raise ValueError(f"loss {name!r} is already registered")
    if any(f not in FORMS for f in forms):
        raise ValueError(f"loss {name!r}: forms {forms} must be a subset of {FORMS}")
    if needs_teacher == (not forms):
        raise ValueError(f"loss {name!r}: a loss needs a teacher exactly when it accepts target forms")

    def decorate(fn: LossFn) -> LossFn:
        _REGISTRY[name] = LossSpec(name, fn, forms, needs_teacher, description)
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
