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


def strip_trace_metadata(graph: ir.Graph) -> None:
    """Drop the exporter's ``pkg.torch.*`` metadata of nodes and values.

    It contains Python stack traces with local file paths and FX node dumps,
    which leak the build machine's layout and grow with the node count. The
    ``namespace`` entry (module path of each node) stays.
    """
    values = [*graph.inputs, *graph.initializers.values()]
    for node in graph.all_nodes():
        values.extend(node.outputs)
        _drop_torch_keys(node.metadata_props)
    for value in values:
        _drop_torch_keys(value.metadata_props)


def _drop_torch_keys(metadata: dict[str, str]) -> None:
    for key in [key for key in metadata if key.startswith(_TORCH_METADATA_PREFIX)]:
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
