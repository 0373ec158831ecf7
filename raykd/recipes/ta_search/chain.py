"""One teacher -> TA(s) -> student walk for every task of the TA schedule search (no Ray).

Teacher assistants as Mirzadeh et al. 2020 ("Improved Knowledge Distillation via Teacher
Assistant", AAAI) put them between a teacher and its student, and as MaxiDisc chains them
(Zhang et al. 2022, arXiv:2205.14570): every hop of a chain is built from the model before it and
distilled from it, the first hop from the teacher's cached soft labels (the teacher is not run
again), every later hop from the hop before, run online. The last hop is the student; it reports
``reports`` times during its phase.

What differs by task is a :class:`ChainTask`: how a hop is built (``shrink``: pruning, layer
drop) and how one phase trains it (``phase``: the objective and the batches). The classifier
(:mod:`.classifier_chain`) and the decoder LM (:mod:`.lm_chain`) each give one and walk the
same :func:`walk_chain`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

import torch
from torch import nn

HopT = TypeVar("HopT")


class ChainTask(Protocol[HopT]):
    """What one task does at a hop of a chain; ``HopT`` is its hop (a sparsity, a :class:`~.paths.Hop`)."""

    def shrink(self, model: nn.Module, prev: HopT, hop: HopT) -> nn.Module:
        """A new, smaller model for ``hop`` made from ``model`` (at ``prev``; left unchanged)."""
        ...

    def phase(self, model: nn.Module, teacher: nn.Module | None, seed: int,
              on_step: Callable[[int], None] | None) -> None:
        """One distillation phase of ``model`` (changed in place): from ``teacher`` run online, or
        from the teacher's cached soft labels when ``teacher`` is None; its batches drawn with
        ``seed``; ``on_step`` called with the 1-based step after every update."""
        ...


def walk_chain(task: ChainTask[HopT], start: tuple[nn.Module, HopT], hops: Sequence[HopT], *, seed: int,
               first_hop: int = 0, online: bool, steps: int, reports: int,
               on_report: Callable[[nn.Module, int], None] | None = None) -> Iterator[tuple[HopT, nn.Module]]:
    """``start`` -> ``hops[0]`` -> ... -> ``hops[-1]`` (the student), one phase of ``steps`` per hop.

    Seeds torch's global generator with ``seed`` when the walk starts, so a chain does not
    depend on what ran before it in the process.

    Args:
        task: the task's hop builder and phase.
        start: the model the chain starts from and its hop: the teacher, or a TA already trained.
        hops: the hops to build, in order, student last.
        seed: the chain's seed; hop ``i`` draws its batches with ``seed + first_hop + i``.
        first_hop: the index of ``hops[0]`` in the whole chain (after the TAs ``start`` stands for),
            so a hop sees the same batches whichever search builds it.
        online: the first hop learns from ``start`` run online (a trained TA), not from the
            teacher's cached soft labels (``start`` is the teacher).
        steps, reports: the phase's steps, and how many times the student reports: every
            ``ceil(steps / reports)`` steps and at the last.
        on_report: called with ``(student, step)`` at those steps of the student's phase.

    Yields:
        ``(hop, model)`` after each hop's phase; the walk builds the next hop when the caller asks
        for it, so what the caller measures on ``model`` runs before that.

    Raises:
        What ``task.shrink`` raises for a hop it cannot build (e.g.
        :class:`~raykd.recipes.ta_search.paths.PathError`: the hop does not shrink the model).
    """
    torch.manual_seed(seed)
    every = max(1, math.ceil(steps / reports))
    prev_model, prev_hop = start
    for i, hop in enumerate(hops):
        model = task.shrink(prev_model, prev_hop, hop)
        last = i == len(hops) - 1
        on_step = _reporting(model, on_report, every, steps) if last and on_report is not None else None
        task.phase(model, prev_model if online else None, seed + first_hop + i, on_step)
        yield hop, model
        prev_model, prev_hop, online = model, hop, True


def _reporting(model: nn.Module, on_report: Callable[[nn.Module, int], None], every: int, steps: int) -> Callable[[int], None]:
    """A phase's ``on_step`` that calls ``on_report(model, step)`` every ``every`` steps and at step ``steps``."""

    def on_step(step: int) -> None:
        if step % every == 0 or step == steps:
            on_report(model, step)

    return on_step
