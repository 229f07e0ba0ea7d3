"""fp32 -> int8 (CPU) copy of the exported ONNX graph: ONNX Runtime dynamic quantization.

Owns `model.int8.onnx`. Only the constant weight matrices of `MatMul` and `Gemm` nodes are
quantized (int8, per output channel, symmetric); their activations are quantized on the fly, per
tensor, by ONNX Runtime (`DynamicQuantizeLinear` + `MatMulInteger`/`ConvInteger`). Everything else
— LayerNormalization, Softmax, the L2 normalisations, the attention products between two
activations (`MatMulConstBOnly`) and the patch-embedding convolution — stays fp32, and the graph
input and outputs stay float32, so the file has the same interface as `model.onnx`.

Dynamic quantization needs no calibration images: the package stays a function of the CLIP file
and the prompt checkpoint alone. Quantization is deterministic (same fp32 graph, same bytes).
Input: the fp32 `onnx.ModelProto` (weights in memory). Output: the int8 `onnx.ModelProto`, which
the exporter saves like the fp32 one. Failure: ONNX Runtime's
quantizer raising (an unsupported graph) propagates to the exporter, which reports it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

# Per-channel weights keep the drift small (one scale per output feature). reduce_range (7-bit
# weights) is only needed on x86 CPUs without VNNI, where the u8 x s8 products can saturate; the
# runtime's u8s8 kernels on VNNI (and ARM) CPUs do not.
OP_TYPES = ["MatMul", "Gemm"]
PER_CHANNEL = True
REDUCE_RANGE = False


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return the int8 copy of `model` (which is left unchanged)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="anomalyclip-int8-") as scratch:
        destination = Path(scratch) / "int8.onnx"
        source = onnx.ModelProto()
        source.CopyFrom(model)  # the quantizer edits the graph it is given
        # The quantizer logs a generic "consider pre-processing" warning on the root logger for
        # every model; the graph is already shape-inferred and constant-folded by the exporter.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(source, destination, op_types_to_quantize=OP_TYPES,
                             per_channel=PER_CHANNEL, reduce_range=REDUCE_RANGE,
                             weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True})
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(destination))
    quantized.doc_string = (model.doc_string + ", int8 dynamic quantization of the MatMul/Gemm "
                            "weights (LayerNorm/softmax/L2-norm in fp32)")
    return quantized
