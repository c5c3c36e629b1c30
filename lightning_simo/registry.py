"""One registry helper for every pluggable concept: tasks, merge methods, weightings, re-alignment modes.

Every extension point of the suite is "a name in a config selects an object", so each is a
:class:`Registry`: the same registration rule (duplicates refused unless replaced on purpose), the
same listing and the same unknown-name error (which lists the valid names and says what to fix), so
that users meet one behaviour whichever room they extend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that no entry of a registry holds (a ``ValueError``, so the CLI reports it in one line)."""


class Registry(Generic[T]):
    """Name -> object, case-insensitive, with a clear error for names it does not hold.

    Args:
        kind: what the entries are, for messages ("task", "merge method", ...).
        hint: how to fix an unknown name, appended to the error (e.g. the config flag to change).
    """

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}

    @staticmethod
    def _key(name: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise UnknownNameError(f"expected a non-empty name string, got {name!r}")
        return name.strip().lower()

    @overload
    def register(
        self, name: str, obj: None = None, *, replace: bool = False
    ) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, replace: bool = False) -> T: ...

    def register(self, name: str, obj: T | None = None, *, replace: bool = False):
        """Register ``obj`` under ``name``; without ``obj`` this is a decorator.

        A second registration of a name is refused unless ``replace=True``: silently shadowing a
        built-in entry from a plugin would change published numbers without a trace.
        """
        key = self._key(name)

        def add(entry: T) -> T:
            if key in self._entries and not replace:
                raise ValueError(
                    f"{self.kind} {key!r} is already registered (pass replace=True to override it)"
                )
            self._entries[key] = entry
            return entry

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; :class:`UnknownNameError` lists the valid names."""
        key = self._key(name)
        if key not in self._entries:
            message = f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
            if self.hint:
                message += f" ({self.hint})"
            raise UnknownNameError(message)
        return self._entries[key]

    __getitem__ = get

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._entries[name]) for name in self.names()]

    def unregister(self, name: str) -> T:
        """Remove and return an entry (tests and plugins that register temporary entries)."""
        key = self._key(name)
        self.get(key)
        return self._entries.pop(key)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
