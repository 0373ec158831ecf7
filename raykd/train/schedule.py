"""Schedules as data: the objective weights and temperature of a training step.

``train.phases`` (:class:`raykd.config.PhaseConfig`) split training into phases by share of
``max_steps``; within a phase the weights and the temperature move linearly from their start to
their end values. :func:`schedule_at` is the one function the training loop calls each step.
Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _get(phase: Any, key: str) -> Any:
    return phase.get(key) if isinstance(phase, Mapping) else getattr(phase, key)


def _lerp(a: float, b: float, frac: float) -> float:
    return a + (b - a) * frac


def schedule_at(
    phases: Sequence[Any],
    step: int,
    max_steps: int,
    weights: Mapping[str, float],
    temperature: float,
    terms: Sequence[str] = (),
) -> tuple[dict[str, float], float]:
    """The objective weights and temperature of optimizer step ``step`` (0-based).

    Args:
        phases: :class:`~raykd.config.PhaseConfig` objects (or their dicts); empty for a
            constant objective.
        step: 0-based step; its training progress is ``step / max_steps``.
        max_steps: total steps of the run.
        weights: the student's own objective ``{loss: weight}``, used by phases without weights.
        temperature: the default temperature (the cache's), used by phases without one.
        terms: loss names to include with weight 0 when a phase does not use them (so every
            step logs the same terms).

    Returns:
        ``({loss: weight}, temperature)``.
    """
    out_w, out_t = dict(weights), temperature
    start = 0.0
    progress = step / max(max_steps, 1)
    for phase in phases:
        until = _get(phase, "until")
        if progress < until or until >= 1.0:
            frac = min(1.0, max(0.0, (progress - start) / max(until - start, 1e-12)))
            w0, w1 = _get(phase, "weights"), _get(phase, "weights_end")
            if w0 is not None:
                w1 = w1 if w1 is not None else w0
                out_w = {n: _lerp(w0.get(n, 0.0), w1.get(n, 0.0), frac) for n in {*w0, *w1}}
            t0, t1 = _get(phase, "temperature"), _get(phase, "temperature_end")
            if t0 is not None:
                out_t = _lerp(t0, t1 if t1 is not None else t0, frac)
            break
        start = until
    for name in terms:
        out_w.setdefault(name, 0.0)
    return dict(sorted(out_w.items())), out_t
