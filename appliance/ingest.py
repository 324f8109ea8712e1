"""The first stage: a received NTNDArray becomes a frame in the ring, or a counted drop.

Runs on the pvAccess callback thread, which holds the GIL and delays the next
update while it works, so it does only what must happen per frame: decode the
header, check the frame, and write the pixels once into a ring slot (crop, bin
and cast fused into that write). Anything wrong with a frame is counted under a
reason and logged (rate-limited), and the stream goes on.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from appliance.config import Config
from appliance.ntndarray import FrameError, FrameMeta, decode, header
from appliance.preprocess import Preprocessor, frame_mask, load_mask_file
from appliance.ring import FrameRing
from appliance.telemetry import Telemetry

log = logging.getLogger(__name__)

_LOG_INTERVAL_S = 5.0


class Ingest:
    def __init__(self, config: Config, ring: FrameRing, telemetry: Telemetry) -> None:
        self._ring = ring
        self._telemetry = telemetry
        self._counters = telemetry.counters
        self._position_names = (config.detector.positions.x, config.detector.positions.y)
        self._accepted = frozenset(np.dtype(d) for d in config.detector.accept_dtypes)
        self._crop = config.preprocess.crop
        self._bin = config.preprocess.bin
        self._mask = config.preprocess.mask
        self._mask_fill = config.preprocess.mask_fill
        self._mask_file = load_mask_file(self._mask) if isinstance(self._mask, str) else None
        self._patience = (
            config.pipeline.backpressure_timeout_ms / 1e3 if config.pipeline.overflow == "backpressure" else 0.0
        )
        self._preprocessors: Dict[Tuple[int, int], Preprocessor] = {}
        # With the data distributor the server hands the ids between our turns to our peers: a gap is
        # theirs, not a loss (the collector, which sees every id, finds real losses).
        self._gaps_are_peers = config.detector.distributor.enabled
        self._last_id: Optional[int] = None
        self._last_logged: Dict[str, float] = {}

    def on_update(self, pv: Any) -> None:
        """The monitor callback."""
        arrival = time.monotonic()
        try:
            unique_id, field = frame_header = header(pv)
        except FrameError as exc:
            self._counters.received += 1
            self._drop(exc.reason, str(exc))
            return
        if unique_id == 0 and not field:
            return  # a record that was never written: the update every monitor gets on connect
        self._counters.received += 1
        if unique_id == self._last_id:
            self._drop("repeated", "uniqueId {}: received again (a reconnect re-sends the last frame); "
                                   "published once".format(unique_id))
            return
        self._track_id(unique_id)
        try:
            image, meta = decode(pv, self._position_names, self._preprocessor, frame_header)
            self._store(image, meta, arrival)
        except FrameError as exc:
            self._drop(exc.reason, str(exc))

    def _track_id(self, unique_id: int) -> None:
        last = self._last_id
        self._last_id = unique_id
        if last is not None and unique_id > last:
            if self._gaps_are_peers:
                self._counters.peer_ids += unique_id - last - 1
            else:
                self._counters.missing_upstream += unique_id - last - 1
            return
        self._counters.acquisitions += 1
        if last is not None:
            log.info("uniqueId went from %d to %d: new acquisition", last, unique_id)

    def _store(self, image: np.ndarray, meta: FrameMeta, arrival: float) -> None:
        if image.dtype not in self._accepted:
            raise FrameError(
                "dtype",
                "uniqueId {}: pixel type {}; this stream accepts {} (detector.accept_dtypes)".format(
                    meta.unique_id, image.dtype.name, ", ".join(sorted(d.name for d in self._accepted))
                ),
            )
        preprocess = self._preprocessor(image.shape, meta.unique_id)
        index = self._ring.reserve(self._patience)
        if index is None:
            raise FrameError("ring_full", "uniqueId {}: ring full ({} frames)".format(meta.unique_id, self._ring.capacity))
        slot = self._ring.frames[index]
        preprocess(image, slot)
        if image.dtype.kind == "f" or slot.dtype.itemsize < 4:
            if not np.isfinite(slot).all():
                raise FrameError("nonfinite", "uniqueId {}: NaN or Inf in the frame after conversion to {}".format(
                    meta.unique_id, slot.dtype.name))
        self._ring.commit(meta, arrival)

    def _preprocessor(self, shape: Tuple[int, int], unique_id: int) -> Preprocessor:
        preprocess = self._preprocessors.get(shape)
        if preprocess is None:
            try:
                mask = frame_mask(self._mask, shape, self._mask_file)
            except FrameError as exc:
                raise FrameError(exc.reason, "uniqueId {}: {}".format(unique_id, exc)) from exc
            preprocess = Preprocessor(shape, self._crop, self._bin, mask, self._mask_fill)
            if preprocess.output_shape != self._ring.frame_shape:
                raise FrameError(
                    "shape",
                    "uniqueId {}: frame {}x{} preprocessed (crop {}, bin {}) gives {}x{}; the engine takes {}x{}".format(
                        unique_id, shape[0], shape[1], list(self._crop), self._bin,
                        preprocess.output_shape[0], preprocess.output_shape[1],
                        self._ring.frame_shape[0], self._ring.frame_shape[1],
                    ),
                )
            self._preprocessors[shape] = preprocess
        return preprocess

    def _drop(self, reason: str, message: str) -> None:
        self._counters.drop(reason)
        self._telemetry.note_error(message)
        now = time.monotonic()
        if now - self._last_logged.get(reason, -_LOG_INTERVAL_S) >= _LOG_INTERVAL_S:
            self._last_logged[reason] = now
            log.warning("frame dropped (%s): %s [%d so far]", reason, message, self._counters.dropped[reason])
