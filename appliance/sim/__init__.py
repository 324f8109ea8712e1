"""The ptychography detector simulator: physics and samples here, the PVA server in ``detector``."""
from __future__ import annotations
