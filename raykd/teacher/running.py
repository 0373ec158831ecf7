"""Checks on a teacher that is already running (reused by name) before a run labels through it."""

from __future__ import annotations

from typing import Any


def check_running_teacher(info: dict[str, Any], name: str, want: dict[str, Any]) -> None:
    """Refuse to label through a running teacher (reused by name) that is not the run's teacher.

    Args:
        info: the running deployment's ``info()`` (its fingerprints, engine and dtype).
        name: the teacher's deployment name (for the message).
        want: what the run's cache key says: ``weights_fingerprint``, ``tokenizer_fingerprint``,
            ``engine``, ``dtype``.

    Raises:
        ValueError: a field differs (the message names each field).
    """
    diff = {f: (info.get(f), v) for f, v in want.items() if info.get(f) != v}
    if diff:
        detail = ", ".join(f"{f}: running {a!r}, run wants {b!r}" for f, (a, b) in diff.items())
        raise ValueError(f"the running teacher {name!r} is not this run's teacher ({detail}); "
                         "use another teacher.name or `raykd teacher down` it")
