"""Model-local ``FunctionProto`` definitions of the ``mfqat`` operators."""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import helper

from mfqat_onnx.onnx_ops._builder import BodyBuilder
from mfqat_onnx.onnx_ops._contract import (
    DEFAULT_AXIS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_OPSET,
    DEFAULT_SCALE_RULE,
    DEQUANTIZE_OP,
    DOMAIN,
    QUANTIZE_OP,
)
from mfqat_onnx.onnx_ops._dequantize import dequantize_body
from mfqat_onnx.onnx_ops._quantize import quantize_body
from mfqat_onnx.onnx_ops._tables import canonical_names, format_tables


def _defaults() -> list[onnx.AttributeProto]:
    return [
        helper.make_attribute("axis", DEFAULT_AXIS),
        helper.make_attribute("block_size", DEFAULT_BLOCK_SIZE),
        helper.make_attribute("scale_rule", DEFAULT_SCALE_RULE),
    ]


def dequantize_function(opset: int = DEFAULT_OPSET, formats: Iterable[str] | None = None) -> onnx.FunctionProto:
    """Build the ``MXDequantize`` function for standard opset ``opset``, serving ``formats`` (all when None)."""
    b = BodyBuilder(format_tables(canonical_names(formats)))
    dequantize_body(b)
    return helper.make_function(
        DOMAIN,
        DEQUANTIZE_OP,
        inputs=["codes", "scales"],
        outputs=["y"],
        nodes=b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["format", "axis_length"],
        attribute_protos=_defaults(),
        doc_string="Decode packed MX element codes and E8M0 scale bytes to float32.",
    )


def quantize_function(opset: int = DEFAULT_OPSET, formats: Iterable[str] | None = None) -> onnx.FunctionProto:
    """Build the ``MXQuantize`` function for standard opset ``opset``, serving ``formats`` (all when None)."""
    b = BodyBuilder(format_tables(canonical_names(formats)))
    quantize_body(b)
    return helper.make_function(
        DOMAIN,
        QUANTIZE_OP,
        inputs=["x"],
        outputs=["codes", "scales"],
        nodes=b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["format"],
        attribute_protos=_defaults(),
        doc_string="Quantize a float tensor to packed MX element codes and E8M0 scale bytes.",
    )
