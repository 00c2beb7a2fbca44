"""Final touches on the traced graph: metadata, exporter debug data, and counts for the report."""

from __future__ import annotations

import json

import onnx_ir as ir

import mfqat_onnx
from mfqat_onnx import onnx_ops
from mfqat_onnx._export_fold import CODES_SUFFIX, SCALES_SUFFIX, FoldedWeight
from mfqat_onnx._onnx_io import ANCHOR_FORMAT_KEY, PRODUCER_VERSION_KEY, SCALE_RULE_KEY, WEIGHTS_KEY

_TORCH_METADATA_PREFIX = "pkg.torch."


def write_metadata(model: ir.Model, anchor: str, scale_rule: str, weights: list[FoldedWeight]) -> None:
    """Set the producer fields and the ``mfqat.*`` metadata keys of ``docs/format.md``."""
    model.producer_name = "mfqat_onnx"
    model.producer_version = mfqat_onnx.__version__
    model.metadata_props[ANCHOR_FORMAT_KEY] = anchor
    model.metadata_props[SCALE_RULE_KEY] = scale_rule
    model.metadata_props[PRODUCER_VERSION_KEY] = mfqat_onnx.__version__
    model.metadata_props[WEIGHTS_KEY] = json.dumps({w.name: w.format for w in weights}, sort_keys=True)


def strip_trace_metadata(graph: ir.Graph, *, keep_debug_info: bool = False) -> None:
    """Drop the exporter's metadata of nodes and values, and the types of intermediate values.

    The ``pkg.torch.*`` entries contain Python stack traces with local file
    paths and FX node dumps, which leak the build machine's layout, so they
    always go. Unless ``keep_debug_info`` is set, the rest goes too: the
    ``namespace`` entry (module path of each node), the optimizer's notes, and
    the types and shapes of intermediate values and initializers. Together
    they take about 200 bytes per node, more than 5 % of the packed weights of
    a small model, and ONNX Runtime and the checker infer the types again.
    """
    values = [*graph.inputs, *graph.initializers.values()]
    for node in graph.all_nodes():
        values.extend(node.outputs)
        _drop_metadata(node.metadata_props, keep_debug_info)
    for value in values:
        _drop_metadata(value.metadata_props, keep_debug_info)
    if keep_debug_info:
        return
    # Initializers carry their own type and shape, so their value_info entries only repeat them.
    graph_io = {id(value) for value in [*graph.inputs, *graph.outputs]}
    intermediate = [*graph.initializers.values(), *(value for node in graph for value in node.outputs)]
    for value in intermediate:
        if id(value) not in graph_io:
            value.type = None
            value.shape = None


def _drop_metadata(metadata: dict[str, str], keep_debug_info: bool) -> None:
    for key in [key for key in metadata if not keep_debug_info or key.startswith(_TORCH_METADATA_PREFIX)]:
        del metadata[key]


def activation_quantizers(graph: ir.Graph) -> dict[str, int]:
    """Count the ``MXQuantize`` nodes left after folding (the activation quantizers), by format."""
    counts: dict[str, int] = {}
    for node in graph:
        if node.domain == onnx_ops.DOMAIN and node.op_type == onnx_ops.QUANTIZE_OP:
            fmt = node.attributes["format"].as_string()
            counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def other_initializer_bytes(graph: ir.Graph, weights: list[FoldedWeight]) -> int:
    packed = {w.name + suffix for w in weights for suffix in (CODES_SUFFIX, SCALES_SUFFIX)}
    return sum(
        v.const_value.nbytes for name, v in graph.initializers.items() if name not in packed and v.const_value
    )
