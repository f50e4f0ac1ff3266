"""A small name -> factory registry, shared by policies, encoders, models and augmentations."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from dds.errors import DdsError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; unknown names list what exists.

    Args:
        kind: what is registered ("policy", "encoder", ...), used in messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``fn`` under ``name``; a taken name raises ``ValueError``."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., T]:
        """The factory for ``name``; raises ``DdsError`` listing known names if absent."""
        if name not in self._entries:
            known = ", ".join(self.names())
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DdsError(f"unknown {self.kind} '{name}'{hint}; known: {known}")
        return self._entries[name]

    def create(self, name: str, **kwargs) -> T:
        """Build the entry ``name`` with keyword arguments."""
        return self.get(name)(**kwargs)
