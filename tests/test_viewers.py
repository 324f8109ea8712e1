"""Viewers are the beamline's business, never the appliance's: a display that stops reading loses
its own updates (pvAccess squashes them in its queue) and costs the stream nothing."""
from __future__ import annotations

import os
import sys

import pytest
from test_stream import frames, serve

from onnx_models import affine_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))


def p4p_viewer(pvs, appliance_ports, log_path, queue_size):
    pytest.importorskip("p4p", reason="the viewer is p4p, the independent PVA implementation")
    from pva_viewer import ViewerProcess, loopback_viewer_env

    viewer = ViewerProcess(pvs, loopback_viewer_env(dict(os.environ), appliance_ports["udp"]), log_path, queue_size)
    viewer.wait_connected(30)
    return viewer


def test_a_frozen_viewer_costs_the_appliance_nothing(tmp_path, names, detector, launch, appliance_ports):
    model = affine_model(str(tmp_path / "identity.onnx"), size=128)
    app, _ = serve(tmp_path, names, launch, model)
    phase = names["prefix"] + ":Phase"
    viewer = p4p_viewer([phase], appliance_ports, str(tmp_path / "viewer.log"), queue_size=4)
    count = 500  # 32 MB of results: more than the viewer's queue and both socket buffers hold
    try:
        viewer.freeze()
        for index, image in enumerate(frames(count)):
            detector.send(image, index + 1)
        app.wait_counts(timeout=60, received=count, published=count)
        viewer.thaw()
        # pvDatabase holds back what it squashed for a client whose queue overflowed until the next
        # update (seen here): the stream goes on, and that next result reaches the viewer.
        count += 1
        detector.send(frames(1)[0], count)
        caught_up = viewer.wait_for_id(phase, count, timeout=30)
        status = app.wait_counts(published=count)
    finally:
        seen = viewer.report()[phase]
    assert caught_up, seen
    assert app.stop() == 0, app.output
    assert status["published"] == count and status["dropped_total"] == 0 and status["missing_upstream"] == 0
    assert seen["last_id"] == count  # once it reads again it gets the newest result,
    assert seen["missed"] > 0 and seen["frames"] + seen["missed"] == count - seen["first_id"] + 1  # minus its own overruns
