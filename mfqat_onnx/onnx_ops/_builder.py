"""A small emitter for function bodies made of standard ONNX nodes.

Value names are unique within one body. Constants are ``Constant`` nodes,
because functions carry no initializers, and identical constants are emitted once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mfqat_onnx.onnx_ops._tables import FormatTables, format_tables

INT64_MAX = np.iinfo(np.int64).max


class BodyBuilder:
    """Collects the nodes of one function body.

    Attributes:
        tables: Per-format constants of the formats the body serves.
        nodes: The body's nodes so far.
    """

    def __init__(self, tables: FormatTables | None = None) -> None:
        self.tables = tables if tables is not None else format_tables()
        self.nodes: list[onnx.NodeProto] = []
        self._used: dict[str, int] = {}
        self._constants: dict[tuple[str, tuple[int, ...], bytes], str] = {}

    def fresh(self, hint: str) -> str:
        """Return a new value name starting with ``hint``."""
        count = self._used.get(hint, 0)
        self._used[hint] = count + 1
        return hint if count == 0 else f"{hint}_{count}"

    def op(
        self, op_type: str, *inputs: str, out: str = "", output: str = "", domain: str = "", **attrs: object
    ) -> str:
        """Append one single-output node and return its output name.

        The output is named ``output`` verbatim when given (a function output),
        else a fresh name built from ``out`` or the op type.
        """
        output = output or self.fresh(out or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], domain=domain, **attrs))
        return output

    def const(self, value: object, dtype: type | np.dtype | None = None, *, out: str = "const") -> str:
        """Return the name of a ``Constant`` holding ``value`` (emitted once per distinct value)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh(out)
            tensor = numpy_helper.from_array(array)
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            self._constants[key] = name
        return self._constants[key]

    def attribute(self, attr_name: str, attr_type: onnx.AttributeProto.AttributeType) -> str:
        """Return a ``Constant`` whose value is the caller's attribute ``attr_name`` (scalar)."""
        value_field = {
            onnx.AttributeProto.INT: "value_int",
            onnx.AttributeProto.FLOAT: "value_float",
            onnx.AttributeProto.STRING: "value_string",
        }[attr_type]
        output = self.fresh(attr_name)
        node = helper.make_node("Constant", [], [output])
        node.attribute.append(helper.make_attribute_ref(value_field, attr_type, ref_attr_name=attr_name))
        self.nodes.append(node)
        return output

    def int_attribute(self, attr_name: str) -> str:
        """Return an int64 scalar holding the caller's int attribute ``attr_name``."""
        return self.attribute(attr_name, onnx.AttributeProto.INT)

    def to_1d(self, scalar: str) -> str:
        """Reshape a scalar to shape ``[1]`` (for ``Concat`` of shapes)."""
        return self.op("Reshape", scalar, self.const([1], np.int64), out=f"{scalar}_1d")

    def shape_of(self, *parts: str) -> str:
        """Concatenate 1-D int64 parts into a shape."""
        return self.op("Concat", *parts, axis=0, out="shape")

    def reshape(self, data: str, shape: str, *, out: str = "", output: str = "") -> str:
        """Reshape with ``allowzero=1``, so a computed 0 is a real empty dimension, never "copy"."""
        return self.op("Reshape", data, shape, allowzero=1, out=out, output=output)

    def gather_row(self, table: np.ndarray, row: str, *, out: str) -> str:
        """Return ``table[row]`` for a constant ``table`` and an int64 row index."""
        return self.op("Gather", self.const(table, out=f"{out}_table"), row, axis=0, out=out)


@dataclasses.dataclass(frozen=True)
class AxisSplit:
    """Dimensions of a tensor around its blocked axis, as int64 tensors in the body.

    Attributes:
        before: 1-D dims before the axis (possibly empty).
        after: 1-D dims after the axis (possibly empty).
        outer: ``[1]`` product of ``before`` (1 when empty).
        inner: ``[1]`` product of ``after`` (1 when empty).
        length: ``[1]`` the input's own length along the axis.
    """

    before: str
    after: str
    outer: str
    inner: str
    length: str


def split_at_axis(b: BodyBuilder, data: str) -> AxisSplit:
    """Split ``data``'s shape at the ``axis`` attribute of the caller; negative axes count from the end.

    ``Mod`` with ``fmod=0`` takes the divisor's sign, so ``axis mod rank`` maps
    ``-1`` to ``rank - 1``. An axis outside ``[-rank, rank)`` wraps around here,
    so callers validate it: the builders and the schema inference functions do.
    """
    shape = b.op("Shape", data, out="input_shape")
    rank = b.op("Size", shape, out="rank")
    axis = b.op("Mod", b.int_attribute("axis"), rank, fmod=0, out="axis_index")
    axis_1d = b.to_1d(axis)
    next_1d = b.op("Add", axis_1d, b.const([1], np.int64), out="axis_next")
    before = b.op("Slice", shape, b.const([0], np.int64), axis_1d, out="dims_before")
    after = b.op("Slice", shape, next_1d, b.const([INT64_MAX], np.int64), out="dims_after")
    length = b.op("Slice", shape, axis_1d, next_1d, out="axis_dim")
    outer = b.op("ReduceProd", before, keepdims=1, out="outer")
    inner = b.op("ReduceProd", after, keepdims=1, out="inner")
    return AxisSplit(before=before, after=after, outer=outer, inner=inner, length=length)


def string_attribute_index(
    b: BodyBuilder, attr_name: str, keys: tuple[str, ...], values: tuple[int, ...], default: int, *, out: str
) -> str:
    """Map the caller's string attribute to ``values[keys.index(s)]``, or ``default``; int64 scalar.

    The body has one ``RegexFullMatch`` per key. The keys are plain
    ``[a-z0-9_]`` words, so each pattern matches exactly itself.
    ``ai.onnx.ml.LabelEncoder`` would be shorter, but ONNX Runtime 1.32 does
    not constant-fold ops outside the ONNX domain, so a constant weight would
    not be folded to float32 at session start. String ``Equal`` fails in
    ``onnx.reference`` 1.23 (the attribute constant and the keys get different
    numpy string dtypes).
    """
    name = b.attribute(attr_name, onnx.AttributeProto.STRING)
    matches = []
    for key in keys:
        if not key.replace("_", "").isalnum():
            raise AssertionError(f"key {key!r} is not a plain word; it would need regex escaping")
        match = b.op("RegexFullMatch", name, pattern=key, out=f"is_{key}")
        if len(keys) == 1:
            # A body for one format: a single Where makes the body about 250 bytes shorter.
            return b.op("Where", match, b.const(values[0], np.int64), b.const(default, np.int64), out=out)
        matches.append(b.op("Unsqueeze", match, b.const([0], np.int64)))
    matched = b.op("Cast", b.op("Concat", *matches, axis=0), to=onnx.TensorProto.INT64, out=f"{out}_matches")

    # At most one key matches: the sum picks its value's offset from the default.
    offsets = b.const(np.array(values, dtype=np.int64) - default, out=f"{out}_offsets")
    offset = b.op("ReduceSum", b.op("Mul", matched, offsets), keepdims=0, out=f"{out}_offset")
    return b.op("Add", offset, b.const(default, np.int64), out=out)


def format_row(b: BodyBuilder) -> str:
    """Map the caller's ``format`` attribute to an int64 scalar row of ``b.tables``."""
    tables = b.tables
    return string_attribute_index(
        b, "format", tables.keys, tables.key_rows, tables.unknown_row, out="format_row"
    )
