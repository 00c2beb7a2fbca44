"""Synthetic anchor models for the retarget tests and benchmark.

Each weight becomes an independent layer with its own graph input, so any mix
of shapes fits in one model. A 1-D weight ``[D]`` feeds ``Mul(x, W)``, a 2-D
weight ``[out, in]`` feeds ``Gemm(x, W, transB=1)``, and a 3-D to 5-D weight
``[O, I, ...]`` feeds ``Conv``.
The decoded weight can also be a graph output, which lets a test compare what
ONNX Runtime decodes with the numpy reference exactly. The file layout follows
``docs/format.md``: ``W.mx_codes`` and ``W.mx_scales`` initializers, one
``mfqat::MXDequantize`` node, the model-local function bodies, and the
``mfqat.*`` metadata keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import mfqat_onnx
from mfqat_onnx import numerics
from mfqat_onnx._onnx_io import (
    ANCHOR_FORMAT_KEY,
    PRODUCER_VERSION_KEY,
    SCALE_RULE_KEY,
    WEIGHTS_KEY,
)
from mfqat_onnx._retarget_rewrite import CODES_SUFFIX, SCALES_SUFFIX
from mfqat_onnx.formats import get_format
from mfqat_onnx.onnx_ops import (
    DEFAULT_OPSET,
    DOMAIN,
    DOMAIN_VERSION,
    attach_functions,
    make_dequantize_node,
    make_quantize_node,
)

# IR 10 is the version that came with opset 21.
IR_VERSION = 10


@dataclasses.dataclass(frozen=True)
class SyntheticWeight:
    """Unpacked codes and scale bytes of one weight.

    Attributes:
        name: Weight name; the initializers are ``<name>.mx_codes`` and ``<name>.mx_scales``.
        codes: Unpacked uint8 codes with the weight's logical shape.
        scale_e8m0: Scale bytes, blocked along ``axis``.
        axis: Blocked axis (1 for both Linear ``[out, in]`` and Conv ``[O, I, kH, kW]``).
    """

    name: str
    codes: np.ndarray
    scale_e8m0: np.ndarray
    axis: int = 1


def quantized_weight(
    name: str, w_hp: np.ndarray, fmt: str, *, axis: int = 1, block_size: int = 32, scale_rule: str = "floor"
) -> SyntheticWeight:
    """Quantize a float weight with the numpy reference."""
    codes, scale_e8m0 = numerics.quantize(w_hp, fmt, axis=axis, block_size=block_size, scale_rule=scale_rule)
    return SyntheticWeight(name, codes, scale_e8m0, axis)


def random_weight(
    name: str,
    shape: Sequence[int],
    fmt: str,
    rng: np.random.Generator,
    *,
    axis: int = 1,
    block_size: int = 32,
    scale_range: tuple[int, int] = (112, 136),
) -> SyntheticWeight:
    """Draw uniformly random encodable codes and scale bytes, much faster than quantizing floats."""
    valid = numerics.encodable_codes(fmt)
    codes = valid[rng.integers(0, valid.size, size=tuple(shape), dtype=np.int32)].astype(np.uint8)
    scale_shape = list(shape)
    scale_shape[axis] = -(-shape[axis] // block_size)
    scale_e8m0 = rng.integers(scale_range[0], scale_range[1], size=scale_shape, dtype=np.uint8)
    return SyntheticWeight(name, codes, scale_e8m0, axis)


def _activation_nodes(
    x: str, fmt: str, *, axis: int, block_size: int, axis_length: int
) -> tuple[list[onnx.NodeProto], str]:
    codes, scales, decoded = f"{x}.mx_codes", f"{x}.mx_scales", f"{x}.mx"
    quantize = make_quantize_node(
        x, codes, scales, fmt=fmt, axis=axis, block_size=block_size, name=f"{x}/quantize"
    )
    dequantize = make_dequantize_node(
        codes,
        scales,
        decoded,
        fmt=fmt,
        axis=axis,
        block_size=block_size,
        axis_length=axis_length,
        name=f"{x}/dequantize",
    )
    return [quantize, dequantize], decoded


def build_anchor_model(
    weights: Sequence[SyntheticWeight],
    anchor: str,
    *,
    block_size: int = 32,
    scale_rule: str = "floor",
    activations: str | None = None,
    expose_weights: bool = False,
) -> onnx.ModelProto:
    """Build an anchor model with one layer per weight.

    Args:
        weights: The weights, all stored in ``anchor``.
        anchor: Anchor format id, recorded in the nodes and the metadata.
        block_size: Elements per block of every weight.
        scale_rule: Scale rule recorded for the stored scales.
        activations: Format of an ``MXQuantize -> MXDequantize`` pair on each
            layer input; ``None`` leaves the inputs in float.
        expose_weights: Also make each decoded weight a graph output.

    Returns:
        The model, with the ``mfqat`` function bodies attached.
    """
    fmt = get_format(anchor)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []

    for weight in weights:
        shape = weight.codes.shape
        packed = numerics.pack_codes(weight.codes, fmt, axis=weight.axis, block_size=block_size)
        codes_name, scales_name = weight.name + CODES_SUFFIX, weight.name + SCALES_SUFFIX
        initializers.append(numpy_helper.from_array(packed, codes_name))
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(weight.scale_e8m0), scales_name))
        nodes.append(
            make_dequantize_node(
                codes_name,
                scales_name,
                weight.name,
                fmt=fmt,
                axis=weight.axis,
                block_size=block_size,
                axis_length=shape[weight.axis],
                scale_rule=scale_rule,
                name=f"{weight.name}/dequantize",
            )
        )

        # One independent layer per weight, with its own input.
        x, y = f"{weight.name}.input", f"{weight.name}.output"
        features = shape[1] if len(shape) > 1 else shape[0]
        if len(shape) <= 2:
            inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", features]))
            outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", shape[0]]))
            act_axis = -1
        else:
            spatial = [f"{weight.name}.h", f"{weight.name}.w"][: len(shape) - 2]
            out_spatial = [f"{weight.name}.out_h", f"{weight.name}.out_w"][: len(shape) - 2]
            inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", features, *spatial]))
            outputs.append(
                helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", shape[0], *out_spatial])
            )
            act_axis = 1
        layer_input = x
        if activations is not None:
            pair, layer_input = _activation_nodes(
                x, get_format(activations).name, axis=act_axis, block_size=block_size, axis_length=features
            )
            nodes.extend(pair)
        if len(shape) == 1:
            nodes.append(helper.make_node("Mul", [layer_input, weight.name], [y]))
        elif len(shape) == 2:
            nodes.append(helper.make_node("Gemm", [layer_input, weight.name], [y], transB=1))
        else:
            nodes.append(helper.make_node("Conv", [layer_input, weight.name], [y]))
        if expose_weights:
            outputs.append(helper.make_tensor_value_info(weight.name, TensorProto.FLOAT, list(shape)))

    graph = helper.make_graph(nodes, "synthetic_anchor", inputs, outputs, initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", DEFAULT_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        producer_name="mfqat_onnx",
        producer_version=mfqat_onnx.__version__,
    )
    model.ir_version = IR_VERSION
    attach_functions(model)
    helper.set_model_props(
        model,
        {
            ANCHOR_FORMAT_KEY: fmt.name,
            SCALE_RULE_KEY: scale_rule,
            PRODUCER_VERSION_KEY: mfqat_onnx.__version__,
            WEIGHTS_KEY: json.dumps({weight.name: fmt.name for weight in weights}),
        },
    )
    return model
