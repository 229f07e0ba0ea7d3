"""fp32 -> fp16 conversion of the exported ONNX graph, keeping precision-sensitive ops in fp32.

Owns `model.fp16.onnx`. Tracing the encoder in fp16 on a CPU is not practical (PyTorch's CPU
half-precision matrix product is ~150x slower than fp32: a ViT-L/14 forward at 518 px would take
hours), so the fp32 graph is converted instead, in the spirit of onnxconverter-common's
`keep_io_types` + op block list:

* every float tensor becomes fp16 (initializers, `Constant`, `ConstantOfShape`, `Cast` targets),
  except the scale/bias initializers of `LayerNormalization`;
* nodes of `FP32_OPS` (LayerNormalization, Softmax, ReduceL2) run in fp32, and so does a `Div` fed
  by a ReduceL2 (the final L2 normalisation); `Cast` nodes are inserted at every precision boundary;
* the graph input and outputs stay float32, so both files have the same interface.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32_OPS = frozenset({"LayerNormalization", "Softmax", "ReduceL2"})
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})  # read only the shape of their float input
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)


def _to_half(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor).astype(np.float32)
    half = np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(half, tensor.name)


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def _produces_float(node: onnx.NodeProto, float_inputs: bool) -> bool:
    if node.op_type in SHAPE_ONLY_OPS:
        return False
    if node.op_type == "Cast":
        attr = _attr(node, "to")
        return attr is not None and attr.i in (FLOAT, HALF)
    if node.op_type == "ConstantOfShape":
        value = _attr(node, "value")
        return value is None or value.t.data_type == FLOAT
    if node.op_type == "Constant":
        value = _attr(node, "value")
        return value is not None and value.t.data_type == FLOAT
    return float_inputs


def convert_float_to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert `model` in place (see the module docstring) and return it."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}

    def node_precision(node: onnx.NodeProto) -> int:
        if node.op_type in FP32_OPS:
            return 32
        if node.op_type == "Div" and any(
                i in producer and producer[i].op_type == "ReduceL2" for i in node.input):
            return 32
        return 16

    consumers: dict[str, list[int]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node_precision(node))

    precision: dict[str, int] = {}  # float tensors only: 16 or 32
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == FLOAT:
            precision[inp.name] = 32
    for name, init in list(initializers.items()):
        if init.data_type != FLOAT:
            continue
        if all(p == 32 for p in consumers.get(name, [16])):
            precision[name] = 32
        else:
            replacement = _to_half(init)
            init.CopyFrom(replacement)
            precision[name] = 16

    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast(name: str, target: int) -> str:
        key = (name, target)
        if key not in casts:
            out = f"{name}__fp{target}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"{out}/Cast",
                                              to=FLOAT if target == 32 else HALF))
            casts[key] = out
            precision[out] = target
        return casts[key]

    for node in graph.node:
        p = node_precision(node)
        float_inputs = False
        if node.op_type not in SHAPE_ONLY_OPS:
            for index, name in enumerate(node.input):
                if name in precision:
                    float_inputs = True
                    if precision[name] != p:
                        node.input[index] = cast(name, p)
        else:
            float_inputs = any(name in precision for name in node.input)
        produces_float = _produces_float(node, float_inputs)  # before the attributes change
        if p == 16:
            if node.op_type == "Constant":
                value = _attr(node, "value")
                if value is not None and value.t.data_type == FLOAT:
                    value.t.CopyFrom(_to_half(value.t))
            elif node.op_type == "ConstantOfShape":
                value = _attr(node, "value")
                if value is None:
                    node.attribute.append(helper.make_attribute(
                        "value", numpy_helper.from_array(np.zeros(1, np.float16))))
                elif value.t.data_type == FLOAT:
                    value.t.CopyFrom(_to_half(value.t))
            elif node.op_type == "Cast":
                to = _attr(node, "to")
                if to is not None and to.i == FLOAT:
                    to.i = HALF
        if produces_float:
            for out in node.output:
                if out:
                    precision[out] = p
        new_nodes.append(node)

    for output in graph.output:
        if precision.get(output.name) == 16:
            inner = f"{output.name}__fp16_out"
            for node in new_nodes:
                for index, name in enumerate(node.output):
                    if name == output.name:
                        node.output[index] = inner
                for index, name in enumerate(node.input):
                    if name == output.name:
                        node.input[index] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [output.name],
                                              name=f"{output.name}/Cast", to=FLOAT))
        output.type.tensor_type.elem_type = FLOAT

    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # stale fp32 annotations
    return model
