"""`Registry`: one name -> implementation table per extension point.

circuitdyn has six extension points, each with exactly one registry, kept beside the code it
dispatches to:

=====================  ==========================================  =========================
extension point        registry                                    entry
=====================  ==========================================  =========================
attribution methods    `circuitdyn.attribution.METHODS`            scores of one batch
ablations              `circuitdyn.activations.ABLATIONS`          ablated source values
selection rules        `circuitdyn.selection.SELECTIONS`           scores, n -> Circuit
tasks                  `circuitdyn.tasks.TASKS`                    tokenizer, options -> Task
tuning strategies      `circuitdyn.strategies.STRATEGIES`          which circuit an update tunes
parameter policies     `circuitdyn.ownership.POLICIES`             a `ParameterPolicy`
=====================  ==========================================  =========================

Adding one is one function and one ``@REGISTRY.register("name", help="...")``. The CLI takes its
choices and help texts from the registries, and an unknown name is a `ValueError` that lists the
known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` is used in messages, e.g. ``"attribution method"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, *, help: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name`."""

        def add(entry: T) -> T:
            self.add(name, entry, help=help)
            return entry

        return add

    def add(self, name: str, entry: T, *, help: str) -> None:
        """Register `entry` under `name`; a name can be registered once."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        self._help[name] = help

    def __getitem__(self, name: str) -> T:
        return self._entries[self.check(name)]

    def check(self, name: object) -> str:
        """`name` as a string if it is registered, else a ValueError that lists the choices."""
        key = getattr(name, "value", name)  # accept str-valued enums
        if not isinstance(key, str) or key not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self)}")
        return key

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def help(self, name: str) -> str:
        return self._help[self.check(name)]

    def describe(self) -> str:
        """One line per entry, ``name: help``, for CLI help texts."""
        return "; ".join(f"{name}: {self._help[name]}" for name in self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
