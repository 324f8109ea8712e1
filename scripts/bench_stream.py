"""Streaming benchmark: ptychonn-edge and pvapy-hpc-consumer on one simulated detector stream.

Everything runs on loopback, on ports of this run's own: ``pvapy-ad-sim-server``
streams 128x128 uint16 frames, the appliance (``ptychonn-edge run``, identity
ONNX model, so transport and hot path are what is measured) and, in ``sweep``,
``pvapy-hpc-consumer`` with its default pass-through processor republishing to
an output PV, both subscribed to the same stream at the same time with the same
server-side queue size.

A frame counts as lost unless the consumer published it: for the appliance,
every frame the simulator sent must show in P:Status as received and published
with nothing dropped, missing or overrun; for the baseline, in the statistics
it prints, as processed and republished with no misses and no overruns.

    sweep   zero-loss rate search, both consumers, several repeats per rate
    soak    the appliance alone for 10^6 frames: RSS after 10^4 and 10^6 frames
    stages  per-frame cost of each hot-path stage, in process (no PVA transport)
    report  the tables of a results file written with ``--out``

Results go to stdout as tables and, with ``--out``, as JSON lines; docs/benchmarks.md
says what they showed. ``main(argv)`` is the entry point for other front ends.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # onnx_models: the identity model
sys.path.insert(0, os.path.join(ROOT, "scripts"))  # pva_viewer: the displays on every output

from appliance.sim.loopback import free_ports, loopback_env  # noqa: E402

from pva_viewer import ViewerProcess  # noqa: E402

ROLES = ("sim", "appliance", "hpc", "bench")
DETECTOR_PV = "BENCH:image"
PREFIX = "BENCH"
HPC_OUTPUT = "BENCH:hpc:output"  # its republished frames
HPC_STATUS = "BENCH:hpc:status"
FRAME_SIZE = 128
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- ports and PVA environment ---------------------------------------------------
def allocate_ports() -> Dict[str, Dict[str, int]]:
    """A TCP/UDP pair per process role, for one trial (one benchmark process)."""
    return {role: free_ports() for role in ROLES}


def pva_env(ports: Dict[str, Dict[str, int]], own: str) -> Dict[str, str]:
    """Loopback-only PVA settings for a process serving as ``own``, which finds every other role's server."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("EPICS_")}
    env.update(loopback_env(ports[own]))
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return env


def _tool(name: str) -> str:
    """A pvapy console script next to this interpreter (the venv's bin), else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else name


# -- process facts -----------------------------------------------------------------
def rss_kib(pid: int) -> int:
    with open("/proc/{}/status".format(pid)) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid {}".format(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads."""
    return cpu_seconds_of("/proc/{}/stat".format(pid))


def cpu_seconds_of(stat_path: str) -> float:
    with open(stat_path) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores have been busy since boot (everyone's processes)."""
    with open("/proc/stat") as handle:
        ticks = [int(v) for v in handle.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> Dict[int, float]:
    """CPU time of each thread of a process, by native thread id."""
    seconds = {}
    for tid in os.listdir("/proc/{}/task".format(pid)):
        try:
            seconds[int(tid)] = cpu_seconds_of("/proc/{}/task/{}/stat".format(pid, tid))
        except OSError:
            continue  # the thread ended meanwhile
    return seconds


def thread_names(pid: int) -> Dict[int, str]:
    """Native thread id -> Python thread name (py-spy dump), else the OS name (EPICS names its threads)."""
    names = {}
    for tid in os.listdir("/proc/{}/task".format(pid)):
        try:
            with open("/proc/{}/task/{}/comm".format(pid, tid)) as handle:
                names[int(tid)] = handle.read().strip()
        except OSError:
            continue
    try:
        dump = subprocess.run([_tool("py-spy"), "dump", "--pid", str(pid)], capture_output=True, text=True,
                              timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return names
    for tid, name in re.findall(r'^Thread (\d+) \(\w+\): "([^"]*)"', dump, re.MULTILINE):
        names[int(tid)] = "python:" + name
    return names


def _signal(process: subprocess.Popen, sig: int, timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the three peers ---------------------------------------------------------------
class Simulator:
    """pvapy-ad-sim-server; its first frame goes out ``start_delay`` seconds after launch."""

    def __init__(self, ports: Dict[str, Dict[str, int]], workdir: str, rate: float, duration: float,
                 start_delay: float) -> None:
        self.log_path = os.path.join(workdir, "sim.log")
        command = [
            _tool("pvapy-ad-sim-server"), "-cn", DETECTOR_PV, "-nx", str(FRAME_SIZE), "-ny", str(FRAME_SIZE),
            "-dt", "uint16", "-fps", str(rate), "-rt", str(duration), "-std", str(start_delay),
            "-shd", "3600", "-rp", "0", "-dc",
        ]
        self.first_frame_at = time.monotonic() + start_delay
        self._channel: Any = None
        self.process = subprocess.Popen(command, env=pva_env(ports, "sim"), stdout=open(self.log_path, "w"),
                                        stderr=subprocess.STDOUT)

    def runtime(self) -> Optional[float]:
        """Seconds between its first and last frame, once it has stopped publishing."""
        with open(self.log_path) as handle:
            found = re.search(r"after reaching runtime of ([0-9.]+) seconds", handle.read())
        return float(found.group(1)) if found else None

    def frames_sent(self) -> int:
        """The last uniqueId it published; ids run 1..N, one per frame (0 before the first)."""
        import pvaccess

        if self._channel is None:
            self._channel = pvaccess.Channel(DETECTOR_PV)  # one per trial (see Appliance)
            self._channel.setTimeout(2.0)
        return int(self._channel.get("field(uniqueId)")["uniqueId"])

    def wait_finished(self, duration: float) -> None:
        """Until it reports its runtime reached; it has been seen to stall before its first frame."""
        deadline = self.first_frame_at + duration * 1.5 + 30
        while self.runtime() is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("simulator did not finish its run; see {}".format(self.log_path))
            time.sleep(0.5)

    def wait_serving(self, timeout: float) -> None:
        """Until its PV answers (it builds its frame cache first)."""
        import pvaccess

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.frames_sent()
                return
            except pvaccess.PvaException:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("simulator not serving; see {}".format(self.log_path))

    def stop(self) -> None:
        _signal(self.process, signal.SIGTERM, 10.0)  # its own shutdown would sleep first


class HpcConsumer:
    """pvapy-hpc-consumer with the framework's own pass-through processor republishing every frame.

    Without ``-pc`` it runs no processor at all and publishes nothing, so the
    base class is named: its ``process()`` republishes the input unchanged.
    Counters come from the statistics it prints each second (``-rp 1``), not
    its status PV: one benchmark client searching three servers by name was
    not reliable with pvapy here.
    """

    PROCESSOR = "pvapy.hpc.userDataProcessor.UserDataProcessor"

    def __init__(self, ports: Dict[str, Dict[str, int]], workdir: str, queue_size: int, role: str = "hpc",
                 output: str = HPC_OUTPUT, status: str = HPC_STATUS, options: Sequence[str] = ()) -> None:
        self.log_path = os.path.join(workdir, "{}.log".format(role))
        command = [
            _tool("pvapy-hpc-consumer"), "-ic", DETECTOR_PV, "-oc", output, "-sc", status,
            "-pc", self.PROCESSOR, "-sqs", str(queue_size), "-siu", "0", "-rp", "1", "-dc",
        ] + list(options)
        self.process = subprocess.Popen(command, env=pva_env(ports, role), stdout=open(self.log_path, "w"),
                                        stderr=subprocess.STDOUT)

    def status(self) -> Optional[Dict[str, Dict[str, float]]]:
        """The last statistics it printed, by group (receiverStats, processorStats, publisherStats)."""
        with open(self.log_path) as handle:
            text = handle.read()
        groups = {}
        for group in ("receiverStats", "processorStats", "publisherStats"):
            found = re.findall(r"'{}': \{{([^}}]*)\}}".format(group), text)
            if not found:
                return None
            groups[group] = {key: float(value) for key, value in re.findall(r"'(\w+)': ([0-9.]+)", found[-1])}
        return groups

    def stop(self) -> None:
        _signal(self.process, signal.SIGINT, 10.0)  # it prints its final statistics on the way out


def start_viewer(ports: Dict[str, Dict[str, int]], workdir: str, name: str, pvs: Sequence[str],
                 queue_size: int) -> ViewerProcess:
    """A p4p display on ``pvs`` (of any role's server)."""
    return ViewerProcess(list(pvs), pva_env(ports, "bench"),
                         os.path.join(workdir, "viewer-{}.log".format(name)), queue_size)


def appliance_sections(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """The config the benchmark changes from the defaults (everything else is as shipped)."""
    sections: Dict[str, Dict[str, Any]] = {"detector": {"queue_size": args.queue_size}, "publish": {"status_period_s": 0.5},
                                           "mosaic": {"pixel_size_m": 1e-8}}  # P:Mosaic as at a beamline
    if args.cpu_threads is not None:
        sections["engine"] = {"cpu_threads": args.cpu_threads}
    return sections


class Appliance:
    """``ptychonn-edge run`` with the benchmark's config, started and watched as the demo and tests do.

    Its status comes through one monitor (``appliance.sim.process.StatusWatch``): pvapy
    crashed here (SIGSEGV) now and then when a client polled with gets.
    """

    def __init__(self, ports: Dict[str, Dict[str, int]], workdir: str, model: str, args: argparse.Namespace) -> None:
        from appliance.sim.process import ApplianceProcess, write_config

        config = write_config(os.path.join(workdir, "appliance.yaml"), DETECTOR_PV, PREFIX, engine_path=model,
                              engine_dir=workdir, **appliance_sections(args))
        self.peer = ApplianceProcess(config, pva_env(ports, "appliance"), PREFIX)
        self.pid = self.peer.process.pid

    def wait_ready(self, timeout: float) -> None:
        """Until it serves and is connected to the detector PV (or fail with its output)."""
        self.peer.wait_ready(timeout)

    def status(self) -> Dict[str, Any]:
        return self.peer.status()

    def stop(self) -> None:
        self.peer.stop()


def start_profiles(pids: Dict[str, int], workdir: str, seconds: float) -> Dict[str, str]:
    """py-spy on every process for the streaming window: collapsed stacks, native frames, per thread.

    Native stacks need the process paused per sample (about 1-2 % slower at 200 Hz):
    profiled trials are for finding where time goes, not for the rate tables.
    """
    profiles = {}
    for name, pid in pids.items():
        path = os.path.join(workdir, "{}.pyspy.txt".format(name))
        subprocess.Popen([_tool("py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds) + 1),
                          "--rate", "200", "--format", "raw", "--native", "--threads",
                          "--output", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        profiles[name] = path
    return profiles


# -- one trial ------------------------------------------------------------------------
def appliance_verdict(status: Dict[str, Any], sent: int) -> Dict[str, Any]:
    dropped = json.loads(status["json"])["dropped"]
    result = {
        "received": status["received"], "published": status["published"],
        "dropped_total": status["dropped_total"], "dropped": {k: v for k, v in dropped.items() if v},
        "missing_upstream": status["missing_upstream"], "upstream_overruns": status["upstream_overruns"],
        "latency_p50_ms": status["latency_p50_ms"], "latency_p99_ms": status["latency_p99_ms"],
        "latency_max_ms": status["latency_max_ms"],
    }
    result["lost"] = sent - status["published"]
    result["zero_loss"] = (
        status["received"] == status["published"] == sent and status["dropped_total"] == 0
        and status["missing_upstream"] == 0 and status["upstream_overruns"] == 0
    )
    return result


def hpc_verdict(status: Dict[str, Dict[str, float]], sent: int) -> Dict[str, Any]:
    """Zero loss: ids 1..sent all processed (no gap, none overrun, the last one seen) and republished.

    With ``-siu 0`` nothing is skipped, so the empty update every monitor gets
    on connect (id 0) is processed and published too: counts may be sent + 1.
    """
    processor, receiver, publisher = status["processorStats"], status["receiverStats"], status["publisherStats"]
    counts = {
        "processed": int(processor["nProcessed"]), "received": int(receiver["nReceived"]),
        "published": int(publisher.get("nPublished", 0)), "missed": int(processor["nMissed"]),
        "overruns": int(receiver["nOverruns"]), "errors": int(processor["nErrors"]),
        "last_id": int(processor["lastObjectId"]),
    }
    result: Dict[str, Any] = dict(counts)
    result["lost"] = counts["missed"] + max(0, sent - counts["last_id"])
    result["zero_loss"] = (
        result["lost"] == 0 and counts["overruns"] == 0 and counts["errors"] == 0
        and counts["processed"] >= sent and counts["published"] >= sent
    )
    return result


def _wait_settled(read: Any, count: Any, target: int, quiet_s: float, timeout_s: float) -> Any:
    """Poll ``read()`` until ``count(value)`` reaches ``target`` or stops moving for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last, since, value = None, time.monotonic(), None
    while time.monotonic() < deadline:
        value = read()
        current = count(value) if value is not None else None
        if current is not None and current >= target:
            return value
        if current != last:
            last, since = current, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return value
        time.sleep(0.25)  # remote counters: no event to await
    return value


def run_trial(ports: Dict[str, Dict[str, int]], model: str, args: argparse.Namespace, rate: float,
              start_delay: float) -> Dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="{}hz-".format(int(rate)), dir=args.workdir)
    trial: Dict[str, Any] = {"rate_hz": rate, "duration_s": args.duration, "queue_size": args.queue_size,
                             "appliance_config": appliance_sections(args), "workdir": workdir}
    sim = Simulator(ports, workdir, rate, args.duration, start_delay)
    appliance = hpc = None
    viewers: Dict[str, ViewerProcess] = {}
    try:
        sim.wait_serving(timeout=start_delay)  # consumers that start before it searched unreliably here
        appliance = Appliance(ports, workdir, model, args)
        hpc = HpcConsumer(ports, workdir, args.queue_size)
        appliance.wait_ready(timeout=start_delay + 20)
        while not ((hpc.status() or {}).get("receiverStats", {}).get("nReceived", 0) >= 1):  # connect update
            if time.monotonic() > sim.first_frame_at + 20:
                raise RuntimeError("pvapy-hpc-consumer did not connect; see {}/hpc.log".format(workdir))
            time.sleep(0.1)  # remote state without an event
        if args.viewers:
            viewers = start_viewers(ports, workdir, args)
            for viewer in viewers.values():
                viewer.wait_connected(sim.first_frame_at + 20 - time.monotonic())
        ready = time.monotonic()
        trial["ready_margin_s"] = round(sim.first_frame_at - ready, 2)
        if ready > sim.first_frame_at - 0.3:
            trial["invalid"] = "consumers connected {:.1f} s after the first frame could go out".format(
                ready - sim.first_frame_at)
            return trial
        pids = {"appliance": appliance.pid, "hpc": hpc.process.pid, "sim": sim.process.pid}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        window = (time.monotonic(), machine_busy_seconds(), sum(os.times()[:2]))
        threads_before = {name: thread_cpu_seconds(pid) for name, pid in pids.items()}
        if args.profile:
            trial["profiles"] = start_profiles(pids, workdir, sim.first_frame_at - time.monotonic() + args.duration)
        if args.freeze_viewer:
            trial["viewer_frozen"] = freeze_during_stream(viewers["appliance"], sim.first_frame_at, args)
        sim.wait_finished(args.duration)
        sent = sim.frames_sent()
        trial.update(sent=sent, sim_runtime_s=sim.runtime())
        trial["achieved_hz"] = round((sent - 1) / trial["sim_runtime_s"], 1) if trial["sim_runtime_s"] else 0.0
        status = _wait_settled(appliance.status, lambda s: s["published"], sent, 3.0, 60.0)
        _wait_settled(hpc.status, lambda s: s["processorStats"]["lastObjectId"], sent, 3.0, 60.0)
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        ours = sum(cpu_after.values()) - sum(cpu_before.values()) + sum(os.times()[:2]) - window[2]
        # Cores kept busy by everyone else (other users' jobs) while this trial streamed and drained.
        trial["other_load_cores"] = round((machine_busy_seconds() - window[1] - ours) / (time.monotonic() - window[0]), 2)
        trial["thread_cpu_us_per_frame"] = {
            name: per_thread_cost(pid, threads_before[name], sent) for name, pid in pids.items()}
        trial["appliance"] = appliance_verdict(status, sent)
        trial["appliance"]["rss_kib"] = rss_kib(appliance.pid)
        hpc.stop()  # its final statistics are complete
        trial["hpc"] = hpc_verdict(hpc.status() or {}, sent)
        trial["cpu_us_per_frame"] = {
            name: round(1e6 * (cpu_after[name] - cpu_before[name]) / max(sent, 1), 1) for name in pids}
        trial["viewers"] = {name: viewer.report() for name, viewer in viewers.items()}
        return trial
    finally:
        for viewer in viewers.values():
            viewer.report(timeout=0)  # stopped, whatever happened
        if hpc is not None:
            hpc.stop()
        if appliance is not None:
            appliance.stop()
        sim.stop()


def start_viewers(ports: Dict[str, Dict[str, int]], workdir: str, args: argparse.Namespace) -> Dict[str, ViewerProcess]:
    """One display per consumer: the appliance's phase images and mosaic, the baseline's output."""
    return {
        "appliance": start_viewer(ports, workdir, "appliance", [PREFIX + ":Phase", PREFIX + ":Mosaic"],
                                  args.viewer_queue_size),
        "hpc": start_viewer(ports, workdir, "hpc", [HPC_OUTPUT], args.viewer_queue_size),
    }


def freeze_during_stream(viewer: ViewerProcess, first_frame_at: float, args: argparse.Namespace) -> Dict[str, float]:
    """Stop the viewer a third into the stream for ``--freeze-viewer`` seconds, then let it go on."""
    start = first_frame_at + args.duration / 3.0
    time.sleep(max(0.0, start - time.monotonic()))  # a point in the stream's schedule, not a wait for an event
    viewer.freeze()
    frozen_at = time.monotonic()
    time.sleep(args.freeze_viewer)
    viewer.thaw()
    return {"from_s": round(frozen_at - first_frame_at, 2), "seconds": round(time.monotonic() - frozen_at, 2)}


# -- isolation: every trial in a fresh process group ----------------------------------------
RESULT_TAG = "RESULT "


def isolated(args: argparse.Namespace, mode: str, extra: Sequence[str], timeout_s: float) -> Dict[str, Any]:
    """Run ``mode`` in a new process (fresh ports, fresh pvapy) and return its result.

    The child leads a new process group, so whatever it started (simulator,
    appliance, baseline) is killed with it even if it crashes; pvapy did crash
    (SIGSEGV) now and then in a long-lived client polling several servers.
    """
    command = [sys.executable, os.path.abspath(__file__), mode, "--queue-size", str(args.queue_size),
               "--start-delay", str(args.start_delay), "--workdir", args.workdir] + list(extra)
    if args.cpu_threads is not None:
        command += ["--cpu-threads", str(args.cpu_threads)]
    if args.profile:
        command.append("--profile")
    if not args.viewers:
        command.append("--no-viewers")
    command += ["--viewer-queue-size", str(args.viewer_queue_size), "--freeze-viewer", str(args.freeze_viewer)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    watchdog = threading.Timer(timeout_s, _kill_group, args=(child.pid,))
    watchdog.start()
    result: Dict[str, Any] = {}
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
        child.wait()
    finally:
        watchdog.cancel()
        _kill_group(child.pid)  # whatever the child left behind, crashed or not
        child.wait()
    if not result:
        result = {"error": "{} exited {} without a result".format(mode, child.returncode)}
    return result


def per_thread_cost(pid: int, before: Dict[int, float], frames: int) -> Dict[str, float]:
    """CPU microseconds per frame spent by each named thread (threads of one name summed)."""
    after = thread_cpu_seconds(pid)
    names = thread_names(pid)
    costs: Dict[str, float] = {}
    for tid, seconds in after.items():
        spent = seconds - before.get(tid, 0.0)
        if spent > 0:
            name = names.get(tid, "?")
            costs[name] = round(costs.get(name, 0.0) + 1e6 * spent / max(frames, 1), 1)
    return dict(sorted(costs.items(), key=lambda item: -item[1]))


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group a trial child leads: only processes this benchmark started."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- sweep -----------------------------------------------------------------------------
def sweep(args: argparse.Namespace) -> List[Dict[str, Any]]:
    trials = []
    for repeat in range(args.repeats):
        for rate in args.rates:
            for attempt in range(3):
                delay = args.start_delay * (attempt + 1)
                trial = isolated(args, "trial", ["--rate", str(rate), "--duration", str(args.duration),
                                                 "--start-delay-trial", str(delay)],
                                 timeout_s=delay + args.duration + 180)
                trial.update(rate_hz=rate, repeat=repeat, attempt=attempt)
                _emit(args, trial)
                if "invalid" not in trial and "error" not in trial:
                    trials.append(trial)
                    break
    print(sweep_table(trials))
    print()
    print(thread_table(trials))
    return trials


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def sweep_table(trials: List[Dict[str, Any]]) -> str:
    rates = sorted({t["rate_hz"] for t in trials})
    lines = [
        "| rate (Hz) | achieved (Hz, median) | runs | appliance zero-loss runs | appliance lost (median) "
        "| hpc zero-loss runs | hpc lost (median) | appliance p50 / p99 ms (median) "
        "| CPU us/frame appliance / hpc / sim (median) | others' load, cores (median) "
        "| viewers' frames, appliance / hpc (median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    best = {"appliance": 0.0, "hpc": 0.0}
    failed = {"appliance": False, "hpc": False}
    for rate in rates:
        runs = [t for t in trials if t["rate_hz"] == rate]
        ok = {who: sum(1 for t in runs if t[who]["zero_loss"]) for who in best}
        for who in best:
            failed[who] = failed[who] or ok[who] < len(runs)
            if not failed[who]:
                best[who] = rate
        cpu = {who: _median([t["cpu_us_per_frame"][who] for t in runs]) for who in ("appliance", "hpc", "sim")}
        lines.append("| {:.0f} | {:.0f} | {} | {} | {:.0f} | {} | {:.0f} | {:.2f} / {:.2f} | {:.0f} / {:.0f} / {:.0f} | {:.2f} | {} |".format(
            rate, _median([t["achieved_hz"] for t in runs]), len(runs), ok["appliance"],
            _median([t["appliance"]["lost"] for t in runs]), ok["hpc"], _median([t["hpc"]["lost"] for t in runs]),
            _median([t["appliance"]["latency_p50_ms"] for t in runs]),
            _median([t["appliance"]["latency_p99_ms"] for t in runs]),
            cpu["appliance"], cpu["hpc"], cpu["sim"], _median([t.get("other_load_cores", float("nan")) for t in runs]),
            viewer_cell(runs),
        ))
    lines.append("")
    for who, label in (("appliance", "appliance"), ("hpc", "pvapy-hpc-consumer")):
        runs = [t for t in trials if t["rate_hz"] <= best[who]]
        lines.append("{}: zero loss in every run at every requested rate up to {:.0f} Hz; the highest rate the "
                     "simulator delivered in those runs: {:.0f} Hz".format(
                         label, best[who], max([t["achieved_hz"] for t in runs] or [0.0])))
    return "\n".join(lines)


def viewer_cell(runs: List[Dict[str, Any]]) -> str:
    """Frames each consumer's viewer received (its own misses in brackets), or none when run without."""
    if not all(t.get("viewers") for t in runs):
        return "no viewers"
    cells = []
    for name, pv in (("appliance", PREFIX + ":Phase"), ("hpc", HPC_OUTPUT)):
        got = [t["viewers"][name].get(pv, {}) for t in runs]
        cells.append("{:.0f} ({:.0f} missed)".format(_median([g.get("frames", 0) for g in got]),
                                                     _median([g.get("missed", 0) for g in got])))
    return " / ".join(cells)


def thread_table(trials: List[Dict[str, Any]]) -> str:
    """Median CPU microseconds per frame of each thread (EPICS names its threads; Python ones are python:NAME)."""
    columns = []
    for who in ("appliance", "hpc", "sim"):
        totals: Dict[str, float] = {}
        for trial in trials:
            for name, value in trial["thread_cpu_us_per_frame"][who].items():
                totals[name] = totals.get(name, 0.0) + value
        columns += [(who, name) for name, _ in sorted(totals.items(), key=lambda item: -item[1])[:4]]
    lines = ["| rate (Hz) | " + " | ".join("{} {}".format(who, name) for who, name in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for rate in sorted({t["rate_hz"] for t in trials}):
        runs = [t for t in trials if t["rate_hz"] == rate]
        cells = [_median([t["thread_cpu_us_per_frame"][who].get(name, 0.0) for t in runs]) for who, name in columns]
        lines.append("| {:.0f} | ".format(rate) + " | ".join("{:.0f}".format(c) for c in cells) + " |")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> None:
    """Tables from a results file written with --out (sweep trials grouped by appliance config)."""
    with open(args.out) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    trials = [r for r in records if r.get("mode") is None and "appliance" in r and "hpc" in r]
    for config in sorted({json.dumps(t["appliance_config"], sort_keys=True) for t in trials}):
        group = [t for t in trials if json.dumps(t["appliance_config"], sort_keys=True) == config]
        print("\nappliance config: {}\n".format(config))
        print(sweep_table(group))
        print()
        print(thread_table(group))
    for record in records:
        if record.get("mode") in ("soak", "stages"):
            print("\n" + json.dumps(record, indent=1, default=str))


# -- soak (memory) --------------------------------------------------------------------------
def soak(args: argparse.Namespace) -> Dict[str, Any]:
    result = isolated(args, "soak-run", ["--rate", str(args.rate), "--frames", str(args.frames),
                                         "--baseline-frames", str(args.baseline_frames)],
                      timeout_s=args.frames / args.rate * 1.2 + 300)
    result["mode"] = "soak"
    _emit(args, result)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return result


def soak_run(args: argparse.Namespace, ports: Dict[str, Dict[str, int]], model: str) -> Dict[str, Any]:
    """The appliance alone at ``rate`` until ``frames`` are published; RSS at checkpoints."""
    workdir = tempfile.mkdtemp(prefix="soak-", dir=args.workdir)
    duration = args.frames / args.rate * 1.05 + 5
    sim = Simulator(ports, workdir, args.rate, duration, args.start_delay)
    sim.wait_serving(timeout=args.start_delay)
    appliance = Appliance(ports, workdir, model, args)
    checkpoints = sorted(set([args.baseline_frames] + [int(args.frames * f) for f in (0.1, 0.25, 0.5, 0.75, 1.0)]))
    samples: List[Dict[str, Any]] = []
    result: Dict[str, Any] = {"rate_hz": args.rate, "frames": args.frames, "workdir": workdir,
                              "appliance_config": appliance_sections(args)}
    try:
        appliance.wait_ready(timeout=args.start_delay + 20)
        pid = appliance.pid
        window = (time.monotonic(), machine_busy_seconds(), cpu_seconds(pid), cpu_seconds(sim.process.pid))
        while checkpoints:
            status = appliance.status()
            if status["published"] >= checkpoints[0]:
                samples.append({"published": status["published"], "rss_kib": rss_kib(pid),
                                "latency_p50_ms": status["latency_p50_ms"], "latency_p99_ms": status["latency_p99_ms"],
                                "rate_in_hz": status["rate_in_hz"]})
                print("published {:>8}: RSS {} KiB".format(status["published"], samples[-1]["rss_kib"]), flush=True)
                while checkpoints and status["published"] >= checkpoints[0]:
                    checkpoints.pop(0)
                continue
            if sim.runtime() is not None and status["published"] == status["received"]:
                break  # stream over before the last checkpoint (the simulator ran slower than asked)
            time.sleep(0.2)  # remote counters: no event to await
        sim.wait_finished(duration)
        sent = sim.frames_sent()
        status = _wait_settled(appliance.status, lambda s: s["published"], sent, 3.0, 60.0)
        result.update(sent=sent, sim_runtime_s=sim.runtime(), samples=samples,
                      appliance=appliance_verdict(status, sent))
        result["achieved_hz"] = round((sent - 1) / result["sim_runtime_s"], 1)
        spent = {"appliance": cpu_seconds(pid) - window[2], "sim": cpu_seconds(sim.process.pid) - window[3]}
        ours = sum(spent.values())
        result["cpu_us_per_frame"] = {name: round(1e6 * value / max(sent, 1), 1) for name, value in spent.items()}
        result["other_load_cores"] = round(
            (machine_busy_seconds() - window[1] - ours) / (time.monotonic() - window[0]), 2)
        first, last = samples[0]["rss_kib"], samples[-1]["rss_kib"]
        result["rss_change_pct"] = round(100.0 * (last - first) / first, 2)
    finally:
        appliance.stop()
        sim.stop()
    return result


# -- stages (in process) ---------------------------------------------------------------------
def stages(args: argparse.Namespace, model: str, ports: Dict[str, Dict[str, int]]) -> Dict[str, float]:
    """Microseconds per frame of each hot-path stage, run in this process on one cached NTNDArray.

    Receive-side pvAccess work (deserialising, the PvObject handed to Python) is
    not in here; the live profile of ``sweep`` shows it. The output record has a
    viewer (unless ``--no-viewers``), as at a beamline.
    """
    import numpy as np
    import yaml
    from pvapy.utility.adImageUtility import AdImageUtility

    from appliance.config import load_config
    from appliance.engines import open_engine
    from appliance.ingest import Ingest
    from appliance.pva import Server, attributes
    from appliance.ring import FrameRing
    from appliance.telemetry import Telemetry

    workdir = args.workdir
    config_path = os.path.join(workdir, "stages.yaml")
    with open(config_path, "w") as handle:
        yaml.safe_dump(appliance_sections(args), handle)
    config = load_config(config_path)
    engine = open_engine(model, config.pipeline.max_batch, config.engine.cpu_threads)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 65535, (FRAME_SIZE, FRAME_SIZE), dtype=np.uint16)
    pv = AdImageUtility.generateNtNdArray2D(1, frame, FRAME_SIZE, FRAME_SIZE, np.uint16, None, None)
    pv["attribute"] = list(attributes({"SampleX": 1.0e-6, "SampleY": 2.0e-6, "ColorMode": 0}))  # as a beamline's
    telemetry = Telemetry(config.publish.latency_window)
    ring = FrameRing(config.pipeline.ring_capacity, engine.io.image_shape, engine.io.input.dtype)
    ingest = Ingest(config, ring, telemetry)
    server = Server()
    record = server.add_image("BENCHSTAGES:Phase")
    viewer = None
    if args.viewers:
        viewer = start_viewer(ports, workdir, "stages", ["BENCHSTAGES:Phase"], args.viewer_queue_size)
        viewer.wait_connected(20)
    batch_size = config.pipeline.max_batch
    names = ("ingest (decode + one write into the ring)", "batch (ring.take)",
             "inference (identity ONNX, batch {})".format(batch_size),
             "publish (P:Phase update, {})".format("one p4p subscriber" if viewer else "no subscriber"))
    seconds = dict.fromkeys(names, 0.0)
    warm_up = ring.capacity  # one lap of the ring first: its pages are touched once, then reused
    n = args.stage_frames - args.stage_frames % batch_size
    try:
        for first in range(1, warm_up + n + 1, batch_size):
            start = time.perf_counter()
            for unique_id in range(first, first + batch_size):
                pv["uniqueId"] = unique_id
                ingest.on_update(pv)
            taken = time.perf_counter()
            batch = ring.take(batch_size)
            inferred = time.perf_counter()
            phase = engine.run(batch.frames)["phase"]
            published = time.perf_counter()
            for index, meta in enumerate(batch.metas):
                record.publish_frame(phase[index], meta)
                telemetry.counters.published += 1
                now = time.monotonic()
                telemetry.latency.add(now - batch.arrivals[index], now)
            ring.release(batch)
            done = time.perf_counter()
            if first > warm_up:
                for name, span in zip(names, (taken - start, inferred - taken, published - inferred, done - published)):
                    seconds[name] += span
    finally:
        viewed = viewer.report() if viewer is not None else {}
        server.close()
        engine.close()
        ring.close()
    n_total = warm_up + n
    if telemetry.counters.dropped_total or telemetry.counters.published != n_total:
        raise RuntimeError("stage run lost frames: published {} of {}, dropped {}".format(
            telemetry.counters.published, n_total, telemetry.counters.dropped_total))
    costs = {name: 1e6 * value / n for name, value in seconds.items()}
    print("| stage | us per frame |\n| --- | --- |")
    for name, value in costs.items():
        print("| {} | {:.1f} |".format(name, value))
    print("| total | {:.1f} |".format(sum(costs.values())))
    fields = field_costs(pv, n)
    print("\n| NTNDArray field read through pvapy | us per read |\n| --- | --- |")
    for name, value in fields.items():
        print("| `pv[{!r}]` | {:.1f} |".format(name, value))
    if viewed:
        print("\nviewer: {}".format(json.dumps(viewed["BENCHSTAGES:Phase"])))
    _emit(args, {"mode": "stages", "frames": n, "cpu_threads": args.cpu_threads, "us_per_frame": costs,
                 "field_read_us": fields, "viewer": viewed})
    return costs


def field_costs(pv: Any, reads: int) -> Dict[str, float]:
    """What reading each field ingest decodes costs: pvapy builds Python objects for every read."""
    costs = {}
    for name in ("uniqueId", "value", "codec", "dimension", "attribute", "timeStamp", "dataTimeStamp",
                 "uncompressedSize"):
        start = time.perf_counter()
        for _ in range(reads):
            pv[name]
        costs[name] = 1e6 * (time.perf_counter() - start) / reads
    return costs


# -- entry point --------------------------------------------------------------------------------
def _emit(args: argparse.Namespace, record: Dict[str, Any]) -> None:
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
    if record.get("mode") is None:
        print(_trial_line(record), flush=True)



def _trial_line(trial: Dict[str, Any]) -> str:
    if "error" in trial:
        return "{:.0f} Hz: trial failed ({}), retrying".format(trial["rate_hz"], trial["error"])
    if "invalid" in trial:
        return "{:.0f} Hz: invalid trial ({}), retrying with a longer start delay".format(trial["rate_hz"], trial["invalid"])
    a, h = trial["appliance"], trial.get("hpc")
    text = "{:.0f} Hz (achieved {:.0f}): sent {} | appliance published {} lost {} {} p50 {:.2f} p99 {:.2f} ms".format(
        trial["rate_hz"], trial["achieved_hz"], trial["sent"], a["published"], a["lost"],
        "OK" if a["zero_loss"] else "LOSS {}".format({k: a[k] for k in ("dropped", "missing_upstream", "upstream_overruns")}),
        a["latency_p50_ms"], a["latency_p99_ms"],
    )
    if h:
        text += " | hpc processed {} lost {} {}".format(
            h["processed"], h["lost"], "OK" if h["zero_loss"] else "LOSS (missed {}, overruns {})".format(h["missed"], h["overruns"]))
    for name, pvs in sorted(trial.get("viewers", {}).items()):
        for pv, got in sorted(pvs.items()):
            text += " | viewer {} {}: {} frames, missed {}".format(name, pv, got["frames"], got.get("missed", 0))
    return text + " | CPU us/frame {} | others' load {} cores".format(trial["cpu_us_per_frame"], trial["other_load_cores"])


def add_sweep_arguments(parser: argparse.ArgumentParser, rates: List[float], duration: float, start_delay: float,
                        queue_help: str) -> None:
    """The options every sweep of simulator trials has (here and in scripts/gpu_fullpath_bench.py)."""
    parser.add_argument("--rates", type=lambda text: [float(rate) for rate in text.split(",")], default=rates,
                        help="sweep: frame rates in Hz, comma-separated")
    parser.add_argument("--duration", type=float, default=duration, help="sweep: seconds of streaming per trial")
    parser.add_argument("--queue-size", type=int, default=1000, help=queue_help)
    parser.add_argument("--start-delay", type=float, default=start_delay,
                        help="seconds from launch to the simulator's first frame (consumers must be connected by then)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("sweep", "soak", "stages", "report", "trial", "soak-run"),
                        help="report prints the tables of an --out file; trial and soak-run are the isolated "
                             "children of sweep and soak")
    add_sweep_arguments(parser, [500, 1000, 2000, 3000, 4000], duration=15.0, start_delay=10.0,
                        queue_help="server-side monitor queue for both consumers (detector.queue_size and -sqs)")
    parser.add_argument("--repeats", type=int, default=3, help="sweep: trials per rate")
    parser.add_argument("--start-delay-trial", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=2500.0, help="soak: frame rate in Hz")
    parser.add_argument("--frames", type=int, default=1000000, help="soak: frames to publish")
    parser.add_argument("--baseline-frames", type=int, default=10000, help="soak: first RSS checkpoint")
    parser.add_argument("--stage-frames", type=int, default=20000, help="stages: frames per stage")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="engine.cpu_threads for the appliance (default: the appliance's own default)")
    parser.add_argument("--no-viewers", dest="viewers", action="store_false",
                        help="sweep: no subscriber on the output PVs (not what a beamline sees; for comparison only)")
    parser.add_argument("--viewer-queue-size", type=int, default=64, help="server-side queue of each viewer's monitors")
    parser.add_argument("--freeze-viewer", type=float, default=0.0,
                        help="sweep: SIGSTOP the appliance's viewer for this many seconds a third into each stream")
    parser.add_argument("--profile", action="store_true",
                        help="sweep: record each process with py-spy while frames flow (files in the trial's workdir)")
    parser.add_argument("--out", help="append every result as a JSON line to this file (report: read it)")
    parser.add_argument("--workdir", help="where each run keeps its config, logs and profiles "
                                          "(default: a new directory under the system's temporary one)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.mode == "report":
        report(args)
        return 0
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="bench-stream-")
        print("run directories, logs and profiles: {}".format(args.workdir), flush=True)
    if args.mode == "sweep":
        sweep(args)
        return 0
    if args.mode == "soak":
        return 0 if soak(args).get("appliance", {}).get("zero_loss") else 1
    if "pvaccess" in sys.modules:
        print("bench_stream: pvaccess is already imported; its search settings cannot be set", file=sys.stderr)
        return 2
    ports = allocate_ports()
    os.environ.update(pva_env(ports, "bench"))
    from onnx_models import affine_model

    model = os.path.join(args.workdir, "identity.onnx")
    if not os.path.exists(model):
        affine_model(model, size=FRAME_SIZE)
    if args.mode == "stages":
        stages(args, model, ports)
        return 0
    if args.mode == "trial":
        result = run_trial(ports, model, args, args.rate, args.start_delay_trial or args.start_delay)
    else:
        result = soak_run(args, ports, model)
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
