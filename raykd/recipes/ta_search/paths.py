"""Teacher-assistant paths as data: parse, check and enumerate (no Ray, no torch).

A *path* is the list of hops from the teacher to the student; its last hop is the student,
every hop before it a teacher assistant (TA), each distilled from the one before. A path of
length 1 is direct distillation, length 2 has one TA (Mirzadeh et al. 2020), longer paths are
MaxiDisc's sequential paths (Zhang et al. 2022, arXiv:2205.14570).

Hop syntax (one string per hop; a whole path is hops joined by ``>``, e.g. ``"0.5 > 4L+0.8"``):

- ``0.8`` or ``80S``: sparsity 0.8, the share of the prunable parameters (attention heads, or
  GQA head groups, and FFN neurons) of the kept layers removed, relative to the dense layers;
- ``4L``: keep 4 transformer layers (evenly spaced over the current ones, first and last kept);
- ``4L+0.8`` (or ``4L+80S``): both, the layers dropped first, then the rest pruned.

Hops are cumulative, not relative: a hop that names only layers keeps the previous hop's
sparsity, and one that names only a sparsity keeps the previous depth (what was removed stays
removed). So every hop must shrink the model: layers never more than before, sparsity never less,
and at least one of them strictly smaller. ``,`` is not a hop separator because the classifier
and LM configs write paths as YAML lists (``[0.5, 4L+0.8]``) and a comma would be ambiguous there.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_HOP = re.compile(r"^\s*(?:(?P<layers>\d+)\s*L)?\s*(?:\+?\s*(?P<sparsity>\d*\.?\d+)\s*(?P<pct>S)?)?\s*$", re.IGNORECASE)


class PathError(ValueError):
    """A TA path that cannot be run: bad syntax, a hop that grows the model, too many layers."""


@dataclass(frozen=True)
class Hop:
    """One model of a TA path.

    Attributes:
        layers: transformer layers kept (None: as many as the hop before, the teacher's for the first).
        sparsity: share in [0, 1) of the kept layers' prunable parameters removed (None: as the hop before).
    """

    layers: int | None = None
    sparsity: float | None = None

    def __str__(self) -> str:
        parts = [f"{self.layers}L"] if self.layers is not None else []
        if self.sparsity is not None and (self.sparsity > 0 or not parts):
            parts.append(f"{self.sparsity:g}")
        return "+".join(parts) or "0"

    def size(self, teacher_layers: int) -> float:
        """Share of the teacher's prunable parameters this (resolved) hop keeps: ``layers / L * (1 - sparsity)``."""
        return (self.layers or teacher_layers) / teacher_layers * (1.0 - (self.sparsity or 0.0))


def parse_hop(text: str | float) -> Hop:
    """One hop from ``0.8``, ``80S``, ``4L`` or ``4L+0.8`` (a YAML float is taken as a sparsity).

    Raises:
        PathError: the text is none of these, the sparsity is outside [0, 1) or the layers are 0.
    """
    if isinstance(text, bool):
        raise PathError(f"TA path hop {text!r}: expected a sparsity (0.8, 80S), a depth (4L) or both (4L+0.8)")
    if isinstance(text, (int, float)):
        text = repr(float(text))
    m = _HOP.match(str(text))
    if not m or (m.group("layers") is None and m.group("sparsity") is None):
        raise PathError(f"TA path hop {text!r}: expected a sparsity (0.8, 80S), a depth (4L) or both (4L+0.8)")
    layers = int(m.group("layers")) if m.group("layers") is not None else None
    sparsity = None
    if m.group("sparsity") is not None:
        sparsity = float(m.group("sparsity")) / (100.0 if m.group("pct") else 1.0)
        if not 0.0 <= sparsity < 1.0:
            raise PathError(f"TA path hop {text!r}: sparsity {sparsity:g} must lie in [0, 1) (write 80S or 0.8 for 80%)")
    if layers is not None and layers < 1:
        raise PathError(f"TA path hop {text!r}: a student keeps at least 1 layer")
    return Hop(layers, sparsity)


def parse_path(spec: str | Sequence[str | float | int]) -> list[Hop]:
    """A path from ``"0.5 > 4L+0.8"`` or a list of hop strings/floats (``[0.5, "4L+0.8"]``).

    Raises:
        PathError: an empty path or a bad hop (see :func:`parse_hop`).
    """
    items = [s for s in spec.split(">")] if isinstance(spec, str) else list(spec)
    if not items or (isinstance(spec, str) and not spec.strip()):
        raise PathError("a TA path needs at least one hop (the student)")
    return [parse_hop(s) for s in items]


def resolve_path(path: Sequence[Hop], teacher_layers: int) -> list[Hop]:
    """Fill in every hop's depth and sparsity from the hop before (the teacher: ``teacher_layers``, 0)
    and check that the path only shrinks the model.

    Args:
        path: the hops, student last.
        teacher_layers: the teacher's ``num_hidden_layers``.

    Returns:
        The hops with ``layers`` and ``sparsity`` both set.

    Raises:
        PathError: a depth above the teacher's, or a hop that does not shrink the model (more
            layers or a lower sparsity than the hop before, or the same model again).
    """
    if not path:
        raise PathError("a TA path needs at least one hop (the student)")
    prev, out = Hop(teacher_layers, 0.0), []
    for i, hop in enumerate(path, 1):
        layers = prev.layers if hop.layers is None else hop.layers
        sparsity = prev.sparsity if hop.sparsity is None else hop.sparsity
        where = f"TA path {format_path(path)}: hop {i} ({hop})"
        if layers > teacher_layers:
            raise PathError(f"{where} keeps {layers} layers but the teacher has only {teacher_layers}; use at most {teacher_layers}L")
        if layers > prev.layers or sparsity < prev.sparsity - 1e-9:
            raise PathError(f"{where} increases model size after {prev.layers}L+{prev.sparsity:g}: each hop keeps at most the "
                            "layers and at least the sparsity of the hop before")
        if layers == prev.layers and abs(sparsity - prev.sparsity) < 1e-9:
            raise PathError(f"{where} is the same model as the hop before ({prev.layers}L+{prev.sparsity:g}); drop it or shrink it")
        prev = Hop(layers, sparsity)
        out.append(prev)
    return out


def format_path(path: Iterable[Hop]) -> str:
    """``"0.5 > 4L+0.8"`` (the form :func:`parse_path` reads)."""
    return " > ".join(str(h) for h in path)


def enumerate_paths(candidates: Sequence[Hop], student: Hop, max_length: int, teacher_layers: int) -> list[list[Hop]]:
    """Every path of at most ``max_length`` hops that ends at ``student`` and whose TAs are
    ``candidates`` in shrinking order (MaxiDisc's sequential paths).

    Args:
        candidates: TA hops (resolved against the teacher one by one, e.g. the sparsity grid
            below the target and layer-drop hops); ones that are not smaller than the teacher
            or not larger than the student are left out.
        student: the last hop.
        max_length: the longest path, >= 1 (1: direct teacher -> student only).
        teacher_layers: the teacher's depth.

    Returns:
        Resolved paths, shortest first, then in candidate order; the direct path comes first.

    Raises:
        PathError: ``max_length < 1`` or a student deeper than the teacher.
    """
    if max_length < 1:
        raise PathError(f"max_path_length must be >= 1, got {max_length}")
    target = resolve_path([student], teacher_layers)[0]
    out = []
    for n_ta in range(max_length):
        for tas in itertools.combinations(candidates, n_ta):
            try:
                out.append(resolve_path([*tas, student], teacher_layers))
            except PathError:
                continue
    seen, unique = set(), []
    for p in out:  # two spellings of one model (e.g. 0.5 and 30L+0.5 on a 30-layer teacher) count once
        key = tuple((h.layers, round(h.sparsity, 9)) for h in p)
        if key not in seen and p[-1] == target:
            seen.add(key)
            unique.append(p)
    return unique


def evenly_spaced_layers(current: int, keep: int) -> list[int]:
    """``keep`` of ``current`` layer indices, evenly spaced, first and last kept (``[0, 6, 12, 17, 23, 29]``
    for 6 of 30).

    Raises:
        PathError: ``keep`` outside ``1..current``.
    """
    if not 1 <= keep <= current:
        raise PathError(f"cannot keep {keep} of {current} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (current - 1) / (keep - 1)) for i in range(keep)})
