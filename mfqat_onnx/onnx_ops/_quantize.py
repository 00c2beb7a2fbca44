"""Standard-op body of ``MXQuantize(x) -> (codes, scales)``.

Follows the numerics of ``docs/format.md`` step by step (OCP MX v1.0 section
6.3 plus the conventions it leaves open):

1. ``x`` is widened to float32 and viewed as blocks ``[outer, n, block_size,
   inner]``; a partial last block is padded with zeros, which never change a
   block's ``amax``.
2. A block holding NaN or ±Inf gets byte 0xFF and zero codes; an all-zero block
   gets byte 0x00. Otherwise ``f = floor(log2(amax))`` and the shared exponent is
   ``f - emax_elem`` (``floor``), plus one when ``amax / 2^f`` exceeds
   ``max_normal / 2^emax_elem`` (``rceil``: the smallest ``E`` with
   ``amax / 2^E <= max_normal``), or plus one when ``amax / 2^f`` rounded to
   ``mbits`` fraction bits with ties to even reaches 2 (``even``). It is clamped
   to [-127, 127] and stored as ``E + 127``.
3. Elements: ``a = |x| / 2^E`` (exact while ``a`` is a normal float32; smaller
   values round to zero either way), rounded with ``Round`` (ties to even) on
   the grid of its element binade, saturated to ``max_normal`` (see
   ``_tables`` for the code formula). A float code takes the sign bit of ``x``
   (``x < 0`` or ``1 / x == -inf``), so -0.0 and negative values that round to
   zero encode as negative zero. Integer codes are two's complement.
4. Codes are packed into each block's little-endian bit stream.

Standard ONNX has no bitcast, so ``floor(log2(t))`` comes from ``Log`` and is
then corrected by comparing ``t`` with exact powers of two from a table; the
float estimate is within one of the answer, and the two comparisons fix that.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from mfqat_onnx.onnx_ops._builder import (
    AxisSplit,
    BodyBuilder,
    format_row,
    split_at_axis,
    string_attribute_index,
)
from mfqat_onnx.onnx_ops._contract import SCALE_RULES
from mfqat_onnx.onnx_ops._tables import E8M0_NAN, POW2_MAX, POW2_MIN, pow2_table

_FLOAT = onnx.TensorProto.FLOAT
_INT64 = onnx.TensorProto.INT64
_E8M0_BIAS = 127
_MAX_SHARED_EXP = 127


def _pow2(b: BodyBuilder, exponent: str, *, out: str) -> str:
    """Return float32 ``2**exponent`` (exact) for int64 exponents in the table's range."""
    index = b.op("Sub", exponent, b.const(POW2_MIN, np.int64), out=f"{out}_index")
    return b.op("Gather", b.const(pow2_table(), out="pow2_values"), index, axis=0, out=out)


def _floor_log2(b: BodyBuilder, t: str, *, out: str) -> str:
    """Return the exact int64 ``floor(log2(t))`` of positive float32 ``t`` (subnormals included)."""
    estimate = b.op("Div", b.op("Log", t), b.const(math.log(2.0), np.float32), out=f"{out}_estimate")
    estimate = b.op("Min", estimate, b.const(POW2_MAX - 1, np.float32))
    estimate = b.op("Max", estimate, b.const(POW2_MIN + 1, np.float32))
    exponent = b.op("Cast", b.op("Floor", estimate), to=_INT64, out=f"{out}_rough")

    # Correct the estimate by one step either way until 2^e <= t < 2^(e+1).
    too_high = b.op("Greater", _pow2(b, exponent, out=f"{out}_low"), t)
    exponent = b.op("Sub", exponent, b.op("Cast", too_high, to=_INT64), out=f"{out}_down")
    next_power = _pow2(b, b.op("Add", exponent, b.const(1, np.int64)), out=f"{out}_high")
    too_low = b.op("LessOrEqual", next_power, t)
    return b.op("Add", exponent, b.op("Cast", too_low, to=_INT64), out=out)


def _to_blocks(b: BodyBuilder, split: AxisSplit, block_size: str) -> tuple[str, str]:
    """Return float32 blocks ``[outer, n, block_size, inner]`` of ``x`` and ``n`` as a ``[1]`` tensor."""
    n_blocks = b.op(
        "Div",
        b.op("Add", split.length, b.op("Sub", block_size, b.const(1, np.int64))),
        block_size,
        out="n_blocks",
    )
    pad = b.op("Sub", b.op("Mul", n_blocks, block_size), split.length, out="pad_length")
    pads = b.op("Concat", b.const([0, 0, 0, 0], np.int64), pad, b.const([0], np.int64), axis=0, out="pads")
    rows = b.reshape(
        b.op("Cast", "x", to=_FLOAT, out="x_float"),
        b.shape_of(split.outer, split.length, split.inner),
        out="rows",
    )
    padded = b.op("Pad", rows, pads, out="rows_padded")
    block_shape = b.shape_of(split.outer, n_blocks, b.to_1d(block_size), split.inner)
    return b.reshape(padded, block_shape, out="blocks"), n_blocks


def _scale_rule_row(b: BodyBuilder) -> str:
    """Map the ``scale_rule`` attribute to its index in ``SCALE_RULES`` (-1 when unknown)."""
    indices = tuple(range(len(SCALE_RULES)))
    return string_attribute_index(b, "scale_rule", SCALE_RULES, indices, -1, out="scale_rule_index")


def _shared_exponent(b: BodyBuilder, amax: str, row: str, rule: str) -> str:
    """Return the unclamped int64 shared exponent of blocks with positive ``amax``."""
    tables = b.tables
    exponent = _floor_log2(b, amax, out="amax_exponent")
    mantissa = b.op("Div", amax, _pow2(b, exponent, out="amax_binade"), out="amax_mantissa")

    # rceil: one binade up when amax / 2^(f - emax_elem) would exceed max_normal.
    max_mantissa = b.gather_row(tables.max_mantissa, row, out="max_mantissa")
    rceil_up = b.op("Greater", mantissa, max_mantissa, out="rceil_up")

    # even: one binade up when amax rounded to mbits fraction bits carries to 2.
    steps = b.op("Cast", b.gather_row(tables.mantissa_steps, row, out="mantissa_steps"), to=_FLOAT)
    rounded = b.op("Round", b.op("Mul", mantissa, steps), out="amax_rounded")
    even_up = b.op("GreaterOrEqual", rounded, b.op("Mul", steps, b.const(2.0, np.float32)), out="even_up")

    is_rule = [
        b.op("Equal", rule, b.const(i, np.int64), out=f"is_{name}") for i, name in enumerate(SCALE_RULES)
    ]
    up = b.op("Or", b.op("And", is_rule[1], rceil_up), b.op("And", is_rule[2], even_up), out="binade_up")
    emax_elem = b.gather_row(tables.emax_elem, row, out="emax_elem")
    exponent = b.op("Sub", exponent, emax_elem, out="floor_exponent")
    return b.op("Add", exponent, b.op("Cast", up, to=_INT64), out="shared_exp_unclamped")


def _encode_elements(b: BodyBuilder, magnitude: str, negative: str, row: str) -> str:
    """Return int64 codes of ``magnitude`` (already divided by the block scale) with sign ``negative``."""
    tables = b.tables
    min_binade = b.gather_row(tables.min_binade, row, out="min_binade")
    max_binade = b.gather_row(tables.max_binade, row, out="max_binade")
    mbits = b.gather_row(tables.mbits, row, out="mbits")

    # Binade of each element, then the count of grid steps in it, rounded to even.
    # Zero is lifted to the smallest float32 so that its binade clips to min_binade.
    positive = b.op("Max", magnitude, b.const(np.float32(2.0**-149), np.float32), out="positive_magnitude")
    binade = _floor_log2(b, positive, out="element_exponent")
    binade = b.op("Max", b.op("Min", binade, max_binade), min_binade, out="binade")
    step = _pow2(b, b.op("Sub", binade, mbits), out="step")
    steps = b.op("Cast", b.op("Round", b.op("Div", magnitude, step)), to=_INT64, out="step_count")

    # Code magnitude, saturated at max_normal's code.
    mantissa_steps = b.gather_row(tables.mantissa_steps, row, out="mantissa_steps_int")
    code = b.op("Add", b.op("Mul", b.op("Sub", binade, min_binade), mantissa_steps), steps)
    code = b.op(
        "Min", code, b.gather_row(tables.max_code_magnitude, row, out="max_code"), out="code_magnitude"
    )

    # Float codes: sign bit on top. Integer codes: two's complement in `bits` bits.
    sign_bit = b.gather_row(tables.sign_bit, row, out="sign_bit")
    float_code = b.op("Add", code, b.op("Mul", b.op("Cast", negative, to=_INT64), sign_bit), out="float_code")
    code_count = b.op("Mul", sign_bit, b.const(2, np.int64), out="code_count")
    int_code = b.op(
        "Mod",
        b.op("Where", negative, b.op("Sub", code_count, code), code),
        code_count,
        fmod=0,
        out="int_code",
    )
    is_float = b.gather_row(tables.is_float, row, out="is_float")
    return b.op("Where", is_float, float_code, int_code, out="element_code")


def _pack(b: BodyBuilder, codes: str, split: AxisSplit, n_blocks: str, block_size: str, row: str) -> str:
    """Pack int64 codes ``[outer, n, block_size, inner]`` into the uint8 ``codes`` output layout."""
    bits = b.gather_row(b.tables.bits, row, out="bits")
    block_bits = b.op("Mul", block_size, bits, out="block_bits")
    bytes_per_block = b.op(
        "Div", b.op("Add", block_bits, b.const(7, np.int64)), b.const(8, np.int64), out="bytes_per_block"
    )

    # Expand every code to its low `bits` bits, lowest first: the block's bit stream.
    code_bytes = b.op("Unsqueeze", b.op("Cast", codes, to=onnx.TensorProto.UINT8), b.const([3], np.int64))
    bit_index = b.const(np.arange(8, dtype=np.uint8).reshape(8, 1), out="bit_index")
    stream = b.op("BitShift", code_bytes, bit_index, direction="RIGHT")
    stream = b.op("BitwiseAnd", stream, b.const(1, np.uint8), out="bits_all")
    stream = b.op(
        "Slice", stream, b.const([0], np.int64), b.to_1d(bits), b.const([3], np.int64), out="bits_used"
    )
    inner_bits = b.to_1d(block_bits)
    stream = b.reshape(stream, b.shape_of(split.outer, n_blocks, inner_bits, split.inner), out="stream")

    # Pad each block's stream to whole bytes and weigh each bit by its place in the byte.
    pad_bits = b.op("Sub", b.op("Mul", bytes_per_block, b.const(8, np.int64)), block_bits, out="pad_bits")
    pads = b.op(
        "Concat", b.const([0, 0, 0, 0, 0, 0], np.int64), b.to_1d(pad_bits), b.const([0], np.int64), axis=0
    )
    stream = b.op("Pad", stream, pads, out="stream_padded")
    byte_shape = b.shape_of(
        split.outer, n_blocks, b.to_1d(bytes_per_block), b.const([8], np.int64), split.inner
    )
    stream = b.op("Cast", b.reshape(stream, byte_shape, out="stream_bytes"), to=onnx.TensorProto.INT32)
    place = b.const((1 << np.arange(8, dtype=np.int32)).reshape(8, 1), out="bit_place")
    packed = b.op("ReduceSum", b.op("Mul", stream, place), b.const([3], np.int64), keepdims=0, out="packed")
    packed = b.op("Cast", packed, to=onnx.TensorProto.UINT8, out="packed_bytes")
    packed_length = b.op("Mul", n_blocks, bytes_per_block, out="packed_length")
    return b.reshape(packed, b.shape_of(split.before, packed_length, split.after), output="codes")


def quantize_body(b: BodyBuilder) -> None:
    """Append the nodes that turn input ``x`` into outputs ``codes`` and ``scales``."""
    tables = b.tables
    row = format_row(b)
    rule = _scale_rule_row(b)
    known = b.op(
        "And",
        b.gather_row(tables.known, row, out="format_known"),
        b.op("GreaterOrEqual", rule, b.const(0, np.int64)),
        out="attributes_known",
    )
    block_size = b.int_attribute("block_size")
    split = split_at_axis(b, "x")
    blocks, n_blocks = _to_blocks(b, split, block_size)

    # Non-finite values mark their block as special, and the steps below treat them as 0.
    finite = b.op("Not", b.op("Or", b.op("IsNaN", blocks), b.op("IsInf", blocks)), out="finite")
    clean = b.op("Where", finite, blocks, b.const(0.0, np.float32), out="clean")
    magnitude = b.op("Abs", clean, out="magnitude")
    any_special = b.op(
        "ReduceMax", b.op("Cast", b.op("Not", finite), to=_FLOAT), b.const([2], np.int64), keepdims=1
    )
    special = b.op(
        "Or", b.op("Greater", any_special, b.const(0.0, np.float32)), b.op("Not", known), out="special"
    )

    # Shared exponent per block. All-zero blocks take the lowest one, byte 0x00.
    amax = b.op("ReduceMax", magnitude, b.const([2], np.int64), keepdims=1, out="amax")
    zero = b.op("Equal", amax, b.const(0.0, np.float32), out="zero_block")
    amax = b.op("Where", zero, b.const(1.0, np.float32), amax, out="amax_nonzero")
    shared_exp = _shared_exponent(b, amax, row, rule)
    shared_exp = b.op("Min", shared_exp, b.const(_MAX_SHARED_EXP, np.int64))
    shared_exp = b.op("Max", shared_exp, b.const(-_MAX_SHARED_EXP, np.int64))
    shared_exp = b.op("Where", zero, b.const(-_MAX_SHARED_EXP, np.int64), shared_exp, out="shared_exp")
    scale_byte = b.op("Add", shared_exp, b.const(_E8M0_BIAS, np.int64))
    scale_byte = b.op("Where", special, b.const(E8M0_NAN, np.int64), scale_byte, out="scale_byte")

    # Elements. 1 / -0.0 is -inf, which is how the sign bit of a zero shows. The
    # sign is read from the blocks before `Where`, because ONNX Runtime 1.32's
    # float `Where` returns +0.0 where it selects -0.0.
    scaled = b.op("Div", magnitude, _pow2(b, shared_exp, out="scale"), out="scaled")
    negative = b.op(
        "Or",
        b.op("Less", blocks, b.const(0.0, np.float32)),
        b.op("Less", b.op("Reciprocal", blocks), b.const(0.0, np.float32)),
        out="negative",
    )
    codes = _encode_elements(b, scaled, negative, row)
    codes = b.op("Where", special, b.const(0, np.int64), codes, out="codes_checked")

    _pack(b, codes, split, n_blocks, block_size, row)
    scale_shape = b.shape_of(split.before, n_blocks, split.after)
    b.reshape(b.op("Cast", scale_byte, to=onnx.TensorProto.UINT8), scale_shape, output="scales")
