"""``LRU``: a bounded mapping that forgets its least recently used entry (the plan caches' store).

Plans are cached per input shape (``CompiledLayer.sized``), path choices per block and sizes
(``Block.choices``), op plans per call signature (the op-level capture): a loop whose shapes never
repeat (a new sequence length per step) would otherwise grow them without bound. ``get``, ``[]`` and
``in`` with a hit mark the entry as used; a write beyond ``maxsize`` entries drops the oldest.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterator

_MISSING = object()


class LRU:
    """{key: value} holding at most ``maxsize`` entries (``maxsize`` >= 1)."""

    __slots__ = ("maxsize", "_data")

    def __init__(self, maxsize: int) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 1:
            raise ValueError(f"LRU maxsize must be an integer >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()

    def get(self, key: Hashable, default=None):
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            return default
        self._data.move_to_end(key)
        return value

    def __getitem__(self, key: Hashable):
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Hashable, value) -> None:
        data = self._data
        data[key] = value
        data.move_to_end(key)
        if len(data) > self.maxsize:
            data.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        if key in self._data:
            self._data.move_to_end(key)
            return True
        return False

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator:
        return iter(list(self._data))

    def items(self):
        return list(self._data.items())

    def values(self):
        return list(self._data.values())

    def pop(self, key: Hashable, default=_MISSING):
        if default is _MISSING:
            return self._data.pop(key)
        return self._data.pop(key, default)

    def clear(self) -> None:
        self._data.clear()

    def __repr__(self) -> str:
        return f"LRU({len(self._data)}/{self.maxsize})"
