"""The collector's config: every problem named before anything starts (exit 2), the effective config shown."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "collect.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "appliance.cli", "collect", "--check", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_check_prints_the_effective_config(tmp_path):
    result = check(tmp_path, "appliances: [PTY1, PTY2, PTY3]\npublish: {prefix: PTY}\nmosaic: {pixel_size_m: 1.0e-8}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("appliances:\n- PTY1\n- PTY2\n- PTY3\n")
    assert "reorder:\n  window: 256\n  max_wait_s: 1.0\n" in result.stdout and "  first_id: 1\n" in result.stdout


def test_every_problem_is_named_with_its_key(tmp_path):
    result = check(tmp_path, "appliances: [A, A]\nreorder: {window: 0, max_wait_s: -1}\ntypo: 1\n")
    assert result.returncode == 2
    assert "appliances: got ['A', 'A'] (list); expected a non-empty list of distinct PV prefixes" in result.stderr
    assert "reorder.window: got 0 (int); expected 1..100000 frames" in result.stderr
    assert "reorder.max_wait_s: got -1 (int); expected 0..600 s" in result.stderr
    assert "typo: unknown key" in result.stderr


def test_cross_checks(tmp_path):
    own = check(tmp_path, "appliances: [A, B]\npublish: {prefix: B}\nmosaic: {pixel_size_m: 1.0e-8}\n")
    assert own.returncode == 2 and "publish.prefix B is also one of the appliances" in own.stderr
    pixel = check(tmp_path, "appliances: [A, B]\n")
    assert pixel.returncode == 2 and "mosaic.pixel_size_m is required while mosaic.enabled" in pixel.stderr
    missing = check(tmp_path, "publish: {prefix: P}\n")
    assert missing.returncode == 2 and "appliances is required" in missing.stderr
