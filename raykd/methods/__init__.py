"""The registry of distillation methods: named compositions of loss terms, schedules, teachers
and recipes.

A *loss* (:mod:`raykd.losses`) is one term; a *method* says how a whole run is put together:
which terms (``train.students``), which schedule (``train.phases``), how many teachers and how
they are combined (``extra_teachers`` + :attr:`Method.combine`), which student (``student``),
which data (``data.perturb_share``), and which recipe function runs it. A config names its
method (``method: annealing_kd``) and spells out every setting itself (a config is a complete
``DistillConfig``; nothing is filled in behind the user's back); the method then *checks* that
the config composes what the method means, before any teacher call or training step
(:func:`validate`, run on the load path by :func:`load`).

The methods are defined by family, one module each (:mod:`.logit`, :mod:`.multi_teacher`,
:mod:`.chains`, :mod:`.on_policy`, :mod:`.cross_tokenizer`, :mod:`.feature`), each a tuple
``METHODS`` of :class:`Method` entries; this package registers them, in one place below. Add a
method as an entry of its family's tuple::

    MY_KD = Method(
        name="my_kd", description="one line for `raykd methods`", paper="Author et al. 2024, ...",
        composes="what the config must hold", uses=frozenset({"phases"}),
        recipe="raykd.recipes.lm.distill:run_distill")

Pure Python: importing this package imports neither torch nor Ray.
"""

from raykd.methods import chains, cross_tokenizer, feature, logit, multi_teacher, on_policy
from raykd.methods.registry import (
    CONFIG_DIR,
    FEATURES,
    METHODS,
    Method,
    UnknownMethodError,
    available_methods,
    config_features,
    get_method,
    register_method,
)
from raykd.methods.validate import distill_configs, load, run_method, validate

for _family in (logit, multi_teacher, chains, on_policy, cross_tokenizer, feature):
    for _method in _family.METHODS:
        register_method(_method)

__all__ = [
    "CONFIG_DIR", "FEATURES", "METHODS", "Method", "UnknownMethodError", "available_methods", "config_features",
    "distill_configs", "get_method", "load", "register_method", "run_method", "validate",
]
