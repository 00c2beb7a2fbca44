"""``OpSchema`` registration for the ``mfqat`` operators, with type and shape inference.

The schemas let ``onnx.shape_inference.infer_shapes`` and
``onnx.checker.check_model(full_check=True)`` see typed outputs and reject bad
attributes before a runtime does. ONNX Runtime keeps its own registry, so this
only affects the ``onnx`` package in this process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx
from onnx import helper
from onnx.defs import OpSchema

from mfqat_onnx.formats import MXFormat, get_format
from mfqat_onnx.onnx_ops._contract import (
    DEFAULT_AXIS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SCALE_RULE,
    DEQUANTIZE_OP,
    DOMAIN,
    DOMAIN_VERSION,
    QUANTIZE_OP,
    SCALE_RULES,
    accepted_format_names,
    n_blocks,
    normalize_axis,
    packed_length,
)

logger = logging.getLogger(__name__)

_InferenceError = onnx.shape_inference.InferenceError
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_FORMAT_DOC = "MX element format id, for example mxfp4_e2m1 or mxint8 (aliases mxfp8, mxfp6, mxfp4 accepted)."


class _Attributes:
    """Attribute values of one node as the inference context reports them, with defaults."""

    def __init__(self, ctx: onnx.shape_inference.InferenceContext, op: str) -> None:
        self._ctx = ctx
        self.op = op

    def string(self, name: str, default: str | None = None) -> str:
        attr = self._ctx.get_attribute(name)
        if attr is None:
            if default is None:
                raise _InferenceError(f"{self.op}: missing required attribute {name!r}")
            return default
        return attr.s.decode()

    def integer(self, name: str, default: int | None = None) -> int:
        attr = self._ctx.get_attribute(name)
        if attr is None:
            if default is None:
                raise _InferenceError(f"{self.op}: missing required attribute {name!r}")
            return default
        return int(attr.i)

    def block_geometry(self) -> tuple[MXFormat, int, int]:
        """Return ``(format, axis, block_size)`` after validating them."""
        name = self.string("format")
        if name not in accepted_format_names():
            raise _InferenceError(
                f"{self.op}: unknown format {name!r}; valid names are: {', '.join(accepted_format_names())}"
            )
        block_size = self.integer("block_size", DEFAULT_BLOCK_SIZE)
        if block_size < 1:
            raise _InferenceError(f"{self.op}: block_size must be a positive integer, got {block_size}")
        rule = self.string("scale_rule", DEFAULT_SCALE_RULE)
        if rule not in SCALE_RULES:
            raise _InferenceError(
                f"{self.op}: unknown scale_rule {rule!r}; valid rules are: {', '.join(SCALE_RULES)}"
            )
        return get_format(name), self.integer("axis", DEFAULT_AXIS), block_size


def _tensor_dims(
    ctx: onnx.shape_inference.InferenceContext, index: int
) -> list[onnx.TensorShapeProto.Dimension] | None:
    """Return the dims of input ``index``, or None when its rank is unknown."""
    if not ctx.has_input(index):
        return None
    input_type = ctx.get_input_type(index)
    if input_type is None or not input_type.tensor_type.HasField("shape"):
        return None
    return list(input_type.tensor_type.shape.dim)


def _axis(op: str, axis: int, rank: int) -> int:
    try:
        return normalize_axis(axis, rank)
    except ValueError as error:
        raise _InferenceError(f"{op}: {error}") from None


def _set_output(
    ctx: onnx.shape_inference.InferenceContext,
    index: int,
    elem_type: int,
    dims: list[onnx.TensorShapeProto.Dimension] | None,
    axis: int,
    axis_dim: int | None,
) -> None:
    """Set output ``index`` to ``dims`` with ``axis_dim`` on ``axis`` (unknown when None)."""
    if dims is None:
        ctx.set_output_type(index, helper.make_tensor_type_proto(elem_type, None))
        return
    output_type = helper.make_tensor_type_proto(elem_type, [])
    shape = output_type.tensor_type.shape
    for position, dim in enumerate(dims):
        new_dim = shape.dim.add()
        if position == axis:
            if axis_dim is not None:
                new_dim.dim_value = axis_dim
        else:
            new_dim.CopyFrom(dim)
    ctx.set_output_type(index, output_type)


def _check_dim(op: str, what: str, dim: onnx.TensorShapeProto.Dimension, expected: int) -> None:
    if dim.HasField("dim_value") and dim.dim_value != expected:
        raise _InferenceError(
            f"{op}: {what} has {dim.dim_value} entries along the blocked axis, expected {expected}; "
            "check the format, axis, block_size and axis_length attributes"
        )


def _infer_dequantize(ctx: onnx.shape_inference.InferenceContext) -> None:
    attrs = _Attributes(ctx, DEQUANTIZE_OP)
    fmt, axis, block_size = attrs.block_geometry()
    axis_length = attrs.integer("axis_length")
    if axis_length < 1:
        raise _InferenceError(f"{DEQUANTIZE_OP}: axis_length must be a positive integer, got {axis_length}")

    code_dims = _tensor_dims(ctx, 0)
    scale_dims = _tensor_dims(ctx, 1)
    if code_dims is None:
        _set_output(ctx, 0, onnx.TensorProto.FLOAT, None, 0, None)
        return
    axis = _axis(DEQUANTIZE_OP, axis, len(code_dims))
    expected_bytes = packed_length(fmt, axis_length, block_size)
    _check_dim(DEQUANTIZE_OP, f"codes ({fmt.name}, {axis_length} elements)", code_dims[axis], expected_bytes)
    if scale_dims is not None:
        if len(scale_dims) != len(code_dims):
            raise _InferenceError(
                f"{DEQUANTIZE_OP}: scales have rank {len(scale_dims)}, but codes have rank {len(code_dims)}"
            )
        _check_dim(DEQUANTIZE_OP, "scales", scale_dims[axis], n_blocks(axis_length, block_size))
    _set_output(ctx, 0, onnx.TensorProto.FLOAT, code_dims, axis, axis_length)


def _infer_quantize(ctx: onnx.shape_inference.InferenceContext) -> None:
    attrs = _Attributes(ctx, QUANTIZE_OP)
    fmt, axis, block_size = attrs.block_geometry()
    dims = _tensor_dims(ctx, 0)
    if dims is None:
        for index in range(2):
            _set_output(ctx, index, onnx.TensorProto.UINT8, None, 0, None)
        return
    axis = _axis(QUANTIZE_OP, axis, len(dims))
    length = dims[axis].dim_value if dims[axis].HasField("dim_value") else None
    codes_dim = None if length is None else packed_length(fmt, length, block_size)
    scales_dim = None if length is None else n_blocks(length, block_size)
    _set_output(ctx, 0, onnx.TensorProto.UINT8, dims, axis, codes_dim)
    _set_output(ctx, 1, onnx.TensorProto.UINT8, dims, axis, scales_dim)


def _block_attributes(*, with_axis_length: bool) -> list[OpSchema.Attribute]:
    attributes = [
        OpSchema.Attribute("format", OpSchema.AttrType.STRING, _FORMAT_DOC),
        OpSchema.Attribute(
            "axis",
            helper.make_attribute("axis", DEFAULT_AXIS),
            "Blocked axis; negative values count from the end.",
        ),
        OpSchema.Attribute(
            "block_size", helper.make_attribute("block_size", DEFAULT_BLOCK_SIZE), "Elements per block."
        ),
        OpSchema.Attribute(
            "scale_rule",
            helper.make_attribute("scale_rule", DEFAULT_SCALE_RULE),
            "Shared-exponent rule: floor (OCP default), rceil or even.",
        ),
    ]
    if with_axis_length:
        attributes.append(
            OpSchema.Attribute(
                "axis_length", OpSchema.AttrType.INT, "Length of the output along the blocked axis."
            )
        )
    return attributes


def _dequantize_schema() -> OpSchema:
    return OpSchema(
        DEQUANTIZE_OP,
        DOMAIN,
        DOMAIN_VERSION,
        "Decode packed MX element codes with E8M0 scale bytes: y = element(code) * 2^(scale - 127).",
        inputs=[
            OpSchema.FormalParameter("codes", "T1", "Packed element codes, one bit stream per block."),
            OpSchema.FormalParameter(
                "scales", "T1", "E8M0 scale bytes, ceil(axis_length / block_size) per row."
            ),
        ],
        outputs=[OpSchema.FormalParameter("y", "T2", "Decoded values.")],
        type_constraints=[
            ("T1", ["tensor(uint8)"], "Byte containers."),
            ("T2", ["tensor(float)"], "Output."),
        ],
        attributes=_block_attributes(with_axis_length=True),
    )


def _quantize_schema() -> OpSchema:
    return OpSchema(
        QUANTIZE_OP,
        DOMAIN,
        DOMAIN_VERSION,
        "Quantize to packed MX element codes and E8M0 scale bytes (OCP MX v1.0).",
        inputs=[OpSchema.FormalParameter("x", "T1", "Values to quantize.")],
        outputs=[
            OpSchema.FormalParameter("codes", "T2", "Packed element codes, one bit stream per block."),
            OpSchema.FormalParameter("scales", "T2", "E8M0 scale bytes."),
        ],
        type_constraints=[
            ("T1", _FLOAT_TYPES, "Input floats."),
            ("T2", ["tensor(uint8)"], "Byte containers."),
        ],
        attributes=_block_attributes(with_axis_length=False),
    )


_SCHEMAS: dict[
    str, tuple[Callable[[], OpSchema], Callable[[onnx.shape_inference.InferenceContext], None]]
] = {
    DEQUANTIZE_OP: (_dequantize_schema, _infer_dequantize),
    QUANTIZE_OP: (_quantize_schema, _infer_quantize),
}


def register_schemas() -> None:
    """Register the ``mfqat`` operator schemas with the ``onnx`` package (no-op when already registered)."""
    for op, (make_schema, infer) in _SCHEMAS.items():
        if onnx.defs.has(op, DOMAIN_VERSION, DOMAIN):
            continue
        schema = make_schema()
        schema.set_type_and_shape_inference_function(infer)
        onnx.defs.register_schema(schema)
        logger.debug("registered schema %s::%s version %s", DOMAIN, op, DOMAIN_VERSION)
