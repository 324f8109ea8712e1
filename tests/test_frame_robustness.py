"""What the frame path does with frames and results a well-behaved beamline would never produce.

Each case once stopped the service or lost frames without a count; every one now
ends as a published frame or a counted drop, and the stream goes on.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto
from test_stream import frames, serve

from onnx_models import affine_model


def details(status):
    return json.loads(status["json"])


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM)."""
    with open("/proc/{}/status".format(pid)) as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))


def test_a_float16_output_model_is_published_as_float32(tmp_path, names, detector, launch):
    model = affine_model(str(tmp_path / "half.onnx"), size=16, scale=0.5, output_type=TensorProto.FLOAT16)
    app, collector = serve(tmp_path, names, launch, model)
    data = frames(5, size=16)
    for index, image in enumerate(data):
        detector.send(image, index + 1)
    received = collector.wait_for(5, timeout=10)
    status = app.wait_counts(published=5)
    assert app.stop() == 0, app.output
    assert [r.unique_id for r in received] == [1, 2, 3, 4, 5]
    for item in received:
        assert item.image.dtype == np.float32
        np.testing.assert_array_equal(item.image, (0.5 * data[item.unique_id - 1]).astype(np.float16).astype(np.float32))
    assert status["published"] == 5 and status["dropped_total"] == 0


def test_wild_motor_positions_cost_the_mosaic_a_patch_not_the_stream(tmp_path, names, detector, launch):
    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    app, collector = serve(tmp_path, names, launch, model, mosaic={"pixel_size_m": 1e-8})
    image = frames(1, size=16)[0]
    positions = [(0.0, 0.0), (float("nan"), 0.0), (0.0, float("inf")), (1e300, 1e300), (-1e12, 0.0), (1e-7, 1e-7)]
    for index, position in enumerate(positions):
        detector.send(image, index + 1, position=position)
    received = collector.wait_for(len(positions), timeout=10)
    status = app.wait_counts(published=len(positions))
    assert app.stop() == 0, app.output
    assert [r.unique_id for r in received] == list(range(1, len(positions) + 1))
    mosaic = details(status)["mosaic"]
    assert mosaic == {"stitched": 2, "unplaced": 2, "outside": 2, "resets": 0, "last_outside": mosaic["last_outside"]}
    assert mosaic["last_outside"].startswith("uniqueId 5: position (-1e+12, 0) m is outside the mosaic")


# A server of a record that is not an NTNDArray, in a child (pvapy's server in the test process could
# take the run down with it): it posts one update per line read from stdin, until stdin closes.
_SERVE_FOREIGN = """
import sys, pvaccess
types = {"scalar": {"value": pvaccess.DOUBLE}, "string": {"value": pvaccess.STRING},
         "no value union": {"uniqueId": pvaccess.INT, "value": [pvaccess.USHORT]}}[sys.argv[2]]
server = pvaccess.PvaServer()
server.addRecord(sys.argv[1], pvaccess.PvObject(types))
print("serving", flush=True)
for line in sys.stdin:
    server.update(sys.argv[1], pvaccess.PvObject(types))
    print("updated", flush=True)
server.stop()
"""


@pytest.mark.parametrize("structure", ["scalar", "string", "no value union"])
def test_updates_that_are_not_ntndarray_are_counted_as_dropped(tmp_path, names, launch, structure):
    server = subprocess.Popen([sys.executable, "-c", _SERVE_FOREIGN, names["detector"], structure],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "serving\n"
        model = affine_model(str(tmp_path / "identity.onnx"), size=16)
        app, _ = serve(tmp_path, names, launch, model)
        for _ in range(5):
            server.stdin.write("update\n")
            server.stdin.flush()
            assert server.stdout.readline() == "updated\n"
        # the value on connect, then 5 updates (each counted received as it arrives, then dropped)
        status = app.wait_details(lambda s: s["received"] >= 6 and s["dropped"]["not_ntndarray"] >= 6)
        assert app.stop() == 0, app.output
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    dropped = {k: v for k, v in status["dropped"].items() if v}
    assert status["received"] == 6 and status["published"] == 0
    assert dropped == {"not_ntndarray": 6}
    assert "is not an NTNDArray" in app.output


def test_a_frame_received_again_after_a_reconnect_is_published_once(tmp_path, names, detector, launch):
    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    app, collector = serve(tmp_path, names, launch, model, mosaic={"pixel_size_m": 1e-8})
    image = frames(1, size=16)[0]
    for unique_id in (1, 2, 3, 3, 4):  # a TCP reset re-delivers the current value: id 3 twice
        detector.send(image, unique_id, position=(unique_id * 1e-7, 0.0))
    received = collector.wait_for(4, timeout=10)
    # The status once all is counted (received counts at arrival, published and stitched a batch later:
    # a status taken at received == 5 said published 2 on a busy machine).
    status = app.wait_details(lambda s: s["received"] >= 5 and s["published"] >= 4 and s["mosaic"]["stitched"] >= 4)
    assert app.stop() == 0, app.output
    assert [r.unique_id for r in received] == [1, 2, 3, 4]
    assert status["acquisitions"] == 1 and status["published"] == 4 and status["received"] == 5
    assert status["dropped"]["repeated"] == 1
    assert status["mosaic"]["resets"] == 0 and status["mosaic"]["stitched"] == 4


def test_a_small_payload_declaring_a_huge_image_is_refused_before_decompression(tmp_path, names, detector, launch):
    from appliance.compression import compress

    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    app, collector = serve(tmp_path, names, launch, model)
    side = 8192  # 128 MiB of uint16 zeros: about 0.5 MiB as LZ4
    payload = np.frombuffer(compress("lz4", np.zeros((side, side), np.uint16)), dtype=np.uint8)
    peak_before = peak_rss_kib(app.process.pid)
    detector.send_raw(1, "ubyteValue", payload, side, side, codec="lz4", uncompressed=side * side * 2)
    detector.send(frames(1, size=16)[0], 2)
    collector.wait_for(1, timeout=10)
    status = app.wait_counts(received=2, published=1)
    peak_growth_kib = peak_rss_kib(app.process.pid) - peak_before
    assert app.stop() == 0, app.output
    assert details(status)["dropped"]["shape"] == 1
    assert peak_growth_kib < 64 * 1024, "the 128 MiB image was decompressed before its shape was checked"


def test_only_the_control_record_takes_puts_from_clients(tmp_path, names, detector, launch, appliance_ports):
    p4p_client = pytest.importorskip("p4p.client.thread", reason="p4p is the independent PVA implementation")
    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    app, collector = serve(tmp_path, names, launch, model, mosaic={"pixel_size_m": 1e-8})
    detector.send(frames(1, size=16)[0], 1, position=(0.0, 0.0))
    collector.wait_for(1, timeout=10)
    context = p4p_client.Context("pva", useenv=False, nt=False, conf={
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": "127.0.0.1:{}".format(appliance_ports["udp"]),
    })
    refused = {}
    try:
        for suffix, value in ((":Phase", {"uniqueId": 999}), (":Mosaic", {"uniqueId": 999}),
                              (":Status", {"state": "hacked"})):
            with pytest.raises(Exception) as caught:
                context.put(names["prefix"] + suffix, value, timeout=5.0)
            refused[suffix] = str(caught.value)
        context.put(names["prefix"] + ":Control", {"value": "reset"}, timeout=5.0)
        phase = context.get(names["prefix"] + ":Phase", timeout=5.0)
    finally:
        context.close()
    status = app.wait_counts(published=1)
    assert app.stop() == 0, app.output
    assert all("not allowed" in reason for reason in refused.values()), refused
    assert phase["uniqueId"] == 1 and status["state"] != "hacked"
    assert "command 'reset': mosaic reset" in app.output
