"""ptychonn-edge: live PtychoNN inference between a detector PV and phase-image PVs."""
from __future__ import annotations

__version__ = "0.1.0"
