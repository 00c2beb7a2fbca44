"""Element codes of one MX format at scale 1: decode tables and the RNE encoder.

A float element with ``ebits`` exponent bits, ``mbits`` mantissa bits and bias
``b`` decodes as ``(-1)^s * 2^(1-b) * m / 2^mbits`` when its exponent field is 0
(subnormal) and ``(-1)^s * 2^(e-b) * (1 + m / 2^mbits)`` otherwise. For a
magnitude ``a`` on the element grid, with ``ee = max(floor(log2(a)), 1 - b)``,
both cases collapse to one code formula::

    code_magnitude = (ee + b - 1) * 2^mbits + a / 2^(ee - mbits)

which the encoder uses after rounding ``a / 2^(ee - mbits)`` to an integer with
ties to even (OCP MX v1.0 section 6.3 requires roundTiesToEven to be available).
An integer element ``k`` decodes as ``k * 2^-mbits`` with ``mbits = bits - 2``.
"""

from __future__ import annotations

import functools

import numpy as np

from mfqat_onnx.formats import MXFormat, get_format

FormatLike = str | MXFormat


def floor_log2(a: np.ndarray) -> np.ndarray:
    """Return ``floor(log2(a))`` for positive finite floats, read from the exponent bits.

    ``np.frexp`` splits the stored exponent exactly (subnormals included), so the
    result never suffers the rounding of a float ``log2`` near powers of two.
    Zeros map to a large negative sentinel.
    """
    _, exponent = np.frexp(a)
    return np.where(a > 0, exponent.astype(np.int32) - 1, np.int32(-100_000))


@functools.cache
def _decode_table_cached(name: str) -> np.ndarray:
    table = np.array(get_format(name).code_values(), dtype=np.float32)
    table.setflags(write=False)
    return table


def decode_table(fmt: FormatLike) -> np.ndarray:
    """Return the float32 value of every element code at scale 1 (read-only, length ``2**bits``).

    NaN codes decode to NaN and the E5M2 infinity codes to ±Inf. Negative
    zero codes decode to -0.0.
    """
    return _decode_table_cached(get_format(fmt).name)


def encodable_codes(fmt: FormatLike) -> np.ndarray:
    """Return the codes the encoder can produce: all but NaN/Inf codes and the unused integer minimum."""
    fmt = get_format(fmt)
    table = decode_table(fmt)
    keep = np.isfinite(table)
    if not fmt.is_float:
        keep &= np.abs(table) <= fmt.max_normal
    return np.flatnonzero(keep).astype(np.uint8 if fmt.bits <= 8 else np.uint16)


def encode_elements(v: np.ndarray, fmt: FormatLike) -> np.ndarray:
    """Round values at scale 1 to element codes: ties to even, subnormals kept, saturating.

    Values beyond the largest magnitude (Inf included) become ± max magnitude,
    never an Inf or NaN code. The sign of a float code is the sign bit of the
    input, so -0.0 and small negative values encode as negative zero. NaN input
    encodes as 0; callers mark NaN blocks through the scale byte instead.

    Args:
        v: Values already divided by the block scale; any float dtype.
        fmt: Target element format.

    Returns:
        uint8 codes of the same shape.
    """
    fmt = get_format(fmt)
    v = np.asarray(v, dtype=np.float64)
    if not fmt.is_float:
        k = np.rint(np.ldexp(v, fmt.mbits))
        k = np.clip(np.nan_to_num(k, nan=0.0), -fmt.int_max_code, fmt.int_max_code).astype(np.int16)
        return (k & (fmt.num_codes - 1)).astype(np.uint8)

    # Anything past max_normal saturates, so capping first keeps ldexp finite.
    magnitude = np.minimum(np.abs(np.nan_to_num(v, nan=0.0)), 2 * fmt.max_normal)
    emin = 1 - fmt.bias

    # Round on the grid of the value's own binade (or the subnormal grid).
    ee = np.maximum(floor_log2(magnitude), emin)
    rounded = np.ldexp(np.rint(np.ldexp(magnitude, fmt.mbits - ee)), ee - fmt.mbits)
    rounded = np.minimum(rounded, fmt.max_normal)

    # Rounding may carry into the next binade, so take the exponent again.
    ee = np.maximum(floor_log2(rounded), emin)
    step_count = np.ldexp(rounded, fmt.mbits - ee).astype(np.int32)
    code_magnitude = (ee + fmt.bias - 1) * (1 << fmt.mbits) + step_count
    sign = np.signbit(v).astype(np.int32) << (fmt.bits - 1)
    return (code_magnitude | sign).astype(np.uint8)


@functools.cache
def _code_exponent_cached(name: str) -> np.ndarray:
    table = decode_table(name).astype(np.float64)
    finite = np.isfinite(table)
    exponents = floor_log2(np.abs(np.where(finite, table, 0.0)))
    exponents.setflags(write=False)
    return exponents


def code_exponent(fmt: FormatLike) -> np.ndarray:
    """Return ``floor(log2(|value|))`` of every code, with a large negative sentinel for zeros and specials."""
    return _code_exponent_cached(get_format(fmt).name)
