"""Small ONNX models with known outputs, built with onnx.helper (no training framework).

They stand for the field's models in shape and naming: arbitrary tensor names
(``input.1`` / ``94``), NCHW with one channel, fixed batch 8 or dynamic batch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper

Dim = Union[int, str]


def _save(graph: onnx.GraphProto, path: str) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by onnxruntime 1.15+ (the Jetson gets 1.19)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _value(name: str, shape: Sequence[Dim], elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def affine_model(
    path: str,
    size: int = 128,
    scale: float = 1.0,
    offset: float = 0.0,
    batch: Dim = "batch",
    input_name: str = "input.1",
    output_name: str = "94",
    amplitude_name: Optional[str] = None,
    input_type: int = TensorProto.FLOAT,
    output_type: int = TensorProto.FLOAT,
) -> str:
    """phase = scale * x + offset (identity by default; scale=-1 gives the negation model).

    With ``amplitude_name``, a second output amplitude = x * 0.5 is added.
    ``output_type`` other than float casts the phase (float16, as FP16 engines give it).
    """
    shape = [batch, 1, size, size]
    x = input_name
    nodes = []
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [input_name], ["x32"], to=TensorProto.FLOAT))
        x = "x32"
    nodes.append(helper.make_node("Mul", [x, "scale"], ["scaled"]))
    phase = output_name if output_type == TensorProto.FLOAT else "phase32"
    nodes.append(helper.make_node("Add", ["scaled", "offset"], [phase]))
    if output_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [phase], [output_name], to=output_type))
    initializers = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]),
    ]
    outputs = [_value(output_name, shape, output_type)]
    if amplitude_name:
        initializers.append(helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]))
        nodes.append(helper.make_node("Mul", [x, "half"], [amplitude_name]))
        outputs.append(_value(amplitude_name, shape))
    graph = helper.make_graph(nodes, "affine", [_value(input_name, shape, input_type)], outputs, initializers)
    return _save(graph, path)


def conv_model(path: str, size: int = 128, batch: Dim = "batch", seed: int = 0) -> str:
    """A small real CNN (conv, relu, conv, tanh*pi): nonlinear, so batching errors would show."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.01, (4, 1, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (1, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input.1", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["c2"], ["t"]),
        helper.make_node("Mul", ["t", "pi"], ["94"]),
    ]
    initializers = [
        helper.make_tensor("w1", TensorProto.FLOAT, w1.shape, w1.ravel()),
        helper.make_tensor("w2", TensorProto.FLOAT, w2.shape, w2.ravel()),
        helper.make_tensor("pi", TensorProto.FLOAT, [], [float(np.pi)]),
    ]
    shape = [batch, 1, size, size]
    graph = helper.make_graph(nodes, "conv", [_value("input.1", shape)], [_value("94", shape)], initializers)
    return _save(graph, path)
