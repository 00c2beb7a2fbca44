"""Block quantization to MX codes with E8M0 scales, and dequantization.

For a block with largest magnitude ``amax`` (OCP MX v1.0 section 6.3):

- ``floor`` (default): ``E = floor(log2(amax)) - emax_elem``;
- ``rceil``: the smallest ``E`` with ``amax / 2^E <= max_normal``;
- ``even``: ``floor(log2(amax'))`` - emax_elem, where ``amax'`` is ``amax``
  rounded to the element's mantissa width with ties to even.

``E`` is clamped to [-127, 127] and stored as the byte ``E + 127``. A block
holding NaN or ±Inf gets byte 0xFF and zero codes; an all-zero block gets 0x00.
Elements are ``x / 2^E`` rounded by :func:`encode_elements`. Decoding is one
float32 product ``table[code] * 2^E``, exact for every byte below 0xFF.
"""

from __future__ import annotations

import numpy as np

from mfqat_onnx.formats import MXFormat, get_format
from mfqat_onnx.numerics._blocks import BlockLayout, make_layout
from mfqat_onnx.numerics._elements import FormatLike, decode_table, encode_elements, floor_log2

SCALE_RULES = ("floor", "rceil", "even")
E8M0_BIAS = 127
E8M0_NAN = 0xFF
MIN_SHARED_EXP = -127
MAX_SHARED_EXP = 127


def _e8m0_table() -> np.ndarray:
    # Built from bit patterns: byte 0 is the float32 subnormal 2^-127 (0x00400000),
    # bytes 1..254 put the byte straight into the float32 exponent field.
    bytes_ = np.arange(256, dtype=np.uint32)
    bits = np.where(bytes_ == 0, np.uint32(0x00400000), bytes_ << np.uint32(23))
    table = bits.view(np.float32).copy()
    table[E8M0_NAN] = np.nan
    table.setflags(write=False)
    return table


_E8M0_VALUES = _e8m0_table()


def e8m0_to_float(scale_e8m0: np.ndarray) -> np.ndarray:
    """Return ``2**(byte - 127)`` as float32 for each E8M0 byte, NaN for 0xFF."""
    scale_e8m0 = np.asarray(scale_e8m0)
    if scale_e8m0.dtype != np.uint8:
        raise TypeError(f"E8M0 scales must be uint8 bytes, got dtype {scale_e8m0.dtype}")
    return _E8M0_VALUES[scale_e8m0]


def e8m0_round_up(x: np.ndarray) -> np.ndarray:
    """Return the smallest power of two at or above each positive ``x``, as float32.

    This is the "round up" float -> E8M0 conversion that CUDA-style RCEIL
    scales use; the mantissa test covers all 23 fraction bits.
    """
    x = np.asarray(x, dtype=np.float32)
    if np.any(~(x > 0)) or not np.all(np.isfinite(x)):
        raise ValueError("e8m0_round_up expects positive finite values")
    mantissa, exponent = np.frexp(x.astype(np.float64))
    exact_power = mantissa == 0.5
    return np.ldexp(np.float32(1.0), np.where(exact_power, exponent - 1, exponent)).astype(np.float32)


def _as_float32(x: np.ndarray) -> np.ndarray:
    """Widen float16/bfloat16/float32 input to float32; reject other dtypes."""
    x = np.asarray(x)
    kind = x.dtype.kind
    if kind == "f" and x.dtype.itemsize <= 4:
        return x.astype(np.float32, copy=False)
    if x.dtype.name == "bfloat16":
        return x.astype(np.float32)
    raise TypeError(
        f"MX quantization takes float32, float16 or bfloat16 input, got dtype {x.dtype}; "
        "cast the array to float32 first"
    )


def _check_scale_rule(scale_rule: str) -> None:
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown scale rule {scale_rule!r}; valid rules are: {', '.join(SCALE_RULES)}")


def shared_exponent(amax: np.ndarray, fmt: FormatLike, scale_rule: str = "floor") -> np.ndarray:
    """Return the unclamped shared exponent of blocks with positive finite ``amax``.

    Entries where ``amax`` is 0 or not finite are meaningless; callers replace them.
    """
    fmt = get_format(fmt)
    _check_scale_rule(scale_rule)
    amax = np.asarray(amax, dtype=np.float64)
    safe = np.where(np.isfinite(amax) & (amax > 0), amax, 1.0)
    if scale_rule == "floor":
        return floor_log2(safe) - fmt.emax_elem
    if scale_rule == "rceil":
        # amax / max_normal is computed in float64; a float32 amax that is not
        # exactly max_normal * 2^k lies at least 2^-28 (relative) away from it,
        # far more than float64 rounding, so the ceiling is exact.
        mantissa, exponent = np.frexp(safe / fmt.max_normal)
        return np.where(mantissa == 0.5, exponent - 1, exponent).astype(np.int32)
    step = np.ldexp(1.0, floor_log2(safe) - fmt.mbits)
    rounded = np.rint(safe / step) * step
    return floor_log2(rounded) - fmt.emax_elem


def _quantize_blocks(
    blocks: np.ndarray, fmt: MXFormat, scale_rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float32 blocks ``[rows, n_blocks, block_size]``; return (codes, scale bytes)."""
    amax = np.max(np.abs(blocks), axis=-1)
    special = ~np.isfinite(amax)
    zero = amax == 0

    shared_exp = np.clip(shared_exponent(amax, fmt, scale_rule), MIN_SHARED_EXP, MAX_SHARED_EXP)
    shared_exp = np.where(special | zero, MIN_SHARED_EXP, shared_exp)
    scaled = np.ldexp(blocks.astype(np.float64), -shared_exp[..., None])
    codes = encode_elements(scaled, fmt)
    codes[special] = 0

    scale_e8m0 = (shared_exp + E8M0_BIAS).astype(np.uint8)
    scale_e8m0[special] = E8M0_NAN
    return codes, scale_e8m0


def quantize(
    x: np.ndarray,
    fmt: FormatLike,
    *,
    axis: int = -1,
    block_size: int = 32,
    scale_rule: str = "floor",
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``x`` to MX element codes and E8M0 scale bytes.

    Args:
        x: float32, float16 or bfloat16 array.
        fmt: Element format name or :class:`MXFormat`.
        axis: Axis along which blocks run.
        block_size: Elements per block; the last block of a row may be partial.
        scale_rule: ``floor`` (OCP default), ``rceil`` or ``even``.

    Returns:
        ``(codes, scale_e8m0)``: unpacked uint8 codes of ``x``'s shape, and uint8
        scale bytes of ``x``'s shape with ``ceil(D / block_size)`` on ``axis``.

    Raises:
        TypeError: ``x`` is not a supported float dtype.
        ValueError: Unknown format or scale rule, bad ``axis`` or ``block_size``.
    """
    fmt = get_format(fmt)
    _check_scale_rule(scale_rule)
    x32 = _as_float32(x)
    layout = make_layout(x32.shape, axis, block_size)
    codes, scale_rows = _quantize_blocks(layout.to_blocks(x32), fmt, scale_rule)
    return layout.from_blocks(codes), layout.scales_from_rows(scale_rows)


def check_codes_and_scales(
    codes: np.ndarray, scale_e8m0: np.ndarray, fmt: MXFormat, axis: int, block_size: int
) -> BlockLayout:
    """Validate unpacked codes and their scales against each other; return the layout."""
    codes = np.asarray(codes)
    scale_e8m0 = np.asarray(scale_e8m0)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8 (unpacked, one code per element), got dtype {codes.dtype}")
    if scale_e8m0.dtype != np.uint8:
        raise TypeError(f"scale_e8m0 must be uint8 bytes, got dtype {scale_e8m0.dtype}")
    layout = make_layout(codes.shape, axis, block_size)
    if scale_e8m0.shape != layout.scale_shape:
        raise ValueError(
            f"scale_e8m0 has shape {scale_e8m0.shape}, but codes of shape {codes.shape} blocked along "
            f"axis {layout.axis} by {block_size} need scales of shape {layout.scale_shape}"
        )
    if fmt.num_codes < 256 and codes.size and int(codes.max()) >= fmt.num_codes:
        raise ValueError(
            f"code {int(codes.max())} does not fit {fmt.name} ({fmt.bits}-bit codes are below {fmt.num_codes}); "
            "were the codes packed, or produced for another format?"
        )
    return layout


def dequantize_blocks(codes: np.ndarray, scale_e8m0: np.ndarray, fmt: MXFormat) -> np.ndarray:
    """Decode blocked codes ``[rows, n_blocks, block_size]`` with scale bytes ``[rows, n_blocks]``."""
    values = decode_table(fmt)[codes] * e8m0_to_float(scale_e8m0)[..., None]
    values[scale_e8m0 == E8M0_NAN] = np.nan
    return values


def dequantize(
    codes: np.ndarray,
    scale_e8m0: np.ndarray,
    fmt: FormatLike,
    *,
    axis: int = -1,
    block_size: int = 32,
) -> np.ndarray:
    """Decode unpacked MX codes and E8M0 scale bytes to float32.

    Raises:
        TypeError: ``codes`` or ``scale_e8m0`` is not uint8.
        ValueError: The scale shape does not match the codes, or a code does not fit the format.
    """
    fmt = get_format(fmt)
    layout = check_codes_and_scales(codes, scale_e8m0, fmt, axis, block_size)
    values = dequantize_blocks(layout.to_blocks(np.asarray(codes)), layout.scales_to_rows(scale_e8m0), fmt)
    return layout.from_blocks(values)


def quantize_dequantize(
    x: np.ndarray,
    fmt: FormatLike,
    *,
    axis: int = -1,
    block_size: int = 32,
    scale_rule: str = "floor",
) -> np.ndarray:
    """Round-trip ``x`` through an MX format (fake quantization); the result keeps ``x``'s dtype."""
    x = np.asarray(x)
    codes, scale_e8m0 = quantize(x, fmt, axis=axis, block_size=block_size, scale_rule=scale_rule)
    values = dequantize(codes, scale_e8m0, fmt, axis=axis, block_size=block_size)
    return values.astype(x.dtype)
