"""Our NTNDArrays follow areaDetector's conventions, read by p4p (an independent PVA implementation).

The reference is what pvapy-ad-sim-server publishes (NDPluginPva's layout): for
an uncompressed image ``codec.name`` is empty and ``compressedSize`` and
``uncompressedSize`` are both its byte count; our P:Phase must also carry the
input frame's ``uniqueId``, both timestamps and its attributes unchanged.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from test_stream import frames, serve

from appliance.sim.loopback import free_ports, loopback_env

from onnx_models import affine_model

pytest.importorskip("p4p", reason="p4p is the independent PVA implementation")

FLOAT_SCALAR_TYPE = 9  # pvData ScalarType of float32: what codec.parameters names for our pixels
SIZE = 32


def p4p_context(udp_port):
    from p4p.client.thread import Context

    return Context("pva", useenv=False, nt=False, conf={
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": "127.0.0.1:{}".format(udp_port),
    })


class Updates:
    """Each update of one NTNDArray PV (a p4p monitor), by uniqueId."""

    def __init__(self, context, pv_name, changed):
        self.by_id = {}
        self._changed = changed
        self._subscription = context.monitor(pv_name, self._update)

    def _update(self, value):
        if isinstance(value, Exception) or value["uniqueId"] == 0:
            return  # a disconnect, or a record's initial value
        with self._changed:
            self.by_id[value["uniqueId"]] = value
            self._changed.notify_all()

    def close(self):
        self._subscription.close()


def sim_server(pv_name, ports, log_path):
    """pvapy-ad-sim-server: 32x32 uint16 frames at 20 Hz, the first one after half a second."""
    tool = os.path.join(os.path.dirname(sys.executable), "pvapy-ad-sim-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    env.update(loopback_env(ports))
    command = [tool, "-cn", pv_name, "-nx", str(SIZE), "-ny", str(SIZE), "-dt", "uint16", "-fps", "20",
               "-rt", "120", "-std", "0.5", "-shd", "0", "-rp", "0", "-dc"]
    return subprocess.Popen(command, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def matching_frames(context, input_pv, output_pv, timeout):
    """An input frame and our result for it (the first uniqueId both PVs delivered)."""
    changed = threading.Condition()
    inputs, outputs = Updates(context, input_pv, changed), Updates(context, output_pv, changed)
    try:
        with changed:
            found = changed.wait_for(lambda: set(inputs.by_id) & set(outputs.by_id), timeout)
            assert found, "no uniqueId seen on both {} and {}".format(input_pv, output_pv)
            unique_id = min(found)
            return inputs.by_id[unique_id], outputs.by_id[unique_id]
    finally:
        inputs.close()
        outputs.close()


def value_bytes(ntndarray):
    return np.asarray(ntndarray["value"]).nbytes


def test_phase_matches_the_simulators_ntndarray_field_by_field(tmp_path, names, launch, appliance_ports):
    sim_ports = free_ports()
    simulator = sim_server(names["detector"], sim_ports, str(tmp_path / "sim.log"))
    try:
        model = affine_model(str(tmp_path / "identity.onnx"), size=SIZE)
        app, _ = serve(tmp_path, names, launch, model)
        context = p4p_context(appliance_ports["udp"])
        try:
            sent, ours = matching_frames(context, names["detector"], names["prefix"] + ":Phase", timeout=30)
        finally:
            context.close()
        assert app.stop() == 0, app.output
    finally:
        simulator.terminate()
        simulator.wait()

    assert ours.getID() == sent.getID() == "epics:nt/NTNDArray:1.0"
    assert ours.type().aspy() == sent.type().aspy()
    np.testing.assert_array_equal(np.asarray(ours["value"]), np.asarray(sent["value"]).astype(np.float32))
    assert sent["codec.name"] == ours["codec.name"] == ""
    assert sent["codec.parameters"] is None and ours["codec.parameters"] is None
    assert sent["compressedSize"] == sent["uncompressedSize"] == value_bytes(sent)
    assert ours["compressedSize"] == ours["uncompressedSize"] == value_bytes(ours) == SIZE * SIZE * 4
    for field in ("uniqueId", "timeStamp", "dataTimeStamp", "dimension", "attribute", "descriptor", "alarm",
                  "display"):
        assert ours.todict()[field] == sent.todict()[field], field
    assert [a["name"] for a in ours["attribute"]] == ["ColorMode"]
    assert "int32_t" in ours["attribute"][0].tostr()  # as NDPluginPva types it: viewers read an int


def test_a_compressed_input_gives_an_uncompressed_result_that_says_so(tmp_path, names, detector, launch,
                                                                      appliance_ports):
    model = affine_model(str(tmp_path / "identity.onnx"), size=SIZE)
    app, collector = serve(tmp_path, names, launch, model)
    image = frames(1, size=SIZE)[0]
    detector.send(image, 5, codec="lz4")
    collector.wait_for(1, timeout=10)
    context = p4p_context(appliance_ports["udp"])
    try:
        ours = context.get(names["prefix"] + ":Phase", timeout=5.0)
    finally:
        context.close()
    assert app.stop() == 0, app.output
    assert ours["uniqueId"] == 5
    assert ours["codec.name"] == ""
    # Not the input's uint16: a decoder that reads codec.parameters must find the type of what is there.
    assert ours["codec.parameters"] == FLOAT_SCALAR_TYPE
    assert ours["compressedSize"] == ours["uncompressedSize"] == image.size * 4
    np.testing.assert_array_equal(np.asarray(ours["value"]), image.astype(np.float32).ravel())


def test_the_mosaic_is_a_mono_ntndarray_with_its_sizes(tmp_path, names, detector, launch, appliance_ports):
    model = affine_model(str(tmp_path / "identity.onnx"), size=SIZE)
    app, collector = serve(tmp_path, names, launch, model, mosaic={"pixel_size_m": 1e-8, "publish_period_s": 0.2})
    for index, image in enumerate(frames(4, size=SIZE)):
        detector.send(image, index + 1, position=(index * 1e-7, 0.0))
    collector.wait_for(4, timeout=10)
    app.wait_details(lambda s: (s.get("mosaic") or {}).get("stitched") == 4)
    context = p4p_context(appliance_ports["udp"])
    try:
        changed = threading.Condition()
        mosaic = Updates(context, names["prefix"] + ":Mosaic", changed)
        with changed:
            assert changed.wait_for(lambda: 4 in mosaic.by_id, timeout=10), sorted(mosaic.by_id)
        mosaic.close()
        picture = mosaic.by_id[4]
    finally:
        context.close()
    assert app.stop() == 0, app.output
    attributes = {a["name"]: a for a in picture["attribute"]}
    assert attributes["ColorMode"]["value"] == 0 and "int32_t" in attributes["ColorMode"].tostr()
    assert {"OriginX", "OriginY", "PixelSize"} <= set(attributes)
    assert picture["codec.name"] == ""
    assert picture["compressedSize"] == picture["uncompressedSize"] == value_bytes(picture) > 0
