"""Jetson telemetry (GPU load, temperatures, power) from jetson-stats, when present.

jetson-stats runs a root service (``jtop.service``, socket ``/run/jtop.sock``)
that clients read; the appliance never needs root for it. On any other machine,
without the package, or while the service is down, the same keys are returned
with ``jetson_available`` false and the reason in ``jetson_detail``: telemetry
is informative and must never stop or slow the appliance. Keys and types are
fixed so ``P:Status`` keeps one structure whatever the board.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)

# A failed connection is retried this often: the jtop service may start after us.
RETRY_PERIOD_S = 60.0

_NAN = float("nan")


def _unavailable(reason: str) -> Dict[str, object]:
    return {
        "jetson_available": False,
        "jetson_detail": reason,
        "gpu_load_pct": _NAN,
        "temp_gpu_c": _NAN,
        "temp_cpu_c": _NAN,
        "power_total_w": _NAN,
    }


def _number(value: Any) -> float:
    """jtop reports offline sensors as strings ('OFF') or -256; both mean unknown."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > -256:
        return float(value)
    return _NAN


def _temperature(stats: Dict[str, Any], sensor: str) -> float:
    """Sensor names differ by board and release ('Temp GPU', 'Temp gpu')."""
    for key, value in stats.items():
        if key.lower() == "temp " + sensor:
            return _number(value)
    return _NAN


def fields_from_stats(stats: Dict[str, Any]) -> Dict[str, object]:
    """Map jtop's ``stats`` dict (percent, degrees C, milliwatts) onto the fixed status keys."""
    return {
        "jetson_available": True,
        "jetson_detail": "jtop",
        "gpu_load_pct": _number(stats.get("GPU")),
        "temp_gpu_c": _temperature(stats, "gpu"),
        "temp_cpu_c": _temperature(stats, "cpu"),
        "power_total_w": _number(stats.get("Power TOT")) / 1000.0,
    }


class _JtopClient:
    """One long-lived jtop connection; jtop's own thread keeps its stats fresh."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jetson: Any = None
        self._reason = "not connected yet"
        self._next_attempt = 0.0

    def read(self) -> Dict[str, object]:
        with self._lock:
            if self._jetson is None and time.monotonic() >= self._next_attempt:
                self._connect()
            if self._jetson is None:
                return _unavailable(self._reason)
            try:
                if not self._jetson.ok(spin=True):
                    raise RuntimeError("connection to jtop.service closed")
                return fields_from_stats(self._jetson.stats)
            except Exception as exc:  # jtop raises its own and builtin errors alike
                self._drop("jtop.service lost: {}".format(exc))
                return _unavailable(self._reason)

    def _connect(self) -> None:
        self._next_attempt = time.monotonic() + RETRY_PERIOD_S
        try:
            from jtop import jtop
        except ImportError:
            self._reason = "jetson-stats not installed"
            self._next_attempt = math.inf  # installing it needs a restart anyway
            return
        try:
            jetson = jtop()
            jetson.start()
        except Exception as exc:
            self._reason = "jtop.service unavailable: {}".format(" ".join(str(exc).split()))
            log.info("no Jetson telemetry: %s", self._reason)
            return
        self._jetson = jetson
        log.info("Jetson telemetry from jtop.service")

    def _drop(self, reason: str) -> None:
        log.warning("no Jetson telemetry: %s", reason)
        jetson, self._jetson, self._reason = self._jetson, None, reason
        try:
            jetson.close()
        except Exception:  # the connection is already gone; closing is best effort
            pass


_client: Optional[_JtopClient] = None
_client_lock = threading.Lock()


def jetson_status() -> Dict[str, object]:
    """Current telemetry with fixed keys; never raises."""
    global _client
    try:
        with _client_lock:
            if _client is None:
                _client = _JtopClient()
        return _client.read()
    except Exception as exc:  # telemetry must never take the appliance down
        return _unavailable("telemetry error: {}".format(exc))


def summary(fields: Dict[str, object]) -> str:
    """A short STATUS= fragment, empty when there is nothing to say."""
    if not fields.get("jetson_available"):
        return ""
    parts = []
    for key, fmt in (("gpu_load_pct", "gpu {:.0f}%"), ("temp_gpu_c", "{:.0f}C"), ("power_total_w", "{:.1f}W")):
        value = fields.get(key)
        if isinstance(value, float) and not math.isnan(value):
            parts.append(fmt.format(value))
    return " ".join(parts)
