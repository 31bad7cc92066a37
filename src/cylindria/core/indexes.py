"""Ordered indexes of job sequence numbers: newest-first paging without a full walk."""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Hashable, Iterable, Iterator


class SeqList:
    """A sorted list of sequence numbers. New jobs have the highest numbers, so most
    insertions and removals happen at the end and move little memory."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[int] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, seq: int) -> None:
        if not self._items or seq > self._items[-1]:
            self._items.append(seq)
        else:
            insort(self._items, seq)

    def discard(self, seq: int) -> None:
        at = bisect_left(self._items, seq)
        if at < len(self._items) and self._items[at] == seq:
            del self._items[at]

    def first(self) -> int | None:
        return self._items[0] if self._items else None

    def newest(self, before: int | None = None) -> Iterator[int]:
        """Descending, starting below `before` (every one when None)."""
        items = self._items
        end = len(items) if before is None else bisect_left(items, before)
        for at in range(end - 1, -1, -1):
            yield items[at]


class SeqIndex:
    """Sequence numbers grouped by a key (a state, a GPU), each group sorted."""

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        self._groups: dict[Hashable, SeqList] = {}

    def add(self, key: Hashable, seq: int) -> None:
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = SeqList()
        group.add(seq)

    def discard(self, key: Hashable, seq: int) -> None:
        group = self._groups.get(key)
        if group is not None:
            group.discard(seq)

    def size(self, keys: Iterable[Hashable]) -> int:
        return sum(len(self._groups[k]) for k in keys if k in self._groups)

    def newest(self, keys: Iterable[Hashable], before: int | None = None) -> Iterator[int]:
        """Descending over the union of the groups of `keys`."""
        groups = [self._groups[k].newest(before) for k in keys if k in self._groups]
        if len(groups) == 1:
            return groups[0]
        return heapq.merge(*groups, reverse=True)
