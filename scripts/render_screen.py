#!/usr/bin/env python3
"""Draw the operator screen (systemd/ptychonn-edge.bob) as a PNG, filled from a running appliance.

A picture of the Phoebus screen for the README and for a beamline without Phoebus at hand: each
widget is drawn where the display file puts it, with what its PV holds now (read once through
p4p, with this shell's EPICS settings): text updates with their units and alarm colours, the
LED, the ring-fill bar, and the phase image and mosaic themselves. It is a layout preview, not
Phoebus: fonts and widget styles are matplotlib's.

    scripts/render_screen.py --prefix DEMO --out docs/operator-screen.png
"""
from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ElementTree
from typing import Any, Dict, List, Optional

import numpy as np

SCREEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "systemd", "ptychonn-edge.bob")
ALARM_COLOURS = {0: "#e8f5e9", 1: "#fff59d", 2: "#ef9a9a", 3: "#f8bbd0"}  # NO_ALARM, MINOR, MAJOR, INVALID


def widgets(path: str) -> List[Dict[str, Any]]:
    """Each widget's type, box, text and PV (the prefix macro left in)."""
    found = []
    for element in ElementTree.parse(path).getroot().iter("widget"):
        found.append({
            "type": element.get("type"), "text": element.findtext("text") or "",
            "pv": (element.findtext("pv_name") or "").replace("pva://", ""),
            "bold": element.find("font/font[@style='BOLD']") is not None,
            **{key: int(element.findtext(key) or 0) for key in ("x", "y", "width", "height")},
        })
    return found


def read_values(names: List[str]) -> Dict[str, Any]:
    """One get of each PV (None where it does not answer)."""
    from p4p.client.thread import Context

    conf = {k: v for k, v in os.environ.items() if k.startswith("EPICS_PVA") and k != "EPICS_PVA_NAME_SERVERS"}
    with Context("pva", useenv=False, nt=False, conf=conf) as context:
        values = context.get(names, timeout=10.0, throw=False)
    return {name: (None if isinstance(value, Exception) else value) for name, value in zip(names, values)}


def image_of(value: Any) -> Optional[np.ndarray]:
    """The NTNDArray's pixels as rows x columns (dimension[0] is x)."""
    if value is None:
        return None
    pixels = np.asarray(value["value"])
    dims = [int(d["size"]) for d in value["dimension"]]
    return pixels.reshape(dims[1], dims[0]) if len(dims) == 2 and pixels.size == dims[0] * dims[1] else None


def shown_text(value: Any) -> str:
    if value is None:
        return "(no answer)"
    number = value["value"]
    units = value.get("display.units", "") if "display" in value else ""
    if isinstance(number, float):
        number = "{:.4g}".format(number)
    return "{} {}".format(number, units).strip()


def severity(value: Any) -> int:
    return int(value["alarm.severity"]) if value is not None and "alarm" in value else 3


def draw(path: str, prefix: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    root = ElementTree.parse(path).getroot()
    width, height = int(root.findtext("width") or 1200), int(root.findtext("height") or 800)
    items = widgets(path)
    for item in items:
        item["pv"] = item["pv"].replace("$(P)", prefix)
        item["text"] = item["text"].replace("$(P)", prefix)
    values = read_values(sorted({item["pv"] for item in items if item["pv"] and item["type"] != "action_button"}))
    figure = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.axis("off")
    for item in items:
        x, y, w, h = item["x"], item["y"], item["width"], item["height"]
        value = values.get(item["pv"])
        kind = item["type"]
        if kind == "label":
            axes.text(x, y + h / 2, item["text"], va="center", fontsize=11 if item["bold"] else 8.5,
                      weight="bold" if item["bold"] else "normal")
        elif kind == "textupdate":
            axes.add_patch(Rectangle((x, y), w, h, facecolor=ALARM_COLOURS[severity(value)], edgecolor="#9e9e9e"))
            axes.text(x + 4, y + 4, shown_text(value), va="top", fontsize=8, wrap=True, clip_on=True)
        elif kind == "led":
            on = value is not None and bool(value["value"])
            axes.add_patch(Circle((x + w / 2, y + h / 2), w / 2, facecolor="#43a047" if on else "#616161"))
        elif kind == "progressbar":
            fraction = 0.0 if value is None else float(value["value"]) / max(float(value["display.limitHigh"]), 1e-9)
            axes.add_patch(Rectangle((x, y), w, h, facecolor="white", edgecolor="#9e9e9e"))
            axes.add_patch(Rectangle((x, y), w * min(max(fraction, 0.0), 1.0), h, facecolor="#42a5f5"))
        elif kind == "image":
            picture = image_of(value)
            if picture is not None:
                axes.imshow(picture, extent=(x, x + w, y + h, y), cmap="viridis", aspect="auto")
            axes.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="#424242"))
        elif kind == "action_button":
            axes.add_patch(Rectangle((x, y), w, h, facecolor="#e0e0e0", edgecolor="#757575"))
            axes.text(x + w / 2, y + h / 2, item["text"], ha="center", va="center", fontsize=8.5)
    figure.savefig(out)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="PTYCHONN", help="the appliance's publish.prefix (the screen's macro P)")
    parser.add_argument("--screen", default=SCREEN, help="the .bob file")
    parser.add_argument("--out", default="operator-screen.png")
    args = parser.parse_args()
    draw(args.screen, args.prefix, args.out)
    print("wrote {}".format(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
