"""A small name -> object registry with lazily loaded entry-point plugins.

Readers, tokenizer presets and backbone presets register here by name; third-party packages add
their own through an entry-point group (e.g. `beitdomain.readers`), loaded the first time a name
is looked up or listed, so importing beitdomain never imports every installed plugin.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Registry(Generic[T]):
    """Named objects of one kind, plus plugins from an entry-point group.

    Args:
        kind: what is registered, for messages ("reader", "tokenizer preset").
        entry_point_group: plugin group to load lazily, or None.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self._plugins_loaded = entry_point_group is None
        self.plugin_errors: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, *, origin: str = "built-in"):
        """Registers `obj` under `name`; without `obj`, returns a decorator."""

        def add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise ValueError(
                    f"{self.kind} '{name}' is already registered ({self._origin[name]})"
                )
            self._items[name] = o
            self._origin[name] = origin
            return o

        return add(obj) if obj is not None else add

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not break the toolkit
                self.plugin_errors[ep.name] = f"{type(e).__name__}: {e}"
                log.warning(
                    "could not load %s plugin '%s' (%s): %s", self.kind, ep.name, ep.value, e
                )
                continue
            if ep.name not in self._items:
                dist = ep.dist.name if ep.dist is not None else ep.value
                self.register(ep.name, obj, origin=f"plugin: {dist}")

    def get(self, name: str) -> T:
        """Returns the object registered as `name`.

        Raises:
            KeyError: naming the unknown name, the closest match and every registered name.
        """
        self._load_plugins()
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise KeyError(
                f"unknown {self.kind} '{name}'.{hint} Known: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def origin(self, name: str) -> str:
        """'built-in' or 'plugin: <distribution>'."""
        self._load_plugins()
        return self._origin[name]

    def names(self) -> list[str]:
        self._load_plugins()
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load_plugins()
        return iter(list(self._items.items()))

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._items

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._items)


def lazy(factory: Callable[[], T]) -> Callable[[], T]:
    """Memoises a zero-argument factory (for registries built on first use)."""
    cache: list[T] = []

    def get() -> T:
        if not cache:
            cache.append(factory())
        return cache[0]

    return get
