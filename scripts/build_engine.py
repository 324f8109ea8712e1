#!/usr/bin/env python3
"""Build a TensorRT engine from an ONNX model on this device: ``ptychonn-edge build-engine`` without installing.

Same options; see ``appliance/engines/build.py`` and docs/gpu.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from appliance.engines import build  # noqa: E402


def _main() -> int:
    parser = argparse.ArgumentParser(description="Build a TensorRT engine (and its manifest) from an ONNX model.")
    build.add_arguments(parser)
    return build.main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(_main())
