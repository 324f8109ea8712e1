"""Health figures as EPICS scalars: one NTScalar PV for each number an operator archives or alarms on.

``P:Status`` carries everything in one structure, for tools that want one read.
The Archiver Appliance and the alarm server take one scalar per channel, with
its units, display limits and an alarm severity: those are the PVs here. They
are computed from the very snapshot ``P:Status`` carries, on the thread that
publishes it, so the hot path never pays for them. A PV is updated only when
its value or its alarm changed, as an EPICS record with MDEL=0 posts: an
archive keeps changes, not a copy of every status period.

Alarm rules: a loss counter (drops, gaps, overruns, rejections, failed builds)
is MINOR while it rises, i.e. while its rate is above zero, and goes back to no
alarm when it stops; the ring is MINOR from half full and MAJOR from 90 %; the
state is MAJOR when the pipeline failed or the engine manager died and MINOR
whenever the appliance is not serving; a number that is not known (latency
before the first frame, Jetson sensors elsewhere) is INVALID.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

from appliance.ntndarray import TimeStamp
from appliance.pva import ALARM_INVALID, ScalarDisplay, ScalarRecord, Server
from appliance.telemetry import DROP_REASONS

NO_ALARM, MINOR, MAJOR = 0, 1, 2
RING_FILL_MINOR_PCT = 50.0  # falling behind: the ring absorbs a burst, not a rate above what we serve
RING_FILL_MAJOR_PCT = 90.0  # about to drop (ring_full) or hold the IOC's queue (backpressure)

Snapshot = Mapping[str, Any]
Alarm = Tuple[int, str]  # severity, message
AlarmRule = Callable[[Any, Any, Snapshot], Alarm]  # (value, previous value or None, snapshot)


class Reading(NamedTuple):
    value: Any
    severity: int
    message: str

    def same_as(self, other: Optional["Reading"]) -> bool:
        """Equal, NaN included (an unknown value that stays unknown is no change)."""
        if other is None or (self.severity, self.message) != (other.severity, other.message):
            return False
        both_nan = _is_nan(self.value) and _is_nan(other.value)
        return both_nan or self.value == other.value


def _no_alarm(value: Any, previous: Any, snapshot: Snapshot) -> Alarm:
    return NO_ALARM, ""


def _minor_while_rising(value: Any, previous: Any, snapshot: Snapshot) -> Alarm:
    if previous is not None and value > previous:
        return MINOR, "rose by {} since the last update".format(value - previous)
    return NO_ALARM, ""


def _ring_fill_alarm(value: Any, previous: Any, snapshot: Snapshot) -> Alarm:
    if value >= RING_FILL_MAJOR_PCT:
        return MAJOR, "ring {:.0f}% full".format(value)
    if value >= RING_FILL_MINOR_PCT:
        return MINOR, "ring {:.0f}% full".format(value)
    return NO_ALARM, ""


def _state_alarm(value: Any, previous: Any, snapshot: Snapshot) -> Alarm:
    failure = str(snapshot.get("pipeline_failure") or "")
    if failure:
        return MAJOR, "pipeline failed: " + failure.splitlines()[0]
    manager = str(snapshot.get("engine_manager") or "running")
    if manager.startswith("died"):
        return MAJOR, "engine manager " + manager
    return (NO_ALARM, "") if value == "serving" else (MINOR, value)


def _minor_when_false(value: Any, previous: Any, snapshot: Snapshot) -> Alarm:
    return (NO_ALARM, "") if value else (MINOR, "not connected to {}".format(snapshot.get("detector_pv", "")))


class Figure(NamedTuple):
    """One scalar PV: its name after ``P:``, type, display, where its value comes from, its alarm rule."""

    suffix: str
    kind: str  # DOUBLE, LONG, STRING, BOOLEAN
    display: ScalarDisplay
    read: Callable[[Snapshot], Any]
    alarm: AlarmRule = _no_alarm
    unknown: Callable[[Snapshot], str] = lambda snapshot: "no value yet"  # why a NaN is not known

    def reading(self, snapshot: Snapshot, previous: Any) -> Reading:
        value = self.read(snapshot)
        if _is_nan(value):
            return Reading(value, ALARM_INVALID, self.unknown(snapshot))
        severity, message = self.alarm(value, previous, snapshot)
        return Reading(value, severity, message)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _number(key: str) -> Callable[[Snapshot], float]:
    def read(snapshot: Snapshot) -> float:
        value = snapshot.get(key)
        return float("nan") if value is None else float(value)

    return read


def _count(key: str) -> Callable[[Snapshot], int]:
    return lambda snapshot: int(snapshot.get(key) or 0)


def _text(key: str, absent: str = "") -> Callable[[Snapshot], str]:
    return lambda snapshot: str(snapshot.get(key) or absent)


def _latency(key: str) -> Callable[[Snapshot], float]:
    return lambda snapshot: _number(key)(snapshot.get("latency") or {})


def _dropped(reason: str) -> Callable[[Snapshot], int]:
    return lambda snapshot: int((snapshot.get("dropped") or {}).get(reason, 0))


def _ring_fill(capacity: int) -> Callable[[Snapshot], float]:
    return lambda snapshot: 100.0 * int(snapshot.get("queue_depth") or 0) / capacity


def _verdicts(snapshot: Snapshot) -> str:
    """The engine manager's verdicts, newest first, one a line."""
    lines = ["{} {} ({}): {}".format("accepted" if v["accepted"] else "rejected", v["file"], v["sha256"][:12],
                                     v["reason"]) for v in reversed(snapshot.get("engine_verdicts") or [])]
    return "\n".join(lines)


def _no_frames(snapshot: Snapshot) -> str:
    return "no frame published yet"


def _no_jetson(snapshot: Snapshot) -> str:
    return "no Jetson telemetry: {}".format(snapshot.get("jetson_detail") or "jetson-stats not running here")


def figures(ring_capacity: int) -> List[Figure]:
    """Every scalar PV, in the order docs/configuration.md lists them."""
    counters = [
        Figure("Received", "LONG", ScalarDisplay("frames", "frames received from the detector"), _count("received")),
        Figure("Published", "LONG", ScalarDisplay("frames", "results published on Phase"), _count("published")),
        Figure("DroppedTotal", "LONG", ScalarDisplay("frames", "frames received but not published, all reasons"),
               _count("dropped_total"), _minor_while_rising),
    ] + [
        Figure("Dropped:" + reason, "LONG", ScalarDisplay("frames", "frames dropped: " + reason), _dropped(reason),
               _minor_while_rising)
        for reason in DROP_REASONS
    ] + [
        Figure("MissingUpstream", "LONG", ScalarDisplay("frames", "uniqueId gaps: frames the detector never sent us"),
               _count("missing_upstream"), _minor_while_rising),
        Figure("Overruns", "LONG", ScalarDisplay("frames", "updates the detector's server queue discarded for us"),
               _count("upstream_overruns"), _minor_while_rising),
        Figure("Acquisitions", "LONG", ScalarDisplay("", "uniqueId restarts (new scans)"), _count("acquisitions")),
    ]
    flow = [
        Figure("RateIn", "DOUBLE", ScalarDisplay("Hz", "frames received per second"), _number("rate_in_hz")),
        Figure("RateOut", "DOUBLE", ScalarDisplay("Hz", "results published per second"), _number("rate_out_hz")),
        Figure("LatencyP50", "DOUBLE", ScalarDisplay("ms", "arrival to publish, median"), _latency("p50_ms"),
               unknown=_no_frames),
        Figure("LatencyP99", "DOUBLE", ScalarDisplay("ms", "arrival to publish, 99th percentile"), _latency("p99_ms"),
               unknown=_no_frames),
        Figure("QueueDepth", "LONG", ScalarDisplay("frames", "frames waiting in the ring", 0.0, float(ring_capacity)),
               _count("queue_depth")),
        Figure("RingFill", "DOUBLE", ScalarDisplay("%", "ring occupancy", 0.0, 100.0), _ring_fill(ring_capacity),
               _ring_fill_alarm),
    ]
    service = [
        Figure("State", "STRING", ScalarDisplay("", "serving, or what the appliance waits for"), _text("state"),
               _state_alarm),
        Figure("DetectorConnected", "BOOLEAN", ScalarDisplay("", "the detector PV is connected"),
               lambda snapshot: bool(snapshot.get("detector_connected")), _minor_when_false),
        Figure("Uptime", "DOUBLE", ScalarDisplay("s", "seconds since start"), _number("uptime_s")),
    ]
    engine = [
        Figure("EngineName", "STRING", ScalarDisplay("", "serving engine file"), _text("engine_name")),
        Figure("EngineSha256", "STRING", ScalarDisplay("", "serving engine file's sha256"), _text("engine_sha256")),
        Figure("EngineBackend", "STRING", ScalarDisplay("", "tensorrt or onnxruntime"), _text("engine_backend")),
        Figure("EngineSwaps", "LONG", ScalarDisplay("", "engines swapped in since start"), _count("engine_swaps")),
        Figure("EngineRejections", "LONG", ScalarDisplay("", "engine files refused since start"),
               _count("engine_rejections"), _minor_while_rising),
        Figure("LastRejection", "STRING", ScalarDisplay("", "the latest refused file and why"), _text("last_rejection")),
        Figure("Verdicts", "STRING", ScalarDisplay("", "the engine manager's verdicts, newest first"), _verdicts),
        Figure("BuildState", "STRING", ScalarDisplay("", "background TensorRT build: idle, building ..., or off"),
               _text("engine_build", "off")),
        Figure("BuildFailures", "LONG", ScalarDisplay("", "TensorRT builds that failed since start"),
               _count("engine_build_failures"), _minor_while_rising),
    ]
    jetson = [
        Figure("GpuLoad", "DOUBLE", ScalarDisplay("%", "Jetson GPU load", 0.0, 100.0), _number("gpu_load_pct"),
               unknown=_no_jetson),
        Figure("GpuTemp", "DOUBLE", ScalarDisplay("C", "Jetson GPU temperature", 0.0, 100.0), _number("temp_gpu_c"),
               unknown=_no_jetson),
        Figure("CpuTemp", "DOUBLE", ScalarDisplay("C", "Jetson CPU temperature", 0.0, 100.0), _number("temp_cpu_c"),
               unknown=_no_jetson),
        Figure("Power", "DOUBLE", ScalarDisplay("W", "Jetson total board power"), _number("power_total_w"),
               unknown=_no_jetson),
    ]
    return counters + flow + service + engine + jetson


class ScalarRecords:
    """The scalar PVs of one appliance; :meth:`publish` runs on the status thread (and at start and stop)."""

    def __init__(self, server: Server, prefix: str, ring_capacity: int) -> None:
        self._figures = figures(ring_capacity)
        self._records: Dict[str, ScalarRecord] = {
            figure.suffix: server.add_scalar("{}:{}".format(prefix, figure.suffix), figure.kind, figure.display)
            for figure in self._figures
        }
        self._sent: Dict[str, Reading] = {}

    def publish(self, snapshot: Snapshot, stamp: TimeStamp) -> None:
        """Update each PV whose value or alarm differs from what it holds, all with the snapshot's time."""
        for figure in self._figures:
            sent = self._sent.get(figure.suffix)
            reading = figure.reading(snapshot, sent.value if sent is not None else None)
            if not reading.same_as(sent):
                self._records[figure.suffix].publish(reading.value, reading.severity, reading.message, stamp)
                self._sent[figure.suffix] = reading
