"""The full-path GPU benchmark's harness, checked without a GPU (scripts/gpu_fullpath_bench.py --cpu).

The GPU figures can only be taken on a lent CUDA machine, in one short run; a
harness that miscounts would waste it. Here the same harness runs end to end
on the CPU: a real pvapy-ad-sim-server, the appliance in process, a subscriber
process, with every process on 127.0.0.1 on ports of its own (the script sets
the loopback PVA environment of each process it starts, as bench_stream does).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_fullpath_bench.py")


def _sim_server() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "pvapy-ad-sim-server")
    return beside if os.path.exists(beside) else (shutil.which("pvapy-ad-sim-server") or "")


def _bench():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_fullpath_bench

    return gpu_fullpath_bench


@pytest.mark.skipif(not _sim_server(), reason="pvapy-ad-sim-server (pvapy's simulator) is not installed")
def test_cpu_harness_streams_every_frame_through_and_counts_agree(tmp_path):
    """The harness's accounting, not the machine's speed: whether a busy CPU kept up at 500 Hz is no verdict here."""
    bench = _bench()
    report_path = tmp_path / "fullpath.json"
    run = subprocess.run(
        [sys.executable, SCRIPT, "--cpu", "--rates", "500", "--duration", "2", "--variants", "pinned",
         "--start-delay", "8", "--json", str(report_path), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "HARNESS CHECK" in run.stdout
    report = json.loads(report_path.read_text())
    assert report["mode"] == "cpu-harness-check"
    judged = [t for t in report["trials"] if "zero_loss" in t]
    assert judged, report["trials"]  # each attempt failed or was invalid: their errors say why
    trial = judged[-1]
    appliance, seen, outputs, sent = trial["appliance"], trial["subscriber"], trial["outputs"], trial["sent"]
    assert sent > 0 and trial["drained"], trial
    # Every frame the simulator sent is accounted for: received or missing upstream; published or dropped.
    assert appliance["received"] + appliance["missing_upstream"] <= sent, trial
    assert appliance["published"] + appliance["dropped_total"] == appliance["received"], trial
    assert seen["first_id"] >= 1 and seen["last_id"] <= sent and seen["out_of_order"] == 0, trial
    assert seen["frames"] + seen["missing"] == seen["last_id"] - seen["first_id"] + 1, trial
    assert seen["frames"] <= appliance["published"], trial
    assert outputs["checked"] == appliance["published"] // bench.CHECK_EVERY and outputs["mismatches"] == 0, trial
    # The verdicts follow from those counts.
    lossless = (appliance["received"] == appliance["published"] == sent and appliance["dropped_total"] == 0
                and appliance["missing_upstream"] == appliance["upstream_overruns"] == 0
                and seen["frames"] == sent and seen["first_id"] == 1 and seen["overruns"] == 0)
    assert trial["zero_loss"] == lossless, trial
    assert trial["sustained"] == (trial["zero_loss"] and trial["kept_up"]), trial
    expected_best = 500 if trial["sustained"] else None
    assert report["summary"]["variants"]["pinned"]["highest_sustained_asked_hz"] == expected_best, report["summary"]
    assert trial["ring_memory"] == "pageable" and trial["in_flight"] == 2 and trial["max_batch"] == 8


def test_a_frame_missing_anywhere_is_a_loss_and_a_backlog_is_not_sustained():
    """The verdict, without PVA: each kind of loss the appliance or the subscriber can show fails the trial,
    and so does a backlog a short trial would hide in the ring."""
    bench = _bench()
    sent = 1000
    snapshot = {"received": sent, "published": sent, "dropped": {"ring_full": 0}, "dropped_total": 0,
                "missing_upstream": 0, "upstream_overruns": 0, "batches": 125,
                "latency": {"p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0}}
    seen = {"frames": sent, "first_id": 1, "last_id": sent, "gaps": 0, "missing": 0, "out_of_order": 0,
            "overruns": 0}
    outputs = {"checked": 15, "mismatches": 0, "first_mismatch": None}
    good = bench.judge(snapshot, seen, outputs, sent, max_p99_ms=100.0)
    assert good["zero_loss"] and good["sustained"] and good["appliance"]["latency_p99_ms"] == 2.0

    backlog = bench.judge(dict(snapshot, latency={"p50_ms": 400.0, "p99_ms": 700.0, "max_ms": 800.0}), seen,
                          outputs, sent, max_p99_ms=100.0)
    assert backlog["zero_loss"] and not backlog["kept_up"] and not backlog["sustained"]

    losses = [
        (dict(snapshot, published=sent - 1), seen, outputs),
        (dict(snapshot, received=sent - 2, published=sent - 2, missing_upstream=2), seen, outputs),
        (dict(snapshot, upstream_overruns=1), seen, outputs),
        (dict(snapshot, published=sent - 3, dropped={"ring_full": 3}, dropped_total=3), seen, outputs),
        (snapshot, dict(seen, frames=sent - 1, gaps=1, missing=1), outputs),
        (snapshot, dict(seen, last_id=sent - 1, frames=sent - 1), outputs),
        (snapshot, dict(seen, overruns=1), outputs),
        (snapshot, seen, dict(outputs, mismatches=1)),
        (snapshot, seen, dict(outputs, checked=0)),
    ]
    for case in losses:
        verdict = bench.judge(*case, sent, max_p99_ms=100.0)
        assert not verdict["zero_loss"] and not verdict["sustained"], case
