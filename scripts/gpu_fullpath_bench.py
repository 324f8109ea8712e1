#!/usr/bin/env python3
"""Full-path GPU benchmark: PVA in, the appliance with a GPU stand-in engine, PVA out; pinned vs naive.

scripts/gpu_bench.py measures the GPU path alone (ring -> CUDA slots -> host) in
one process. Here every frame takes the whole trip a beamline frame takes, so
the figure includes what the GPU path cannot hide: pvAccess receive, ingest,
publish and a real subscriber.

- PVA in: ``pvapy-ad-sim-server`` streams 128x128 uint16 frames on 127.0.0.1
  (scripts/bench_stream.py's Simulator, ports and loopback environment).
- The real appliance, in this process: ``appliance.runtime.Appliance`` with the
  project's config, serving the NVRTC stand-in engine (tests/gpu/standin_engine.py,
  spinning ``--compute-us`` per batch to stand for a network) through
  ``Appliance.start(engine=...)``. Two variants, same detector queue, max_batch 8:
    pinned  ring in pinned memory (decided by the appliance: the engine runs on
            the GPU), pipeline.in_flight 2 (two CUDA slots, two streams,
            completion by event query: copy-in of k+1 overlaps compute of k);
    naive   ``pinned_ring=False`` (pageable ring), pipeline.in_flight 1 (one
            slot, one stream; the pipeline waits for each batch before it
            launches the next: how the field's code worked).
- PVA out: the appliance publishes P:Phase (and P:Amplitude); one subscriber in
  a separate process monitors P:Phase and counts every update and its uniqueId,
  so the output is really transported and seen.

A trial has zero loss when every frame the simulator sent (its last uniqueId)
was received and published with nothing dropped, missing or overrun (the
appliance's own telemetry, the same accounting as bench_stream), and the
subscriber saw every id 1..sent once, in order, without overruns. Latency p50/p99
is the appliance's (frame arrival to publish, every frame of the trial), plus
the simulator's timestamp to the subscriber's arrival (end to end). A trial in
which the simulator fell short of the asked rate is marked source-limited: its
zero-loss figure is then a lower bound of what the appliance can take.

Each (variant, rate) trial runs in a fresh process group (fresh ports, fresh
pvapy, fresh CUDA context) that is killed afterwards, as bench_stream does.
Rates go up; a variant stops at its first loss. ``--cpu`` runs the same harness
with a CPU engine of the same transform (both variants then use the CPU slot):
a check of the harness where there is no GPU, not a GPU figure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts"), os.path.join(ROOT, "tests", "gpu")]

from appliance.engines.base import BatchSpec, Engine, EngineIO, TensorSpec  # noqa: E402
from appliance.engines.manifest import AMPLITUDE, PHASE  # noqa: E402

import bench_stream  # noqa: E402
from bench_stream import DETECTOR_PV, FRAME_SIZE, PREFIX, RESULT_TAG, Simulator, allocate_ports, pva_env  # noqa: E402

OUTPUT_PV = PREFIX + ":Phase"
MOSAIC_PV = PREFIX + ":Mosaic"
VARIANTS: Dict[str, Dict[str, Any]] = {
    "pinned": {"pinned_ring": None, "in_flight": 2,
               "what": "pinned ring (chosen by the appliance for a GPU engine), 2 in-flight slots/streams, "
                       "completion by event query"},
    "naive": {"pinned_ring": False, "in_flight": 1,
              "what": "pageable ring (pinned_ring=False), 1 in-flight slot: one stream, the pipeline waits "
                      "for each batch before launching the next"},
}
SOURCE_LIMITED_BELOW = 0.98  # achieved / asked under this: the simulator, not the appliance, set the pace
CHECK_EVERY = 64  # every 64th published frame's outputs are checked against the transform


# -- the CPU stand-in (--cpu) ----------------------------------------------------------------
class CpuStandin(Engine):
    """NvrtcEngine's transform on the CPU (phase = scale * x + offset, amplitude = x * x), same I/O.

    Lets the harness (simulator, appliance, subscriber, accounting) be checked on
    a machine without a GPU; the numbers it gives are not GPU figures.
    """

    backend = "cpu-standin"

    def __init__(self, size: int = FRAME_SIZE, batch: BatchSpec = BatchSpec(False, 8),
                 scale: float = 2.0, offset: float = 1.0) -> None:
        frame = (1, size, size)
        io = EngineIO(
            input=TensorSpec("x", frame, np.dtype(np.float32)),
            outputs={PHASE: TensorSpec("phase", frame, np.dtype(np.float32)),
                     AMPLITUDE: TensorSpec("amplitude", frame, np.dtype(np.float32))},
            batch=batch,
        )
        super().__init__("standin-{}x{}.cpu".format(size, size), io, "0" * 64)
        self.scale, self.offset = scale, offset

    def run(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        x = np.asarray(frames, dtype=np.float32)
        return {PHASE: x * np.float32(self.scale) + np.float32(self.offset), AMPLITUDE: x * x}


def make_engine(args: argparse.Namespace) -> Engine:
    if args.cpu:
        return CpuStandin(FRAME_SIZE, BatchSpec(False, args.batch))
    from standin_engine import NvrtcEngine  # tests/gpu: needs cuda-python with NVRTC

    return NvrtcEngine(size=FRAME_SIZE, batch=BatchSpec(False, args.batch), spin_us=args.compute_us)


class OutputCheck:
    """Spot check of published results (pipeline thread, so it stays cheap): phase = scale*sqrt(amplitude) + offset.

    The frames are the simulator's, unknown here, but the two outputs of the
    stand-in transform pin each other down: a wrong or stale buffer fails.
    """

    def __init__(self, scale: float, offset: float) -> None:
        self.scale, self.offset = scale, offset
        self.seen = 0
        self.checked = 0
        self.mismatches = 0
        self.first_mismatch: Optional[str] = None

    def __call__(self, meta: Any, images: Dict[str, np.ndarray]) -> None:
        self.seen += 1
        if self.seen % CHECK_EVERY:
            return
        self.checked += 1
        want = np.sqrt(images[AMPLITUDE]) * np.float32(self.scale) + np.float32(self.offset)
        if not np.allclose(images[PHASE], want, rtol=1e-5, atol=1e-2):
            self.mismatches += 1
            if self.first_mismatch is None:
                self.first_mismatch = "uniqueId {}: phase does not match the transform of amplitude".format(
                    meta.unique_id)


# -- the subscriber (its own process) -------------------------------------------------------------
def subscriber_main(args: argparse.Namespace) -> int:
    """Monitor ``--pv`` and count updates by uniqueId; report on stdout until stdin closes.

    Reads only uniqueId and timeStamp of each update (the whole NTNDArray is still
    transported and unpacked by pvapy), so at high rates it keeps up with the appliance.
    Lines: READY once connected, PROGRESS {...} every 0.2 s, FINAL {...} at the end.
    """
    import pvaccess

    state = {"updates": 0, "frames": 0, "first_id": 0, "last_id": 0, "gaps": 0, "missing": 0, "out_of_order": 0}
    latencies: List[float] = []

    def on_update(pv: Any) -> None:
        arrived = time.time()
        state["updates"] += 1
        unique_id = pv["uniqueId"]
        if unique_id == 0:
            return  # the record's value before its first frame: the update every monitor gets on connect
        stamp = pv["timeStamp"]
        latencies.append(arrived - (stamp["secondsPastEpoch"] + stamp["nanoseconds"] * 1e-9))
        last = state["last_id"]
        if last == 0:
            state["first_id"] = unique_id
        elif unique_id != last + 1:
            if unique_id > last:
                state["gaps"] += 1
                state["missing"] += unique_id - last - 1
            else:
                state["out_of_order"] += 1
        state["frames"] += 1
        state["last_id"] = unique_id

    channel = pvaccess.Channel(args.pv)
    channel.monitor(on_update, "record[queueSize={}]field()".format(args.subscriber_queue))
    deadline = time.monotonic() + 15.0
    while state["updates"] == 0:
        if time.monotonic() > deadline:
            print("ERROR no connection to {}".format(args.pv), flush=True)
            return 1
        time.sleep(0.02)  # the connect update has no other event to wait on
    print("READY", flush=True)
    while True:
        readable = select.select([sys.stdin], [], [], 0.2)[0]
        if readable and not sys.stdin.readline():
            break  # the trial closed our stdin: report and go
        print("PROGRESS " + json.dumps(state), flush=True)
    channel.stopMonitor()
    final: Dict[str, Any] = dict(state)
    counters = channel.getMonitorCounters()
    final["overruns"] = int(counters.get("nOverruns", 0))
    final["monitor_received"] = int(counters.get("nReceived", 0))
    if latencies:
        values = np.array(latencies) * 1e3
        final["e2e_p50_ms"], final["e2e_p99_ms"] = (float(v) for v in np.percentile(values, [50, 99]))
        final["e2e_max_ms"] = float(values.max())
    print("FINAL " + json.dumps(final), flush=True)
    return 0


class Subscriber:
    """The subscriber process, seen from the trial: its latest counts, read by a thread from its stdout."""

    def __init__(self, ports: Dict[str, Dict[str, int]], workdir: str, args: argparse.Namespace,
                 pv: str = OUTPUT_PV) -> None:
        command = [sys.executable, os.path.abspath(__file__), "--role", "subscriber", "--pv", pv,
                   "--subscriber-queue", str(args.subscriber_queue)]
        self.log_path = os.path.join(workdir, "subscriber-{}.log".format(pv.rsplit(":", 1)[-1].lower()))
        self.process = subprocess.Popen(command, env=pva_env(ports, "bench"), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), text=True)
        self.ready = threading.Event()
        self.progress: Dict[str, Any] = {}
        self.final: Optional[Dict[str, Any]] = None
        self.error: Optional[str] = None
        self._done = threading.Event()
        threading.Thread(target=self._read, args=(self.process.stdout,), name="subscriber-reader", daemon=True).start()

    def _read(self, stream: TextIO) -> None:
        for line in stream:
            kind, _, payload = line.strip().partition(" ")
            if kind == "READY":
                self.ready.set()
            elif kind == "PROGRESS":
                self.progress = json.loads(payload)
            elif kind == "FINAL":
                self.final = json.loads(payload)
            elif kind == "ERROR":
                self.error = payload
        self._done.set()

    def frames(self) -> Optional[int]:
        return self.progress.get("frames")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.error or self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("subscriber not connected ({}); see {}".format(
                    self.error or "exit {}".format(self.process.poll()), self.log_path))

    def finish(self, timeout: float = 10.0) -> Dict[str, Any]:
        """Close its stdin: it stops monitoring and prints its final counts."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.close()
        except OSError:
            pass
        self._done.wait(timeout)
        self.stop()
        if self.final is None:
            raise RuntimeError("subscriber gave no final counts; see {}".format(self.log_path))
        return self.final

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- one trial (its own process) ------------------------------------------------------------------
def appliance_config(workdir: str, args: argparse.Namespace, variant: str) -> Any:
    """The Config as the project builds one: a YAML file through appliance.sim.process.write_config, then load_config.

    Everything not named here is the shipped default (ring of 4096, max_wait_ms 5).
    The latency window holds every frame of a trial, so p50/p99 cover the whole trial.
    """
    from appliance.config import load_config
    from appliance.sim.process import write_config

    path = write_config(
        os.path.join(workdir, "appliance.yaml"), DETECTOR_PV, PREFIX, engine_dir=workdir,
        detector={"queue_size": args.queue_size},
        pipeline={"max_batch": args.batch, "in_flight": VARIANTS[variant]["in_flight"]},
        publish={"status_period_s": 0.25, "latency_window": 1000000},
        mosaic={"pixel_size_m": 1e-8},  # P:Mosaic with a viewer, as at a beamline (the simulator sends no positions)
    )
    return load_config(path)


def _device(args: argparse.Namespace) -> str:
    if args.cpu:
        return "cpu (harness check: {} cores)".format(os.cpu_count())
    from appliance import cuda

    return cuda.available()[1]


def trial_main(args: argparse.Namespace) -> int:
    """One (variant, rate) trial; prints its result as one RESULT line."""
    for key in [k for k in os.environ if k.startswith("EPICS_")]:
        del os.environ[key]
    ports = allocate_ports()
    os.environ.update(pva_env(ports, "appliance"))  # before this process's first PVA object
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result: Dict[str, Any] = {}
    try:
        run_trial(ports, args, result)
    except Exception as exc:  # reported to the sweep, which retries or gives up on the variant
        result["error"] = "{}: {}".format(type(exc).__name__, exc)
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)
    return 0


def run_trial(ports: Dict[str, Dict[str, int]], args: argparse.Namespace, trial: Dict[str, Any]) -> None:
    """Fills ``trial`` as it goes, so a trial that fails still tells how far it got."""
    from appliance.runtime import Appliance

    variant, rate = args.variant, args.rate
    workdir = tempfile.mkdtemp(prefix="{}-{}hz-".format(variant, int(rate)), dir=args.workdir)
    trial.update(variant=variant, rate_hz=rate, duration_s=args.duration, start_delay_s=args.start_delay,
                 workdir=workdir)
    # pvapy-ad-sim-server's main loop wakes once a second and shuts the server down once start delay +
    # runtime have passed since it started. With a whole-number sum that check races the last frames of
    # a run that started a little late (seen: runs cut off a few frames before their end). A sum just
    # past a whole number leaves the publisher almost a second to finish.
    sim_delay = args.start_delay + (0.05 - (args.start_delay + args.duration)) % 1.0
    trial["sim_start_delay_s"] = round(sim_delay, 3)
    sim = Simulator(ports, workdir, rate, args.duration, sim_delay)
    appliance: Optional[Appliance] = None
    subscriber: Optional[Subscriber] = None
    mosaic_viewer: Optional[Subscriber] = None
    try:
        trial["device"] = _device(args)  # appliance.cuda first: it sets the device flags before any context
        engine = make_engine(args)  # NVRTC compile and CUDA context while the simulator fills its cache
        trial["engine"] = engine.describe()
        check = OutputCheck(2.0, 1.0)
        sim.wait_serving(timeout=args.start_delay)
        appliance = Appliance(appliance_config(workdir, args, variant), pinned_ring=VARIANTS[variant]["pinned_ring"])
        appliance.add_result_listener(check)
        appliance.start(engine=engine)
        pipeline = appliance.config.pipeline
        trial.update(ring_memory=appliance.latest_status()["ring_memory"], in_flight=pipeline.in_flight,
                     max_batch=pipeline.max_batch, queue_size=appliance.config.detector.queue_size)
        subscriber = Subscriber(ports, workdir, args)
        mosaic_viewer = Subscriber(ports, workdir, args, MOSAIC_PV)
        for viewer in (subscriber, mosaic_viewer):
            viewer.wait_ready(timeout=max(5.0, sim.first_frame_at - time.monotonic() + 5.0))
        deadline = sim.first_frame_at + 10.0
        while not appliance.latest_status().get("detector_connected"):
            if time.monotonic() > deadline:
                raise RuntimeError("appliance not connected to {}".format(DETECTOR_PV))
            time.sleep(0.05)  # the status snapshot refreshes every period; no event to await
        ready = time.monotonic()
        trial["ready_margin_s"] = round(sim.first_frame_at - ready, 2)
        if ready > sim.first_frame_at - 0.3:
            trial["invalid"] = "consumers ready {:.1f} s after the first frame could go out".format(
                ready - sim.first_frame_at)
            return
        pids = {"appliance": os.getpid(), "sim": sim.process.pid, "subscriber": subscriber.process.pid}
        cpu_before = {name: bench_stream.cpu_seconds(pid) for name, pid in pids.items()}
        wait_stream_end(sim, args.duration, lambda: "appliance received {} published {}, subscriber {}".format(
            appliance.latest_status().get("received"), appliance.latest_status().get("published"),
            subscriber.frames()))
        sent = sim.frames_sent()
        runtime = sim.runtime()
        achieved = (sent - 1) / runtime if runtime else 0.0
        trial.update(sent=sent, sim_runtime_s=runtime, achieved_hz=round(achieved, 1),
                     source_limited=achieved < SOURCE_LIMITED_BELOW * rate)
        status = bench_stream._wait_settled(appliance.latest_status, lambda s: s["published"], sent, 3.0, 60.0)
        bench_stream._wait_settled(lambda: subscriber.progress or None, lambda s: s["frames"], sent, 3.0, 30.0)
        cpu_after = {name: bench_stream.cpu_seconds(pid) for name, pid in pids.items()}
        trial["cpu_us_per_frame"] = {name: round(1e6 * (cpu_after[name] - cpu_before[name]) / max(sent, 1), 1)
                                     for name in pids}
        outputs = {"checked": check.checked, "mismatches": check.mismatches, "first_mismatch": check.first_mismatch}
        trial.update(judge(status, subscriber.finish(), outputs, sent, args.max_p99_ms))
        trial["mosaic_subscriber"] = mosaic_viewer.finish()
    finally:
        for viewer in (subscriber, mosaic_viewer):
            if viewer is not None:
                viewer.stop()
        if appliance is not None:
            trial["drained"] = appliance.stop(10.0)
        sim.stop()


def judge(snapshot: Dict[str, Any], seen: Dict[str, Any], outputs: Dict[str, Any], sent: int,
          max_p99_ms: float) -> Dict[str, Any]:
    """The verdict on a trial: the appliance's accounting (bench_stream's), the subscriber's, the output check.

    ``snapshot`` is ``Appliance.latest_status()`` (flattened as P:Status carries it,
    so bench_stream.appliance_verdict reads it unchanged); ``seen`` the
    subscriber's final counts. Zero loss needs all three to agree that every one
    of the ``sent`` frames went through once, correctly. A trial is *sustained*
    when, besides, the appliance kept up: its p99 latency stayed under
    ``max_p99_ms``. Without that a short trial could end with zero loss while a
    backlog grew in the ring (4096 frames hide 0.4 s of overload at 10 kHz) that
    a longer stream would overflow.
    """
    from appliance.pva import flatten_status

    appliance = bench_stream.appliance_verdict(flatten_status(snapshot), sent)
    appliance["batches"] = snapshot.get("batches")
    seen = dict(seen)
    seen["zero_loss"] = (seen["frames"] == sent and seen["first_id"] == 1 and seen["last_id"] == sent
                         and seen["gaps"] == 0 and seen["out_of_order"] == 0 and seen["overruns"] == 0)
    zero_loss = bool(appliance["zero_loss"] and seen["zero_loss"] and outputs["mismatches"] == 0
                     and (outputs["checked"] > 0 or sent < CHECK_EVERY))
    p99 = appliance["latency_p99_ms"]
    kept_up = p99 is not None and p99 == p99 and p99 <= max_p99_ms  # NaN when nothing was published
    return {"appliance": appliance, "subscriber": seen, "outputs": outputs, "zero_loss": zero_loss,
            "kept_up": kept_up, "max_p99_ms": max_p99_ms, "sustained": zero_loss and kept_up}


def verdict_text(trial: Dict[str, Any]) -> str:
    a, s = trial["appliance"], trial["subscriber"]
    if not trial["zero_loss"]:
        lost = trial["sent"] - min(a["published"], s["frames"])
        return "LOSS ({} lost)".format(lost) if lost else "LOSS (outputs wrong or counts disagree)"
    if not trial["kept_up"]:
        return "zero loss but BACKLOGGED (p99 {:.0f} ms > {:.0f})".format(a["latency_p99_ms"], trial["max_p99_ms"])
    return "sustained (zero loss)"


def wait_stream_end(sim: Simulator, duration: float, counts: Any, stall_s: float = 3.0) -> None:
    """Until the simulator reports its run over; fail fast when its uniqueId stops moving.

    Its own shutdown once cut runs off a few frames before their end (see the
    start delay in run_trial), and bench_stream saw one stall before a first
    frame: waiting for the whole deadline would cost half a minute. A stall is
    reported with everyone's counts and, where py-spy exists, the simulator's
    Python stacks (sim.pyspy.txt beside its log); the sweep retries the trial.
    """
    deadline = sim.first_frame_at + duration * 1.5 + 30
    last, since = -1, time.monotonic()
    while sim.runtime() is None:
        now = time.monotonic()
        sent = sim.frames_sent()
        if sent != last:
            last, since = sent, now
        elif (now > sim.first_frame_at + 1.0 and now - since > stall_s) or now > deadline:
            dump = os.path.join(os.path.dirname(sim.log_path), "sim.pyspy.txt")
            try:
                with open(dump, "w") as handle:
                    subprocess.run([bench_stream._tool("py-spy"), "dump", "--pid", str(sim.process.pid)],
                                   stdout=handle, stderr=subprocess.STDOUT, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass  # py-spy is optional
            raise RuntimeError("simulator stalled at uniqueId {} for {:.0f} s ({:.1f} s after its first frame was due; "
                               "{}); see {}".format(sent, now - since, now - sim.first_frame_at, counts(),
                                                    sim.log_path))
        time.sleep(0.25)  # the simulator's progress has no event to await


# -- the sweep (the parent process) ------------------------------------------------------------------
def run_isolated(args: argparse.Namespace, variant: str, rate: float, start_delay: float) -> Dict[str, Any]:
    """One trial in a new process group, killed with everything it started once it is over."""
    command = [sys.executable, os.path.abspath(__file__), "--role", "trial", "--variant", variant,
               "--rate", str(rate), "--duration", str(args.duration), "--start-delay", str(start_delay),
               "--queue-size", str(args.queue_size), "--subscriber-queue", str(args.subscriber_queue),
               "--batch", str(args.batch), "--compute-us", str(args.compute_us), "--max-p99-ms", str(args.max_p99_ms),
               "--workdir", args.workdir]
    if args.cpu:
        command.append("--cpu")
    log_path = os.path.join(args.workdir, "{}-{}hz.log".format(variant, int(rate)))
    began = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    watchdog = threading.Timer(start_delay + args.duration * 1.5 + 90, bench_stream._kill_group, args=(child.pid,))
    watchdog.start()
    result: Dict[str, Any] = {}
    try:
        assert child.stdout is not None
        with open(log_path, "a") as log:
            for line in child.stdout:
                if line.startswith(RESULT_TAG):
                    result = json.loads(line[len(RESULT_TAG):])
                else:
                    log.write(line)
        child.wait()
    finally:
        watchdog.cancel()
        bench_stream._kill_group(child.pid)
        child.wait()
    if not result:
        result = {"error": "trial exited {} without a result; see {}".format(child.returncode, log_path)}
    result.update(variant=variant, rate_hz=rate, log=log_path, wall_s=round(time.monotonic() - began, 1))
    return result


def trial_line(trial: Dict[str, Any]) -> str:
    head = "{:>6} {:>6.0f} Hz [{:.0f} s]".format(trial["variant"], trial["rate_hz"], trial.get("wall_s", 0.0))
    if "error" in trial:
        return head + ": trial failed: " + trial["error"]
    if "invalid" in trial:
        return head + ": invalid: " + trial["invalid"]
    a, s = trial["appliance"], trial["subscriber"]
    return ("{}: achieved {:.0f}{} | sent {} published {} subscriber {} | dropped {} missing {} overruns {} "
            "sub-overruns {} | {} | p50 {:.2f} p99 {:.2f} ms | e2e p50 {:.2f} p99 {:.2f} ms | ring {}").format(
        head, trial["achieved_hz"], " (source-limited)" if trial["source_limited"] else "", trial["sent"],
        a["published"], s["frames"], a["dropped_total"], a["missing_upstream"], a["upstream_overruns"],
        s["overruns"], verdict_text(trial), a["latency_p50_ms"], a["latency_p99_ms"],
        s.get("e2e_p50_ms", float("nan")), s.get("e2e_p99_ms", float("nan")), trial.get("ring_memory"))


def sweep(args: argparse.Namespace, save: Callable[[List[Dict[str, Any]], Optional[Dict[str, Any]]], None]
          ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Rates upwards, both variants at each rate in turn; a variant stops at its first loss or backlog.

    Returns every attempt (retried ones too, so the JSON shows them) and the summary;
    ``save`` gets the attempts after each one, so a run cut short keeps its results.
    """
    started = time.monotonic()
    attempts: List[Dict[str, Any]] = []
    trials: List[Dict[str, Any]] = []
    stopped: Dict[str, str] = {}
    per_trial_s = args.start_delay + args.duration + 8.0  # start, stream, settle, stop (measured: about 6-8 s)
    for rate in args.rates:
        for variant in args.variants:
            if variant in stopped:
                continue
            if time.monotonic() - started + per_trial_s > args.budget_s:
                stopped[variant] = "time budget ({:.0f} s) spent before {:.0f} Hz".format(args.budget_s, rate)
                print("{:>6} {:>6.0f} Hz: not run: {}".format(variant, rate, stopped[variant]), flush=True)
                continue
            delay = args.start_delay
            for attempt in range(3):
                trial = run_isolated(args, variant, rate, delay)
                trial["attempt"] = attempt
                attempts.append(trial)
                save(attempts, None)
                print(trial_line(trial), flush=True)
                if "invalid" in trial:
                    delay *= 2  # the consumers were not ready in time: give them longer
                    continue
                if "error" in trial and attempt == 0:
                    continue
                break
            trials.append(trial)
            if "error" in trial or "invalid" in trial:
                stopped[variant] = "trial at {:.0f} Hz failed".format(rate)
            elif not trial["sustained"]:
                stopped[variant] = "not sustained at {:.0f} Hz".format(rate)
    return attempts, summarise(args, trials, stopped, time.monotonic() - started)


def summarise(args: argparse.Namespace, trials: List[Dict[str, Any]], stopped: Dict[str, str],
              elapsed: float) -> Dict[str, Any]:
    """Per variant: the highest rate it sustained and where it first did not; pinned/naive; the targets."""
    good = [t for t in trials if "sustained" in t]
    summary: Dict[str, Any] = {"variants": {}, "elapsed_s": round(elapsed, 1), "max_p99_ms": args.max_p99_ms}
    for variant in args.variants:
        runs = [t for t in good if t["variant"] == variant]
        held = [t for t in runs if t["sustained"]]
        best = max(held, key=lambda t: t["rate_hz"]) if held else None
        failed = next((t for t in runs if not t["sustained"]), None)
        summary["variants"][variant] = {
            "highest_sustained_asked_hz": best["rate_hz"] if best else None,
            "highest_sustained_achieved_hz": best["achieved_hz"] if best else None,
            "highest_sustained_source_limited": best["source_limited"] if best else None,
            "highest_sustained_p50_p99_ms": [best["appliance"]["latency_p50_ms"], best["appliance"]["latency_p99_ms"]]
            if best else None,
            "first_failure_asked_hz": failed["rate_hz"] if failed else None,
            "first_failure": verdict_text(failed) if failed else None,
            "limit_reached": failed is not None,
            "stopped": stopped.get(variant),
        }
    pinned, naive = summary["variants"].get("pinned"), summary["variants"].get("naive")
    if pinned and naive and pinned["highest_sustained_achieved_hz"] and naive["highest_sustained_achieved_hz"]:
        ratio = pinned["highest_sustained_achieved_hz"] / naive["highest_sustained_achieved_hz"]
        if not naive["limit_reached"]:
            meaning = "undetermined: the naive path sustained every rate tried, so its limit was not reached"
        elif not pinned["limit_reached"]:
            meaning = "a lower bound: the pinned path sustained every rate tried"
        else:
            meaning = "both paths reached their limit"
        if (pinned["highest_sustained_source_limited"] or naive["highest_sustained_source_limited"]):
            meaning += "; source-limited figures are lower bounds"
        summary["ratio_pinned_over_naive"] = {"value": round(ratio, 3), "meaning": meaning}
    if pinned and not args.cpu:  # a harness check says nothing about the GPU targets
        summary["targets"] = targets(pinned, naive, summary.get("ratio_pinned_over_naive"))
    return summary


def targets(pinned: Dict[str, Any], naive: Optional[Dict[str, Any]], ratio: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """Issue #4's two targets, each met, not met, or not shown by this sweep (a limit not reached)."""
    best = pinned["highest_sustained_achieved_hz"] or 0.0
    if best >= 10000:
        ten_khz = "met ({:.0f} Hz achieved, sustained with zero loss)".format(best)
    elif pinned["limit_reached"]:
        ten_khz = "not met (sustained up to {:.0f} Hz achieved; {} at {:.0f} Hz asked)".format(
            best, pinned["first_failure"], pinned["first_failure_asked_hz"])
    else:
        ten_khz = "not shown (sustained up to {:.0f} Hz achieved: the rates tried or the source stop there)".format(
            best)
    if ratio is None:
        two_x = "not shown (no sustained figure for both paths)"
    elif ratio["value"] >= 2:
        two_x = "met ({:.2f}x, {})".format(ratio["value"], ratio["meaning"])
    elif naive is not None and naive["limit_reached"] and pinned["limit_reached"]:
        two_x = "not met ({:.2f}x)".format(ratio["value"])
    else:
        two_x = "not shown ({:.2f}x, {})".format(ratio["value"], ratio["meaning"])
    return {"2x_naive": two_x, "10_khz": ten_khz}


def print_tables(args: argparse.Namespace, trials: List[Dict[str, Any]], summary: Dict[str, Any]) -> None:
    print("\n| variant | asked (Hz) | achieved (Hz) | sent | published | subscriber saw | dropped / missing / "
          "overruns | verdict | p50 / p99 ms (appliance) | p50 / p99 ms (end to end) | CPU us/frame appliance / "
          "sim / subscriber |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in sorted((t for t in trials if "sustained" in t), key=lambda t: (t["variant"], t["rate_hz"])):
        a, s, cpu = t["appliance"], t["subscriber"], t["cpu_us_per_frame"]
        print("| {} | {:.0f} | {:.0f}{} | {} | {} | {} | {} / {} / {} | {} | {:.2f} / {:.2f} | {:.2f} / {:.2f} | "
              "{:.0f} / {:.0f} / {:.0f} |".format(
                  t["variant"], t["rate_hz"], t["achieved_hz"], " (source-limited)" if t["source_limited"] else "",
                  t["sent"], a["published"], s["frames"], a["dropped_total"], a["missing_upstream"],
                  a["upstream_overruns"], verdict_text(t), a["latency_p50_ms"], a["latency_p99_ms"],
                  s.get("e2e_p50_ms", float("nan")), s.get("e2e_p99_ms", float("nan")),
                  cpu["appliance"], cpu["sim"], cpu["subscriber"]))
    print("\nsustained = zero loss (appliance, subscriber and output check agree) and appliance p99 <= {:.0f} ms "
          "(no backlog growing in the ring)".format(args.max_p99_ms))
    for variant, facts in summary["variants"].items():
        if facts["highest_sustained_asked_hz"] is None:
            text = "sustained no rate tried"
        else:
            text = "sustained up to {:.0f} Hz asked ({:.0f} Hz achieved{}; p50 / p99 {:.2f} / {:.2f} ms)".format(
                facts["highest_sustained_asked_hz"], facts["highest_sustained_achieved_hz"],
                ", source-limited: a lower bound" if facts["highest_sustained_source_limited"] else "",
                *facts["highest_sustained_p50_p99_ms"])
        if facts["limit_reached"]:
            text += "; at {:.0f} Hz: {}".format(facts["first_failure_asked_hz"], facts["first_failure"])
        else:
            text += "; every rate tried sustained (its limit is higher)"
            if facts["stopped"]:
                text += " [stopped: {}]".format(facts["stopped"])
        print("{} (batch {}): {}".format(variant, args.batch, text))
    ratio = summary.get("ratio_pinned_over_naive")
    if ratio:
        print("pinned / naive, highest sustained achieved rate at batch {}: {:.2f}x ({})".format(
            args.batch, ratio["value"], ratio["meaning"]))
    if summary.get("targets"):
        print("targets (issue #4): >= 2x naive at batch 8: {}; >= 10 kHz with zero loss: {}".format(
            summary["targets"]["2x_naive"], summary["targets"]["10_khz"]))
    if args.cpu:
        print("\nHARNESS CHECK ONLY (--cpu): CPU stand-in engine, CPU slot for both variants; not a GPU figure.")


def environment_facts(args: argparse.Namespace) -> Dict[str, Any]:
    facts: Dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__,
                             "cpus": os.cpu_count(), "host": platform.node()}
    try:
        from importlib.metadata import version

        facts["pvapy"] = version("pvapy")
    except Exception as exc:  # an install without metadata still runs
        facts["pvapy"] = "unknown ({})".format(type(exc).__name__)
    facts["sim_server"] = shutil.which(bench_stream._tool("pvapy-ad-sim-server"))
    return facts


def sweep_main(args: argparse.Namespace) -> int:
    if not shutil.which(bench_stream._tool("pvapy-ad-sim-server")):
        print("SKIPPED: pvapy-ad-sim-server not found (install pvapy; with pip --target, put its bin/ on PATH)")
        return 0
    if args.cpu:
        device = "cpu"
        print("HARNESS CHECK (--cpu): CPU stand-in engine with the stand-in transform; both variants run on the CPU "
              "slot, so pinned and naive differ only in name here. Not a GPU figure.")
    else:
        from appliance import cuda

        usable, device = cuda.available()
        if not usable:
            print("SKIPPED: no usable CUDA device: {}".format(device))
            return 0
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="gpu-fullpath-")
    facts = environment_facts(args)
    print("device: {}\nrun directory (configs, logs): {}\nfacts: {}".format(device, args.workdir, json.dumps(facts)))
    print("{:.0f}x{:.0f} uint16 frames, batch {}, stand-in compute {:.0f} us per batch{}, detector queue {}, "
          "{} s per trial, rates {}\n".format(FRAME_SIZE, FRAME_SIZE, args.batch, args.compute_us,
                                               " (not applied with --cpu)" if args.cpu else "", args.queue_size,
                                               args.duration, ",".join("{:.0f}".format(r) for r in args.rates)),
          flush=True)

    def save(trials: List[Dict[str, Any]], summary: Optional[Dict[str, Any]]) -> None:
        if not args.json:
            return
        report = {"mode": "cpu-harness-check" if args.cpu else "gpu", "device": device, "facts": facts,
                  "settings": {"rates_hz": args.rates, "duration_s": args.duration, "batch": args.batch,
                               "compute_us": 0.0 if args.cpu else args.compute_us, "queue_size": args.queue_size,
                               "subscriber_queue": args.subscriber_queue, "max_p99_ms": args.max_p99_ms,
                               "variants": {
                                   v: VARIANTS[v] for v in args.variants}},
                  "complete": summary is not None, "trials": trials, "summary": summary}
        with open(args.json + ".part", "w") as handle:
            json.dump(report, handle, indent=1, default=str)
        os.replace(args.json + ".part", args.json)  # never a half-written file, even when killed

    trials, summary = sweep(args, save)
    save(trials, summary)
    print_tables(args, trials, summary)
    return 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_stream.add_sweep_arguments(parser, [2000.0, 5000.0, 10000.0, 15000.0, 20000.0], duration=3.0,
                                     start_delay=5.0, queue_help="detector.queue_size (both variants)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["pinned", "naive"],
                        help="which of pinned,naive to run")
    parser.add_argument("--compute-us", type=float, default=250.0,
                        help="stand-in GPU compute per batch, microseconds (as scripts/gpu_bench.py)")
    parser.add_argument("--batch", type=int, default=8, help="pipeline.max_batch and the engine's batch")
    parser.add_argument("--subscriber-queue", type=int, default=10000,
                        help="server-side queue of the output subscriber's monitor")
    parser.add_argument("--max-p99-ms", type=float, default=100.0,
                        help="a rate is sustained only if the appliance's p99 latency stays under this (a backlog "
                             "growing in the ring shows here before the ring overflows)")
    parser.add_argument("--budget-s", type=float, default=210.0,
                        help="no trial is started that would end after this many seconds of the sweep")
    parser.add_argument("--cpu", action="store_true",
                        help="harness check without a GPU: a CPU engine with the same transform")
    parser.add_argument("--json", help="write every trial and the summary here")
    parser.add_argument("--workdir", help="where trials keep configs and logs (default: a new temporary directory)")
    parser.add_argument("--role", choices=("sweep", "trial", "subscriber"), default="sweep", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--pv", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error("unknown variant(s) {}; expected pinned and/or naive".format(unknown))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.role == "subscriber":
        return subscriber_main(args)
    if args.role == "trial":
        return trial_main(args)
    return sweep_main(args)


if __name__ == "__main__":
    sys.exit(main())
