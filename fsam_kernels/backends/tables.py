"""Caches of what the backends derive from a layout's tensors, shared by the native and Triton backends."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable


class TableCache:
    """A small LRU cache: tables are rebuilt only when the tensors' addresses or sizes change."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: "OrderedDict[Hashable, Any]" = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = build()
        self._entries[key] = value
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()
