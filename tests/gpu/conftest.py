"""GPU tests run only where CUDA works; elsewhere they skip with the reason.

``PTYCHONN_REQUIRE_GPU=1`` (set by scripts/gpu_check.sh) turns a missing GPU
into a failure, so a run on the CUDA machine cannot pass by skipping.
"""
from __future__ import annotations

import os

import pytest

from appliance import cuda


@pytest.fixture(autouse=True)
def _cuda_device() -> None:
    usable, why = cuda.available()
    if usable:
        return
    if os.environ.get("PTYCHONN_REQUIRE_GPU") == "1":
        pytest.fail("PTYCHONN_REQUIRE_GPU=1 but CUDA is not usable: {}".format(why))
    pytest.skip("needs a CUDA GPU: {}".format(why))
