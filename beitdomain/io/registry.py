"""Reader registry: built-in readers plus plugins from the ``beitdomain.readers`` entry points.

Plugins are discovered lazily (on the first lookup), so importing ``beitdomain.io`` stays cheap
and a broken plugin only shows up as a line in ``beitdomain readers list``, never as a crash.

A plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."beitdomain.readers"]
    npy = "my_package:NpyReader"

The object may be a reader class (instantiated with no arguments) or a reader instance.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any

from beitdomain.io.base import Reader

ENTRY_POINT_GROUP = "beitdomain.readers"


@dataclasses.dataclass
class ReaderInfo:
    """One line of ``beitdomain readers list``."""

    name: str
    source: str  # 'built-in' or the distribution that provides the plugin
    description: str
    status: str  # 'ok', 'missing: pkg ...', or 'failed: ...'


class ReaderRegistry:
    """Holds readers by name and finds the one that understands a file."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self.group = group
        self._readers: dict[str, Any] = {}
        self._sources: dict[str, str] = {}
        self._plugin_failures: dict[str, tuple[str, str]] = {}
        self._plugins_loaded = False

    def register(self, reader: Any, source: str = "built-in") -> Any:
        """Adds a reader (class or instance). Usable as a class decorator."""
        instance = reader() if isinstance(reader, type) else reader
        for attr in ("name", "can_read", "read"):
            if not hasattr(instance, attr):
                raise TypeError(f"reader {reader!r} lacks {attr!r}; see beitdomain.io.Reader")
        if instance.name in self._readers:
            raise ValueError(
                f"reader name {instance.name!r} is already registered by "
                f"{self._sources[instance.name]}"
            )
        self._readers[instance.name] = instance
        self._sources[instance.name] = source
        return reader

    def load_plugins(self, force: bool = False) -> None:
        """Imports readers from installed entry points (once, unless ``force``)."""
        if self._plugins_loaded and not force:
            return
        self._plugins_loaded = True
        for ep in importlib.metadata.entry_points(group=self.group):
            dist = ep.dist.name if ep.dist is not None else "?"
            if ep.name in self._readers and self._sources.get(ep.name) == dist:
                continue
            try:
                obj = ep.load()
                self.register(obj, source=dist)
            except Exception as e:  # a broken plugin must not break reading built-in formats
                self._plugin_failures[ep.name] = (dist, f"failed: {type(e).__name__}: {e}")

    def get(self, name: str) -> Any:
        """The reader called ``name``; KeyError lists the known names."""
        self.load_plugins()
        try:
            return self._readers[name]
        except KeyError:
            known = ", ".join(sorted(self._readers))
            raise KeyError(f"no reader named {name!r}; known readers: {known}") from None

    def readers(self) -> list[Any]:
        """All readers, highest priority first, built-ins before plugins at equal priority."""
        self.load_plugins()
        order = list(self._readers.values())
        return sorted(order, key=lambda r: -getattr(r, "priority", 0))

    def find(self, path: str, head: bytes) -> Any | None:
        """The first reader whose ``can_read`` accepts the file, or None."""
        for reader in self.readers():
            try:
                if reader.can_read(path, head):
                    return reader
            except Exception:  # a plugin's sniffing bug should not hide other readers
                continue
        return None

    def info(self) -> list[ReaderInfo]:
        """Descriptions of built-in, plugin and failed plugin readers."""
        self.load_plugins()
        rows = []
        for name, reader in self._readers.items():
            missing = reader.missing() if hasattr(reader, "missing") else []
            status = "ok" if not missing else "missing: pip install " + " ".join(missing)
            desc = getattr(reader, "description", "") or (reader.__doc__ or "").strip()
            rows.append(
                ReaderInfo(name, self._sources[name], desc.splitlines()[0] if desc else "", status)
            )
        for name, (dist, status) in self._plugin_failures.items():
            rows.append(ReaderInfo(name, dist, "", status))
        return rows


def is_reader(obj: Any) -> bool:
    """Whether ``obj`` satisfies the Reader protocol."""
    return isinstance(obj, Reader)
