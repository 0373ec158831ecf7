"""User errors: bad input the user can fix, shown as ``error: <message>`` with exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# user errors


class UserError(Exception):
    """Bad input the user can fix; ``raykd`` prints ``error: <message>`` and exits 2."""


USER_ERROR_TYPES = (
    "raykd.config:ConfigError",
    "raykd.soft_labels.cache:CacheError",
    "raykd.soft_labels.schema:SchemaError",
    "raykd.soft_labels.join:CacheJoinError",
    "raykd.students.build:VocabularyMismatchError",
    "raykd.train.trainer:InsufficientResourcesError",
    "raykd.methods:UnknownMethodError",
    "raykd.losses.registry:UnknownLossError",
    "raykd.data.sources:DataError",
)
"""``module:class`` of the exceptions that are always user errors, wherever they are raised.
Plain ``ValueError`` / ``FileNotFoundError`` are user errors only where :func:`user_errors`
marks them (the plan, before any compute), so a bug deep in training still shows as one."""

_MARK = "raykd_user_error"


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Only modules already imported can have raised their errors: nothing is imported here.
    types: list[type[BaseException]] = [UserError]
    for spec in USER_ERROR_TYPES:
        module, _, name = spec.partition(":")
        if module in sys.modules and isinstance(t := getattr(sys.modules[module], name, None), type):
            types.append(t)
    return tuple(types)


def is_user_error(e: BaseException) -> bool:
    """True for a :data:`USER_ERROR_TYPES` error, a :class:`UserError`, or an error marked by
    :func:`user_errors`; also when one of them was raised in a Ray task (:func:`ray_cause`)."""
    return getattr(e, _MARK, False) or isinstance(e, _user_error_types()) or isinstance(ray_cause(e), _user_error_types())


@contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Mark exceptions of ``types`` raised inside the block as user errors (type and message
    unchanged, so callers that catch e.g. ``ValueError`` still do)."""
    try:
        yield
    except types as e:
        setattr(e, _MARK, True)
        raise


def ray_cause(e: BaseException) -> BaseException:
    """The exception raised in a Ray task or actor, without Ray's wrappers around it: a
    ``RayTaskError``'s ``cause`` (its message holds the remote traceback) and Ray Data's
    ``UserCodeException`` around a map function's error; ``e`` itself when Ray did not wrap it."""
    exceptions = sys.modules.get("ray.exceptions")
    task_error = getattr(exceptions, "RayTaskError", ())
    user_code = getattr(exceptions, "UserCodeException", ())
    for _ in range(8):  # a few layers at most (a task that called a task)
        if task_error and isinstance(e, task_error) and isinstance(getattr(e, "cause", None), BaseException):
            e = e.cause
        elif user_code and isinstance(e, user_code) and e.__cause__ is not None:
            e = e.__cause__
        else:
            break
    return e


def error_message(e: BaseException) -> str:
    """What ``error:`` says: the message (KeyError's without its quotes; the original one of an
    error raised in a Ray task, :func:`ray_cause`), else the type's name."""
    e = ray_cause(e)
    text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    return text.strip() or type(e).__name__
