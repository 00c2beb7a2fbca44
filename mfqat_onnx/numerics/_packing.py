"""Packing of b-bit element codes into bytes, block by block.

Each block's codes form a little-endian bit stream: element ``i`` occupies bits
``i*b .. i*b+b-1``, bit 0 being the lowest bit of the block's first byte, and
the stream is padded to ``ceil(block_size * b / 8)`` bytes. A partial last block
is padded with zero codes first. The packed array keeps the tensor's layout,
with the blocked axis replaced by ``n_blocks * bytes_per_block`` bytes.
"""

from __future__ import annotations

import math

import numpy as np

from mfqat_onnx.formats import get_format
from mfqat_onnx.numerics._blocks import BlockLayout, make_layout
from mfqat_onnx.numerics._elements import FormatLike


def bytes_per_block(fmt: FormatLike, block_size: int) -> int:
    """Return the bytes one packed block of ``block_size`` codes takes."""
    return math.ceil(block_size * get_format(fmt).bits / 8)


def _packed_layout(layout: BlockLayout, n_bytes: int) -> BlockLayout:
    """Layout of the packed array: the blocked axis holds ``n_blocks * n_bytes`` bytes."""
    shape = list(layout.shape)
    shape[layout.axis] = layout.n_blocks * n_bytes
    return BlockLayout(tuple(shape), layout.axis, n_bytes)


def _pack_rows(blocks: np.ndarray, bits: int, n_bytes: int) -> np.ndarray:
    """Pack ``[rows, n_blocks, block_size]`` codes into ``[rows, n_blocks, n_bytes]``."""
    rows, n_blocks, block_size = blocks.shape
    if bits == 8:
        return blocks
    if 8 % bits == 0 and block_size % (8 // bits) == 0:
        # 2- and 4-bit codes: the codes of one output byte, read as one
        # little-endian word, hold code k at bit 8k. Shifting the word right by
        # k * (8 - bits) moves code k to bit k * bits, and the low byte of the OR
        # is the packed byte. Whole words beat strided per-slot ORs by about 3x.
        per_byte = 8 // bits
        word_type = np.dtype(f"<u{per_byte}")
        words = np.ascontiguousarray(blocks, dtype=np.uint8).view(word_type)
        packed_words = words.copy()
        for slot in range(1, per_byte):
            packed_words |= words >> word_type.type(slot * (8 - bits))
        return packed_words.astype(np.uint8)
    if block_size % 8 == 0:
        # Eight b-bit codes fill exactly b bytes, so build one little-endian
        # 64-bit word per eight codes and keep its low b bytes.
        groups = blocks.reshape(rows, n_blocks, block_size // 8, 8).astype(np.uint64)
        words = np.zeros(groups.shape[:-1], dtype="<u8")
        for slot in range(8):
            words |= groups[..., slot] << np.uint64(slot * bits)
        packed_groups = words[..., None].view(np.uint8)[..., :bits]
        return packed_groups.reshape(rows, n_blocks, n_bytes)
    # Other block sizes: expand to a bit stream and let packbits regroup it.
    bit_index = np.arange(bits, dtype=np.uint8)
    stream = ((blocks[..., None] >> bit_index) & 1).astype(np.uint8)
    stream = stream.reshape(rows, n_blocks, block_size * bits)
    pad = n_bytes * 8 - block_size * bits
    if pad:
        stream = np.concatenate([stream, np.zeros((rows, n_blocks, pad), np.uint8)], axis=-1)
    return np.packbits(stream, axis=-1, bitorder="little")


def _unpack_rows(packed: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Invert :func:`_pack_rows`: ``[rows, n_blocks, n_bytes]`` to ``[rows, n_blocks, block_size]``."""
    rows, n_blocks, n_bytes = packed.shape
    if bits == 8:
        return packed
    if 8 % bits == 0 and block_size % (8 // bits) == 0:
        per_byte = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        slots = [(packed >> np.uint8(slot * bits)) & mask for slot in range(per_byte)]
        return np.stack(slots, axis=-1).reshape(rows, n_blocks, block_size)
    if block_size % 8 == 0:
        groups = packed.reshape(rows, n_blocks, block_size // 8, bits)
        padded = np.zeros((*groups.shape[:-1], 8), dtype=np.uint8)
        padded[..., :bits] = groups
        words = padded.view("<u8")[..., 0]
        mask = np.uint64((1 << bits) - 1)
        slots = [(words >> np.uint64(slot * bits)) & mask for slot in range(8)]
        return np.stack(slots, axis=-1).astype(np.uint8).reshape(rows, n_blocks, block_size)
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : block_size * bits]
    stream = stream.reshape(rows, n_blocks, block_size, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.astype(np.uint16) * weights).sum(axis=-1).astype(np.uint8)


def pack_codes(codes: np.ndarray, fmt: FormatLike, *, axis: int = -1, block_size: int = 32) -> np.ndarray:
    """Pack unpacked element codes into per-block little-endian bit streams.

    Returns:
        uint8 array of ``codes``' shape with ``n_blocks * bytes_per_block`` on ``axis``.

    Raises:
        TypeError: ``codes`` is not uint8.
        ValueError: A code does not fit the format, or ``axis``/``block_size`` is invalid.
    """
    fmt = get_format(fmt)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8 (one code per element), got dtype {codes.dtype}")
    if codes.size and int(codes.max()) >= fmt.num_codes:
        raise ValueError(f"code {int(codes.max())} does not fit {fmt.name} ({fmt.bits}-bit codes)")
    layout = make_layout(codes.shape, axis, block_size)
    n_bytes = bytes_per_block(fmt, block_size)
    packed = _pack_rows(layout.to_blocks(codes), fmt.bits, n_bytes)
    return _packed_layout(layout, n_bytes).from_blocks(packed)


def packed_shape(shape: tuple[int, ...], fmt: FormatLike, *, axis: int = -1, block_size: int = 32) -> tuple[int, ...]:
    """Return the shape :func:`pack_codes` gives for codes of ``shape``."""
    layout = make_layout(tuple(shape), axis, block_size)
    return _packed_layout(layout, bytes_per_block(fmt, block_size)).shape


def unpack_codes(
    packed: np.ndarray,
    fmt: FormatLike,
    *,
    axis: int = -1,
    block_size: int = 32,
    axis_length: int,
) -> np.ndarray:
    """Unpack per-block bit streams into one uint8 code per element.

    Args:
        packed: uint8 array from :func:`pack_codes`.
        fmt: Element format of the codes.
        axis: Blocked axis.
        block_size: Elements per block.
        axis_length: Logical length ``D`` of the blocked axis.

    Raises:
        TypeError: ``packed`` is not uint8.
        ValueError: The packed length along ``axis`` does not match ``axis_length``.
    """
    fmt = get_format(fmt)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed codes must be uint8, got dtype {packed.dtype}")
    if isinstance(axis_length, bool) or not isinstance(axis_length, (int, np.integer)) or axis_length <= 0:
        raise ValueError(f"axis_length must be a positive integer, got {axis_length!r}")
    probe = make_layout(packed.shape, axis, block_size)
    shape = list(packed.shape)
    shape[probe.axis] = int(axis_length)
    layout = make_layout(tuple(shape), probe.axis, block_size)
    n_bytes = bytes_per_block(fmt, block_size)
    expected = layout.n_blocks * n_bytes
    if packed.shape[layout.axis] != expected:
        raise ValueError(
            f"packed {fmt.name} codes have {packed.shape[layout.axis]} bytes along axis {layout.axis}, but "
            f"{axis_length} elements in blocks of {block_size} need {expected} "
            f"({layout.n_blocks} blocks x {n_bytes} bytes); check axis_length, block_size and format"
        )
    packed_rows = _packed_layout(layout, n_bytes).to_blocks(packed)
    return layout.from_blocks(_unpack_rows(packed_rows, fmt.bits, block_size))
