"""Counters, rates and latency percentiles: the facts behind P:Status and STATUS=.

Each counter has one writing thread (ingest writes what it sees, the pipeline
what it publishes), so the hot paths never take a lock; the status reader takes
a slightly racy but self-consistent-enough snapshot and derives rates from the
change since its previous snapshot.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

# Why a received frame was not published. Every frame is either published or counted here.
DROP_REASONS = (
    "ring_full",  # no free ring slot within the overflow policy's patience
    "empty",  # the value union carried no data
    "codec",  # unknown codec or missing codec library / parameters
    "corrupt",  # compressed payload did not decode to the announced size
    "size",  # element count does not match the dimensions
    "shape",  # image shape does not map onto the engine's input
    "dtype",  # pixel type not accepted for this stream
    "nonfinite",  # NaN or Inf after conversion
    "engine",  # inference failed for the frame's batch
    "no_engine",  # no engine could serve when the frame arrived
    "not_ntndarray",  # the update has no int uniqueId and value union (a scalar, a string, another structure)
    "repeated",  # the uniqueId just received came again (a reconnect re-sends the last frame)
    "publish",  # the result could not be published (the output record refused it)
)


# Latency figures of frames published longer ago than this describe a scan that has ended, not now.
LATENCY_IDLE_S = 10.0


class LatencyWindow:
    """The last N arrival-to-publish latencies, in seconds, in a fixed array."""

    def __init__(self, size: int) -> None:
        self._values = np.zeros(size, dtype=np.float64)
        self._count = 0
        self._last_added = 0.0

    def add(self, seconds: float, now: float) -> None:
        """One frame's latency, published at ``now`` (time.monotonic(): the caller has just read it)."""
        self._values[self._count % self._values.size] = seconds
        self._count += 1
        self._last_added = now

    def percentiles(self) -> Dict[str, Optional[float]]:
        """p50, p99 and max over the window; none while nothing was published for LATENCY_IDLE_S, so that
        an idle appliance does not keep showing the last scan's figures as if they were current."""
        filled = self._values[: min(self._count, self._values.size)].copy()
        if filled.size == 0 or time.monotonic() - self._last_added > LATENCY_IDLE_S:
            return {"p50_ms": None, "p99_ms": None, "max_ms": None}
        p50, p99 = np.percentile(filled, [50, 99])
        return {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "max_ms": float(filled.max()) * 1e3}


@dataclass
class Counters:
    received: int = 0
    published: int = 0
    missing_upstream: int = 0  # gaps in uniqueId
    peer_ids: int = 0  # gaps in uniqueId that the data distributor handed to the group's other clients
    acquisitions: int = 0  # uniqueId restarts (a new scan or an IOC restart)
    batches: int = 0
    upstream_overruns: int = 0  # the PVA server queue overflowed (monitor counters)
    dropped: Dict[str, int] = field(default_factory=lambda: {reason: 0 for reason in DROP_REASONS})

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] += count

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class Telemetry:
    def __init__(self, latency_window: int) -> None:
        self.counters = Counters()
        self.latency = LatencyWindow(latency_window)
        self.started = time.monotonic()
        self.recent_errors: Deque[str] = collections.deque(maxlen=10)
        self._last_sample = (self.started, 0, 0)
        self._rates = (0.0, 0.0)
        self._lock = threading.Lock()
        self._providers: List[Callable[[], Dict[str, object]]] = []

    def note_error(self, message: str) -> None:
        self.recent_errors.append(message)

    def add_provider(self, provider: Callable[[], Dict[str, object]]) -> None:
        """Extra status fields (engine, telemetry of the device) computed at snapshot time."""
        self._providers.append(provider)

    def rates(self) -> Tuple[float, float]:
        """Frames/s in and out since the previous call (at most one sampler: the status loop)."""
        with self._lock:
            now = time.monotonic()
            then, received, published = self._last_sample
            c = self.counters
            if now - then >= 0.2:
                self._rates = ((c.received - received) / (now - then), (c.published - published) / (now - then))
                self._last_sample = (now, c.received, c.published)
            return self._rates

    def snapshot(self) -> Dict[str, object]:
        c = self.counters
        rate_in, rate_out = self.rates()
        data: Dict[str, object] = {
            "received": c.received,
            "published": c.published,
            "dropped": dict(c.dropped),
            "dropped_total": c.dropped_total,
            "missing_upstream": c.missing_upstream,
            "peer_ids": c.peer_ids,
            "upstream_overruns": c.upstream_overruns,
            "acquisitions": c.acquisitions,
            "batches": c.batches,
            "rate_in_hz": rate_in,
            "rate_out_hz": rate_out,
            "latency": self.latency.percentiles(),
            "uptime_s": time.monotonic() - self.started,
            "recent_errors": list(self.recent_errors),
        }
        for provider in self._providers:
            data.update(provider())
        return data


def status_line(snapshot: Dict[str, object]) -> str:
    """The one-line summary for systemd's STATUS= and the log."""
    latency = snapshot["latency"]
    p99 = latency.get("p99_ms") if isinstance(latency, dict) else None
    state = snapshot.get("state")
    prefix = "{}; ".format(state) if state and state != "serving" else ""
    build = snapshot.get("engine_build")
    suffix = "; {}".format(build) if build and build != "idle" else ""  # minutes on a Jetson: say so
    mosaic = snapshot.get("mosaic")
    if isinstance(mosaic, dict) and mosaic.get("outside"):  # wrong position units land every point there
        suffix += "; {} patches outside the mosaic".format(mosaic["outside"])
    return prefix + "in {:.0f} Hz, out {:.0f} Hz, p99 {}, published {}, dropped {}, missing {}{}, engine {}{}".format(
        snapshot["rate_in_hz"],
        snapshot["rate_out_hz"],
        "{:.1f} ms".format(p99) if p99 is not None else "-",
        snapshot["published"],
        snapshot["dropped_total"],
        snapshot["missing_upstream"],
        "" if restart_loss(snapshot) is None else ", lost at restart {}".format(restart_loss(snapshot)),
        snapshot.get("engine_name") or "none",
        suffix,
    )


def restart_loss(snapshot: Dict[str, object]) -> Optional[int]:
    """Frames the previous run never published (a crash, kill -9): not in this run's ``missing``
    (gaps this run saw), so said beside it; None after a first start or a new acquisition."""
    gap = snapshot.get("restart_gap")
    return gap.get("frames_lost") if isinstance(gap, dict) else None
