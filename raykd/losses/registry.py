"""The one registry of distillation losses, looked up by name from the config.

A loss is a pure function with the signature::

    fn(student_logits [B, T, V], *, targets: TeacherTargets | None, labels [B, T],
       temperature: float, **hyper_params) -> per-token loss [B, T]

It returns the loss unreduced, and each position's value depends on that position's logits,
targets and label alone (no loss reads across positions): so the objective may compute a logit
loss on any subset of positions, and :mod:`raykd.losses.chunked` computes it chunk by chunk.
Masking and reduction happen once, in :mod:`raykd.losses.reduction`. :func:`define_loss`
declares a loss (its :class:`LossSpec`, checked against the function); :mod:`raykd.losses` adds
every declared loss of its loss modules to :data:`LOSSES`, in one place.

Temperature: a loss reads its distributions at ``temperature`` tau, and the registry multiplies
every loss that declares ``tau_squared`` (the default for a logit loss with a teacher) by tau**2
(:func:`times_tau_squared`), so its gradients keep their size as tau changes (Hinton et al.
2015); no loss applies the factor itself.

Every hyper-parameter (a keyword-only argument besides the common ones) is declared on the entry
as a :class:`Param`, with its type and range: ``train.loss_params`` is checked against them when
the config loads (:func:`raykd.losses.objective.validate_params`), before any work, and a loss
whose declared parameters differ from its signature is refused at registration.

Feature (intermediate-layer) losses live in the same registry with ``kind="features"``: they
read the student's and the teacher's :class:`~raykd.losses.features.Features` instead of logits
(signature in :mod:`raykd.losses.features`).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from raykd.registry import Registry, UnknownNameError

LossFn = Callable[..., Tensor]
FORMS = ("sparse", "dense")
KINDS = ("logits", "features")
COMMON_ARGS = frozenset({"targets", "labels", "temperature", "layer_map", "projections", "intervened"})
"""Keyword arguments every loss of a kind receives from the objective (not hyper-parameters)."""
PARAM_TYPES = (float, int, bool, str, list)


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a registered loss (``train.loss_params.<loss>.<name>``).

    Attributes:
        type: ``float``; ``int`` (a whole number); ``bool`` (true/false or 1/0); ``str`` (one of
            ``choices``; Python callers only, a config value is a number); ``list`` (Python callers
            only, e.g. UHC's class blocks, which the recipe fills in).
        low, high: bounds (None: unbounded); inclusive unless ``low_open`` / ``high_open``.
        choices: the valid values of a ``str``; for a number, values valid outside the bounds
            too (DIITO's ``max_tokens=-1``, no cap).
        optional: None is valid (the loss then picks the value, e.g. from the layer map).
        meaning: what the value means, shown with a value out of range.
    """

    type: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False
    meaning: str = ""

    def describe(self) -> str:
        """The valid values in words, e.g. ``a number in [0, 1]`` or ``a whole number >= 1``."""
        if self.type is str:
            return f"one of {list(self.choices)}"
        if self.type is bool:
            return "true or false (1 or 0)"
        if self.type is list:
            return "a list"
        what = {float: "a number", int: "a whole number"}[self.type]
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            what += f" in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
        elif lo is not None:
            what += f" {'>' if self.low_open else '>='} {lo:g}"
        elif hi is not None:
            what += f" {'<' if self.high_open else '<='} {hi:g}"
        extra = [*(repr(c) for c in self.choices), *(["None"] if self.optional else [])]
        return what + (f", or {' or '.join(extra)}" if extra else "")

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` has this parameter's type and lies in its range."""
        if value is None:
            return self.optional
        if self.type is str:
            return value in self.choices
        if self.type is list:
            return isinstance(value, (list, tuple))
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if self.type is bool:
            return isinstance(value, bool) or is_number and value in (0, 1)
        if not is_number or self.type is int and not float(value).is_integer():
            return False
        if value in self.choices:
            return True
        lo_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        hi_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return lo_ok and hi_ok


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
        params: its hyper-parameters by name, with types and ranges (:class:`Param`); exactly
            the keyword-only arguments of ``fn`` besides :data:`COMMON_ARGS`.
        cached: a feature loss with a cached form: it reads a few chosen teacher blocks, which the
            keyed teacher-feature cache (:mod:`raykd.soft_labels.feature_cache`) can hold.
        measured_faster: for a feature loss, the source of its teacher features measured faster
            on the LM path (``cached`` or ``online``; ``train.feature_teacher=auto`` takes it), from
            the step times of ``benchmarks/bench_feature_cost_lm.py``
            (``benchmarks/results/feature_cost_lm*.json``; the attention terms from the steady-load
            rerun ``feature_cost_lm_attention.json``: cached 1.8-1.9x faster). None: not measured
            (it runs online).
        transfer: a layer-wise transfer term of progressive knowledge transfer
            (:mod:`raykd.train.progressive`, MobileBERT).
        tau_squared: ``fn`` is the loss at temperature tau times tau**2, the factor applied by the
            registry (:func:`times_tau_squared`) to the declared function's value; False for a loss
            without the factor (hard-label CE, logit MSE, the feature losses).
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
    params: Mapping[str, Param] = field(default_factory=dict)
    cached: bool = False
    measured_faster: str | None = None
    transfer: bool = False
    tau_squared: bool = False


class UnknownLossError(UnknownNameError):
    """A loss name that is not registered; the message lists the valid names."""


LOSSES: Registry[LossSpec] = Registry("loss", "losses", error=UnknownLossError)
"""Every loss by name, filled by :mod:`raykd.losses` (:func:`register_losses` on each loss module)."""


def define_loss(
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
    params: Mapping[str, Param] | None = None,
    cached: bool = False,
    measured_faster: str | None = None,
    transfer: bool = False,
    tau_squared: bool | None = None,
) -> Callable[[LossFn], LossFn]:
    """Decorator that declares ``fn`` a loss called ``name``: it checks the declaration against
    the function and puts the :class:`LossSpec` on it as ``fn.loss_spec`` (registered by
    :func:`register_losses`).

    Args:
        name: registry name; description: one line for listings.
        forms: target forms accepted, from :data:`FORMS` (default: all for a logit loss, none else).
        needs_teacher: False for losses on hard labels only; they must have ``forms=()``.
        kind, attention, projections, modules, interventions: see :class:`LossSpec`; a feature loss
            has ``forms=()`` and ``needs_teacher=True`` (it reads the teacher's features).
        cached, measured_faster, transfer: facts about a feature loss, see :class:`LossSpec`.
        tau_squared: the registry multiplies the function's value by tau**2 (default: True for a
            logit loss with a teacher); only a logit loss with a teacher may set it.
        params: the hyper-parameters with types and ranges (:class:`Param`), one per keyword-only
            argument of the function besides :data:`COMMON_ARGS`.

    Returns:
        The decorator; it returns the loss as registered (the function, times tau**2 where
        ``tau_squared``) with its ``loss_spec``.

    Raises:
        ValueError: ``forms`` is invalid or does not agree with ``needs_teacher``, the feature
            facts are given to a logit loss or disagree, ``tau_squared`` is set on a loss without
            a teacher's logits, or ``params`` does not declare exactly the function's
            hyper-parameters.
    """
    forms = tuple(forms) if forms is not None else (FORMS if kind == "logits" else ())
    _check_kind(name, kind, forms, needs_teacher, bool(attention or projections or modules or interventions))
    tau_squared = _check_facts(name, kind, needs_teacher, cached, measured_faster, transfer, tau_squared)
    declared = dict(params or {})

    def decorate(fn: LossFn) -> LossFn:
        signature = inspect.signature(fn).parameters
        wanted = sorted(k for k, p in signature.items() if p.kind is p.KEYWORD_ONLY and k not in COMMON_ARGS)
        if wanted != sorted(declared) or any(p.type not in PARAM_TYPES for p in declared.values()):
            raise ValueError(f"loss {name!r}: declare params={{name: Param(...)}} for exactly its hyper-parameters "
                             f"{wanted} (declared {sorted(declared)}; types {PARAM_TYPES})")
        loss = times_tau_squared(fn) if tau_squared else fn
        loss.loss_spec = LossSpec(name, loss, forms, needs_teacher, description, kind, attention, tuple(projections),
                                  modules, interventions, declared, cached, measured_faster, transfer, tau_squared)
        return loss

    return decorate


def _check_kind(name: str, kind: str, forms: tuple[str, ...], needs_teacher: bool, feature_parts: bool) -> None:
    """:func:`define_loss`'s checks of kind, forms and teacher; raises ValueError."""
    if kind not in KINDS:
        raise ValueError(f"loss {name!r}: kind {kind!r} must be one of {KINDS}")
    if any(f not in FORMS for f in forms):
        raise ValueError(f"loss {name!r}: forms {forms} must be a subset of {FORMS}")
    if kind == "features" and (forms or not needs_teacher):
        raise ValueError(f"feature loss {name!r} reads teacher features: give forms=() and needs_teacher=True")
    if kind == "logits" and (needs_teacher == (not forms) or feature_parts):
        raise ValueError(f"loss {name!r}: a logit loss needs a teacher exactly when it accepts target forms, "
                         "and has no attention, projections, modules or interventions")


def _check_facts(name: str, kind: str, needs_teacher: bool, cached: bool, measured_faster: str | None,
                 transfer: bool, tau_squared: bool | None) -> bool:
    """:func:`define_loss`'s checks of the feature facts and tau**2; returns ``tau_squared`` with
    its default filled in (True for a logit loss with a teacher); raises ValueError."""
    if kind == "logits" and (cached or measured_faster or transfer):
        raise ValueError(f"loss {name!r}: cached, measured_faster and transfer describe feature losses")
    if measured_faster not in (None, "cached", "online") or measured_faster == "cached" and not cached:
        raise ValueError(f"loss {name!r}: measured_faster is None, 'online', or 'cached' with cached=True")
    tau_squared = kind == "logits" and needs_teacher if tau_squared is None else tau_squared
    if tau_squared and not (kind == "logits" and needs_teacher):
        raise ValueError(f"loss {name!r}: tau_squared scales a logit loss with a teacher")
    return tau_squared


def times_tau_squared(fn: LossFn) -> LossFn:
    """``fn`` (a loss at temperature tau) times tau**2: the one place the factor is applied."""

    @functools.wraps(fn)
    def scaled(*args: Any, temperature: float, **kwargs: Any) -> Tensor:
        return temperature**2 * fn(*args, temperature=temperature, **kwargs)

    return scaled


def register_losses(module: Any) -> None:
    """Add every loss that ``module`` defines (:func:`define_loss`) to :data:`LOSSES`, in order.

    Raises:
        ValueError: a name is already registered.
    """
    for value in list(vars(module).values()):
        if getattr(value, "__module__", None) == module.__name__ and (spec := getattr(value, "loss_spec", None)):
            LOSSES.add(spec.name, spec)


def get_loss(name: str) -> LossSpec:
    """The registered loss called ``name``.

    Raises:
        KeyError: (an :class:`UnknownLossError`) ``name`` is not registered; the message
            lists the valid names, sorted.
    """
    return LOSSES.get(name)


def feature_terms(names: Iterable[str]) -> list[str]:
    """The feature (intermediate-layer) losses among ``names``, in order (e.g. a config's
    ``train.objective_terms()``: every term any student or phase uses, weight 0 included).

    Raises:
        KeyError: a name is not a registered loss.
    """
    return [n for n in names if get_loss(n).kind == "features"]


def losses_where(fact: str, value: Any = True) -> tuple[str, ...]:
    """The names of the registered losses whose ``LossSpec.<fact>`` equals ``value``, in
    registration order (e.g. ``losses_where("cached")``)."""
    return tuple(n for n, spec in LOSSES.entries().items() if getattr(spec, fact) == value)


def available_losses() -> dict[str, LossSpec]:
    """All registered losses by name, sorted (a copy)."""
    return dict(sorted(LOSSES.entries().items()))
