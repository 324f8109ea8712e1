"""A viewer client: keeps every update of an NTNDArray PV (the appliance's outputs).

Used by the demo, the benchmarks and the tests. It decodes with the same code
as ingest, so what it sees is what any areaDetector client would see. The
monitor itself runs in a child process (appliance.sim.child_client): a crash
in pvapy's client cannot take the demo or a test run down.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from appliance.ntndarray import FrameMeta, attribute_value
from appliance.sim.child_client import ChildMonitor, frame_from_message


@dataclass
class Received:
    meta: FrameMeta
    image: np.ndarray
    arrived: float  # time.time() when it arrived here

    @property
    def unique_id(self) -> int:
        return self.meta.unique_id

    def attribute(self, name: str) -> Any:
        for entry in self.meta.attributes:
            if entry["name"] == name:
                return attribute_value(entry)
        raise KeyError(name)


class Viewer:
    """Monitor ``pv_name``; ``keep_images=False`` keeps only pixel [0, 0] of each image (long runs)."""

    def __init__(self, pv_name: str, queue_size: int = 10000, keep_images: bool = True,
                 positions: Tuple[str, str] = ("SampleX", "SampleY"), connect_timeout: float = 90.0) -> None:
        self.items: List[Received] = []
        self.updates = 0
        self._changed = threading.Condition()
        kind = "frames" if keep_images else "corners"
        self._monitor = ChildMonitor(pv_name, ["monitor", kind, pv_name, "--queue-size", str(queue_size),
                                               "--positions", positions[0], positions[1]], self._on_message)
        with self._changed:  # every monitor starts with the record's current value: connected
            if not self._changed.wait_for(lambda: self.updates > 0, connect_timeout):
                self._monitor.close()
                raise TimeoutError("no connection to {} within {} s{}".format(
                    pv_name, connect_timeout, "".join("\n" + death for death in self._monitor.deaths)))

    def _on_message(self, message: Dict[str, Any], first: bool) -> None:
        frame = message["frame"]
        item = None if frame is None else Received(*frame_from_message(frame), arrived=message["arrived"])
        with self._changed:
            if first and self.updates:
                return  # a restarted monitor's first update: the record's value, seen before or missed with the gap
            if message.get("current_value") and item is not None and self.items and \
                    item.unique_id == self.items[-1].unique_id:
                return  # a reconnected monitor's first update: the frame it got last, delivered again
            self.updates += 1
            if item is not None:
                self.items.append(item)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> List[Received]:
        return self.wait_until(lambda items: len(items) >= count, timeout)

    def wait_until(self, done: Callable[[List[Received]], bool], timeout: float) -> List[Received]:
        """The items so far, once ``done`` holds for them or ``timeout`` has passed (the caller checks which)."""
        with self._changed:
            self._changed.wait_for(lambda: done(self.items), timeout)
            return list(self.items)

    def latest(self) -> Optional[Received]:
        with self._changed:
            return self.items[-1] if self.items else None

    def close(self) -> None:
        self._monitor.close()


def latencies_ms(items: List[Received]) -> np.ndarray:
    """Detector timestamp to arrival here, per item (same host clock)."""
    sent = np.array([m.meta.timestamp[0] + m.meta.timestamp[1] * 1e-9 for m in items])
    return (np.array([m.arrived for m in items]) - sent) * 1e3

