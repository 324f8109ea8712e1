import sys; sys.path.insert(0, "/work/main/tests")
import conftest
from test_service import *
def test_dbg(setup):
    notify = setup["notify"]
    p = _start(setup)
    notify.wait_for(lambda m: _has(m, "READY", "1"), 30, "READY=1")
    s = Streamer(setup["detector"], rate_hz=100)
    time.sleep(3)
    print("sent", s.stop(), setup["detector"].sent)
    p.send_signal(signal.SIGTERM)
    print(_finish(p))
    print(notify.messages[-3:])
