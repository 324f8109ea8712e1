"""Put frames from several appliances back into uniqueId order, holding each for a bounded time.

The data distributor hands consecutive ids to different appliances, whose
results arrive with different delays. The collector holds what arrived early
until the ids before it come, but never for long: a frame is released once the
ids before it have been awaited ``max_wait_s`` (measured from the oldest held
frame) or once more than ``window`` frames are held. The ids skipped then are
*missing*; one that arrives after all is published *late* (out of order) and
leaves the missing list, so what stays missing is what no appliance published:
the true loss. Pure logic, one thread (the collector's merge thread) calls it.
"""
from __future__ import annotations

import collections
import heapq
import itertools
from typing import Any, Deque, Dict, Generic, List, Optional, Set, Tuple, TypeVar

Item = TypeVar("Item")


class Released(Generic[Item]):
    """A frame let out, in order unless ``late``."""

    __slots__ = ("unique_id", "item", "late")

    def __init__(self, unique_id: int, item: Item, late: bool) -> None:
        self.unique_id, self.item, self.late = unique_id, item, late


class Reorder(Generic[Item]):
    def __init__(self, window: int, max_wait_s: float, missing_limit: int, last_merged: Optional[int] = None,
                 first_id: Optional[int] = None) -> None:
        """``last_merged``: the last id released before a restart, so that what passed meanwhile counts as missing.
        ``first_id``: where a scan's ids start (None: unknown), so that a scan's first frames can be missing too."""
        self.window = window
        self.max_wait_s = max_wait_s
        self.missing_limit = missing_limit
        self._heap: List[Tuple[int, int, float, Any]] = []  # (id, arrival order, arrival time, item)
        self._order = itertools.count()
        self._held: Set[int] = set()
        self._arrivals: Deque[Tuple[float, int]] = collections.deque()  # (time, id) in arrival order, lazily pruned
        self.first_id = first_id
        self._next: Optional[int] = first_id if last_merged is None else last_merged + 1
        self._recent: Deque[int] = collections.deque(maxlen=window)  # released ids: a repeat is a duplicate
        self._recent_set: Set[int] = set()
        self.missing: Set[int] = set()  # skipped, not (yet) arrived; at most missing_limit listed
        self.counts: Dict[str, int] = {"merged": 0, "late": 0, "duplicates": 0, "missing_unlisted": 0,
                                       "acquisitions": 0, "lost_in_earlier_acquisitions": 0, "max_depth": 0}

    @property
    def depth(self) -> int:
        return len(self._heap)

    def missing_count(self) -> int:
        return len(self.missing) + self.counts["missing_unlisted"]

    def add(self, unique_id: int, item: Item, now: float) -> List[Released[Item]]:
        """One arrival; returns what it lets out (possibly nothing, possibly many)."""
        if unique_id in self._held or unique_id in self._recent_set:
            self.counts["duplicates"] += 1
            return []
        released: List[Released[Item]] = []
        if self._next is not None and unique_id < self._next:
            if unique_id in self.missing:
                self.missing.discard(unique_id)
                self.counts["late"] += 1
                return [self._release(unique_id, item, late=True)]
            released = self._new_acquisition()
        heapq.heappush(self._heap, (unique_id, next(self._order), now, item))
        self._held.add(unique_id)
        self._arrivals.append((now, unique_id))
        released += self.expire(now)
        self.counts["max_depth"] = max(self.counts["max_depth"], len(self._heap))  # frames held, waiting
        return released

    def expire(self, now: float) -> List[Released[Item]]:
        """Let out what is in order, and what has waited long enough or overflows the window."""
        released: List[Released[Item]] = []
        while self._heap:
            unique_id = self._heap[0][0]
            in_order = self._next is not None and unique_id == self._next
            if not (in_order or len(self._heap) > self.window or now - self._oldest_arrival() >= self.max_wait_s):
                break
            released.append(self._pop())
        return released

    def flush(self) -> List[Released[Item]]:
        """Everything held, in order (at stop)."""
        return [self._pop() for _ in range(len(self._heap))]

    def next_deadline(self) -> Optional[float]:
        """When the oldest held frame will have waited long enough (time.monotonic scale); None when none held."""
        return self._oldest_arrival() + self.max_wait_s if self._heap else None

    def missing_ranges(self, limit: int) -> List[Tuple[int, int]]:
        """The listed missing ids as (first, last) runs, at most ``limit`` runs, lowest first."""
        runs: List[Tuple[int, int]] = []
        for unique_id in sorted(self.missing):
            if runs and unique_id == runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], unique_id)
            elif len(runs) == limit:
                break
            else:
                runs.append((unique_id, unique_id))
        return runs

    def _oldest_arrival(self) -> float:
        """Arrival time of the frame held longest (arrivals come in time order: the first still held)."""
        while self._arrivals[0][1] not in self._held:
            self._arrivals.popleft()
        return self._arrivals[0][0]

    def _pop(self) -> Released[Item]:
        unique_id, _, _, item = heapq.heappop(self._heap)
        self._held.discard(unique_id)
        if self._next is not None:
            for skipped in range(self._next, unique_id):
                self._note_missing(skipped)
        return self._release(unique_id, item, late=False)

    def _release(self, unique_id: int, item: Item, late: bool) -> Released[Item]:
        if not late:
            self._next = unique_id + 1
        if len(self._recent) == self._recent.maxlen:
            self._recent_set.discard(self._recent[0])
        self._recent.append(unique_id)
        self._recent_set.add(unique_id)
        self.counts["merged"] += 1
        return Released(unique_id, item, late)

    def _note_missing(self, unique_id: int) -> None:
        if len(self.missing) < self.missing_limit:
            self.missing.add(unique_id)
        else:
            self.counts["missing_unlisted"] += 1

    def _new_acquisition(self) -> List[Released[Item]]:
        """Ids went back beyond anything awaited: the detector started again. Let out the old scan's frames and
        keep its losses as a count (its ids will come again)."""
        released = self.flush()
        self._arrivals.clear()
        self.counts["lost_in_earlier_acquisitions"] += self.missing_count()
        self.counts["acquisitions"] += 1
        self.missing = set()
        self.counts["missing_unlisted"] = 0
        self._next = self.first_id
        self._recent.clear()
        self._recent_set.clear()
        return released
