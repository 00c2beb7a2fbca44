"""Fold the quantizer of every constant weight into packed code and scale initializers.

After tracing, a quantized weight ``W`` reads ``W -> MXQuantize -> MXDequantize
-> consumer``. This pass computes the codes and scale bytes of ``W`` once with
the numpy reference: ``numerics.quantize`` then ``numerics.pack_codes``, with
the node's format, axis, block size and scale rule. It stores them as the
initializers ``W.mx_codes`` and ``W.mx_scales``, rewires the ``MXDequantize``
nodes to them and deletes the ``MXQuantize`` node. ``W`` itself is deleted
when nothing else reads it. The pass changes the model in place.

An ``MXQuantize`` whose input is not an initializer (an activation) is left as
it is.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from mfqat_onnx import numerics, onnx_ops
from mfqat_onnx._export_errors import ExportError

logger = logging.getLogger(__name__)

CODES_SUFFIX = ".mx_codes"
SCALES_SUFFIX = ".mx_scales"


@dataclasses.dataclass(frozen=True)
class FoldedWeight:
    """A weight stored as packed MX codes and E8M0 scales.

    Attributes:
        name: Initializer name of the fp32 weight in the traced graph.
        shape: Logical shape of the weight.
        format: Canonical format id of the codes.
        axis: Blocked axis, in ``[0, rank)``.
        block_size: Elements per block.
        scale_rule: Rule that produced the scale bytes.
        codes_bytes: Bytes of the packed codes.
        scales_bytes: Bytes of the scales.
        kept_fp32: Whether the fp32 weight stays in the file because another
            node (not a quantizer) reads it too, as with tied weights.
    """

    name: str
    shape: tuple[int, ...]
    format: str
    axis: int
    block_size: int
    scale_rule: str
    codes_bytes: int
    scales_bytes: int
    kept_fp32: bool

    @property
    def fp32_bytes(self) -> int:
        """Bytes of the weight in float32."""
        return 4 * int(np.prod(self.shape, dtype=np.int64))

    @property
    def packed_bytes(self) -> int:
        """Bytes of codes and scales together."""
        return self.codes_bytes + self.scales_bytes


@dataclasses.dataclass(frozen=True)
class _Settings:
    format: str
    axis: int
    block_size: int
    scale_rule: str


def _settings(node: ir.Node, rank: int) -> _Settings:
    attrs = node.attributes
    return _Settings(
        format=attrs["format"].as_string(),
        axis=attrs["axis"].as_int() % rank,
        block_size=attrs["block_size"].as_int(),
        scale_rule=attrs["scale_rule"].as_string(),
    )


def _is_op(node: ir.Node, op_type: str) -> bool:
    return node.domain == onnx_ops.DOMAIN and node.op_type == op_type


def _dequantize_consumers(quantize: ir.Node) -> list[ir.Node] | None:
    """Return the ``MXDequantize`` nodes reading this quantizer, or None when anything else reads it."""
    codes, scales = quantize.outputs
    consumers: list[ir.Node] = []
    for output in (codes, scales):
        if output.is_graph_output():
            return None
        for use in output.uses():
            node = use.node
            if not _is_op(node, onnx_ops.DEQUANTIZE_OP) or node.inputs[:2] != (codes, scales):
                return None
            if node not in consumers:
                consumers.append(node)
    return consumers


def _weight_quantizers(graph: ir.Graph) -> list[tuple[ir.Node, ir.Value, list[ir.Node]]]:
    """Return ``(MXQuantize, weight, MXDequantize consumers)`` for each quantizer of an initializer."""
    found = []
    for node in graph:
        if not _is_op(node, onnx_ops.QUANTIZE_OP):
            continue
        weight = node.inputs[0]
        if weight is None or not weight.is_initializer() or weight.const_value is None:
            continue
        consumers = _dequantize_consumers(node)
        if consumers is None:
            logger.warning(
                "keeping MXQuantize %r of %s: its outputs feed nodes other than MXDequantize",
                node.name,
                weight.name,
            )
            continue
        found.append((node, weight, consumers))
    return found


def _weight_array(weight: ir.Value) -> np.ndarray:
    array = weight.const_value.numpy()
    if array.dtype != np.float32:
        raise ExportError(
            f"weight {weight.name!r} has dtype {array.dtype}, but quantized weights are exported from "
            "float32; convert the model with model.float() before exporting"
        )
    return array


def _pack(array: np.ndarray, settings: _Settings) -> tuple[np.ndarray, np.ndarray]:
    codes, scale_e8m0 = numerics.quantize(
        array,
        settings.format,
        axis=settings.axis,
        block_size=settings.block_size,
        scale_rule=settings.scale_rule,
    )
    packed = numerics.pack_codes(codes, settings.format, axis=settings.axis, block_size=settings.block_size)
    return packed, scale_e8m0


def _new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        raise ExportError(
            f"the traced graph already has an initializer named {name!r}; rename the parameter so that "
            f"no name ends in {CODES_SUFFIX!r} or {SCALES_SUFFIX!r}"
        )
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.UINT8),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def fold_weight_quantizers(
    graph: ir.Graph, *, on_weight: Callable[[FoldedWeight], None] | None = None
) -> list[FoldedWeight]:
    """Replace the quantizer of each constant weight by packed initializers, in place.

    Args:
        graph: The traced graph (top level; weights are never inside subgraphs).
        on_weight: Called after each weight, for progress reporting.

    Returns:
        One entry per folded weight, in graph order.

    Raises:
        ExportError: A quantized weight is not float32, one weight is quantized
            with two different settings, or a new initializer name is taken.
    """
    folded: dict[str, tuple[_Settings, ir.Value, ir.Value]] = {}
    results: list[FoldedWeight] = []
    for quantize, weight, consumers in _weight_quantizers(graph):
        array = _weight_array(weight)
        settings = _settings(quantize, array.ndim)

        # A weight read by two quantized layers (tied weights) is packed once.
        if weight.name in folded:
            previous, codes, scales = folded[weight.name]
            if previous != settings:
                raise ExportError(
                    f"weight {weight.name!r} is quantized as {previous} and as {settings}; a stored weight "
                    "has one format, so give the layers that share it the same quantization settings"
                )
        else:
            packed, scale_e8m0 = _pack(array, settings)
            codes = _new_initializer(graph, weight.name + CODES_SUFFIX, packed)
            scales = _new_initializer(graph, weight.name + SCALES_SUFFIX, scale_e8m0)
            folded[weight.name] = (settings, codes, scales)

        for dequantize in consumers:
            dequantize.replace_input_with(0, codes)
            dequantize.replace_input_with(1, scales)
            dequantize.name = f"{weight.name}/{onnx_ops.DEQUANTIZE_OP}"
        graph.remove(quantize, safe=True)
        logger.debug("folded %s %s into %s", weight.name, settings, codes.name)

        if any(r.name == weight.name for r in results):
            continue
        results.append(
            FoldedWeight(
                name=weight.name,
                shape=tuple(array.shape),
                format=settings.format,
                axis=settings.axis,
                block_size=settings.block_size,
                scale_rule=settings.scale_rule,
                codes_bytes=codes.const_value.nbytes,
                scales_bytes=scales.const_value.nbytes,
                kept_fp32=False,
            )
        )
        if on_weight is not None:
            on_weight(results[-1])

    # Drop each fp32 weight that nothing reads any more.
    for index, entry in enumerate(results):
        weight = graph.initializers[entry.name]
        if weight.uses() or weight.is_graph_output():
            results[index] = dataclasses.replace(entry, kept_fp32=True)
            logger.info("keeping fp32 %s: nodes other than its quantizer read it", entry.name)
        else:
            del graph.initializers[entry.name]
    return results
