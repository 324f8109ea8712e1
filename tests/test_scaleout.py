"""One detector -> three appliances (data distributor) -> the collector, all real pvapy on loopback.

Each appliance and the collector is its own process with its own ports, as on three Jetsons and a
collector host. The frames' pixels are their uniqueId, so every merged image says where it came from.
"""
from __future__ import annotations

import numpy as np
import pytest

from appliance.sim.scaleout import ScaleOut

from harness import Collector
from onnx_models import affine_model

SIZE = 16


def frame(unique_id: int) -> np.ndarray:
    return np.full((SIZE, SIZE), unique_id, dtype=np.uint16)


@pytest.fixture
def scale(tmp_path, names):
    """Build (not start) three appliances and a collector on this test's detector."""
    made = []

    def build(**options):
        model = affine_model(str(tmp_path / "identity.onnx"), size=SIZE)
        collector = options.pop("collector", {})
        collector.setdefault("mosaic", {}).setdefault("pixel_size_m", 1e-8)
        group = ScaleOut(str(tmp_path), names["detector"], model, 3, log_dir=str(tmp_path),
                         prefix=names["prefix"].replace(":", ""), collector=collector, **options)
        made.append(group)
        return group

    yield build
    for group in made:
        group.stop()


def send(detector, first: int, last: int, rate_hz: float = 200.0) -> None:
    detector.stream(((frame(i), (i * 1e-8, 0.0)) for i in range(first, last + 1)), rate_hz, first_id=first)


def merged_viewer(group):
    """A viewer of the merged P:Phase. Its connect deadline is long: on CI's 2 cores, loaded, one
    took over 30 s (the first monitor update of a just-started collector)."""
    return Collector(group.collector_prefix + ":Phase", connect_timeout=90.0)


def merged_ids(viewer, count: int):
    return [item.unique_id for item in viewer.wait_for(count, timeout=30)]


def out_of_order(ids) -> int:
    """Ids that came after a higher one: frames the collector let out late (one appliance fell more
    than the reorder window behind), each counted in its `late`."""
    return sum(1 for index, unique_id in enumerate(ids) if unique_id < max(ids[: index + 1]))


def test_every_id_is_merged_exactly_once_in_order(scale, detector):
    group = scale(collector={"reorder": {"window": 256, "max_wait_s": 2.0}})
    group.start()
    merged = merged_viewer(group)
    send(detector, 1, 150)
    ids = merged_ids(merged, 150)
    status = group.collector.wait_details(lambda s: s["merged"] >= 150)
    codes = group.stop()
    assert ids == list(range(1, 151))
    for item in merged.items:
        np.testing.assert_array_equal(item.image, frame(item.unique_id).astype(np.float32))
        assert item.meta.position == pytest.approx((item.unique_id * 1e-8, 0.0))
    assert (status["missing"], status["late"], status["duplicates"]) == (0, 0, 0)
    assert sorted(s["frames"] for s in status["appliances"].values()) == [50, 50, 50]
    assert status["mosaic"]["stitched"] == 150
    assert set(codes.values()) == {0}, codes


def test_a_killed_appliance_loses_exactly_the_frames_it_held_and_the_scan_goes_on(scale, detector):
    # The victim batches up to 64 frames for up to 10 s: it holds what it received when it dies.
    group = scale(collector={"reorder": {"window": 64, "max_wait_s": 1.0}},
                  per_instance=[{"pipeline": {"max_batch": 64, "max_wait_ms": 10000}}, {}, {}])
    group.start()
    merged = merged_viewer(group)
    send(detector, 1, 90)
    victim = group.appliances[0]
    held = victim.wait_counts(received=30)
    assert (held["received"], held["published"]) == (30, 0)
    group.kill(0)
    send(detector, 91, 180)
    ids = merged_ids(merged, 150)
    # The collector notices a lost appliance at its next check (every search_interval_s), which can come
    # after the reorder window has let the last frames out (seen twice in 28 loaded runs).
    status = group.collector.wait_details(lambda s: s["missing"] >= 30 and s["reorder_depth"] == 0
                                          and not s["appliances"][group.prefixes[0]]["connected"])
    group.stop()
    lost = set(range(1, 181)) - set(ids)
    assert len(ids) == len(set(ids)) == 150 and out_of_order(ids) == status["late"]
    assert len(lost) == 30 and max(lost) <= 90
    residue = min(lost) % 3
    assert lost == {i for i in range(1, 91) if i % 3 == residue}  # the victim's turns, nothing after it died
    listed = {i for first, last in status["missing_ids"] for i in range(first, last + 1)}
    assert listed == lost and status["missing"] == 30 and status["missing_ids_complete"]
    assert not status["appliances"][group.prefixes[0]]["connected"]


def test_a_restarted_appliance_rejoins_the_group_and_takes_its_share_again(scale, detector):
    group = scale(collector={"reorder": {"window": 64, "max_wait_s": 1.0}})
    group.start()
    send(detector, 1, 30)
    group.collector.wait_details(lambda s: s["merged"] >= 30)
    group.kill(0)
    first = group.prefixes[0]
    group.collector.wait_details(lambda s: not s["appliances"][first]["connected"])
    send(detector, 31, 60)  # two left in the group: 15 each
    for app in group.appliances[1:]:
        app.wait_counts(received=20)
    back = group.restart_appliance(0)  # what systemd's Restart= does
    group.collector.wait_details(lambda s: s["appliances"][first]["connected"])  # found again, by itself
    merged = merged_viewer(group)
    on_connect = len(merged.items)  # the record's current value (the last id merged), if it has one
    send(detector, 61, 150)
    ids = merged_ids(merged, on_connect + 90)[on_connect:]
    status = group.collector.wait_details(lambda s: s["merged"] >= 90 and s["reorder_depth"] == 0)
    rejoined = back.wait_counts(received=30)
    group.stop()
    assert sorted(ids) == list(range(61, 151)) and out_of_order(ids) <= status["late"]
    # Its turns again: a third of 61..150, plus at most the detector's current frame, sent on connect.
    assert rejoined["received"] in (30, 31) and rejoined["dropped_total"] == 0
    assert status["appliances"][first]["connected"]


def test_a_restarted_collector_counts_and_names_what_it_missed(scale, detector):
    # The restarted collector meets its three appliances one after another (within 0.7 s on a quiet
    # machine, more on a loaded one); max_wait_s holds the first frames until the last of them is in.
    group = scale(collector={"reorder": {"window": 64, "max_wait_s": 5.0}})
    group.start()
    send(detector, 1, 60)
    group.collector.wait_details(lambda s: s["merged"] >= 60)
    group.collector.process.kill()  # a crash: the last merged id stays in its state file
    group.collector.finish()
    send(detector, 61, 120)
    for app in group.appliances:
        app.wait_counts(published=40)
    group.start_collector()
    send(detector, 121, 150)
    status = group.collector.wait_details(lambda s: s["merged"] >= 33 and s["reorder_depth"] == 0)
    group.stop()
    # On connect it gets each appliance's last frame (118, 119, 120); 61..117 passed while it was down.
    assert status["restart_gap"] == {"previous_last_id": 60, "first_id": 118, "frames_lost": 57}
    assert status["missing_ids"] == [[61, 117]] and status["missing"] == 57
    assert status["merged"] == 33  # the three last frames and 121..150 (one of the first may come late)


def test_a_slow_peer_cannot_hold_the_merge_beyond_its_window(scale, detector):
    # The slow one publishes its frames about 2 s late; the window (8 frames), not the clock (5 s), lets the
    # others' go on; the clock lets out the scan's last frames.
    group = scale(collector={"reorder": {"window": 8, "max_wait_s": 5.0}},
                  per_instance=[{"pipeline": {"max_batch": 64, "max_wait_ms": 2000}}, {}, {}])
    group.start()
    merged = merged_viewer(group)
    send(detector, 1, 90, rate_hz=100.0)
    ids = merged_ids(merged, 90)
    status = group.collector.wait_details(lambda s: s["merged"] >= 90)
    group.stop()
    assert sorted(ids) == list(range(1, 91))
    assert status["late"] > 0 and status["missing"] == 0 and status["reorder_max_depth"] <= 8
    assert out_of_order(ids) == status["late"]
