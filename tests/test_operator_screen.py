"""The Phoebus operator screen names only PVs a running appliance serves, and its buttons send commands it knows."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree

import pytest
from test_stream import frames, serve

from onnx_models import affine_model

SCREEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "systemd", "ptychonn-edge.bob")
PREFIX_MACRO = "pva://$(P):"


def screen():
    return ElementTree.parse(SCREEN).getroot()


def named_pvs(root):
    """Every PV the screen names (widgets and actions), without the scheme and the prefix macro."""
    names = [element.text or "" for element in root.iter("pv_name")]
    assert names and all(name.startswith(PREFIX_MACRO) for name in names), [n for n in names if
                                                                             not n.startswith(PREFIX_MACRO)]
    return sorted({name[len(PREFIX_MACRO):] for name in names})


def button_writes(root):
    """(pv, value) of every write action."""
    return [(action.findtext("pv_name"), action.findtext("value")) for action in root.iter("action")
            if action.get("type") == "write_pv"]


def test_the_screen_is_a_display_with_a_default_prefix_and_the_images():
    root = screen()
    assert root.tag == "display" and root.get("version", "").startswith("2.")
    assert root.findtext("macros/P")
    images = {w.findtext("pv_name") for w in root.iter("widget") if w.get("type") == "image"}
    assert images == {PREFIX_MACRO + "Phase", PREFIX_MACRO + "Mosaic"}
    assert sorted(button_writes(root)) == [(PREFIX_MACRO + "Control", "rescan"), (PREFIX_MACRO + "Control", "reset")]


def test_every_pv_on_the_screen_is_served_and_every_button_is_a_command(tmp_path, names, detector, launch,
                                                                        appliance_ports):
    p4p_client = pytest.importorskip("p4p.client.thread", reason="p4p is the independent PVA implementation")
    root = screen()
    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    app, collector = serve(tmp_path, names, launch, model, mosaic={"pixel_size_m": 1e-8, "publish_period_s": 0.2})
    detector.send(frames(1, size=16)[0], 1, position=(0.0, 0.0))  # so that the mosaic has a picture
    collector.wait_for(1, timeout=10)
    context = p4p_client.Context("pva", useenv=False, nt=False, conf={
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": "127.0.0.1:{}".format(appliance_ports["udp"]),
    })
    prefix = names["prefix"] + ":"
    try:
        pvs = named_pvs(root)
        answers = context.get([prefix + pv for pv in pvs], timeout=10.0, throw=False)
        replies = []
        for count, (pv, value) in enumerate(button_writes(root), start=1):
            context.put(prefix + pv[len(PREFIX_MACRO):], value, timeout=5.0)
            # the put is acknowledged before the appliance runs the command: P:Status says when it has
            replies.append(app.wait_details(lambda s: s["commands_handled"] >= count, timeout=30)["last_command"])
    finally:
        context.close()
    assert app.stop() == 0, app.output
    missing = [pv for pv, answer in zip(pvs, answers) if isinstance(answer, Exception)]
    assert not missing, missing
    assert sorted(replies) == ["rescan: rescanning engines", "reset: mosaic reset"]
    assert "command 'reset': mosaic reset" in app.output
    assert "command 'rescan': rescanning engines" in app.output
