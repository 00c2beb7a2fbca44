"""Standard-op body of ``MXDequantize(codes, scales) -> y``.

With ``D = axis_length``, ``n = ceil(D / block_size)`` blocks per row and
``P = ceil(block_size * bits / 8)`` bytes per block, the body views the
packed codes as ``[outer, n, P, inner]``, where ``outer`` and ``inner`` are the
products of the dims before and after ``axis``. Element ``i`` of a block
starts at bit ``i * bits`` of the block's little-endian bit stream, so it lies
inside the two bytes ``k = i * bits // 8`` and ``k + 1``. The body gathers
both (one zero byte of padding covers ``k + 1 == P``), joins them into a
16-bit word, shifts right by ``i * bits % 8`` and masks. That keeps the
intermediates at the size of the decoded tensor for every width from 2 to 8
bits.

Decoding is ``table[code] * 2^(byte - 127)``, one float32 product, with both
factors gathered from exact constant tables (byte 0xFF gives NaN). The padded
tail of a partial last block is sliced off at the end. When every format the
body serves has 8-bit codes, each byte is a code and the unpacking is left out.
"""

from __future__ import annotations

import numpy as np
import onnx

from mfqat_onnx.onnx_ops._builder import AxisSplit, BodyBuilder, format_row, split_at_axis
from mfqat_onnx.onnx_ops._tables import E8M0_STEP, e8m0_factors


def _unpack_codes(
    b: BodyBuilder, codes: str, split: AxisSplit, n_blocks: str, bits: str, block_size: str, row: str
) -> str:
    """Return int64 codes ``[outer, n_blocks, block_size, inner]`` from the packed bytes."""
    bytes_per_block = b.op(
        "Div",
        b.op("Add", b.op("Mul", block_size, bits, out="block_bits"), b.const(7, np.int64)),
        b.const(8, np.int64),
        out="bytes_per_block",
    )
    blocked_shape = b.shape_of(split.outer, b.to_1d(n_blocks), b.to_1d(bytes_per_block), split.inner)
    packed = b.reshape(codes, blocked_shape, out="packed_blocks")
    padded = b.op("Pad", packed, b.const([0, 0, 0, 0, 0, 0, 1, 0], np.int64), out="packed_padded")

    # Where each element's bits start: byte index and bit offset inside it.
    start_bit = b.op(
        "Mul", b.op("Range", b.const(0, np.int64), block_size, b.const(1, np.int64), out="element"), bits
    )
    low_index = b.op("Div", start_bit, b.const(8, np.int64), out="low_byte_index")
    high_index = b.op("Add", low_index, b.const(1, np.int64), out="high_byte_index")
    bit_offset = b.op("Mod", start_bit, b.const(8, np.int64), out="bit_offset")
    shift = b.op(
        "Cast", b.op("Unsqueeze", bit_offset, b.const([1], np.int64)), to=onnx.TensorProto.UINT16, out="shift"
    )

    # Join the two bytes into a 16-bit word, low byte first, and cut the code out.
    low = b.op("Cast", b.op("Gather", padded, low_index, axis=2), to=onnx.TensorProto.UINT16, out="low")
    high = b.op("Cast", b.op("Gather", padded, high_index, axis=2), to=onnx.TensorProto.UINT16, out="high")
    high = b.op("BitShift", high, b.const(8, np.uint16), direction="LEFT", out="high_shifted")
    word = b.op("BitwiseOr", low, high, out="word")
    word = b.op("BitShift", word, shift, direction="RIGHT", out="word_shifted")
    return _mask_code(b, word, row)


def _byte_codes(b: BodyBuilder, codes: str, split: AxisSplit, n_blocks: str, block_size: str, row: str) -> str:
    """Return int64 codes ``[outer, n_blocks, block_size, inner]`` when every format has 8-bit codes."""
    blocked_shape = b.shape_of(split.outer, b.to_1d(n_blocks), b.to_1d(block_size), split.inner)
    word = b.op("Cast", b.reshape(codes, blocked_shape, out="code_blocks"), to=onnx.TensorProto.UINT16, out="word")
    return _mask_code(b, word, row)


def _mask_code(b: BodyBuilder, word: str, row: str) -> str:
    """Keep the code bits of uint16 ``word``; the unknown row's mask 0 sends every code to its NaN."""
    mask = b.gather_row(b.tables.code_mask, row, out="code_mask")
    code = b.op("BitwiseAnd", word, mask, out="code_u16")
    return b.op("Cast", code, to=onnx.TensorProto.INT64, out="code")


def _decode_scales(b: BodyBuilder, scale_bytes: str) -> str:
    """Return the float32 value of int32 E8M0 bytes (see :func:`e8m0_factors`)."""
    high, low = e8m0_factors()
    step = b.const(E8M0_STEP, np.int32)
    high_index = b.op("Div", scale_bytes, step, out="scale_high_index")
    low_index = b.op("Mod", scale_bytes, step, out="scale_low_index")
    high_value = b.op("Gather", b.const(high, out="scale_high_values"), high_index, axis=0, out="scale_high")
    low_value = b.op("Gather", b.const(low, out="scale_low_values"), low_index, axis=0, out="scale_low")
    return b.op("Mul", high_value, low_value, out="scale")


def dequantize_body(b: BodyBuilder) -> None:
    """Append the nodes that turn inputs ``codes``, ``scales`` into output ``y``."""
    tables = b.tables
    row = format_row(b)
    block_size = b.int_attribute("block_size")
    axis_length = b.int_attribute("axis_length")
    n_blocks = b.op(
        "Div",
        b.op("Add", axis_length, b.op("Sub", block_size, b.const(1, np.int64))),
        block_size,
        out="n_blocks",
    )
    split = split_at_axis(b, "codes")

    # A set of 8-bit formats stores one code per byte, so its body skips the bit unpacking.
    if np.all(tables.bits == 8):
        code = _byte_codes(b, "codes", split, n_blocks, block_size, row)
    else:
        bits = b.gather_row(tables.bits, row, out="bits")
        code = _unpack_codes(b, "codes", split, n_blocks, bits, block_size, row)

    # Element values at scale 1, times the block scale, in one float32 product.
    decode_row = b.op(
        "Slice",
        b.const(tables.decode, out="decode_values"),
        b.to_1d(b.gather_row(tables.decode_start, row, out="decode_start")),
        b.to_1d(b.gather_row(tables.decode_end, row, out="decode_end")),
        out="decode_row",
    )
    values = b.op("Gather", decode_row, code, axis=0, out="values")
    scale_shape = b.shape_of(split.outer, b.to_1d(n_blocks), b.const([1], np.int64), split.inner)
    scale_bytes = b.op(
        "Cast", b.reshape("scales", scale_shape, out="scale_blocks"), to=onnx.TensorProto.INT32
    )
    scale = _decode_scales(b, scale_bytes)
    decoded = b.op("Mul", values, scale, out="decoded")

    # Drop the padding of a partial last block and restore the logical shape.
    padded_length = b.to_1d(b.op("Mul", n_blocks, block_size, out="padded_length"))
    rows = b.reshape(decoded, b.shape_of(split.outer, padded_length, split.inner), out="rows")
    length_1d = b.to_1d(axis_length)
    rows = b.op("Slice", rows, b.const([0], np.int64), length_1d, b.const([1], np.int64), out="rows_trimmed")
    b.reshape(rows, b.shape_of(split.before, length_1d, split.after), output="y")
