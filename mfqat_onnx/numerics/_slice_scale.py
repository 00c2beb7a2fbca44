"""Slice-and-Scale: convert stored anchor codes to a lower format without fp32 weights.

For an anchor block with shared exponent ``E`` whose largest decoded element has
``p = floor(log2(max |value|))`` (values at scale 1), the target block gets::

    E' = clamp(E + p - emax_target, -127, 127)

and each anchor element ``value`` becomes the target code of
``value / 2^(E' - E)`` rounded with ties to even and saturated. That is exactly
re-quantizing the decoded anchor with the ``floor`` rule, block by block,
because decoding is exact and ``floor(log2)`` commutes with the power-of-two
scale. For a floor-rule anchor away from the clamp ``p == emax_anchor``, so
``E' = E + emax_anchor - emax_target`` (the plain shift; MXINT scales stay put).

Since the target code depends only on the anchor code and the shift
``d = E' - E``, the conversion is a table lookup ``lut[d, code]`` built once per
format pair from the element encoder. All-zero blocks keep byte 0x00; NaN
blocks (byte 0xFF, or a NaN/Inf element code) keep 0xFF with zero codes.
"""

from __future__ import annotations

import functools

import numpy as np

from mfqat_onnx.formats import MXFormat, get_format
from mfqat_onnx.numerics._elements import FormatLike, code_exponent, decode_table, encode_elements, floor_log2
from mfqat_onnx.numerics._quantize import (
    E8M0_BIAS,
    E8M0_NAN,
    MAX_SHARED_EXP,
    MIN_SHARED_EXP,
    check_codes_and_scales,
    dequantize,
    quantize,
)


@functools.cache
def _shift_table(anchor_name: str, target_name: str) -> tuple[int, np.ndarray]:
    """Return ``(d_min, lut)`` with ``lut[d - d_min, code]`` the target code of ``value(code) / 2^d``."""
    anchor, target = get_format(anchor_name), get_format(target_name)
    table = decode_table(anchor).astype(np.float64)
    exponents = code_exponent(anchor)
    finite_exponents = exponents[np.isfinite(table) & (table != 0)]
    # The smallest shift comes from a block whose largest element is the
    # smallest non-zero code; beyond the largest shift every element is below
    # half the target's smallest subnormal and flushes to zero.
    d_min = int(finite_exponents.min()) - target.emax_elem
    d_max = int(finite_exponents.max()) + 2 - int(np.floor(np.log2(target.min_subnormal)))
    shifts = np.arange(d_min, d_max + 1)
    values = np.where(np.isfinite(table), table, 0.0)
    lut = encode_elements(np.ldexp(values[None, :], -shifts[:, None]), target)
    lut.setflags(write=False)
    return d_min, lut


_SPECIAL_EXPONENT = 1000
_ZERO_EXPONENT = -1000


@functools.cache
def _magnitude_rank_tables(anchor_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rank, rank_exponent)`` for the anchor's codes.

    ``rank[code]`` (uint8) orders codes by magnitude, so a block's peak is one
    max over bytes; NaN/Inf codes rank 255. ``rank_exponent[rank]`` (int16) is
    ``floor(log2(|value|))``, -1000 for zero and +1000 for rank 255.
    """
    table = decode_table(anchor_name).astype(np.float64)
    finite = np.isfinite(table)
    magnitudes = np.abs(np.where(finite, table, 0.0))
    distinct = np.unique(magnitudes[finite])
    rank = np.searchsorted(distinct, magnitudes).astype(np.uint8)
    rank[~finite] = 255
    rank_exponent = np.full(256, _SPECIAL_EXPONENT, dtype=np.int16)
    rank_exponent[: distinct.size] = np.maximum(floor_log2(distinct), _ZERO_EXPONENT)
    rank.setflags(write=False)
    rank_exponent.setflags(write=False)
    return rank, rank_exponent


def _check_same_family(anchor: MXFormat, target: MXFormat) -> None:
    if anchor.family != target.family:
        raise ValueError(
            f"slice_and_scale converts within one family, but {anchor.name} is {anchor.family} and "
            f"{target.name} is {target.family}; use convert() to decode and re-quantize across families"
        )


def slice_and_scale(
    codes: np.ndarray,
    scale_e8m0: np.ndarray,
    anchor: FormatLike,
    target: FormatLike,
    *,
    axis: int = -1,
    block_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Convert unpacked anchor codes and scales to a format of the same family.

    Args:
        codes: Unpacked uint8 anchor codes.
        scale_e8m0: Anchor scale bytes, blocked along ``axis``.
        anchor: Format of ``codes``.
        target: Format to convert to (same family).
        axis: Blocked axis.
        block_size: Elements per block.

    Returns:
        ``(codes, scale_e8m0)`` in the target format, same shapes as the inputs.

    Raises:
        ValueError: The formats belong to different families, or the inputs are inconsistent.
    """
    anchor, target = get_format(anchor), get_format(target)
    _check_same_family(anchor, target)
    layout = check_codes_and_scales(codes, scale_e8m0, anchor, axis, block_size)
    blocks = layout.to_blocks(np.asarray(codes))
    scale_rows = layout.scales_to_rows(np.asarray(scale_e8m0)).astype(np.int32)

    # Codes are ranked by magnitude, so one byte gather and max find each
    # block's peak. NaN/Inf codes rank highest and poison their block, as
    # re-quantizing the decoded values would.
    rank, rank_exponent = _magnitude_rank_tables(anchor.name)
    peak = rank_exponent[np.take(rank, blocks).max(axis=-1)].astype(np.int32)
    special = (scale_rows == E8M0_NAN) | (peak >= _SPECIAL_EXPONENT)
    zero = peak <= _ZERO_EXPONENT

    old_exp = scale_rows - E8M0_BIAS
    new_exp = np.clip(old_exp + peak - target.emax_elem, MIN_SHARED_EXP, MAX_SHARED_EXP)
    new_exp = np.where(special | zero, MIN_SHARED_EXP, new_exp)

    # Gather lut[d, code] through a flat index: the shift picks a row of 2^bits codes.
    d_min, lut = _shift_table(anchor.name, target.name)
    shift_index = np.clip(new_exp - old_exp - d_min, 0, lut.shape[0] - 1)
    # Fewer than 256 shift rows of at most 256 codes, so the flat index fits uint16.
    row_offset = (shift_index * anchor.num_codes).astype(np.uint16)
    new_codes = np.take(lut.ravel(), blocks.astype(np.uint16) | row_offset[..., None])
    new_codes[special] = 0

    new_scale = (new_exp + E8M0_BIAS).astype(np.uint8)
    new_scale[special] = E8M0_NAN
    return layout.from_blocks(new_codes), layout.scales_from_rows(new_scale)


def requantize(
    codes: np.ndarray,
    scale_e8m0: np.ndarray,
    source: FormatLike,
    target: FormatLike,
    *,
    axis: int = -1,
    block_size: int = 32,
    scale_rule: str = "floor",
) -> tuple[np.ndarray, np.ndarray]:
    """Decode codes to float32 and quantize the result again in ``target`` (any family)."""
    values = dequantize(codes, scale_e8m0, source, axis=axis, block_size=block_size)
    return quantize(values, target, axis=axis, block_size=block_size, scale_rule=scale_rule)


def convert(
    codes: np.ndarray,
    scale_e8m0: np.ndarray,
    source: FormatLike,
    target: FormatLike,
    *,
    axis: int = -1,
    block_size: int = 32,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Convert codes to ``target``: Slice-and-Scale within a family, re-quantization across.

    Returns:
        ``(codes, scale_e8m0, method)`` with ``method`` either ``"slice_and_scale"`` or ``"requantize"``.
    """
    source, target = get_format(source), get_format(target)
    if source.family == target.family:
        new_codes, new_scale = slice_and_scale(codes, scale_e8m0, source, target, axis=axis, block_size=block_size)
        return new_codes, new_scale, "slice_and_scale"
    new_codes, new_scale = requantize(codes, scale_e8m0, source, target, axis=axis, block_size=block_size)
    return new_codes, new_scale, "requantize"
