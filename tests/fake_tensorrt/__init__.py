"""FAKE TensorRT and FAKE cuda-python, for exercising the GPU code on CPU-only machines.

Neither is NVIDIA's code: ``fake_trt.py`` follows the TensorRT 8.5 / 10.x Python
API and ``fake_cudart.py`` cuda-python's runtime module, closely enough for
``appliance.cuda``, ``appliance.gpu_inflight``, ``appliance.engines.tensorrt``
and ``appliance.engines.build`` to run end to end with numpy doing the "GPU"
work. Each install loads a fresh copy, so state never leaks between tests, and
goes through ``monkeypatch`` so the real modules (on a GPU machine) come back.

Child processes (an appliance under test, its background engine builds) get the
fakes through :func:`child_environment`: ``child/sitecustomize.py`` installs them
at interpreter start-up, for good, in every process started with that environment.
"""
import importlib.util
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD_SITE = os.path.join(HERE, "child")
VERSION_VARIABLE = "FAKE_TENSORRT_VERSION"
BUILD_GATE_VARIABLE = "FAKE_TENSORRT_BUILD_GATE"  # fake_trt.BUILD_GATE_VARIABLE: builds wait for this file
CUDA_MODULES = ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.bindings.utils", "cuda.cudart")


def _load(filename, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _forget_loaded_runtime(monkeypatch):
    import appliance.cuda

    monkeypatch.setattr(appliance.cuda, "_RUNTIME", None)


def install_cuda(monkeypatch, layout="cuda.bindings.runtime", name="Fake GPU", integrated=False,
                 compute=(8, 6), count=1):
    """Make ``cuda-python`` import as the fake, in the 12.6.1+/13.x layout or the 11.8 ``cuda.cudart`` one."""
    cudart = _load("fake_cudart.py", "fake_cudart")
    cudart.device.update(name=name, integrated=integrated, major=compute[0], minor=compute[1], count=count)
    package = types.ModuleType("cuda")
    modules = dict.fromkeys(CUDA_MODULES)  # None blocks an import
    modules["cuda"] = package
    if layout == "cuda.bindings.runtime":
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime = cudart
        package.bindings = bindings
        modules.update({"cuda.bindings": bindings, "cuda.bindings.runtime": cudart})  # no .utils, as before 13.0
    elif layout == "cuda.cudart":
        package.cudart = cudart
        modules["cuda.cudart"] = cudart
    else:
        raise ValueError(layout)
    for module_name, module in modules.items():
        monkeypatch.setitem(sys.modules, module_name, module)
    _forget_loaded_runtime(monkeypatch)
    return cudart


def remove_cuda(monkeypatch):
    """Make every cuda-python layout fail to import, as on a machine without it."""
    for module_name in CUDA_MODULES:
        monkeypatch.setitem(sys.modules, module_name, None)
    _forget_loaded_runtime(monkeypatch)


def install_tensorrt(monkeypatch, cudart, version="8.5.2.2", dla_cores=0):
    """Make ``import tensorrt`` give the fake pretending to be ``version``, running on ``cudart``'s GPU.

    ``dla_cores``: the DLA engines beside that GPU (2 on an AGX Xavier, none on a discrete GPU).
    """
    trt = _load("fake_trt.py", "fake_tensorrt_{}".format(version.replace(".", "_")))
    trt.__version__ = version
    trt.cudart = cudart
    trt.dla_cores = dla_cores
    major, minor = (int(p) for p in version.split(".")[:2])
    if major >= 10:
        del trt.ICudaEngine.get_profile_shape
        del trt.ICudaEngine.num_bindings
        del trt.IExecutionContext.execute_async_v2
    if major < 10:
        del trt.IProgressMonitor
    if (major, minor) < (8, 5):
        for attr in ("num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_shape", "get_tensor_dtype",
                     "get_tensor_profile_shape"):
            delattr(trt.ICudaEngine, attr)
        for attr in ("set_input_shape", "set_tensor_address", "execute_async_v3"):
            delattr(trt.IExecutionContext, attr)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def write_engine(path, trt, tensors, profiles=(), op=None, **overrides):
    """Write a fake engine file (see ``fake_trt.engine_description``) and return its path."""
    description = trt.engine_description(tensors, profiles, op)
    description.update(overrides)
    with open(path, "wb") as handle:
        handle.write(trt.serialize(description))
    return path


class _ForGood:
    """``monkeypatch``'s setitem/setattr without the undo, for a process that lives to use the fakes."""

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value

    @staticmethod
    def setattr(target, name, value):
        setattr(target, name, value)


def install_in_this_process():
    """What ``child/sitecustomize.py`` runs: the fakes, with the version the parent asked for."""
    install_tensorrt(_ForGood, install_cuda(_ForGood), os.environ.get(VERSION_VARIABLE, "8.5.2.2"))


def child_environment(env, version="8.5.2.2"):
    """``env`` plus what makes a child Python process, and its own children, run on the fakes."""
    env = dict(env)
    tests = os.path.dirname(HERE)
    paths = [CHILD_SITE, tests, os.path.dirname(tests)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[VERSION_VARIABLE] = version
    return env
