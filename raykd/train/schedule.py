"""Schedules as data: the objective weights and temperature of a training step.

``train.phases`` (:class:`raykd.config.PhaseConfig`) split training into phases by share of
``max_steps``; within a phase the weights and the temperature move linearly from their start to
their end values. :func:`schedule_at` is the one function the training loop calls each step.
:class:`StackedSchedule` keeps SID's layer stages on top of those weights. Pure Python, no torch.
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


class StackedSchedule:
    """The stages of stacked internal distillation (SID; Aguilar et al. 2020, "Knowledge
    Distillation from Internal Representations", AAAI; the loss is :func:`raykd.losses.stacked.sid`).

    Stage ``l = 1..L`` (``L`` the layer map's pairs) trains the ``sid`` term on the first ``l``
    pairs with the ``gated`` terms (the logit terms: KD, CE) at weight 0; stage ``L + 1`` drops
    ``sid`` and gives the gated terms their weights back. ``sid_cos`` (the cosine part) is logged
    at weight 0 every step. After each step (:meth:`update`) the stage advances when that cosine
    falls below ``threshold``, or when ``step >= l * total_steps / (L + 1)`` (the seed's
    ``sid_lim_e=avg``: an equal share of the steps per stage, at most). The training loop applies
    it to every step's weights (:meth:`apply`), steps it, and keeps :meth:`state_dict` in the
    train state, so a resumed run continues the same stage.

    Args:
        pairs: ``L``, the layer map's pair count.
        total_steps: the run's optimizer steps.
        gated: the terms off until the last stage.
        threshold: the cosine below which a stage ends early (the seed's ``sid_accumulate_t``,
            default 0: never, the cosine distance is not negative).

    Raises:
        ValueError: ``pairs`` or ``total_steps`` below 1.
    """

    def __init__(self, pairs: int, total_steps: int, gated, threshold: float = 0.0):
        if pairs < 1 or total_steps < 1:
            raise ValueError(f"SID needs at least one layer pair and one step, got {pairs} pairs and {total_steps} steps")
        self.pairs, self.total_steps, self.gated, self.threshold = pairs, total_steps, tuple(gated), threshold
        self.stage = 1

    @property
    def last(self) -> bool:
        """Whether every layer is unlocked (stage ``L + 1``: the gated terms on, ``sid`` off)."""
        return self.stage > self.pairs

    def apply(self, weights: Mapping[str, float], params: Mapping[str, Mapping[str, Any]]
              ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
        """The step's ``(weights, params)``: ``weights`` with the gated terms at 0 (or ``sid`` at
        0 in the last stage) and ``sid_cos`` at 0 added; ``unlocked`` set for both terms."""
        def weight(name: str, w: float) -> float:
            if name == "sid":
                return 0.0 if self.last else float(w)
            return 0.0 if name in self.gated and not self.last else float(w)

        unlocked = min(self.stage, self.pairs)
        out = {n: weight(n, w) for n, w in weights.items()}
        out["sid_cos"] = 0.0
        p = {n: dict(v) for n, v in params.items()}
        for name in ("sid", "sid_cos"):
            p[name] = {**p.get("sid", {}), "unlocked": unlocked}
        return out, p

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Advance after 1-based ``step`` with that step's ``metrics`` (``sid_cos``: its per-position mean)."""
        if self.last:
            return
        if metrics.get("sid_cos", float("inf")) < self.threshold or step >= self.stage * self.total_steps / (self.pairs + 1):
            self.stage += 1

    def state_dict(self) -> dict[str, int]:
        return {"stage": self.stage}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.stage = int(state["stage"])
