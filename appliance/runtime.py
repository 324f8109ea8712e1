"""The running appliance: every stage wired together, started and stopped in order.

Start order is output first (our PV server, so results have somewhere to go),
then the pipeline, then the detector monitor; stop is the reverse, so a frame
that was received is always published or counted before the process exits.
Process lifecycle (signals, systemd) is :mod:`appliance.service`'s business.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from appliance.config import Config, DistributorConfig, PublishConfig, load_config
from appliance.cuda import device_info
from appliance.engines.autobuild import BuildSettings, EngineBuilds, default_cache_directory
from appliance.engines.base import Engine
from appliance.engines.manifest import AMPLITUDE, PHASE
from appliance.engines.tensorrt import choose_backend, import_tensorrt
from appliance.hotswap import EngineManager, StreamSpec, validate
from appliance.ingest import Ingest
from appliance.mosaic import Mosaic, make_window
from appliance.ntndarray import FrameMeta, now_stamp
from appliance.pipeline import Pipeline
from appliance.positions import PositionTransform
from appliance.pva import CommandRecord, FrameSource, ImageRecord, Server, StatusRecord, access_rules
from appliance.ring import FrameRing, HostBuffer
from appliance.scalars import ScalarRecords
from appliance.statefile import PublishedRecord, restart_gap, state_directory
from appliance.telemetry import Counters, Telemetry, status_line

log = logging.getLogger(__name__)

# After the final P:Status, how long the server stays up for monitors to receive it.
FINAL_STATUS_LINGER_S = 0.5


class Appliance:
    def __init__(self, config: Config, config_path: Optional[str] = None, pinned_ring: Optional[bool] = None) -> None:
        """``pinned_ring``: None decides by backend; False forces pageable memory (the naive baseline of benchmarks)."""
        self.config = config
        self.config_path = config_path
        self._pinned_ring = pinned_ring
        self._backend = ""
        self.telemetry = Telemetry(config.publish.latency_window)
        self.telemetry.add_provider(self._status_fields)
        self._server: Optional[Server] = None
        self._images: Dict[str, ImageRecord] = {}
        self._status: Optional[StatusRecord] = None
        self._scalars: Optional[ScalarRecords] = None
        self._ring: Optional[FrameRing] = None
        self._pipeline: Optional[Pipeline] = None
        self._source: Optional[FrameSource] = None
        self._ingest: Optional[Ingest] = None
        self._state = "starting"
        self._stop_status = threading.Event()
        self._status_thread: Optional[threading.Thread] = None
        self._result_listeners: List[Callable[[FrameMeta, Dict[str, np.ndarray]], None]] = []
        self._idle_ticks = 0
        self._latest_status: Dict[str, object] = {"summary": "starting"}
        self._engines: Optional[EngineManager] = None
        self._backend_reason = ""
        self.mosaic: Optional[Mosaic] = None
        self._mosaic_record: Optional[ImageRecord] = None
        self._published_record: Optional[PublishedRecord] = None
        self._control: Optional[CommandRecord] = None
        self._restart_gap: Optional[Dict[str, object]] = None
        self._awaiting_first_result = True

    # -- lifecycle ---------------------------------------------------------------
    def start(self, engine: Optional[Engine] = None) -> None:
        """Serve ``engine``, else the configured or newest good engine file.

        Raises EngineError when a configured engine file cannot serve. Passing an
        engine object (benchmarks, embedding) bypasses the engines directory.
        """
        if engine is None:
            engine = self._initial_engine()
        self._published_record = self._open_published_record()
        publish = self.config.publish
        self._server = Server(access_rules(publish.control_users, publish.control_hosts))
        prefix = publish.prefix
        self._status = self._server.add_status(prefix + ":Status")
        self._scalars = ScalarRecords(self._server, prefix, self.config.pipeline.ring_capacity)
        self._images[PHASE] = self._server.add_image(prefix + ":Phase")
        if publish.control:
            self._control = self._server.add_command(prefix + ":Control", self.command)
        if engine is None:
            self._state = "waiting for an engine in {}".format(self.config.engine.directory)
            log.warning("%s", self._state)
        else:
            self._serve(engine)
        if self._engines is not None:
            self._engines.start()
        self._publish_status()
        self._status_thread = threading.Thread(target=self._status_loop, name="status", daemon=True)
        self._status_thread.start()

    def _open_published_record(self) -> Optional[PublishedRecord]:
        """The record of the last published uniqueId (none without a state directory, or if it cannot be used)."""
        directory = state_directory(self.config.publish.state_directory)
        if directory is None:
            log.info("no state directory (publish.state_directory, STATE_DIRECTORY): a restart cannot report its gap")
            return None
        try:
            record = PublishedRecord(directory)
        except OSError as exc:
            log.error("cannot keep the last published uniqueId in %s: %s", directory, exc.strerror or exc)
            return None
        if record.previous is not None:
            log.info("the previous run last published uniqueId %d", record.previous)
        return record

    def _initial_engine(self) -> Optional[Engine]:
        """The configured file (which must serve), else the newest good one in the engines directory."""
        engine_config = self.config.engine
        self._backend, self._backend_reason = choose_backend(engine_config.backend)
        log.info("backend %s (%s)", self._backend, self._backend_reason)
        if engine_config.path:
            return validate(engine_config.path, engine_config, self.config.pipeline.max_batch, None,
                            in_flight=self.config.pipeline.in_flight)
        self._engines = EngineManager(engine_config, self.config.pipeline.max_batch, self._engine_accepted,
                                      builds=self._engine_builds(), in_flight=self.config.pipeline.in_flight)
        self.telemetry.add_provider(self._engines.status)
        return self._engines.select_initial()

    def _engine_builds(self) -> Optional[EngineBuilds]:
        """Background TensorRT builds of deployed ONNX models, where TensorRT runs and they are wanted."""
        engine_config, pipeline = self.config.engine, self.config.pipeline
        if self._backend != "tensorrt" or engine_config.auto_build == "off":
            return None
        gpu = device_info()
        gpu_model = "{} sm{}{}".format(gpu.name, *gpu.compute_capability)
        settings = BuildSettings(engine_config.auto_build, pipeline.max_batch, pipeline.in_flight,
                                 str(import_tensorrt().__version__), gpu_model)
        directory = engine_config.build_cache or default_cache_directory()
        try:
            return EngineBuilds(directory, settings, niceness=engine_config.build_niceness)
        except OSError as exc:
            log.error("ONNX models will not be built into TensorRT engines: cannot use %s: %s",
                      directory, exc.strerror or exc)
            return None

    def _engine_accepted(self, engine: Engine) -> None:
        """A new engine from the manager: start serving, or swap it in between batches."""
        if self._pipeline is None:
            self._serve(engine)
        else:
            self._add_output_records(engine)
            self._pipeline.swap_engine(engine)

    def _serve(self, engine: Engine) -> None:
        """Build the frame path around ``engine``'s input and start receiving."""
        config = self.config
        self._ring = FrameRing(
            config.pipeline.ring_capacity, engine.io.image_shape, engine.io.input.dtype, self._allocator(engine)
        )
        self._add_output_records(engine)
        self._start_mosaic(engine)
        if self._engines is not None:
            self._engines.stream = StreamSpec(self._ring.frame_shape, self._ring.dtype, self._input_rate_hz)
        self._pipeline = Pipeline(
            config.pipeline, self._ring, engine, self._deliver, self.telemetry,
            on_fault=self._engines.report_fault if self._engines is not None else None,
            fault_limit=config.engine.fault_limit,
        )
        self._pipeline.start()
        self._ingest = Ingest(config, self._ring, self.telemetry)
        distributor = config.detector.distributor
        self._source = FrameSource(config.detector.pv, config.detector.queue_size, self._ingest.on_update,
                                   config.detector.search_interval_s,
                                   distributor.plugin_option() if distributor.enabled else None)
        self._source.start()
        self._state = "serving"
        log.info("serving %s; monitoring %s", engine.describe(), config.detector.pv)

    def _input_rate_hz(self) -> float:
        """The stream's frames/s over the last status period: a new engine slower than that is refused."""
        return float(self._latest_status.get("rate_in_hz") or 0.0)  # type: ignore[arg-type]

    def _add_output_records(self, engine: Engine) -> None:
        """P:Amplitude appears with the first engine that has an amplitude output, and then stays."""
        if AMPLITUDE in engine.io.outputs and AMPLITUDE not in self._images and self._server is not None:
            self._images[AMPLITUDE] = self._server.add_image(self.config.publish.prefix + ":Amplitude")

    def _start_mosaic(self, engine: Engine) -> None:
        settings = self.config.mosaic
        if not settings.enabled or self._server is None:
            return
        manifest = engine.manifest
        pixel_size = settings.pixel_size_m or (manifest.pixel_size_m if manifest else None)
        if pixel_size is None:
            log.warning("no mosaic: neither mosaic.pixel_size_m nor the engine manifest gives the pixel size")
            return
        window = make_window(engine.io.output_image_shape(PHASE), settings.window, settings.window_sigma_px)
        self.mosaic = Mosaic(pixel_size, window, settings.max_pixels, settings.extent_m)
        self._mosaic_record = self._server.add_image(self.config.publish.prefix + ":Mosaic")
        to_metres = PositionTransform(self.config.detector.positions)
        mosaic = self.mosaic

        def stitch(meta: FrameMeta, images: Dict[str, np.ndarray]) -> None:
            problem = mosaic.add(images[PHASE], to_metres(meta.position), meta.unique_id)
            if problem is not None:
                self.telemetry.note_error(problem)

        self.add_result_listener(stitch)

    def command(self, text: str) -> str:
        """P:Control: ``reset`` starts a new mosaic, ``rescan`` looks at the engines directory again."""
        if text == "reset":
            if self.mosaic is not None:
                self.mosaic.reset()
            return "mosaic reset"
        if text == "rescan":
            self.rescan_engines()
            return "rescanning engines"
        raise ValueError("unknown command {!r}; expected reset or rescan".format(text))

    def stop(self, timeout_s: float) -> bool:
        """Stop receiving, publish everything already received, release everything."""
        self._state = "stopping"
        if self._engines is not None:
            self._engines.stop()
        if self._source is not None:
            self._source.stop()
        drained = self._pipeline.stop(timeout_s) if self._pipeline is not None else True
        if not drained:
            log.error("drain did not finish within %.1f s; %d frames left", timeout_s, self.queue_depth())
        self._stop_status.set()
        if self._status_thread is not None:
            self._status_thread.join()
        self._state = "stopped" if drained else "stopped, drain timed out"
        self._publish_status()
        self._publish_mosaic()
        if self._published_record is not None:
            self._published_record.flush()  # closed with the process: a timed-out drain may still publish
        if self._server is not None:
            time.sleep(FINAL_STATUS_LINGER_S)  # pvapy cannot tell when an update has gone out to its monitors
            self._server.close()
        if self._ring is not None and drained:
            self._ring.close()
        return drained

    def reload(self) -> None:
        """Re-read the config file (only to report what needs a restart) and rescan engines."""
        if self.config_path:
            try:
                fresh = load_config(self.config_path)
            except (OSError, ValueError) as exc:
                log.error("reload: config not reloaded, keeping the running one: %s", exc)
            else:
                if fresh != self.config:
                    log.warning("reload: %s changed; the new settings apply after a restart", self.config_path)
        self.rescan_engines()

    def rescan_engines(self) -> None:
        """Look at the engines directory again (reload, or the P:Control command ``rescan``)."""
        if self._engines is not None:
            self._engines.rescan()

    # -- queries -------------------------------------------------------------------
    def progress(self) -> int:
        """Grows while the pipeline thread loops (or while waiting for an engine, nothing can hang)."""
        if self._pipeline is None:
            self._idle_ticks += 1
            return self._idle_ticks
        return self._pipeline.progress

    def failure(self) -> Optional[str]:
        return self._pipeline.failure() if self._pipeline is not None else None

    def queue_depth(self) -> int:
        return self._ring.depth() if self._ring is not None else 0

    def status_line(self) -> str:
        return str(self.latest_status()["summary"])

    def latest_status(self) -> Dict[str, object]:
        """The snapshot last published on P:Status (taken once per period: rates are per period)."""
        return self._latest_status

    def add_status_fields(self, provider: Callable[[], Dict[str, object]]) -> None:
        self.telemetry.add_provider(provider)

    def add_result_listener(self, listener: Callable[[FrameMeta, Dict[str, np.ndarray]], None]) -> None:
        """Also hand every published result to ``listener`` (pipeline thread; keep it quick)."""
        self._result_listeners.append(listener)

    # -- internals -------------------------------------------------------------------
    def _deliver(self, meta: FrameMeta, images: Dict[str, np.ndarray]) -> None:
        """Publish (a failure here is the frame's drop), then the listeners (a failure there is only theirs)."""
        for role, image in images.items():
            record = self._images.get(role)
            if record is not None:
                record.publish_frame(image, meta)
        if self._published_record is not None:
            if self._awaiting_first_result:
                self._note_first_result(meta.unique_id)
            self._published_record.note(meta.unique_id)
        for listener in self._result_listeners:
            try:
                listener(meta, images)
            except Exception as exc:
                self.telemetry.note_error("result listener failed on uniqueId {}: {}: {}".format(
                    meta.unique_id, type(exc).__name__, exc))
                log.exception("result listener failed on uniqueId %d", meta.unique_id)

    def _note_first_result(self, unique_id: int) -> None:
        """The first publish of this run tells what the previous run's end lost (reported in P:Status)."""
        self._awaiting_first_result = False
        previous = self._published_record.previous if self._published_record is not None else None
        if previous is None:
            return
        self._restart_gap = restart_gap(previous, unique_id)
        log.warning("restart gap: previous run last published uniqueId %d, this one first %d: %s frames lost",
                    previous, unique_id, self._restart_gap["frames_lost"])

    def _allocator(self, engine: Engine) -> Callable[[int], object]:
        """Pinned memory for a GPU engine, and on a TensorRT device from the start: an ONNX model
        served by ONNX Runtime there is replaced by its built engine, which then reads the same ring."""
        pinned = engine.runs_on_gpu or self._backend == "tensorrt"
        if self._pinned_ring is not None:
            pinned = self._pinned_ring
        if pinned:
            from appliance.cuda import PinnedBuffer

            return PinnedBuffer
        return HostBuffer

    def _status_fields(self) -> Dict[str, object]:
        engine = self._pipeline.engine if self._pipeline is not None else None
        if self._source is not None:
            self.telemetry.counters.upstream_overruns = self._source.overruns()
        return {
            "state": self._reported_state(),
            "engine_name": engine.name if engine else "",
            "engine_sha256": engine.sha256 if engine else "",
            "engine_backend": engine.backend if engine else "",
            "backend_choice": self._backend_reason,
            "queue_depth": self.queue_depth(),
            "ring_capacity": self._ring.capacity if self._ring is not None else None,
            "in_flight_cap": (self._pipeline.in_flight_cap or "") if self._pipeline is not None else "",
            "ring_memory": self._ring_memory(),
            "mosaic": dict(self.mosaic.counts, last_outside=self.mosaic.last_outside) if self.mosaic is not None else None,
            "detector_pv": self.config.detector.pv,
            "detector_connected": self._source is not None and self._source.connected(),
            "detector_waiting_s": self._source.waiting_s() if self._source is not None else None,
            "detector_channels_created": self._source.channels_created if self._source is not None else 0,
            "restart_gap": self._restart_gap,
            "distributor": distributor_status(self.config.detector.distributor, self.telemetry.counters),
            "control_access": control_access(self.config.publish),
            "commands_handled": self._control.handled if self._control is not None else 0,
            "last_command": self._control.last_reply if self._control is not None else "",
            "pipeline_failure": self.failure() or "",
        }

    def _reported_state(self) -> str:
        """'serving' only once frames can arrive: until then operators must see what we wait for."""
        if self._state == "serving" and self._source is not None and not self._source.connected():
            return "waiting for {}".format(self._source.pv_name)
        return self._state

    def _ring_memory(self) -> str:
        """pageable, pinned, or pinned and mapped (the GPU reads frames in place: no copy-in at all)."""
        if self._ring is None:
            return ""
        memory = self._ring.memory
        if isinstance(memory, HostBuffer):
            return "pageable"
        return "pinned, mapped" if memory.device_ptr is not None else "pinned"

    def _status_loop(self) -> None:
        """P:Status and P:Mosaic, each at its own period, off the pipeline thread."""
        periods = {self._publish_status: self.config.publish.status_period_s,
                   self._publish_mosaic: self.config.mosaic.publish_period_s}
        due = {task: time.monotonic() + period for task, period in periods.items()}
        while not self._stop_status.wait(max(0.0, min(due.values()) - time.monotonic())):
            for task, when in list(due.items()):
                if time.monotonic() >= when:
                    try:
                        task()
                    except Exception:  # the next period tries again; the service goes on without this one
                        log.exception("publishing %s failed", task.__name__)
                    due[task] = when + periods[task]

    def _publish_mosaic(self) -> None:
        if self.mosaic is not None and self._mosaic_record is not None:
            self._mosaic_record.publish_mosaic(self.mosaic)

    def _publish_status(self) -> None:
        snapshot = self.telemetry.snapshot()
        snapshot["summary"] = status_line(snapshot)
        self._latest_status = snapshot
        if self._scalars is not None:  # first: a client that sees this P:Status finds the scalars as current
            try:
                self._scalars.publish(snapshot, now_stamp())
            except Exception as exc:  # a hiccup of the scalar PVs must not take the service down
                log.warning("scalar PVs publish failed: %s", exc)
        if self._status is not None:
            try:
                self._status.publish(snapshot)
            except Exception as exc:  # nor a status hiccup
                log.warning("status publish failed: %s", exc)


def distributor_status(distributor: DistributorConfig, counters: Counters) -> Optional[Dict[str, object]]:
    """The group this instance shares the detector with, and its share of the ids seen so far
    (its frames over its frames and the peers' ids between them); None without the distributor."""
    if not distributor.enabled:
        return None
    own = counters.received
    spanned = own + counters.peer_ids
    return {"plugin": distributor.plugin, "group": distributor.group, "set": distributor.set,
            "updates": distributor.updates, "peer_ids": counters.peer_ids,
            "share": own / spanned if spanned else None}


def control_access(publish: PublishConfig) -> str:
    """Who may write P:Control, in words for P:Status (pvAccess refuses everyone else's puts)."""
    if not publish.control:
        return "off: no P:Control (publish.control is false)"
    if not publish.control_users and not publish.control_hosts:
        return "any client"
    parts = []
    if publish.control_users:
        parts.append("users " + ", ".join(publish.control_users))
    if publish.control_hosts:
        parts.append("from " + ", ".join(publish.control_hosts))
    return " ".join(parts)
