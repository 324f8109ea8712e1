"""``ptychonn-edge demo --appliances 3``: the merged scan is as good as one appliance's, and nothing is lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo(out, *extra: str):
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "demo", "--points", "150", "--out", str(out)]
                         + list(extra), capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(os.path.join(str(out), "results.json")) as handle:
        return json.load(handle), run.stdout


def test_three_appliances_and_the_collector_match_one_appliance(tmp_path):
    single, _ = demo(tmp_path / "one")
    merged, printed = demo(tmp_path / "three", "--appliances", "3")
    assert (merged["appliances"], merged["published"], merged["lost"]) == (3, 150, 0)
    assert "lost 0 (collector: missing 0" in printed and "in uniqueId order: yes" in printed
    assert abs(merged["ssim"] - single["ssim"]) <= 0.01, (single, merged)
