"""Who may write P:Control: pvAccess itself refuses puts from users and hosts the config does not list.

The puts come from p4p, an independent PVA client, which reports its user's login name; on
loopback its address is 127.0.0.1.
"""
from __future__ import annotations

import getpass

import pytest

from appliance.config import PublishConfig
from appliance.runtime import control_access

from harness import write_config
from onnx_models import affine_model

p4p_client = pytest.importorskip("p4p.client.thread", reason="p4p is the independent PVA implementation")


def _put_reset(prefix: str, appliance_ports) -> str:
    """'done', or the client's error: what an operator's put to P:Control gets."""
    context = p4p_client.Context("pva", useenv=False, nt=False, conf={
        "EPICS_PVA_AUTO_ADDR_LIST": "NO", "EPICS_PVA_ADDR_LIST": "127.0.0.1:{}".format(appliance_ports["udp"])})
    try:
        context.put(prefix + ":Control", {"value": "reset"}, timeout=5.0)
        return "done"
    except Exception as exc:  # p4p raises RemoteError for a refusal, TimeoutError for a missing PV
        return "{}: {}".format(type(exc).__name__, exc)
    finally:
        context.close()


@pytest.mark.parametrize("publish, answer", [
    ({"control_users": [getpass.getuser()], "control_hosts": ["127.0.0.1"]}, "done"),
    ({"control_users": ["someone-else"]}, "RemoteError: ChannelPut::put is not allowed"),
    ({"control_hosts": ["10.11.12.13"]}, "RemoteError: ChannelPut::put is not allowed"),
    ({"control": False}, "TimeoutError"),
], ids=["listed user and host", "another user", "another host", "control off"])
def test_control_takes_puts_only_from_whom_the_config_allows(tmp_path, names, detector, launch, appliance_ports,
                                                             publish, answer):
    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    app = launch(write_config(str(tmp_path / "config.yaml"), names["detector"], names["prefix"], engine_path=model,
                              publish=publish), names["prefix"])
    reply = _put_reset(names["prefix"], appliance_ports)
    details = app.details()
    assert app.stop() == 0, app.output
    assert reply.startswith(answer), reply
    assert ("command 'reset'" in app.output) == (answer == "done")  # a refused put never reaches the appliance
    assert details["control_access"] == control_access(PublishConfig(**{
        key: tuple(value) if isinstance(value, list) else value for key, value in publish.items()}))


def test_the_status_says_who_may_control_in_words():
    assert control_access(PublishConfig()) == "any client"
    assert control_access(PublishConfig(control_users=("alice", "bob"), control_hosts=("10.0.0.5",))) == \
        "users alice, bob from 10.0.0.5"
    assert control_access(PublishConfig(control=False)).startswith("off: no P:Control")
