"""A detector stand-in: serves frames as an areaDetector NTNDArray PV.

It behaves like an areaDetector IOC with the PVA plugin: increasing uniqueId,
timestamps, motor positions as NTAttributes (as an attributes XML file would
add them), optionally a codec plugin's compression. Frames are paced against
an absolute schedule so the mean rate holds even when one update is slow.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from appliance.ntndarray import now_stamp
from appliance.pva import Server, attributes

Position = Optional[Tuple[float, float]]


class DetectorServer:
    def __init__(self, pv_name: str, position_names: Tuple[str, str] = ("SampleX", "SampleY")) -> None:
        self.pv_name = pv_name
        self.position_names = position_names
        self._server = Server()
        self.record = self._server.add_image(pv_name)
        self.sent = 0

    def send(
        self,
        image: np.ndarray,
        unique_id: int,
        position: Position = None,
        codec: Optional[str] = None,
        extra: Optional[Mapping[str, Any]] = None,
    ) -> Tuple[int, int, int]:
        """Publish one frame; returns the timestamp it carries."""
        values: Dict[str, Any] = {"ColorMode": 0}
        if position is not None:
            values[self.position_names[0]] = float(position[0])
            values[self.position_names[1]] = float(position[1])
        if extra:
            values.update(extra)
        stamp = now_stamp()
        self.record.publish(image, unique_id, stamp, stamp, attributes(values), codec=codec)
        self.sent += 1
        return stamp

    def stream(
        self,
        frames: Iterable[Tuple[np.ndarray, Position]],
        rate_hz: float,
        first_id: int = 1,
        codec: Optional[str] = None,
    ) -> int:
        """Send every frame at ``rate_hz``; returns the next unused uniqueId."""
        period = 1.0 / rate_hz
        start = time.perf_counter()
        unique_id = first_id
        for index, (image, position) in enumerate(frames):
            delay = start + index * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.send(image, unique_id, position, codec)
            unique_id += 1
        return unique_id

    def close(self) -> None:
        self._server.close()
