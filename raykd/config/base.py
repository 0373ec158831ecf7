"""Settings basics shared by every config: the strict base model, errors, seeds, the user cache folder, Ray and custom resources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field



class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field and the fix."""


def _distinct_seeds(v: list[int]) -> list[int]:
    if not v or len(set(v)) != len(v):
        raise ValueError(f"seeds must be a non-empty list without repeats, got {v}")
    return v


Seeds = Annotated[list[int], AfterValidator(_distinct_seeds)]
"""A recipe's seeds: a non-empty list without repeats (the table's mean +/- std runs over them)."""


class Strict(BaseModel):
    """Base of every raykd settings model: unknown fields are refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def default_cache_root() -> Path:
    """User cache folder for raykd (``$RAYKD_CACHE`` or ``~/.cache/raykd``)."""
    return Path(os.environ.get("RAYKD_CACHE", Path.home() / ".cache" / "raykd")).expanduser()


class RayConfig(Strict):
    """How to reach Ray."""

    address: str | None = None
    """Cluster to join: ``HOST:PORT``, ``auto`` (Ray's most recent ``ray start``), ``ray://...``,
    or ``raykd`` (the cluster ``raykd teacher up`` started, recorded in the user cache). None:
    ``$RAY_ADDRESS`` if set, else a new local Ray of this run's own (never a running cluster;
    a run with ``teacher.start=false`` looks for its teacher on raykd's recorded cluster)."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of a newly started local Ray (None: all cores)."""


VocabMapping = Literal["bucket", "decoder", "cosine", "euclidean"]
"""How a compressed student vocabulary maps the teacher's ids (``student.vocab_map``)."""


def check_custom_resources(resources: dict[str, float], builtin_fields: str) -> dict[str, float]:
    """Validate a ``{resource name: amount}`` of custom Ray resources (node labels such as
    ``train_node`` given to ``ray start --resources``); returns it unchanged.

    Raises:
        ValueError: a built-in resource (``CPU``, ``GPU``, ``memory``, ``object_store_memory``:
            set ``builtin_fields`` instead) or an amount that is not above 0.
    """
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} is not a custom resource; set {builtin_fields} instead")
        if amount <= 0:
            raise ValueError(f"{name}={amount:g} must be > 0 (leave the resource out to not reserve it)")
    return resources
