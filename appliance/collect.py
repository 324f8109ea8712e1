"""Merge several appliances' outputs into one: ``ptychonn-edge collect``.

Appliances that share a detector through the PVA data distributor each publish
their share of the frames. The collector subscribes to every appliance's
``P:Phase`` (and ``P:Amplitude``), republishes each frame once in uniqueId order
(within a bounded reorder window, see :mod:`appliance.reorder`) on its own
prefix, stitches the one mosaic of the scan, and reports on ``P:Status`` what no
appliance published: it is the one place that sees every id, so its missing
list is the true loss. pvapy's own ``pvapy-hpc-collector`` is not the engine
here; docs/deploy.md says why.
"""
from __future__ import annotations

import argparse
import faulthandler
import functools
import logging
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import yaml

from appliance import schema
from appliance.config import MAX_CONFIG_BYTES, MosaicConfig, PositionAttributes, _is_pv_name
from appliance.engines.errors import first_line
from appliance.engines.manifest import AMPLITUDE, PHASE
from appliance.mosaic import Mosaic, make_window
from appliance.ntndarray import FrameError, FrameMeta, decode, header
from appliance.positions import PositionTransform
from appliance.reorder import Released, Reorder
from appliance.schema import check
from appliance.statefile import PublishedRecord, restart_gap, state_directory

log = logging.getLogger(__name__)

DEFAULT_COLLECT_CONFIG_PATH = "/etc/ptychonn-edge/collect.yaml"
ROLES = (PHASE, AMPLITUDE)
_RECORD_SUFFIX = {PHASE: ":Phase", AMPLITUDE: ":Amplitude"}
_MAX_WAIT_S = 0.5  # the merge thread looks at the clock at least this often
_LINGER_S = 0.5  # after the final status, for monitors to receive it


@dataclass(frozen=True)
class ReorderConfig:
    window: int = field(default=256, metadata=check(lambda v: 1 <= v <= 100000, "1..100000 frames"))
    max_wait_s: float = field(default=1.0, metadata=check(lambda v: 0.0 <= v <= 600, "0..600 s"))
    missing_ids_limit: int = field(default=100000, metadata=check(lambda v: 0 <= v <= 10**7, "0..10000000 ids"))
    missing_ranges_shown: int = field(default=200, metadata=check(lambda v: 1 <= v <= 100000, "1..100000 runs"))
    first_id: Optional[int] = field(default=1, metadata=check(lambda v: v >= 0, "an id >= 0, or null"))


@dataclass(frozen=True)
class CollectPublishConfig:
    prefix: str = field(default="PTYCHONN", metadata=check(_is_pv_name, "a PV name prefix"))
    status_period_s: float = field(default=1.0, metadata=check(lambda v: 0.05 <= v <= 3600, "0.05..3600 s"))
    state_directory: Optional[str] = None  # where the last merged uniqueId is kept; default $STATE_DIRECTORY


def _are_prefixes(value: Tuple[str, ...]) -> bool:
    return len(value) > 0 and len(set(value)) == len(value) and all(_is_pv_name(v) for v in value)


@dataclass(frozen=True)
class CollectConfig:
    appliances: Tuple[str, ...] = field(default=(), metadata=check(
        _are_prefixes, "a non-empty list of distinct PV prefixes (each appliance's publish.prefix)"))
    amplitude: bool = True  # also merge P:Amplitude (appliances whose model has no amplitude just never serve it)
    queue_size: int = field(default=1000, metadata=check(lambda v: 1 <= v <= 100000, "1..100000"))
    search_interval_s: float = field(default=0.5, metadata=check(lambda v: 0.1 <= v <= 60, "0.1..60 s"))
    positions: PositionAttributes = field(default_factory=PositionAttributes)
    publish: CollectPublishConfig = field(default_factory=CollectPublishConfig)
    reorder: ReorderConfig = field(default_factory=ReorderConfig)
    mosaic: MosaicConfig = field(default_factory=MosaicConfig)

    def __post_init__(self) -> None:
        if not self.appliances:
            raise ValueError("appliances is required: the publish.prefix of each appliance to merge")
        if self.publish.prefix in self.appliances:
            raise ValueError("publish.prefix {} is also one of the appliances: the collector needs a prefix of its "
                             "own".format(self.publish.prefix))
        if self.mosaic.enabled and self.mosaic.pixel_size_m is None:
            raise ValueError("mosaic.pixel_size_m is required while mosaic.enabled (the collector has no engine "
                             "manifest to read it from)")


def load_collect_config(path: str) -> CollectConfig:
    """Read and validate a collector config; raises SchemaError (or OSError) naming the file."""
    with open(path, "r", encoding="utf-8") as handle:
        text = handle.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
        raise schema.SchemaError(path, ["more than {} characters; a configuration is a few kB".format(MAX_CONFIG_BYTES)])
    return schema.load(CollectConfig, schema.parse_yaml(text, path), path)


class _Instance:
    """What the collector knows of one appliance: its channels and what came from it."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.sources: Dict[str, Any] = {}
        self.frames = 0  # phase frames received
        self.rejected = 0  # updates that were not usable frames
        self.last_id: Optional[int] = None
        self.first_seen = False  # its first phase frame since we started came
        self._sample = (time.monotonic(), 0)
        self.rate_hz = 0.0

    def sample_rate(self, now: float) -> None:
        then, frames = self._sample
        if now - then > 0:
            self.rate_hz = (self.frames - frames) / (now - then)
        self._sample = (now, self.frames)

    def status(self) -> Dict[str, object]:
        phase = self.sources.get(PHASE)
        return {"connected": bool(phase is not None and phase.connected()), "frames": self.frames,
                "rate_hz": self.rate_hz, "last_id": self.last_id, "rejected": self.rejected,
                "overruns": phase.overruns() if phase is not None else 0}


class Collector:
    """Sources on every appliance's outputs, one merge thread, our records."""

    def __init__(self, config: CollectConfig) -> None:
        self.config = config
        self._instances = [_Instance(prefix) for prefix in config.appliances]
        self._arrivals: "queue.Queue[Tuple[int, str, int, np.ndarray, FrameMeta, float]]" = queue.Queue()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._server: Any = None
        self._records: Dict[str, Any] = {}
        self._status_record: Any = None
        self._mosaic_record: Any = None
        self.mosaic: Optional[Mosaic] = None
        self._to_metres = PositionTransform(config.positions)  # the appliances' own detector.positions
        self._published: Optional[PublishedRecord] = None
        self._last_merged: Optional[int] = None
        self._restart_gap: Optional[Dict[str, object]] = None
        self._reorders: Dict[str, Reorder] = {}
        self._state = "starting"
        self._started = time.monotonic()
        self._stale = 0
        self._rate_sample = (self._started, 0)
        self._rate_out_hz = 0.0
        self.progress = 0  # the merge thread's loops (the service's watchdog reads it)
        self.latest_status: Dict[str, object] = {"summary": "starting"}

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        from appliance.pva import FrameSource, Server

        self._published = self._open_published_record()
        if self._published is not None:
            self._last_merged = self._published.previous
        settings = self.config.reorder
        self._reorders = {role: Reorder(settings.window, settings.max_wait_s, settings.missing_ids_limit,
                                        self._last_merged if role == PHASE else None, settings.first_id)
                          for role in ROLES}
        prefix = self.config.publish.prefix
        self._server = Server()  # read-only records: the collector takes no commands
        self._status_record = self._server.add_status(prefix + ":Status")
        self._records[PHASE] = self._server.add_image(prefix + ":Phase")
        if self.config.mosaic.enabled:
            self._mosaic_record = self._server.add_image(prefix + ":Mosaic")
        self._publish_status()
        roles = ROLES if self.config.amplitude else (PHASE,)
        for index, instance in enumerate(self._instances):
            for role in roles:
                source = FrameSource(instance.prefix + _RECORD_SUFFIX[role], self.config.queue_size,
                                     functools.partial(self._arrive, index, role), self.config.search_interval_s)
                instance.sources[role] = source
                source.start()
        self._state = "serving"
        self._thread = threading.Thread(target=self._merge_loop, name="merge", daemon=True)
        self._thread.start()
        log.info("collecting %s into %s", ", ".join(self.config.appliances), prefix)

    def _open_published_record(self) -> Optional[PublishedRecord]:
        directory = state_directory(self.config.publish.state_directory)
        if directory is None:
            log.info("no state directory (publish.state_directory, STATE_DIRECTORY): a restart cannot count "
                     "what it missed")
            return None
        try:
            return PublishedRecord(directory)
        except OSError as exc:
            log.error("cannot keep the last merged uniqueId in %s: %s", directory, exc.strerror or exc)
            return None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop receiving, let out everything held (in order), publish the final status and mosaic."""
        self._state = "stopping"
        for instance in self._instances:
            for source in instance.sources.values():
                source.stop()
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self._state = "stopped"
        self._publish_status()
        self._publish_mosaic()
        if self._published is not None:
            self._published.flush()
        if self._server is not None:
            time.sleep(_LINGER_S)  # pvapy cannot tell when an update has reached its monitors
            self._server.close()

    # -- pvAccess threads --------------------------------------------------------------
    def _arrive(self, index: int, role: str, pv: Any) -> None:
        instance = self._instances[index]
        try:
            unique_id, union_field = frame_header = header(pv)
            if unique_id == 0 and not union_field:
                return  # a record never written (an appliance that has published nothing yet)
            image, meta = decode(pv, (self.config.positions.x, self.config.positions.y), None, frame_header)
        except FrameError as exc:
            instance.rejected += 1
            log.warning("%s%s: update refused: %s", instance.prefix, _RECORD_SUFFIX[role], exc)
            return
        if role == PHASE:
            instance.frames += 1
            instance.last_id = unique_id
        self._arrivals.put((index, role, unique_id, image, meta, time.monotonic()))

    # -- the merge thread --------------------------------------------------------------
    def _merge_loop(self) -> None:
        next_status = time.monotonic()
        next_mosaic = next_status + self.config.mosaic.publish_period_s
        while True:
            self.progress += 1
            now = time.monotonic()
            due = [next_status, next_mosaic] + [d for d in (r.next_deadline() for r in self._reorders.values()) if d]
            try:
                arrival = self._arrivals.get(timeout=max(0.0, min([now + _MAX_WAIT_S] + due) - now))
            except queue.Empty:
                arrival = None
            if arrival is not None:
                self._take(*arrival)
            elif self._stopping.is_set():
                break
            now = time.monotonic()
            for role, reorder in self._reorders.items():
                self._publish(role, reorder.expire(now))
            if now >= next_status:
                self._publish_status()
                next_status = now + self.config.publish.status_period_s
            if now >= next_mosaic:
                self._publish_mosaic()
                next_mosaic = now + self.config.mosaic.publish_period_s
        for role, reorder in self._reorders.items():
            self._publish(role, reorder.flush())

    def _take(self, index: int, role: str, unique_id: int, image: np.ndarray, meta: FrameMeta, arrival: float) -> None:
        instance = self._instances[index]
        if role == PHASE and not instance.first_seen:
            instance.first_seen = True
            if self._last_merged is not None and unique_id <= self._last_merged:
                self._stale += 1  # its record's last frame, merged before our restart
                return
        self._publish(role, self._reorders[role].add(unique_id, (image, meta), arrival))

    def _publish(self, role: str, released: List[Released[Tuple[np.ndarray, FrameMeta]]]) -> None:
        for item in released:
            image, meta = item.item
            record = self._records.get(role)
            if record is None:
                record = self._records[role] = self._server.add_image(self.config.publish.prefix + _RECORD_SUFFIX[role])
            try:
                record.publish_frame(image, meta)
            except Exception as exc:  # the record refused it: counted in the log, the stream goes on
                log.warning("publishing uniqueId %d on %s failed: %s", item.unique_id, record.name, first_line(exc))
            if role == PHASE:
                self._stitch(image, meta, item.late)
                if not item.late:
                    self._note_merged(item.unique_id)

    def _stitch(self, image: np.ndarray, meta: FrameMeta, late: bool) -> None:
        settings = self.config.mosaic
        if not settings.enabled or settings.pixel_size_m is None:
            return
        if self.mosaic is None:
            window = make_window(image.shape, settings.window, settings.window_sigma_px)
            self.mosaic = Mosaic(settings.pixel_size_m, window, settings.max_pixels, settings.extent_m)
        self.mosaic.add(image, self._to_metres(meta.position), meta.unique_id, late=late)

    def _note_merged(self, unique_id: int) -> None:
        if self._published is None:
            return
        if self._restart_gap is None and self._last_merged is not None:
            self._restart_gap = restart_gap(self._last_merged, unique_id)
            log.warning("restart gap: the previous run last merged uniqueId %d, this one first %d: %s frames missed",
                        self._last_merged, unique_id, self._restart_gap["frames_lost"])
        self._published.note(unique_id)

    # -- outputs ---------------------------------------------------------------------
    def snapshot(self) -> Dict[str, object]:
        now = time.monotonic()
        for instance in self._instances:
            instance.sample_rate(now)
        phase = self._reorders.get(PHASE)
        counts = dict(phase.counts) if phase is not None else {}
        then, merged = self._rate_sample
        if now - then > 0:
            self._rate_out_hz = (counts.get("merged", 0) - merged) / (now - then)
        self._rate_sample = (now, counts.get("merged", 0))
        instances = {i.prefix: i.status() for i in self._instances}
        missing = phase.missing_count() if phase is not None else 0
        shown = self.config.reorder.missing_ranges_shown
        ranges = phase.missing_ranges(shown) if phase is not None else []
        connected = all(s["connected"] for s in instances.values())
        data: Dict[str, object] = {
            "role": "collector",
            "state": self._state if self._state != "serving" or connected else "waiting for {}".format(
                ", ".join(p + ":Phase" for p, s in instances.items() if not s["connected"])),
            "detector_connected": connected,
            "appliances": instances,
            "received": sum(i.frames for i in self._instances),
            "published": counts.get("merged", 0),
            "merged": counts.get("merged", 0),
            "missing": missing,
            "missing_upstream": missing,
            "missing_ids": [list(run) for run in ranges],
            "missing_ids_complete": phase is not None and counts.get("missing_unlisted", 0) == 0
            and sum(b - a + 1 for a, b in ranges) == missing,
            "late": counts.get("late", 0),
            "duplicates": counts.get("duplicates", 0),
            "stale": self._stale,
            "reorder_depth": phase.depth if phase is not None else 0,
            "queue_depth": phase.depth if phase is not None else 0,
            "reorder_max_depth": counts.get("max_depth", 0),
            "reorder_window": self.config.reorder.window,
            "acquisitions": counts.get("acquisitions", 0),
            "lost_in_earlier_acquisitions": counts.get("lost_in_earlier_acquisitions", 0),
            "amplitude_merged": self._reorders[AMPLITUDE].counts["merged"] if AMPLITUDE in self._reorders else 0,
            "restart_gap": self._restart_gap,
            "mosaic": dict(self.mosaic.counts) if self.mosaic is not None else None,
            "rate_in_hz": sum(i.rate_hz for i in self._instances),
            "rate_out_hz": self._rate_out_hz,
            "uptime_s": now - self._started,
        }
        data["summary"] = summary_line(data)
        return data

    def _publish_status(self) -> None:
        snapshot = self.snapshot()
        self.latest_status = snapshot
        if self._status_record is not None:
            try:
                self._status_record.publish(snapshot)
            except Exception as exc:  # the next period tries again
                log.warning("status publish failed: %s", exc)

    def _publish_mosaic(self) -> None:
        if self.mosaic is not None and self._mosaic_record is not None:
            self._mosaic_record.publish_mosaic(self.mosaic)


def summary_line(snapshot: Dict[str, object]) -> str:
    """The one line for systemd's STATUS= and the log."""
    state = snapshot["state"]
    prefix = "{}; ".format(state) if state != "serving" else ""
    return prefix + "merged {} from {} appliances, missing {}, late {}, duplicates {}, reorder depth {}".format(
        snapshot["merged"], len(snapshot["appliances"]), snapshot["missing"],  # type: ignore[arg-type]
        snapshot["late"], snapshot["duplicates"], snapshot["reorder_depth"])


# -- the command -------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_COLLECT_CONFIG_PATH, help="the collector's YAML config")
    parser.add_argument("--check", action="store_true", help="print the effective config (or every error) and exit")


def main(args: argparse.Namespace) -> int:
    """Exit codes as ``run``: 0 stopped cleanly, 1 the merge thread died, 2 bad configuration."""
    from appliance.pva import exit_without_teardown
    from appliance.service import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, Notifier, SignalWaiter, configure_logging

    if args.check:
        try:
            config = load_collect_config(args.config)
        except (OSError, ValueError) as exc:
            print(exc, file=sys.stderr)
            return EXIT_CONFIG
        sys.stdout.write(yaml.safe_dump(schema.dump(config), sort_keys=False))
        return EXIT_OK
    if not logging.getLogger().handlers:
        configure_logging()
    faulthandler.enable()  # a crash's stacks reach the journal
    notify = Notifier()
    try:
        config = load_collect_config(args.config)
    except (OSError, ValueError) as exc:
        log.error("cannot load configuration: %s", exc)
        notify("STATUS=bad configuration: " + first_line(exc))
        return EXIT_CONFIG
    signals = SignalWaiter()
    collector = Collector(config)
    try:
        collector.start()
    except Exception as exc:
        log.error("startup failed: %s", exc)
        notify("STATUS=startup failed: " + first_line(exc))
        return EXIT_CONFIG
    notify("READY=1")
    exit_without_teardown(_serve(collector, notify, signals, (EXIT_OK, EXIT_FAILED)))


def _serve(collector: Collector, notify: Any, signals: Any, codes: Tuple[int, int]) -> int:
    """Until SIGTERM/SIGINT: STATUS= each period, the watchdog fed while the merge thread loops."""
    from appliance.service import watchdog_interval_s

    interval = watchdog_interval_s() or 0.0
    period = min(collector.config.publish.status_period_s, interval or _MAX_WAIT_S, 1.0)
    last_progress = -1
    while True:
        if not collector.alive():
            log.error("the merge thread died")
            notify("STATUS=failed: the merge thread died")
            return codes[1]
        notify("STATUS=" + str(collector.latest_status["summary"]))
        if interval and collector.progress != last_progress:
            last_progress = collector.progress
            notify("WATCHDOG=1")
        for number in signals.wait(period):
            if number == signal.SIGHUP:
                log.info("SIGHUP: the collector's settings apply after a restart")
                continue
            notify("STOPPING=1")
            log.info("%s: stopping", signal.Signals(number).name)
            collector.stop()
            return codes[0]
