"""One small registry of named entries: losses, methods, teacher engines, teacher combiners and
MUKI's student rows are each one :class:`Registry`.

Entries are added explicitly, in one place per family (``LOSSES.add(...)`` in
:mod:`raykd.losses`, the method families in :mod:`raykd.methods`, ...), so what a registry holds
never depends on which modules happen to have been imported. A lookup of an unknown name fails
with :class:`UnknownNameError`, whose message lists the valid names.

Pure Python: importing this module imports neither torch nor Ray, so config-level code can use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered; the message lists the valid names.

    Both a ``KeyError`` (a failed lookup) and a ``ValueError`` (bad input in a config: a pydantic
    validator turns it into a validation error)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """Entries by name, in the order they were added.

    Args:
        what: what an entry is, in the messages (``loss``, ``teacher engine``).
        plural: the plural in ``valid <plural>: ...`` (default ``what + "s"``).
        error: the :class:`UnknownNameError` subclass an unknown name raises.
    """

    def __init__(self, what: str, plural: str | None = None, *, error: type[UnknownNameError] = UnknownNameError) -> None:
        self.what, self.plural, self.error = what, plural or what + "s", error
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name`` and return it.

        Raises:
            ValueError: ``name`` is already registered.
        """
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            UnknownNameError: (of the registry's ``error`` type) ``name`` is not registered; the
                message lists the valid names, sorted.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            valid = ", ".join(sorted(self._entries))
            raise self.error(f"unknown {self.what} {name!r}; valid {self.plural}: {valid}") from None

    def names(self) -> list[str]:
        """The registered names, in the order they were added."""
        return list(self._entries)

    def entries(self) -> dict[str, T]:
        """Every entry by name, in the order they were added (a copy)."""
        return dict(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.names()})"
