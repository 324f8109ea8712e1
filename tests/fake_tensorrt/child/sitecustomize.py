"""Imported by Python at start-up when this directory is on PYTHONPATH: the process runs on the FAKE
TensorRT and cuda-python (see ``fake_tensorrt.child_environment``)."""
import fake_tensorrt

fake_tensorrt.install_in_this_process()
