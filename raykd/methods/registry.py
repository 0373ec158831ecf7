"""The method registry: the :class:`Method` entry, the config features a method may use, and the
checks several method families share. The families (:mod:`raykd.methods.logit`, ...) define the
entries; :mod:`raykd.methods` registers them.

Pure Python: importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd.registry import Registry, UnknownNameError

DistillConfig = Any
"""A :class:`raykd.config.DistillConfig` (the checks read it; not imported, so that the method
families need nothing but this module)."""

FEATURES = ("phases", "teachers", "vocab", "perturb", "generate", "chain", "agnostic_stage", "on_policy",
            "cross_tokenizer", "features")
"""Parts of a config beyond a plain single-teacher run; a method must declare the ones it uses.

- ``phases``: ``train.phases`` is not empty (a schedule of objective and temperature);
- ``teachers``: ``extra_teachers`` is not empty (several teachers joined by row);
- ``vocab``: ``student.vocab_size`` is set (vocabulary compression, mapped as ``student.vocab_map``);
- ``perturb``: ``data.perturb_share > 0`` (teacher labels on perturbed text);
- ``generate``: ``generation`` is set (teacher generations as training text);
- ``chain``: ``chain`` is set (teacher assistants between teacher and student);
- ``agnostic_stage``: ``agnostic_stage`` is set (a task-agnostic stage before the task stage);
- ``on_policy``: ``on_policy`` is set (the student's own samples scored by the served teacher);
- ``cross_tokenizer``: ``student.tokenizer_alignment`` is set (a student with another tokenizer).
- ``features``: an objective has a feature (intermediate-layer) term, read from the teacher run
  in each Train worker through ``train.layer_map`` (default: the stride of ``student.keep_layers``).
"""

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped config of every method (package data: present in a non-editable install too); each
holds only its differences over ``base.yaml``, the settings they share (``base:``, see
:func:`raykd.config.read_config_tree`)."""


class UnknownMethodError(UnknownNameError):
    """A method name that is not registered; the message lists the valid names."""


@dataclass(frozen=True)
class Method:
    """A registered distillation method.

    Attributes:
        name: registry name, the ``method`` field of a config.
        description: one line shown by ``raykd methods``.
        paper: the paper (or source) the method follows.
        composes: how the method composes loss terms, schedules, teachers and recipes (shown
            by ``raykd methods --verbose``).
        uses: config features (:data:`FEATURES`) the method may use.
        requires: features the method must use (a subset of ``uses``).
        combine: how several teachers' soft labels become one target (a name in
            :mod:`raykd.losses.multi_teacher`), for methods that use ``teachers``.
        recipe: ``"module:function"`` that runs a config of this method; called as
            ``fn(cfg, output_dir)``. Resolved lazily, so the registry imports nothing heavy.
        check: optional extra check ``fn(cfg) -> None`` raising ``ValueError``.
    """

    name: str
    description: str
    paper: str
    composes: str
    uses: frozenset[str] = frozenset()
    requires: frozenset[str] = frozenset()
    combine: str | None = None
    recipe: str = "raykd.recipes.lm.distill:run_distill"
    check_fn: Callable[[DistillConfig], None] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        """The method's config under ``raykd/methods/configs/``."""
        return CONFIG_DIR / f"{self.name}.yaml"

    def check(self, cfg: DistillConfig) -> None:
        """Check that ``cfg`` composes this method (cheap; runs when the config is validated).

        Raises:
            ValueError: the config uses a feature the method does not, misses one it requires,
                or fails the method's own check; the message says which and how to fix it.
        """
        used = config_features(cfg)
        if extra := sorted(used - self.uses):
            raise ValueError(f"method {self.name!r} does not use {extra} (set by the config); "
                             f"pick a method that does (`raykd methods`) or remove them")
        if missing := sorted(self.requires - used):
            raise ValueError(f"method {self.name!r} needs {missing} in the config: {self.composes}")
        if self.check_fn is not None:
            self.check_fn(cfg)

    def run(self, cfg: DistillConfig, output_dir: Path) -> Any:
        """Run ``cfg`` with this method's recipe function."""
        module, _, fn = self.recipe.partition(":")
        return getattr(importlib.import_module(module), fn)(cfg, Path(output_dir))


def config_features(cfg: DistillConfig) -> set[str]:
    """The :data:`FEATURES` a config uses."""
    from raykd.losses.registry import feature_terms  # lazy: keeps torch out of importing the registry

    flags = {
        "phases": bool(cfg.train.phases),
        "teachers": bool(cfg.extra_teachers),
        "vocab": cfg.student.vocab_size is not None,
        "perturb": cfg.data.perturb_share > 0,
        "generate": cfg.generation is not None,
        "chain": cfg.chain is not None,
        "agnostic_stage": cfg.agnostic_stage is not None,
        "on_policy": getattr(cfg, "on_policy", None) is not None,
        "cross_tokenizer": getattr(cfg.student, "tokenizer_alignment", None) is not None,
        "features": bool(feature_terms(cfg.train.objective_terms())),
    }
    return {name for name, on in flags.items() if on}


METHODS: Registry[Method] = Registry("method", error=UnknownMethodError)
"""Every method by name, in the order :mod:`raykd.methods` registers the families."""


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry and return it.

    Raises:
        ValueError: the name is taken, or ``uses`` / ``requires`` name unknown features.
    """
    if bad := sorted((method.uses | method.requires) - set(FEATURES)):
        raise ValueError(f"method {method.name!r}: unknown features {bad}; known: {list(FEATURES)}")
    if not method.requires <= method.uses:
        raise ValueError(f"method {method.name!r}: requires {sorted(method.requires)} must be a subset of uses")
    return METHODS.add(method.name, method)


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Raises:
        KeyError: (an :class:`UnknownMethodError`) the name is unknown; the message lists the
            valid ones.
    """
    return METHODS.get(name)


def available_methods() -> dict[str, Method]:
    """All registered methods by name, in registration order (a copy)."""
    return METHODS.entries()


# ---- checks that several method families share ------------------------------------------------


def objectives(cfg: DistillConfig) -> list[dict[str, float]]:
    """Every ``{loss: weight}`` objective of ``cfg``: each student's and each phase's."""
    out = list(cfg.train.students.values())
    for p in cfg.train.phases:
        out += [w for w in (p.weights, p.weights_end) if w is not None]
    return out


def teacher_terms(weights: dict[str, float]) -> list[str]:
    """The terms of ``weights`` with a weight > 0 that read the teacher."""
    from raykd.losses import get_loss  # lazy: keeps torch out of importing the registry

    return [n for n, w in weights.items() if w > 0 and get_loss(n).needs_teacher]


def no_hard_labels(cfg: DistillConfig) -> None:
    """The check of a method that distils from logits only: no objective has a ``ce`` weight > 0."""
    if bad := [w for w in objectives(cfg) if w.get("ce", 0) > 0]:
        raise ValueError(f"method {cfg.method!r} distils from logits only (no hard labels): "
                         f"remove the `ce` term (or give it weight 0) in {bad}")
