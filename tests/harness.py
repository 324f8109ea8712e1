"""The tests' names for the real PVA peers they use (see appliance.sim)."""
from __future__ import annotations

from appliance.sim.process import ApplianceProcess, write_config  # noqa: F401
from appliance.sim.viewer import Received, Viewer as Collector  # noqa: F401
