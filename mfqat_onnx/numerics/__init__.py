"""Numpy reference for MX numerics: the oracle every other implementation is tested against.

See ``docs/format.md`` for the conventions: scale rules, rounding, NaN and
all-zero blocks, packing and Slice-and-Scale.
"""

from mfqat_onnx.numerics._elements import decode_table, encodable_codes, encode_elements, floor_log2
from mfqat_onnx.numerics._packing import bytes_per_block, pack_codes, packed_shape, unpack_codes
from mfqat_onnx.numerics._quantize import (
    SCALE_RULES,
    dequantize,
    e8m0_round_up,
    e8m0_to_float,
    quantize,
    quantize_dequantize,
    shared_exponent,
)
from mfqat_onnx.numerics._slice_scale import convert, requantize, slice_and_scale

__all__ = [
    "SCALE_RULES",
    "bytes_per_block",
    "convert",
    "decode_table",
    "dequantize",
    "e8m0_round_up",
    "e8m0_to_float",
    "encodable_codes",
    "encode_elements",
    "floor_log2",
    "pack_codes",
    "packed_shape",
    "quantize",
    "quantize_dequantize",
    "requantize",
    "shared_exponent",
    "slice_and_scale",
    "unpack_codes",
]
