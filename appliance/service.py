"""Process lifecycle: signals, sd_notify, the progress-gated watchdog, logging.

The appliance runs unattended under systemd, so systemd must be able to tell a
healthy daemon from one that merely has a live main thread. The main thread
therefore only pings the watchdog when the pipeline thread has advanced since
the previous ping; a stuck pipeline starves the watchdog and systemd kills and
restarts the service. Outside systemd (no ``NOTIFY_SOCKET``, or no
systemd-python) every notification is a no-op and the same code runs unchanged.

Exit codes (``RestartPreventExitStatus=2`` in the unit relies on them):
  0  stopped on SIGTERM/SIGINT and fully drained;
  1  the pipeline died, or the drain timed out (frames were lost: the unit shows
     as failed so somebody notices; systemd restarts on the former);
  2  bad configuration or startup failure: restarting would not help.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable, List, Optional

from appliance import jetson_stats
from appliance.config import Config, load_config
from appliance.engines.errors import first_line
from appliance.runtime import Appliance
from appliance.site_setup import unconfigured

log = logging.getLogger(__name__)

SYSLOG_IDENTIFIER = "ptychonn-edge"
_JOURNAL_SOCKET = "/run/systemd/journal/socket"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Upper bound on one wait, so a dead pipeline thread is noticed within a second
# even when the status period and the watchdog interval are long.
_MAX_WAIT_S = 1.0
_log_handler: Optional[logging.Handler] = None  # the one configure_logging() installed


def _under_systemd() -> bool:
    """systemd sets one of these for every service it starts (and JOURNAL_STREAM when stderr goes to the journal)."""
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def configure_logging(level: int = logging.INFO) -> None:
    """Log to journald with structured fields under systemd, to stderr with timestamps otherwise.

    journald adds its own timestamps and keeps extra fields (``extra={"FRAME_ID": 3}``)
    searchable with ``journalctl FRAME_ID=3``; stderr output must carry its own time.
    """
    global _log_handler
    root = logging.getLogger()
    if _log_handler is not None:
        root.removeHandler(_log_handler)
    handler = _journal_handler() if _under_systemd() else None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    _log_handler = handler
    root.addHandler(handler)
    root.setLevel(level)


def _journal_handler() -> Optional[logging.Handler]:
    if not os.path.exists(_JOURNAL_SOCKET):  # e.g. systemd without journald, in a container
        return None
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)


class Notifier:
    """sd_notify through systemd-python, or nothing when not started by systemd."""

    def __init__(self) -> None:
        self._send: Optional[Callable[[str], object]] = None
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        try:
            from systemd import daemon
        except ImportError:
            log.error(
                "NOTIFY_SOCKET is set but systemd-python is not installed: systemd will never see "
                "READY=1 (install python3-systemd, or the 'systemd' extra)"
            )
            return
        self._send = daemon.notify

    @property
    def active(self) -> bool:
        return self._send is not None

    def __call__(self, *assignments: str) -> None:
        if self._send is None:
            return
        try:
            self._send("\n".join(assignments))
        except OSError as exc:  # a vanished socket must not take the appliance down
            log.warning("sd_notify failed: %s", exc)


def watchdog_interval_s() -> Optional[float]:
    """Half of systemd's WatchdogSec, or None when no watchdog is configured for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2e6 if value > 0 else None


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC, which is what systemd compares MONOTONIC_USEC against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SignalWaiter:
    """SIGTERM, SIGINT and SIGHUP as bytes on a socket, whichever thread the kernel picked.

    Native threads started by libraries at import (EPICS, ONNX Runtime) do not
    block signals, so a blocked-mask-plus-sigtimedwait scheme would let the
    default action kill the process when the kernel delivers there. Python's C
    handler writes every signal number to the wakeup fd instead, and the main
    thread waits on it with a timeout.
    """

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        for number in _HANDLED_SIGNALS:
            signal.signal(number, _note_signal)

    def wait(self, timeout_s: float) -> List[int]:
        """Signal numbers received, oldest first; empty after ``timeout_s`` without any."""
        readable, _, _ = select.select([self._read], [], [], timeout_s)
        if not readable:
            return []
        try:
            return [number for number in self._read.recv(256) if number in _HANDLED_SIGNALS]
        except BlockingIOError:
            return []


def _note_signal(number: int, frame: object) -> None:
    """The wakeup fd already carries the signal; this handler only replaces the default action."""


class _WatchdogKeepalive:
    """Feeds the watchdog while ``start()`` or ``stop()`` hold the main thread.

    An engine build at start can take minutes and a drain takes up to
    pipeline.drain_timeout_s; progress means nothing then, and systemd bounds
    both phases by TimeoutStartSec and TimeoutStopSec instead.
    """

    def __init__(self, notify: Notifier, interval_s: Optional[float]) -> None:
        self._notify = notify
        self._interval_s = interval_s
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "_WatchdogKeepalive":
        if self._notify.active and self._interval_s:
            self._thread = threading.Thread(target=self._run, name="watchdog-keepalive", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(self._interval_s):
            self._notify("WATCHDOG=1")

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()


class _ProgressWatchdog:
    """Pings only when the pipeline's progress counter moved since the last ping."""

    def __init__(self, notify: Notifier, appliance: Appliance, interval_s: float) -> None:
        self._notify = notify
        self._appliance = appliance
        self.interval_s = interval_s
        self._last_progress = appliance.progress()
        self._stalled_since: Optional[float] = None
        self.next_due = time.monotonic() + interval_s

    def tick(self, now: float) -> None:
        if now < self.next_due:
            return
        self.next_due = now + self.interval_s
        progress = self._appliance.progress()
        if progress != self._last_progress:
            self._last_progress = progress
            if self._stalled_since is not None:
                log.warning("pipeline progressing again after %.1f s", now - self._stalled_since)
                self._stalled_since = None
            self._notify("WATCHDOG=1")
        elif self._stalled_since is None:
            self._stalled_since = now
            log.warning(
                "pipeline made no progress for %.1f s: withholding the watchdog ping "
                "(systemd restarts the service if this persists)",
                self.interval_s,
            )


class _Service:
    """The main thread's loop: status, watchdog, reload and stop, driven by signals."""

    def __init__(
        self, config: Config, config_path: str, appliance: Appliance, notify: Notifier, signals: SignalWaiter
    ) -> None:
        self._config = config
        self._signals = signals
        self._config_path = config_path
        self._appliance = appliance
        self._notify = notify
        interval = watchdog_interval_s() if notify.active else None
        self._watchdog = _ProgressWatchdog(notify, appliance, interval) if interval else None
        self._next_status = time.monotonic()

    def run(self) -> int:
        """Serve until a stop signal or a pipeline failure; returns the exit code."""
        while True:
            now = time.monotonic()
            reason = self._appliance.failure()
            if reason is not None:
                return self._fail(reason)
            if now >= self._next_status:
                self._send_status()
                self._next_status = now + self._config.publish.status_period_s
            if self._watchdog is not None:
                self._watchdog.tick(now)
            for number in self._signals.wait(self._wait_s(time.monotonic())):
                if number != signal.SIGHUP:
                    return self._stop(signal.Signals(number).name)
                self._reload()

    def _wait_s(self, now: float) -> float:
        deadline = self._next_status
        if self._watchdog is not None:
            deadline = min(deadline, self._watchdog.next_due)
        return min(_MAX_WAIT_S, max(0.0, deadline - now))

    def _send_status(self) -> None:
        line = self._appliance.status_line()
        jetson = jetson_stats.summary(self._appliance.latest_status())
        self._notify("STATUS=" + (line + "; " + jetson if jetson else line))

    def _reload(self) -> None:
        """The appliance re-reads the file itself; settings used here apply after a restart."""
        self._notify("RELOADING=1", "MONOTONIC_USEC={}".format(_monotonic_usec()))
        log.info("reloading %s", self._config_path)
        try:
            self._appliance.reload()
        except Exception as exc:  # keep serving as before; the journal says why
            log.error("reload failed, still serving as before: %s", exc)
            self._notify("READY=1", "STATUS=reload failed (see journal); " + self._appliance.status_line())
            return
        self._notify("READY=1")
        self._send_status()
        log.info("reloaded")

    def _stop(self, signal_name: str) -> int:
        timeout = self._config.pipeline.drain_timeout_s
        self._notify("STOPPING=1", "STATUS=draining (up to {:g} s)".format(timeout))
        log.info("%s: stopping, draining for up to %g s", signal_name, timeout)
        with _WatchdogKeepalive(self._notify, watchdog_interval_s()):
            drained = self._appliance.stop(timeout)
        if not drained:
            log.error("drain timed out after %g s: frames still queued were not published", timeout)
            return EXIT_FAILED
        counters = self._appliance.telemetry.counters
        log.info("stopped, all received frames published (received %d, published %d, dropped %d)",
                 counters.received, counters.published, counters.dropped_total)
        return EXIT_OK

    def _fail(self, reason: str) -> int:
        log.error("pipeline failed: %s", reason)
        self._notify("STOPPING=1", "STATUS=failed: " + (reason.splitlines() or [""])[0])
        try:
            self._appliance.stop(0.0)
        except Exception as exc:  # already failing; the first reason is the one that matters
            log.warning("cleanup after the failure also failed: %s", exc)
        return EXIT_FAILED


def serve(config_path: str) -> int:
    """Run the appliance until stopped; the return value is the process exit code."""
    if not logging.getLogger().handlers:  # the caller may have configured logging already
        configure_logging()
    faulthandler.enable()  # a watchdog SIGABRT then dumps every thread's stack to the journal
    notify = Notifier()
    try:
        config = load_config(config_path)
    except (OSError, ValueError) as exc:
        log.error("cannot load configuration: %s", exc)
        notify("STATUS=bad configuration: " + first_line(exc))
        return EXIT_CONFIG
    problem = unconfigured(config, config_path)
    if problem is not None:
        log.error("not started: %s", problem)
        notify("STATUS=not configured: detector.pv is the example's; run ptychonn-edge setup")
        return EXIT_CONFIG
    # Before start(): a stop request during a long start is served once it is done.
    signals = SignalWaiter()
    appliance = Appliance(config, config_path)
    appliance.add_status_fields(jetson_stats.jetson_status)
    notify("STATUS=starting")
    try:
        with _WatchdogKeepalive(notify, watchdog_interval_s()):
            appliance.start()
    except Exception as exc:
        log.error("startup failed: %s", exc)
        notify("STATUS=startup failed: " + first_line(exc))
        return EXIT_CONFIG
    notify("READY=1")
    log.info("started with %s", config_path, extra={"CONFIG_PATH": config_path})
    return _Service(config, config_path, appliance, notify, signals).run()
