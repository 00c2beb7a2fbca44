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
def _rank_tables(anchor_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rank, rank_exponent)`` for the anchor's codes.

    ``rank[code]`` (uint8) orders codes by magnitude and ranks NaN/Inf codes
    highest. ``rank_exponent[rank]`` (int16) is ``floor(log2(|value|))``, with
    -1000 for zero and +1000 for NaN/Inf. For float codes the rank is the code
    without its sign bit, and for integers it is ``|k|``.
    """
    fmt = get_format(anchor_name)
    table = decode_table(fmt).astype(np.float64)
    codes = np.arange(fmt.num_codes)
    if fmt.is_float:
        rank = codes & ((1 << (fmt.bits - 1)) - 1)
    else:
        rank = np.where(codes >= fmt.num_codes // 2, fmt.num_codes - codes, codes)
    rank_exponent = np.full(256, _SPECIAL_EXPONENT, dtype=np.int16)
    finite = np.isfinite(table)
    exponents = np.maximum(floor_log2(np.abs(np.where(finite, table, 0.0))), _ZERO_EXPONENT)
    rank_exponent[rank[finite]] = exponents[finite]
    rank = rank.astype(np.uint8)
    rank.setflags(write=False)
    rank_exponent.setflags(write=False)
    return rank, rank_exponent


# Elements per chunk in the loops below. A chunk's temporaries (numpy widens
# gather indices to 8 bytes) then stay in the CPU cache.
_CHUNK_ELEMENTS = 1 << 18


def _block_max(a: np.ndarray) -> np.ndarray:
    """Return the max over the last axis.

    Each chunk of blocks is transposed so that the max runs along long
    contiguous rows, which numpy vectorises. Numpy's own reduction along a
    short inner axis has a fixed cost per block. On 100M uint8 codes in
    blocks of 32 this took 35 ms, against 120 ms for pairwise maxima of halves.
    """
    block_size = a.shape[-1]
    flat = a.reshape(-1, block_size)
    out = np.empty(flat.shape[0], dtype=a.dtype)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, flat.shape[0], step):
        chunk = np.ascontiguousarray(flat[start : start + step].T)
        np.max(chunk, axis=0, out=out[start : start + step])
    return out.reshape(a.shape[:-1])


def _fold_or_bytes(a: np.ndarray) -> np.ndarray | None:
    """Return the bitwise OR of the uint8 values over the last axis, eight bytes per step.

    OR works on whole 64-bit words, where a maximum has to go byte by byte.
    On 16M int8 codes in blocks of 32 the block peak took 4 ms this way and
    21 ms with a maximum. Returns None when the axis is not a whole number of
    words or ``a`` is not contiguous.
    """
    n = a.shape[-1]
    if n % 8 or not a.flags.c_contiguous:
        return None
    words = a.reshape(-1, n).view(np.uint64)
    acc = words[:, 0].copy()
    for column in range(1, words.shape[1]):
        acc |= words[:, column]
    for shift in (32, 16, 8):
        acc |= acc >> np.uint64(shift)
    return (acc & np.uint64(0xFF)).astype(np.uint8).reshape(a.shape[:-1])


@functools.cache
def _top_bit_exponent(anchor_name: str) -> np.ndarray:
    """Return a 256-entry int16 table: the exponent of the rank that is the highest set bit of the index.

    An integer format's rank is ``|k|`` and its exponent is ``floor(log2 |k|)``
    less a constant, so the OR of a block's ranks has the same exponent as
    their maximum.
    """
    rank_exponent = _rank_tables(anchor_name)[1]
    top_bit = [1 << (v.bit_length() - 1) if v else 0 for v in range(256)]
    table = rank_exponent[top_bit]
    table.setflags(write=False)
    return table


def _peak_exponent(blocks: np.ndarray, fmt: MXFormat) -> np.ndarray:
    """Return ``floor(log2(max |value|))`` of each block, -1000 for zero, +1000 for NaN/Inf."""
    rank, rank_exponent = _rank_tables(fmt.name)
    if fmt.is_float:
        # Sign-magnitude codes: clearing the sign bit leaves the rank itself.
        return rank_exponent[_block_max(blocks & np.uint8((1 << (fmt.bits - 1)) - 1))]
    if fmt.bits == 8:
        # abs() of int8 -128 wraps to -128, whose uint8 view is the right magnitude 128.
        ranks = np.abs(blocks.view(np.int8)).view(np.uint8)
    else:
        ranks = np.take(rank, blocks)
    top_bits = _fold_or_bytes(ranks)
    if top_bits is None:
        return rank_exponent[_block_max(ranks)]
    return _top_bit_exponent(fmt.name)[top_bits]


@functools.cache
def _pair_table(anchor_name: str, target_name: str, row: int) -> np.ndarray:
    """Return a 65536-entry uint16 table that maps two anchor codes at once through ``lut[row]``."""
    lut_row = _shift_table(anchor_name, target_name)[1][row]
    full = np.zeros(256, np.uint16)
    full[: lut_row.size] = lut_row
    pairs = np.arange(65536)
    # The two bytes of each entry map independently, so the table reads the
    # same whatever the machine's byte order.
    table = (full[pairs >> 8] << np.uint16(8)) | full[pairs & 0xFF]
    table.setflags(write=False)
    return table


def _gather_bytes(pair_table: np.ndarray, byte_table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Map every code through one table, two bytes per lookup when the size allows it.

    Halving the number of lookups matters because numpy widens each index to
    intp before gathering.
    """
    if codes.size % 2:
        return np.take(byte_table, codes)
    flat = np.ascontiguousarray(codes).reshape(-1).view(np.uint16)
    out = np.empty_like(flat)
    # In chunks: about 2x faster than one take over 50M pairs.
    for start in range(0, flat.size, _CHUNK_ELEMENTS):
        stop = start + _CHUNK_ELEMENTS
        np.take(pair_table, flat[start:stop], out=out[start:stop])
    return out.view(np.uint8).reshape(codes.shape)


def _gather_rows(lut: np.ndarray, blocks: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Return ``lut[rows[block], code]`` for every code of ``blocks`` (``[..., block_size]``)."""
    # There are fewer than 256 shift rows of at most 256 codes, so a flat
    # index fits uint16.
    flat_lut = lut.ravel()
    block_size = blocks.shape[-1]
    flat_blocks = blocks.reshape(-1, block_size)
    offsets = (rows.reshape(-1) * lut.shape[1]).astype(np.uint16)
    out = np.empty(flat_blocks.shape, dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, flat_blocks.shape[0], step):
        stop = start + step
        index = flat_blocks[start:stop].astype(np.uint16)
        index |= offsets[start:stop, None]
        np.take(flat_lut, index, out=out[start:stop])
    return out.reshape(blocks.shape)


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

    # The peak's exponent comes from its magnitude rank. NaN/Inf codes rank
    # highest and poison their block, as re-quantizing the decoded values would.
    peak = _peak_exponent(blocks, anchor).astype(np.int32)
    special = (scale_rows == E8M0_NAN) | (peak >= _SPECIAL_EXPONENT)
    zero = peak <= _ZERO_EXPONENT

    old_exp = scale_rows - E8M0_BIAS
    new_exp = np.clip(old_exp + peak - target.emax_elem, MIN_SHARED_EXP, MAX_SHARED_EXP)
    new_exp = np.where(special | zero, MIN_SHARED_EXP, new_exp)

    d_min, lut = _shift_table(anchor.name, target.name)
    shift_index = np.clip(new_exp - old_exp - d_min, 0, lut.shape[0] - 1)
    regular = ~(special | zero)
    shifts_used = shift_index[regular]
    if shifts_used.size == 0 or shifts_used.min() == shifts_used.max():
        # Floor-rule anchors away from the clamp all share one shift. Zero and
        # NaN blocks do not care which row they use, so one row serves all.
        row = int(shifts_used[0]) if shifts_used.size else 0
        new_codes = _gather_bytes(_pair_table(anchor.name, target.name, row), lut[row], blocks)
    else:
        new_codes = _gather_rows(lut, blocks, shift_index)
    if special.any():
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
