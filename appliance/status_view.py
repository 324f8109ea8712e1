"""P:Status for people: one read (``ptychonn-edge status``) or a live page (``ptychonn-edge watch``).

Both read the appliance only through its PVs, as any EPICS client would, so they
work from another host and over ssh. p4p (pvxs) is the client where it is
installed: pvapy's server keeps about 41 kB for each channel a pvapy client ever
opened to it, even after that client has gone, while a channel from p4p leaves
nothing behind (docs/deploy.md, "Reading the status"). ``watch`` holds one
monitor for its whole session rather than reading again each second, so even
through pvapy it costs the appliance one channel.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

# P:Status is published once a second; a page older than this says so.
STALE_AFTER_S = 3.0
_VERDICTS_SHOWN = 5
# The service's EPICS settings (systemd's EnvironmentFile=): how a client on the same host reaches it.
APPLIANCE_ENVIRONMENT = "/etc/ptychonn-edge/environment"
EXIT_REJECTED = 1
EXIT_NO_VERDICT = 3


def read_environment_file(path: str) -> Dict[str, str]:
    """NAME=value lines as systemd reads them (comments, blank lines and quotes allowed); {} if unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read(1 << 16).splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    variables = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        name, value = line.split("=", 1)
        variables[name.strip()] = value.strip().strip("\"'")
    return variables


def local_client_settings(service: Dict[str, str]) -> Dict[str, str]:
    """The PVA client settings that find the appliance whose environment is ``service``, from this host.

    The service's own search port and interface tell where it answers; its client
    settings (which find the detector) are of no use here.
    """
    interfaces = [a for a in service.get("EPICS_PVAS_INTF_ADDR_LIST", "").split() if a != "0.0.0.0"]
    address = interfaces[0] if interfaces else "127.0.0.1"
    udp = service.get("EPICS_PVAS_BROADCAST_PORT") or service.get("EPICS_PVA_BROADCAST_PORT")
    tcp = service.get("EPICS_PVAS_SERVER_PORT") or service.get("EPICS_PVA_SERVER_PORT")
    settings = {"EPICS_PVA_AUTO_ADDR_LIST": "NO", "EPICS_PVA_ADDR_LIST": address + (":" + udp if udp else "")}
    if tcp:
        settings["EPICS_PVA_NAME_SERVERS"] = "{}:{}".format(address, tcp)
    return settings


def use_local_appliance(environment_path: str = APPLIANCE_ENVIRONMENT) -> None:
    """Find this host's appliance as its service is configured, unless this shell says otherwise:
    a bare shell on the device (or over ssh) would otherwise search the whole network."""
    service = read_environment_file(environment_path)
    if not service or any(name.startswith("EPICS_PVA") for name in os.environ):
        return
    os.environ.update(local_client_settings(service))


def _p4p_conf() -> Dict[str, str]:
    """This process's PVA settings for p4p; pvxs's TCP name search (EPICS_PVA_NAME_SERVERS) finds no
    pvapy server (measured), so p4p searches by UDP only."""
    return {k: v for k, v in os.environ.items() if k.startswith("EPICS_PVA") and k != "EPICS_PVA_NAME_SERVERS"}


def read_status(pv_name: str, timeout_s: float) -> Dict[str, Any]:
    """P:Status's fields, through p4p where it is installed, else through pvapy."""
    try:
        from p4p.client.thread import Context
    except ImportError:  # no p4p wheel for aarch64 (the Jetson): one pvapy channel, 41 kB kept
        from appliance.pva import read_once

        return read_once(pv_name, timeout_s)
    with Context("pva", useenv=False, conf=_p4p_conf()) as context:
        return dict(context.get(pv_name, timeout=timeout_s).todict())


class StatusFeed:
    """The latest P:Status snapshot from one monitor, and when it arrived.

    The client library calls back on its own thread; the page is drawn on the
    caller's, so the snapshot is handed over under a lock.
    """

    def __init__(self, pv_name: str) -> None:
        self.pv_name = pv_name
        self._lock = threading.Condition()
        self._latest: Optional[Dict[str, Any]] = None
        self._arrived = 0.0
        self._close: Callable[[], None] = self._subscribe()

    def _subscribe(self) -> Callable[[], None]:
        try:
            from p4p.client.thread import Context
        except ImportError:
            import pvaccess

            channel = pvaccess.Channel(self.pv_name)
            channel.monitor(lambda pv: self._arrive(pv.toDict()), "field()")
            return channel.stopMonitor
        context = Context("pva", useenv=False, conf=_p4p_conf())
        subscription = context.monitor(self.pv_name, self._arrive_p4p)

        def close() -> None:
            subscription.close()
            context.close()

        return close

    def _arrive_p4p(self, value: Any) -> None:
        self._arrive(dict(value.todict()))

    def _arrive(self, fields: Dict[str, Any]) -> None:
        with self._lock:
            self._latest, self._arrived = fields, time.monotonic()
            self._lock.notify_all()

    def wait_for(self, done: Callable[[Dict[str, Any]], bool], timeout_s: float) -> Optional[Dict[str, Any]]:
        """The first snapshot (the latest one included) for which ``done`` holds; None after ``timeout_s``."""
        with self._lock:
            held = self._lock.wait_for(lambda: self._latest is not None and done(snapshot(self._latest)), timeout_s)
            return snapshot(self._latest) if held and self._latest is not None else None

    def latest(self) -> Tuple[Optional[Dict[str, Any]], float]:
        """(fields, seconds since they arrived); (None, 0.0) before the first update."""
        with self._lock:
            if self._latest is None:
                return None, 0.0
            return self._latest, time.monotonic() - self._arrived

    def close(self) -> None:
        self._close()


def snapshot(fields: Dict[str, Any]) -> Dict[str, Any]:
    """The whole status snapshot from P:Status's ``json`` field; figures not measured yet (NaN there,
    e.g. jetson-stats' on a machine without them) become None, so it prints as strict JSON."""
    return json.loads(fields["json"], parse_constant=lambda _: None)


def format_status(status: Dict[str, Any]) -> str:
    """A readable page of P:Status for operators."""
    latency = status.get("latency") or {}

    def ms(value: Optional[float]) -> str:
        return "-" if value is None else "{:.2f} ms".format(value)

    drops = ", ".join("{} {}".format(k, v) for k, v in sorted(status.get("dropped", {}).items()) if v) or "none"
    lines = [
        "state:      {}".format(status.get("state")),
        "engine:     {} [{}] sha256 {}".format(
            status.get("engine_name") or "none", status.get("engine_backend") or "-", (status.get("engine_sha256") or "-")[:16]
        ),
        "frames:     received {}, published {}, dropped {}".format(
            status.get("received"), status.get("published"), status.get("dropped_total")),
        "upstream:   {} missing (gaps in uniqueId), {} server queue overruns".format(
            status.get("missing_upstream"), status.get("upstream_overruns")),
        _restart(status),
        "drops:      {}".format(drops),
        "rates:      in {:.1f} Hz, out {:.1f} Hz".format(status.get("rate_in_hz", 0.0), status.get("rate_out_hz", 0.0)),
        "latency:    p50 {}, p99 {}, max {}".format(ms(latency.get("p50_ms")), ms(latency.get("p99_ms")), ms(latency.get("max_ms"))),
        "queue:      {}".format(_queue(status)),
        _detector(status),
    ]
    if status.get("distributor"):
        lines.append(_distributor(status["distributor"]))
    lines += [
        "engines:    {} swaps, {} rejected{}; build {}".format(
            status.get("engine_swaps", 0), status.get("engine_rejections", 0),
            ", last: " + status["last_rejection"] if status.get("last_rejection") else "",
            status.get("engine_build") or "off"),
        "uptime:     {:.0f} s".format(status.get("uptime_s", 0.0)),
    ]
    for error in status.get("recent_errors") or []:
        lines.append("last error: {}".format(error))
    return "\n".join(lines)


def _restart(status: Dict[str, Any]) -> str:
    """What the previous run lost at its end (a crash or kill -9): ``missing`` counts only this run's gaps."""
    gap = status.get("restart_gap")
    if not isinstance(gap, dict):
        return "restart:    - (no previous run recorded, or nothing published yet)"
    if gap.get("frames_lost") is None:
        return "restart:    new acquisition (first uniqueId {} after the previous run's {})".format(
            gap.get("first_id"), gap.get("previous_last_id"))
    return "restart:    {} frames lost (the previous run last published uniqueId {}, this one first {})".format(
        gap["frames_lost"], gap.get("previous_last_id"), gap.get("first_id"))


def _queue(status: Dict[str, Any]) -> str:
    depth, capacity = status.get("queue_depth"), status.get("ring_capacity")
    if not capacity:
        return "{} frames".format(depth)
    return "{} of {} frames ({:.0f} % of the ring)".format(depth, capacity, 100.0 * (depth or 0) / capacity)


def watch_page(pv_name: str, status: Optional[Dict[str, Any]], age_s: float) -> List[str]:
    """The lines of the live page: the status page plus what changes over a scan (detector, engines, GPU)."""
    if status is None:
        return ["{}: waiting for the first update (is the appliance running, and do EPICS_PVA_ADDR_LIST and "
                "EPICS_PVA_BROADCAST_PORT reach it?)".format(pv_name), "", "q quits"]
    freshness = "updated {:.0f} s ago".format(age_s)
    if age_s > STALE_AFTER_S:
        freshness = "STALE: no update for {:.0f} s (appliance stopped or unreachable)".format(age_s)
    lines = ["ptychonn-edge  {}  {}".format(pv_name, freshness), ""]
    lines += format_status(status).splitlines()
    lines += _verdicts(status)
    jetson = _jetson(status)
    if jetson:
        lines += ["", jetson]
    lines += ["", "q quits"]
    return lines


def _distributor(distributor: Dict[str, Any]) -> str:
    share = distributor.get("share")
    return "shared:     group {} ({} per turn{}), this instance's share {}, {} ids went to peers".format(
        distributor.get("group"), distributor.get("updates"),
        ", set " + distributor["set"] if distributor.get("set") else "",
        "-" if share is None else "{:.1%}".format(share), distributor.get("peer_ids"))


def _detector(status: Dict[str, Any]) -> str:
    pv = status.get("detector_pv") or "?"
    if status.get("detector_connected"):
        return "detector:   {} connected".format(pv)
    waiting = status.get("detector_waiting_s")
    return "detector:   {} NOT CONNECTED{}".format(pv, "" if waiting is None else " for {:.0f} s".format(waiting))


def _verdicts(status: Dict[str, Any]) -> List[str]:
    """The latest engine verdicts, newest last: what was deployed and what became of it."""
    lines = []
    for verdict in (status.get("engine_verdicts") or [])[-_VERDICTS_SHOWN:]:
        mark = "accepted" if verdict.get("accepted") else "REJECTED"
        reason = verdict.get("reason") or ""
        lines.append("  {} {}{}".format(mark, verdict.get("file"), ": " + reason if reason else ""))
    return lines


def _jetson(status: Dict[str, Any]) -> str:
    """The Jetson line from jetson-stats' figures; empty where there are none (not a Jetson)."""
    if not status.get("jetson_available"):
        return ""
    figures = [("GPU", "gpu_load_pct", "{:.0f} %"), ("GPU temp", "temp_gpu_c", "{:.0f} C"),
               ("CPU temp", "temp_cpu_c", "{:.0f} C"), ("power", "power_total_w", "{:.1f} W")]
    parts = ["{} {}".format(label, form.format(status[key])) for label, key, form in figures
             if isinstance(status.get(key), (int, float)) and status[key] == status[key]]
    return "jetson:     " + (", ".join(parts) or "no figures")


def verdict_of(status: Dict[str, Any], sha256: str) -> Optional[Tuple[int, str]]:
    """(exit code, what to tell the person who deployed ``sha256``) once the appliance has judged it."""
    judged = [v for v in status.get("engine_verdicts") or [] if v.get("sha256") == sha256]
    if not judged:
        return None
    verdict = judged[-1]
    if not verdict.get("accepted"):
        return EXIT_REJECTED, "rejected: {}".format(verdict.get("reason") or "no reason given")
    if status.get("engine_sha256") != sha256:
        return None  # accepted; the swap shows in a later snapshot
    return 0, "accepted and serving: {} [{}]".format(verdict.get("file"), status.get("engine_backend"))


def wait_for_verdict(pv_name: str, sha256: str, timeout_s: float) -> Tuple[int, str]:
    """What the appliance made of a deployed file, by its sha256, as P:Status reports it."""
    feed = StatusFeed(pv_name)
    try:
        status = feed.wait_for(lambda s: verdict_of(s, sha256) is not None, timeout_s)
        latest, _ = feed.latest()
    finally:
        feed.close()
    outcome = verdict_of(status, sha256) if status is not None else None
    if outcome is not None:
        return outcome
    if latest is None:
        return EXIT_NO_VERDICT, "no answer from {} within {:.0f} s: is the service running?".format(pv_name, timeout_s)
    last = snapshot(latest)
    if any(v.get("sha256") == sha256 for v in last.get("engine_verdicts") or []):
        return 0, "accepted, but {} serves (a newer file?)".format(last.get("engine_name") or "nothing")
    return EXIT_NO_VERDICT, "no verdict within {:.0f} s (pending: {})".format(
        timeout_s, ", ".join(last.get("engine_pending") or []) or "nothing")


def watch(pv_name: str, refresh_s: float) -> int:
    """Redraw the page every ``refresh_s`` until q (or Ctrl-C); curses keeps it usable over ssh."""
    import curses

    feed = StatusFeed(pv_name)

    def loop(screen: Any) -> None:
        try:
            curses.curs_set(0)
        except curses.error:  # a terminal without cursor control
            pass
        screen.timeout(max(1, int(refresh_s * 1000)))
        while True:
            fields, age = feed.latest()
            status = snapshot(fields) if fields else None
            _draw(screen, watch_page(pv_name, status, age))
            if screen.getch() in (ord("q"), ord("Q")):
                return

    try:
        curses.wrapper(loop)
    except KeyboardInterrupt:
        pass
    finally:
        feed.close()
    return 0


def _draw(screen: Any, lines: List[str]) -> None:
    import curses

    height, width = screen.getmaxyx()
    screen.erase()
    for row, line in enumerate(lines[: height]):
        try:
            screen.addnstr(row, 0, line, max(0, width - 1))
        except curses.error:  # the bottom-right cell of a tiny terminal
            pass
    screen.refresh()
