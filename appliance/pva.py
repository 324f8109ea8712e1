"""EPICS PVAccess through pvapy: the detector monitor (source) and our records (sink).

This is the only module that imports pvapy. Records reuse one PvObject each and
only change fields per update: building a pvData structure per frame costs more
than the frame's whole trip through the pipeline.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, NamedTuple, NoReturn, Optional, Sequence, Tuple

import numpy as np

from appliance import ntndarray
from appliance.compression import compress
from appliance.ntndarray import FrameMeta, TimeStamp, now_stamp

if TYPE_CHECKING:
    from appliance.mosaic import Mosaic

log = logging.getLogger(__name__)


def _pvaccess() -> Any:
    """pvapy, imported when a PVA object is first needed (so CLI help and tests without PVA stay light)."""
    import pvaccess

    return pvaccess


def monitor_request(queue_size: int, distributor: Optional[str] = None) -> str:
    """Ask for every field (the default drops uniqueId, dimension and attribute) and a server-side queue.

    ``distributor`` (``PLUGIN=group:G;...``, see DistributorConfig.plugin_option) selects the server's
    data distributor plugin, which still sends the whole structure: ``field(_[PLUGIN=...])``, the form
    pvapy's hpc consumer uses (pvapy/hpc/dataConsumer.py).
    """
    fields = "_[{}]".format(distributor) if distributor else ""
    return "record[queueSize={}]field({})".format(queue_size, fields)


DEFAULT_SEARCH_INTERVAL_S = 0.5
_SEARCH_FIRST_RETRY_S = 0.225  # pvAccess's ChannelSearchManager: its first retry, then doubling
_SEARCH_LONGEST_GAP_S = 29.0  # where its back-off settles


def name_server_count(environ: Mapping[str, str] = os.environ) -> int:
    """The TCP name servers a pvAccess client with ``environ`` searches (EPICS_PVA_NAME_SERVERS)."""
    return len(environ.get("EPICS_PVA_NAME_SERVERS", "").split())


def channel_life_s(search_interval_s: float, name_servers: int) -> float:
    """How long a channel may search before a fresh one replaces it.

    A search attempt goes to every UDP address at once, but to one TCP name
    server only: pvAccess takes them in turn (the turn carries over from one
    channel to the next), each attempt later than the one before, as above.
    Seen here with 5 name servers: a fresh channel's PV connected after 0 s,
    0.7 s or 3.4 s (0.225 * (1 + 2 + 4 + 8)), by where the turn stood. A
    channel replaced every 0.5 s left the late replies unheard (the collector
    and a viewer in the scale-out demo waited 60 s and 30 s for PVs that were
    served, on a busy machine). With name servers a channel therefore lives
    until it has asked each of them once, and one interval more for the reply.
    """
    if name_servers < 2:
        return search_interval_s
    turn = sum(min(_SEARCH_FIRST_RETRY_S * 2 ** attempt, _SEARCH_LONGEST_GAP_S) for attempt in range(name_servers - 1))
    return turn + search_interval_s


class FrameSource:
    """A monitor on the detector's NTNDArray PV; ``callback`` runs on the pvAccess thread.

    pvAccess searches for an unconnected channel with an exponential back-off
    (ChannelSearchManager: 0.225 s ticks, doubling, settling at one search every
    ~29 s after about a minute); only a beacon from a new server resets it, and
    none did on loopback here (nor do beacons cross subnets or name servers). A
    detector that appeared a minute after us was found up to 30 s late.
    So a connector thread replaces a channel that has not connected within its
    life (:func:`channel_life_s`: ``search_interval_s`` where search is by UDP)
    by a fresh one, whose first search goes out at once: the detector is found
    within about one life of appearing, however long we waited. Channels are
    replaced at most once per life (pvapy has crashed when channels are made and
    dropped at a high rate), and the monitor is started only on a connected channel.
    """

    def __init__(self, pv_name: str, queue_size: int, callback: Callable[[Any], None],
                 search_interval_s: float = DEFAULT_SEARCH_INTERVAL_S, distributor: Optional[str] = None) -> None:
        """``distributor``: the data distributor option (see :func:`monitor_request`), or None for every frame."""
        self.pv_name = pv_name
        self.search_interval_s = search_interval_s
        self.channel_life_s = channel_life_s(search_interval_s, name_server_count())
        self._request = monitor_request(queue_size, distributor)
        self._callback = callback
        self._changed = threading.Condition()
        self._channel: Any = None
        self._generation = 0
        self._connected = False
        self._monitoring = False
        self._live = False
        self.update_is_current_value = False  # see _on_update
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._overruns_of_dropped = 0
        self._waiting_since: Optional[float] = None
        self.channels_created = 0

    def start(self) -> None:
        self._waiting_since = time.monotonic()
        self._thread = threading.Thread(target=self._connect_loop, name="detector-connect", daemon=True)
        self._thread.start()

    def connected(self) -> bool:
        """True once the monitor on a connected channel has delivered its first update."""
        return self._monitoring and self._connected and self._live

    def waiting_s(self) -> Optional[float]:
        """Seconds since we began looking for the PV (or lost it); None while connected."""
        since = self._waiting_since
        return None if since is None or self.connected() else time.monotonic() - since

    def overruns(self) -> int:
        """Updates the server had to discard because its queue for us was full (all channels so far)."""
        with self._changed:
            channel, monitoring, dropped = self._channel, self._monitoring, self._overruns_of_dropped
        if channel is None or not monitoring:
            return dropped
        return dropped + int(channel.getMonitorCounters().get("nOverruns", 0))

    def stop(self) -> None:
        """Stop monitoring; :meth:`overruns` keeps the final count (the last status reports it)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- the connector thread ----------------------------------------------------
    def _connect_loop(self) -> None:
        while not self._stopping:
            self._use_one_channel()

    def _use_one_channel(self) -> None:
        """One channel, from its creation until it is given up; it is destroyed when this returns."""
        channel = self._new_channel()
        if self._wait_for(lambda: self._connected, self.channel_life_s):
            # pvapy 5.6 calls a connection callback from inside monitor() without the GIL, a fatal
            # error: none from here on, the connection is polled instead.
            channel.setConnectionCallback(None)
            channel.monitor(self._on_update, self._request)
            with self._changed:
                self._monitoring = True
            log.info("connected to %s", self.pv_name)
            self._stay_while_connected(channel)
        self._drop(channel)

    def _on_update(self, pv: Any) -> None:
        """The monitor callback. Its first update (the record's current value) shows the server now
        sends us every update: only from then on are we connected (and ready for a scan).

        ``update_is_current_value`` tells the callback which update that is: after a
        reconnect it is the record's value again, perhaps a frame already delivered.
        """
        self.update_is_current_value = not self._live
        self._live = True
        self._callback(pv)

    def _new_channel(self) -> Any:
        """A channel whose connection callback (which issues the connect) reports to this source."""
        with self._changed:
            self._generation += 1
            generation = self._generation
            self._connected = False
            self._live = False
        channel = _pvaccess().Channel(self.pv_name)
        channel.setConnectionCallback(lambda connected: self._on_connection(generation, bool(connected)))
        with self._changed:
            self._channel = channel
            self.channels_created += 1
        return channel

    def _on_connection(self, generation: int, connected: bool) -> None:
        """pvAccess thread (or ours, while a channel is dropped): note the state of the current channel."""
        with self._changed:
            if generation == self._generation:
                self._connected = connected
                self._changed.notify_all()

    def _wait_for(self, condition: Callable[[], bool], timeout_s: Optional[float]) -> bool:
        """Whether ``condition`` held within ``timeout_s``; False at once when stopping."""
        with self._changed:
            self._changed.wait_for(lambda: self._stopping or condition(), timeout_s)
            return not self._stopping and condition()

    def _stay_while_connected(self, channel: Any) -> None:
        """Return on stop, or once ``channel`` has stayed disconnected for a whole interval."""
        lost_at: Optional[float] = None
        while not self._stopped_within(self.search_interval_s):
            connected = bool(channel.isConnected())
            with self._changed:
                self._connected = connected
                if not connected:
                    self._live = False  # live again with the reconnected monitor's first update
            if connected:
                if lost_at is not None:
                    log.info("reconnected to %s", self.pv_name)
                lost_at = None
            elif lost_at is None:
                log.warning("lost %s; searching again", self.pv_name)
                lost_at = self._waiting_since = time.monotonic()
            else:
                return

    def _stopped_within(self, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._stopping, timeout_s)

    def _drop(self, channel: Any) -> None:
        """Stop ``channel``'s monitor, keeping its overrun count; outside the lock (its destruction calls back)."""
        monitoring = self._monitoring
        overruns = int(channel.getMonitorCounters().get("nOverruns", 0)) if monitoring else 0
        with self._changed:
            self._monitoring = False
            self._live = False
            self._channel = None
            self._overruns_of_dropped += overruns
            self._generation += 1  # what the dropped channel reports from now on is of no interest
        if monitoring:
            channel.stopMonitor()


def attributes(values: Mapping[str, Any]) -> Sequence[Dict[str, Any]]:
    """NTAttribute entries for plain values (what an areaDetector attributes file produces)."""
    pvaccess = _pvaccess()
    entries = []
    for name, value in values.items():
        if isinstance(value, float):
            kind = pvaccess.DOUBLE
        elif isinstance(value, bool):
            kind = pvaccess.BOOLEAN
        elif isinstance(value, int):
            kind = pvaccess.LONG
        else:
            kind, value = pvaccess.STRING, str(value)
        entries.append({"name": name, "value": pvaccess.PvObject({"value": kind}, {"value": value})})
    return entries


# Access security for our records: anyone may read; only P:Control takes writes, from the users and
# hosts the config allows. Without it a pvDatabase record accepts any client's put (a fake frame
# reached viewers; a put to P:Status overwrote it). pvAccess applies the rules before a put reaches
# the record: it matches a client's user name as the client reports it and its IP address.
def access_rules(control_users: Sequence[str] = (), control_hosts: Sequence[str] = ()) -> str:
    """The access-security file (EPICS ACF) for our records; with both lists, a listed user on a listed host."""
    groups, members = "", []
    if control_users:
        groups += "UAG(controllers) {{{}}}\n".format(", ".join(control_users))
        members.append("UAG(controllers)")
    if control_hosts:
        groups += "HAG(consoles) {{{}}}\n".format(", ".join(control_hosts))
        members.append("HAG(consoles)")
    who = " {{ {} }}".format(" ".join(members)) if members else ""
    return groups + "ASG(DEFAULT) {\n    RULE(1, READ)\n}\nASG(COMMANDS) {\n    RULE(1, READ)\n    RULE(1, WRITE)" + who + "\n}\n"


_access_rules_loaded: List[str] = []  # the rules this process loaded; pvDatabase keeps one set per process


def _init_access_security(server: Any, rules: str) -> None:
    """Load ``rules`` once per process: they are process-wide in pvDatabase, and reloading them under
    live channels (a test process makes many servers) is nothing it promises to survive."""
    if _access_rules_loaded:
        if _access_rules_loaded[0] != rules:
            raise RuntimeError("this process already serves other access rules: one appliance per process")
        return
    _access_rules_loaded.append(rules)
    with tempfile.NamedTemporaryFile("w", suffix=".acf", delete=False) as handle:
        handle.write(rules)
    try:
        server.initAs(handle.name, "")
    finally:
        os.unlink(handle.name)


class Server:
    """One PvaServer per process, holding this process's records; only command records are writable,
    and those only by whom ``rules`` (see :func:`access_rules`) allows."""

    def __init__(self, rules: Optional[str] = None) -> None:
        self._server = _pvaccess().PvaServer()
        _init_access_security(self._server, rules or access_rules())
        self.names: List[str] = []

    def add_image(self, name: str) -> "ImageRecord":
        self.names.append(name)
        return ImageRecord(self._server, name)

    def add_status(self, name: str) -> "StatusRecord":
        self.names.append(name)
        return StatusRecord(self._server, name)

    def add_scalar(self, name: str, kind: str, display: "ScalarDisplay") -> "ScalarRecord":
        self.names.append(name)
        return ScalarRecord(self._server, name, kind, display)

    def add_command(self, name: str, on_command: Callable[[str], str]) -> "CommandRecord":
        self.names.append(name)
        return CommandRecord(self._server, name, on_command)

    def close(self) -> None:
        for name in self.names:
            self._server.removeRecord(name)
        self.names = []
        self._server.stop()


class ImageRecord:
    """An NTNDArray record.

    A received frame's result goes out on the frame's own structure (its
    ``carrier``, see :class:`~appliance.ntndarray.FrameMeta`): only the pixels,
    the dimensions and the sizes change, and pvapy copies the rest in C++. Images
    made here (the mosaic), and frames whose structure is not the standard
    NTNDArray our record has, are sent from a reused structure field by field.
    """

    def __init__(self, server: Any, name: str) -> None:
        pvaccess = _pvaccess()
        self.name = name
        self._server = server
        self._object = pvaccess.NtNdArray()
        self._shape: Optional[Tuple[int, int]] = None
        self._codec: Optional[str] = None
        self._carriers_fit = True
        server.addRecord(name, pvaccess.NtNdArray())

    def publish(
        self,
        image: np.ndarray,
        unique_id: int,
        timestamp: TimeStamp,
        data_timestamp: TimeStamp,
        frame_attributes: Sequence[Any] = (),
        codec: Optional[str] = None,
    ) -> None:
        pv = self._object
        if codec:
            self._set_compressed(image, codec)
        else:
            if self._codec:
                pv["codec"] = _uncompressed_codec(image.dtype)
                self._codec = None
            _set_pixels(pv, image)
        if self._shape != image.shape:
            pv["dimension"] = ntndarray.dimensions(image.shape[0], image.shape[1])
            self._shape = image.shape
        pv["uniqueId"] = unique_id
        pv["timeStamp"] = ntndarray.timestamp_field(timestamp)
        pv["dataTimeStamp"] = ntndarray.timestamp_field(data_timestamp)
        pv["attribute"] = _with_color_mode(frame_attributes)
        self._server.update(self.name, pv)

    def publish_mosaic(self, mosaic: "Mosaic") -> None:
        """The live mosaic as one image, stamped now, its origin and pixel size as attributes so a
        viewer can place it on the sample; nothing goes out before the first patch lands."""
        picture = mosaic.snapshot()
        if not picture.phase.size:
            return
        stamp = now_stamp()
        self.publish(picture.phase, picture.stitched, stamp, stamp, attributes(
            {"OriginX": picture.origin_m[0], "OriginY": picture.origin_m[1], "PixelSize": picture.pixel_size_m}))

    def publish_frame(self, image: np.ndarray, meta: FrameMeta) -> None:
        """An output image carrying its input frame's identity, times and attributes."""
        if meta.carrier is not None and self._carriers_fit:
            try:
                self._send_on_carrier(image, meta)
                return
            except ValueError as exc:  # pvapy: "structure definitions do not match"
                self._carriers_fit = False
                log.warning("%s: the detector's NTNDArray structure differs from ours (%s); publishing "
                            "field by field from now on (slower)", self.name, exc)
        self.publish(image, meta.unique_id, meta.timestamp, meta.data_timestamp, meta.attributes)

    def _send_on_carrier(self, image: np.ndarray, meta: FrameMeta) -> None:
        carrier = meta.carrier
        _set_pixels(carrier, image)
        if meta.codec:
            carrier["codec"] = _uncompressed_codec(image.dtype)
        if meta.image_shape != image.shape:
            carrier["dimension"] = ntndarray.dimensions(image.shape[0], image.shape[1])
        self._server.update(self.name, carrier)

    def publish_raw(self, pv_object: Any) -> None:
        """Send a hand-built structure as is (to test how receivers treat malformed frames)."""
        self._server.update(self.name, pv_object)

    def _set_compressed(self, image: np.ndarray, codec: str) -> None:
        pvaccess = _pvaccess()
        payload = compress(codec, np.ascontiguousarray(image))
        pv = self._object
        pv["value"] = {"ubyteValue": np.frombuffer(payload, dtype=np.uint8)}
        code = ntndarray.DTYPE_SCALAR_TYPES[image.dtype]
        pv["codec"] = {"name": codec, "parameters": pvaccess.PvObject({"value": pvaccess.INT}, {"value": code})}
        pv["compressedSize"] = len(payload)
        pv["uncompressedSize"] = image.nbytes
        self._codec = codec


def _set_pixels(pv: Any, image: np.ndarray) -> None:
    """Uncompressed pixels, with both sizes set to their byte count as NDPluginPva does."""
    dtype, field = _pixel_field(image.dtype)
    image = image.astype(dtype, copy=False)
    pv["value"] = {field: image.ravel()}
    pv.setLong("compressedSize", image.nbytes)
    pv.setLong("uncompressedSize", image.nbytes)


@functools.lru_cache(maxsize=None)
def _uncompressed_codec(dtype: np.dtype) -> Dict[str, Any]:
    """The codec field of an uncompressed image that may go out on a compressed frame's structure: no
    name, and ``parameters`` the published pixel type (a received frame's type there would be stale)."""
    pvaccess = _pvaccess()
    code = ntndarray.DTYPE_SCALAR_TYPES[ntndarray.published_dtype(dtype)]
    return {"name": "", "parameters": pvaccess.PvObject({"value": pvaccess.INT}, {"value": code})}


def _with_color_mode(frame_attributes: Sequence[Any]) -> List[Any]:
    """The attributes, with ``ColorMode`` mono unless present: areaDetector's viewers read it, and
    NDPluginPva always sends it; our images (the mosaic among them) are monochrome."""
    entries = list(frame_attributes)
    if not any(entry["name"] == "ColorMode" for entry in entries):
        entries.insert(0, _mono_color_mode())
    return entries


@functools.lru_cache(maxsize=None)
def _mono_color_mode() -> Dict[str, Any]:
    """ColorMode 0 as an int32, the type NDPluginPva gives it (its converter reads it back as one)."""
    pvaccess = _pvaccess()
    return {"name": "ColorMode", "value": pvaccess.PvObject({"value": pvaccess.INT}, {"value": 0})}


@functools.lru_cache(maxsize=None)
def _pixel_field(dtype: np.dtype) -> Tuple[np.dtype, str]:
    """The published pixel type and its value-union member (asked per frame, answered once per dtype)."""
    return ntndarray.published_dtype(dtype), ntndarray.union_field(dtype)


# P:Status fields: a typed structure for tools and widgets, plus the whole snapshot as JSON.
_STATUS_NUMBERS = (
    ("received", "LONG"),
    ("published", "LONG"),
    ("dropped_total", "LONG"),
    ("missing_upstream", "LONG"),
    ("peer_ids", "LONG"),
    ("upstream_overruns", "LONG"),
    ("acquisitions", "LONG"),
    ("queue_depth", "LONG"),
    ("engine_swaps", "LONG"),
    ("engine_rejections", "LONG"),
    ("rate_in_hz", "DOUBLE"),
    ("rate_out_hz", "DOUBLE"),
    ("latency_p50_ms", "DOUBLE"),
    ("latency_p99_ms", "DOUBLE"),
    ("latency_max_ms", "DOUBLE"),
    ("uptime_s", "DOUBLE"),
)
_STATUS_FLAGS = ("detector_connected",)
_STATUS_STRINGS = ("state", "engine_name", "engine_sha256", "engine_backend", "last_rejection", "last_command", "summary",
                   "json")


def flatten_status(snapshot: Mapping[str, Any]) -> Dict[str, Any]:
    """The typed P:Status fields of a telemetry snapshot (missing numbers are NaN/0)."""
    latency = snapshot.get("latency") or {}
    values: Dict[str, Any] = {}
    for name, kind in _STATUS_NUMBERS:
        raw = latency.get(name[len("latency_") :]) if name.startswith("latency_") else snapshot.get(name)
        if kind == "LONG":
            values[name] = int(raw or 0)
        else:
            values[name] = float("nan") if raw is None else float(raw)
    for name in _STATUS_FLAGS:
        values[name] = bool(snapshot.get(name))
    for name in _STATUS_STRINGS:
        values[name] = str(snapshot.get(name) or "")
    values["json"] = json.dumps(snapshot, default=str, sort_keys=True)
    return values


class StatusRecord:
    def __init__(self, server: Any, name: str) -> None:
        pvaccess = _pvaccess()
        self.name = name
        self._server = server
        structure = {name: getattr(pvaccess, kind) for name, kind in _STATUS_NUMBERS}
        structure.update({name: pvaccess.BOOLEAN for name in _STATUS_FLAGS})
        structure.update({name: pvaccess.STRING for name in _STATUS_STRINGS})
        self._object = pvaccess.PvObject(structure)
        server.addRecord(name, pvaccess.PvObject(structure))

    def publish(self, snapshot: Mapping[str, Any]) -> None:
        self._object.set(flatten_status(snapshot))
        self._server.update(self.name, self._object)


class ScalarDisplay(NamedTuple):
    """What a display or an archiver shows with a scalar's value (NTScalar ``display``)."""

    units: str
    description: str
    low: float = 0.0  # low == high: no display range (a count, a name)
    high: float = 0.0


# NTScalar alarm.status codes (pvData AlarmStatus) for the severities we set.
_ALARM_STATUS_NONE, _ALARM_STATUS_RECORD, _ALARM_STATUS_UNDEFINED = 0, 3, 6
ALARM_INVALID = 3


class ScalarRecord:
    """An NTScalar record (kind: DOUBLE, LONG, STRING or BOOLEAN), read-only like every output record.

    Until its first update it holds INVALID "no value yet", as an EPICS record that was never processed.
    """

    def __init__(self, server: Any, name: str, kind: str, display: ScalarDisplay) -> None:
        self.name = name
        self._server = server
        self._object = _scalar_object(kind, display)
        server.addRecord(name, _scalar_object(kind, display))
        self.publish(self._object["value"], ALARM_INVALID, "no value yet", (0, 0, 0))

    def publish(self, value: Any, severity: int, message: str, stamp: TimeStamp) -> None:
        """``severity``: 0 none, 1 MINOR, 2 MAJOR, 3 INVALID (the value is not known)."""
        pv = self._object
        pv["value"] = value
        pv["alarm"] = {"severity": severity, "status": _alarm_status(severity), "message": message}
        pv["timeStamp"] = ntndarray.timestamp_field(stamp)
        self._server.update(self.name, pv)


def _scalar_object(kind: str, display: ScalarDisplay) -> Any:
    pvaccess = _pvaccess()
    pv = pvaccess.NtScalar(getattr(pvaccess, kind))
    pv["display"] = {"limitLow": display.low, "limitHigh": display.high, "description": display.description,
                     "format": "", "units": display.units}
    return pv


def _alarm_status(severity: int) -> int:
    if severity == ALARM_INVALID:
        return _ALARM_STATUS_UNDEFINED
    return _ALARM_STATUS_RECORD if severity else _ALARM_STATUS_NONE


class CommandRecord:
    """A string PV operators write commands to (``reset``, ``rescan``).

    pvAccess acknowledges a put before pvapy's callback thread runs the command,
    so a client cannot tell from the put that it was carried out: ``handled``
    and ``last_reply`` (shown on P:Status) say so once it has been.
    """

    def __init__(self, server: Any, name: str, on_command: Callable[[str], str]) -> None:
        pvaccess = _pvaccess()
        self.name = name
        self.handled = 0
        self.last_reply = ""
        self._on_command = on_command
        self._server = server
        server.addRecordWithAs(name, pvaccess.PvObject({"value": pvaccess.STRING}), 0, "COMMANDS", self._written)

    def _written(self, pv: Any) -> None:
        command = str(pv["value"]).strip()
        try:
            reply = self._on_command(command)
        except ValueError as exc:
            reply = "error: {}".format(exc)
        log.info("command %r: %s", command, reply)
        self.last_reply = "{}: {}".format(command, reply)
        self.handled += 1


def exit_without_teardown(code: int) -> NoReturn:
    """End a pvAccess process once its work is done, skipping the interpreter's teardown.

    pvapy 5.6 can crash (SIGSEGV) on the way out: the collector unit, stopped
    cleanly, once ended by signal 11 (1 of 20 runs of the suite on a loaded
    machine), and ``record`` once died after its frame bound. By the time this is
    called everything that must outlive the process (state file, final status,
    logs) is written, so the teardown can only turn a clean stop into a failed unit.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def read_once(pv_name: str, timeout_s: float = 5.0) -> Dict[str, Any]:
    """One get of a PV as a plain dict (for the status command and tools)."""
    channel = _pvaccess().Channel(pv_name)
    channel.setTimeout(timeout_s)
    return channel.get("field()").toDict()


def put_string(pv_name: str, value: str, timeout_s: float = 5.0) -> None:
    channel = _pvaccess().Channel(pv_name)
    channel.setTimeout(timeout_s)
    channel.putString(value)

