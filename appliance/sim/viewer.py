"""A viewer client: keeps every update of an NTNDArray PV (the appliance's outputs).

Used by the demo, the benchmarks and the tests. It decodes with the same code
as ingest, so what it sees is what any areaDetector client would see.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np

from appliance.ntndarray import FrameError, FrameMeta, attribute_value, decode
from appliance.pva import FrameSource


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
                 positions: Tuple[str, str] = ("SampleX", "SampleY")) -> None:
        self.items: List[Received] = []
        self.updates = 0
        self._keep_images = keep_images
        self._positions = positions
        self._changed = threading.Condition()
        self._source = FrameSource(pv_name, queue_size, self._on_update)
        self._source.start()
        with self._changed:  # every monitor starts with the record's current value: connected
            if not self._changed.wait_for(lambda: self.updates > 0, 10.0):
                raise TimeoutError("no connection to {}".format(pv_name))

    def _on_update(self, pv: Any) -> None:
        arrived = time.time()
        with self._changed:
            self.updates += 1
            self._changed.notify_all()
        try:
            image, meta = decode(pv, self._positions)
        except FrameError:
            return  # the empty initial update of a record never written
        item = Received(meta, np.array(image if self._keep_images else image[:1, :1]), arrived)
        with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> List[Received]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.items) >= count, timeout)
            return list(self.items)

    def latest(self) -> Optional[Received]:
        with self._changed:
            return self.items[-1] if self.items else None

    def close(self) -> None:
        self._source.stop()


def latencies_ms(items: List[Received]) -> np.ndarray:
    """Detector timestamp to arrival here, per item (same host clock)."""
    sent = np.array([m.meta.timestamp[0] + m.meta.timestamp[1] * 1e-9 for m in items])
    return (np.array([m.arrived for m in items]) - sent) * 1e3

