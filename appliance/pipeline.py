"""The hot loop: batch frames from the ring, run them in flight, publish results in order.

Batching adapts to the load: a backlog goes out in full batches; a trickle goes
out after at most ``max_wait_ms`` so the last frames of a scan never wait for
frames that will not come. Engine swaps happen between batches: batches in
flight finish on the engine they started with, which is closed after its last
batch completes.

While a batch is in flight the loop never sleeps longer than the slot's poll
interval, so a finished batch is published at once, whether or not another frame
arrives. Batches complete, succeed or fail in the order they were taken, as the
ring releases its slots only in that order.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Callable, Deque, Dict, List, Optional

import numpy as np

from appliance.config import PipelineConfig
from appliance.engines.base import Engine
from appliance.inflight import CpuSlot, InflightSlot
from appliance.ntndarray import FrameMeta
from appliance.ring import Batch, FrameRing
from appliance.telemetry import Telemetry

log = logging.getLogger(__name__)

ResultSink = Callable[[FrameMeta, Dict[str, np.ndarray]], None]
FaultHandler = Callable[[Engine, str], None]

_IDLE_TICK_S = 0.25  # the loop reports progress at least this often when idle
HANG_HOOK_ENV = "PTYCHONN_EDGE_TEST_HANG_FILE"


def make_slots(engine: Engine, ring: FrameRing, count: int) -> List[InflightSlot]:
    """Slots suited to ``engine``: CUDA slots for GPU engines, one CPU slot otherwise.

    A CPU engine runs synchronously, so more than one CPU slot would never overlap.
    GPU slots are capped at :func:`slot_limit`: a slot beyond what the engine can
    run at once would fail every batch it is given.
    """
    if engine.runs_on_gpu:
        from appliance.gpu_inflight import CudaSlot

        return [CudaSlot(engine, ring) for _ in range(slot_limit(engine, count))]
    return [CpuSlot()]


def slot_limit(engine: Engine, count: int) -> int:
    """``count`` (pipeline.in_flight), or what the engine was loaded to run at once: fewer where a
    dynamic-batch engine has fewer profiles, more where DLA cores serve beside the GPU."""
    cap = engine.max_in_flight
    return count if cap is None else max(1, cap)


class _FailedLaunch(InflightSlot):
    """A batch whose launch raised: it waits in the in-flight FIFO, behind the batches launched
    before it, and fails when its turn comes, so the ring gets its slots back in order."""

    def __init__(self, engine: Engine, batch: Batch, error: Exception) -> None:
        super().__init__()
        self.engine, self.batch = engine, batch
        self._error = error

    def launch(self, engine: Engine, batch: Batch) -> None:
        raise AssertionError("a failed launch is not relaunched")

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        """Nothing runs: the launch failed."""

    def outputs(self) -> Dict[str, np.ndarray]:
        raise self._error


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        ring: FrameRing,
        engine: Optional[Engine],
        sink: ResultSink,
        telemetry: Telemetry,
        on_fault: Optional[FaultHandler] = None,
        fault_limit: int = 3,
    ) -> None:
        self._config = config
        self._on_fault = on_fault
        self._fault_limit = fault_limit
        self._faults_in_a_row = 0
        self._ring = ring
        self._sink = sink
        self._telemetry = telemetry
        self._counters = telemetry.counters
        self._engine: Optional[Engine] = None
        self._slots: List[InflightSlot] = []
        self._inflight: Deque[InflightSlot] = collections.deque()
        self._pending_engine: Optional[Engine] = None
        self._retiring: List[Engine] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[str] = None
        self._hang_file = os.environ.get(HANG_HOOK_ENV)
        self.progress = 0
        self.in_flight_cap: Optional[str] = None  # why fewer slots than pipeline.in_flight serve the engine
        if engine is not None:
            self._install(engine)

    # -- control (other threads) ----------------------------------------------
    @property
    def engine(self) -> Optional[Engine]:
        return self._engine

    def swap_engine(self, engine: Engine) -> None:
        """Serve ``engine`` from the next batch on."""
        with self._lock:
            if self._pending_engine is not None:
                self._pending_engine.close()
            self._pending_engine = engine
        self._ring.wake()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Finish every frame already received, then stop; True if it finished in time."""
        self._stopping.set()
        self._ring.wake()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def failure(self) -> Optional[str]:
        return self._failure

    # -- the loop (pipeline thread) -------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self.progress += 1
                self._wait_while_hang_hook()
                self._take_pending_engine()
                self._complete_finished()
                if self._stopping.is_set() and self._ring.waiting() == 0 and not self._inflight:
                    break
                if self._engine is None:
                    self._drop_without_engine()
                    continue
                slot = self._free_slot()
                if slot is None:
                    self._complete(self._inflight.popleft(), block=True)
                    continue
                batch = self._next_batch(self._batch_limit(self._engine))
                if batch is not None:
                    self._launch(slot, batch)
            self._close_engines()
        except Exception as exc:  # the service must learn of it and restart us
            self._failure = "pipeline thread died: {}: {}".format(type(exc).__name__, exc)
            log.exception("pipeline thread died")

    def _wait_while_hang_hook(self) -> None:
        """Test hook: a stuck pipeline, for proving the watchdog restarts the service."""
        while self._hang_file and os.path.exists(self._hang_file):
            time.sleep(0.05)

    def _batch_limit(self, engine: Engine) -> int:
        spec = engine.io.batch
        return spec.size if spec.fixed else min(spec.size, self._config.max_batch)

    def _next_batch(self, limit: int) -> Optional[Batch]:
        """A full batch at once, or whatever waits once the oldest frame has waited max_wait."""
        ring = self._ring
        if ring.waiting() >= limit:
            return ring.take(limit)
        oldest = ring.oldest_arrival()
        look_again = self._next_look()
        if oldest is None:
            ring.wait_for_frames(1, look_again)
            return None
        deadline = oldest + self._config.max_wait_ms / 1e3
        if self._stopping.is_set():
            deadline = time.monotonic()
        if ring.wait_for_frames(limit, min(deadline, look_again)) >= limit:
            return ring.take(limit)
        if time.monotonic() >= deadline:
            return ring.take(limit)
        return None

    def _next_look(self) -> float:
        """When the loop must look up from waiting for frames: at the oldest in-flight batch's next
        completion check, or at the idle tick when nothing is in flight."""
        pause = self._inflight[0].poll_s if self._inflight else _IDLE_TICK_S
        return time.monotonic() + pause

    def _free_slot(self) -> Optional[InflightSlot]:
        """A slot for the current engine with no batch in flight, or None when all are busy."""
        engine = self._engine
        return next((s for s in self._slots if s not in self._inflight and s.engine in (None, engine)), None)

    def _launch(self, slot: InflightSlot, batch: Batch) -> None:
        engine = self._engine
        assert engine is not None
        try:
            slot.launch(engine, batch)
        except Exception as exc:
            self._inflight.append(_FailedLaunch(engine, batch, exc))
            return
        self._counters.batches += 1
        self._inflight.append(slot)

    def _complete_finished(self) -> None:
        while self._inflight and self._inflight[0].done():
            self._complete(self._inflight.popleft(), block=False)

    def _complete(self, slot: InflightSlot, block: bool) -> None:
        batch = slot.batch
        assert batch is not None and slot.engine is not None
        try:
            if block:
                slot.wait()
            outputs = slot.outputs()
        except Exception as exc:
            self._fail_batch(slot.engine, batch, "{}: {}".format(type(exc).__name__, exc))
            return
        finite = np.ones(batch.size, dtype=bool)
        for images in outputs.values():
            finite &= np.isfinite(images).all(axis=tuple(range(1, images.ndim)))
        for index, meta in enumerate(batch.metas):
            if finite[index]:
                self._publish(meta, {role: images[index] for role, images in outputs.items()}, batch.arrivals[index])
        bad = batch.size - int(finite.sum())
        if bad:
            self._counters.drop("engine", bad)
            self._note_fault(slot.engine, batch, "{} of {} outputs are NaN or Inf".format(bad, batch.size),
                             counts=2 * bad > batch.size)
        else:
            self._faults_in_a_row = 0
        self._ring.release(batch)
        self._retire_unused_engines()

    def _publish(self, meta: FrameMeta, images: Dict[str, np.ndarray], arrival: float) -> None:
        """Hand one result to the sink; a result the sink refuses is a counted drop, never the thread's end."""
        try:
            self._sink(meta, images)
        except Exception as exc:
            self._counters.drop("publish")
            message = "publishing uniqueId {} failed: {}: {}".format(meta.unique_id, type(exc).__name__, exc)
            self._telemetry.note_error(message)
            if self._counters.dropped["publish"] == 1 or self._counters.dropped["publish"] % 1000 == 0:
                log.error("%s [%d so far]", message, self._counters.dropped["publish"])
            return
        self._counters.published += 1
        now = time.monotonic()
        self._telemetry.latency.add(now - arrival, now)

    def _fail_batch(self, engine: Engine, batch: Batch, error: str) -> None:
        self._counters.drop("engine", batch.size)
        self._note_fault(engine, batch, error, counts=True)
        self._ring.release(batch)

    def _note_fault(self, engine: Engine, batch: Batch, error: str, counts: bool) -> None:
        """Log a bad batch; after fault_limit bad batches in a row, report the engine as failing."""
        message = "inference of {} frames (uniqueId {}..{}) on {}: {}".format(
            batch.size, batch.metas[0].unique_id, batch.metas[-1].unique_id, engine.name, error
        )
        log.error("%s", message)
        self._telemetry.note_error(message)
        if not counts or engine is not self._engine:
            return
        self._faults_in_a_row += 1
        if self._faults_in_a_row >= self._fault_limit and self._on_fault is not None:
            self._faults_in_a_row = 0
            self._on_fault(engine, "{} bad batches in a row, last: {}".format(self._fault_limit, error))

    def _drop_without_engine(self) -> None:
        """No engine yet: received frames are counted as dropped, not left to fill the ring."""
        batch = self._ring.take(self._ring.capacity)
        if batch is None:
            self._ring.wait_for_frames(1, time.monotonic() + _IDLE_TICK_S)
            return
        self._counters.drop("no_engine", batch.size)
        self._ring.release(batch)

    # -- engines ----------------------------------------------------------------
    def _take_pending_engine(self) -> None:
        with self._lock:
            engine, self._pending_engine = self._pending_engine, None
        if engine is not None:
            if self._engine is not None:
                self._retiring.append(self._engine)
            self._install(engine)
            log.info("now serving %s", engine.describe())

    def _install(self, engine: Engine) -> None:
        self._engine = engine
        self._faults_in_a_row = 0
        busy = [slot for slot in self._slots if slot in self._inflight]
        for slot in self._slots:
            if slot not in busy:
                slot.close()
        self._slots = busy + make_slots(engine, self._ring, self._config.in_flight)
        self._note_in_flight_cap(engine)

    def _note_in_flight_cap(self, engine: Engine) -> None:
        """Say (log, status) when the engine runs fewer batches at once than pipeline.in_flight asks."""
        wanted = self._config.in_flight
        allowed = slot_limit(engine, wanted)
        self.in_flight_cap = None
        if engine.runs_on_gpu and allowed < wanted:
            self.in_flight_cap = "{} runs at most {} batches at once: pipeline.in_flight {} capped to {}".format(
                engine.name, engine.max_in_flight, wanted, allowed)
            log.warning("%s", self.in_flight_cap)
        elif engine.runs_on_gpu and allowed > wanted:
            log.info("%s runs %d batches at once (pipeline.in_flight %d and its DLA cores)", engine.name, allowed, wanted)

    def _retire_unused_engines(self) -> None:
        busy = {id(slot.engine) for slot in self._inflight}
        for engine in [e for e in self._retiring if id(e) not in busy]:
            self._retiring.remove(engine)
            engine.close()
        keep = [s for s in self._slots if s in self._inflight or s.engine in (None, self._engine)]
        for slot in self._slots:
            if slot not in keep:
                slot.close()
        self._slots = keep

    def _close_engines(self) -> None:
        for slot in self._slots:
            slot.close()
        self._slots = []
        for engine in self._retiring + ([self._engine] if self._engine else []):
            engine.close()
        self._retiring = []
