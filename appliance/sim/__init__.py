"""The ptychography detector simulator.

Stages, one module each: ``glyphs`` and ``objects`` draw the sample (etched
training patterns, unseen test shapes), ``trajectory`` places the beam
(Fermat spiral, raster), ``physics`` makes the probe and turns exit waves into
detector counts, ``scan`` ties them into a :class:`~appliance.sim.scan.ScanSimulation`
with ground truth and file output, ``metrics`` scores a phase image against the
truth, and ``detector`` serves the frames over PVAccess.
"""
from __future__ import annotations
