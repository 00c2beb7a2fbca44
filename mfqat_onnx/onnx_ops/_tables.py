"""Per-format constants that the function bodies gather by format index.

The bodies are generic over a set of formats, by default every format in
:data:`mfqat_onnx.formats.FORMATS`: ``RegexFullMatch`` nodes map the ``format``
attribute to a row index, and each constant below is a table with one row per
format plus one trailing row for names outside the set. That row decodes to NaN
and makes the quantizer emit NaN blocks, so a misspelt format never yields
plausible numbers. A file carries tables for the formats its nodes use, because
the tables of all formats (about 7 KB) outweigh the weights of a small model.

Quantizer constants (for a magnitude ``a`` already divided by the block scale):

- the element binade ``e = clip(floor(log2(a)), min_binade, max_binade)``,
  with ``min_binade = 1 - bias`` and ``max_binade = emax_elem + 1`` for floats;
  integers use ``min_binade = max_binade = 0``, so every integer value sits on
  the fixed grid ``2^-mbits``;
- ``n = rne(a / 2^(e - mbits))`` and the code magnitude
  ``(e - min_binade) * 2^mbits + n``, which also covers subnormals and a
  rounding carry into the next binade, clipped to ``max_code_magnitude``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import numpy as np

from mfqat_onnx.formats import ALIASES, FORMATS, MXFormat, get_format

# Exponent range of the power-of-two table: wide enough for floor(log2) of any
# float32 (subnormals included) plus one step on either side. Entries below
# 2^-149 are 0 and entries from 2^128 on are +Inf, as float32 rounds them.
POW2_MIN = -160
POW2_MAX = 160
E8M0_NAN = 0xFF


@dataclasses.dataclass(frozen=True)
class FormatTables:
    """Constant tables indexed by format row (last row: unknown format).

    Attributes:
        keys: ``format`` strings the bodies accept.
        key_rows: Row index of each key.
        unknown_row: Row index for names outside ``keys``.
        decode: float32 element values at scale 1 of every row, one row after
            another: ``2**bits`` values per format, then one NaN for the unknown row.
        decode_start: int64 index in ``decode`` where each row's values start.
        decode_end: int64 index in ``decode`` one past each row's last value.
        bits: int64 bits per code.
        mbits: int64 mantissa bits (fraction bits for integers).
        emax_elem: int64 exponent of the largest power of two of an element.
        min_binade: int64 lowest element binade (see the module docstring).
        max_binade: int64 highest element binade.
        max_code_magnitude: int64 code of ``+max_normal``.
        mantissa_steps: int64 ``2**mbits``.
        sign_bit: int64 ``2**(bits - 1)``, the sign of float codes and half the code count.
        max_mantissa: float32 ``max_normal / 2**emax_elem``, in ``[1, 2)``.
        is_float: bool, small float rather than integer elements.
        code_mask: uint16 ``2**bits - 1``; 0 for the unknown row, whose codes then all read its NaN.
        known: bool, False only for the unknown row.
    """

    keys: tuple[str, ...]
    key_rows: tuple[int, ...]
    unknown_row: int
    decode: np.ndarray
    decode_start: np.ndarray
    decode_end: np.ndarray
    bits: np.ndarray
    mbits: np.ndarray
    emax_elem: np.ndarray
    min_binade: np.ndarray
    max_binade: np.ndarray
    max_code_magnitude: np.ndarray
    mantissa_steps: np.ndarray
    sign_bit: np.ndarray
    max_mantissa: np.ndarray
    is_float: np.ndarray
    code_mask: np.ndarray
    known: np.ndarray


def element_values(fmt: MXFormat) -> np.ndarray:
    """Return the float32 value at scale 1 of each of the ``2**bits`` codes of ``fmt``."""
    return np.array(fmt.code_values(), dtype=np.float32)


def _max_code_magnitude(fmt: MXFormat, values: np.ndarray) -> int:
    positive = values[: fmt.num_codes // 2]
    matches = np.flatnonzero(positive == np.float32(fmt.max_normal))
    if matches.size != 1:
        raise AssertionError(f"{fmt.name}: max_normal {fmt.max_normal} is not exactly one positive code")
    return int(matches[0])


def canonical_names(names: Iterable[str] | None) -> tuple[str, ...]:
    """Return the canonical ids of ``names`` in registry order; every format when ``names`` is None.

    Raises:
        ValueError: A name is not a known format.
    """
    if names is None:
        return tuple(FORMATS)
    requested = {get_format(name).name for name in names}
    return tuple(name for name in FORMATS if name in requested)


@functools.cache
def format_tables(names: tuple[str, ...] | None = None) -> FormatTables:
    """Build the tables for the formats ``names`` (canonical ids), or for every format when None."""
    formats = [FORMATS[name] for name in canonical_names(names)]
    int_columns: dict[str, list[int]] = {
        name: []
        for name in (
            "bits",
            "mbits",
            "emax_elem",
            "min_binade",
            "max_binade",
            "max_code_magnitude",
            "mantissa_steps",
            "sign_bit",
        )
    }
    max_mantissa: list[float] = []
    for fmt in formats:
        values = element_values(fmt)
        int_columns["bits"].append(fmt.bits)
        int_columns["mbits"].append(fmt.mbits)
        int_columns["emax_elem"].append(fmt.emax_elem)
        int_columns["min_binade"].append(1 - fmt.bias if fmt.is_float else 0)
        int_columns["max_binade"].append(fmt.emax_elem + 1 if fmt.is_float else 0)
        int_columns["max_code_magnitude"].append(_max_code_magnitude(fmt, values))
        int_columns["mantissa_steps"].append(1 << fmt.mbits)
        int_columns["sign_bit"].append(1 << (fmt.bits - 1))
        max_mantissa.append(fmt.max_normal / 2.0**fmt.emax_elem)

    # The unknown row: 8-bit codes so that shapes still work out, everything else inert.
    unknown = {"bits": 8, "mantissa_steps": 1, "sign_bit": 128}
    for name, column in int_columns.items():
        column.append(unknown.get(name, 0))
    max_mantissa.append(1.0)

    decode_bounds = np.cumsum([0] + [fmt.num_codes for fmt in formats] + [1]).tolist()
    names = [fmt.name for fmt in formats]
    aliases = {alias: target for alias, target in ALIASES.items() if target in names}
    keys = (*names, *aliases)
    key_rows = (*range(len(names)), *(names.index(target) for target in aliases.values()))
    return FormatTables(
        keys=keys,
        key_rows=key_rows,
        unknown_row=len(formats),
        decode=np.concatenate([element_values(fmt) for fmt in formats] + [np.full(1, np.nan, np.float32)]),
        decode_start=np.array(decode_bounds[:-1], dtype=np.int64),
        decode_end=np.array(decode_bounds[1:], dtype=np.int64),
        **{name: np.array(column, dtype=np.int64) for name, column in int_columns.items()},
        max_mantissa=np.array(max_mantissa, dtype=np.float32),
        is_float=np.array([f.is_float for f in formats] + [False]),
        code_mask=np.array([f.num_codes - 1 for f in formats] + [0], dtype=np.uint16),
        known=np.array([True] * len(formats) + [False]),
    )


@functools.lru_cache(maxsize=1)
def pow2_table() -> np.ndarray:
    """Return float32 ``2**k`` for ``k`` in ``[POW2_MIN, POW2_MAX]``, rounded as float32 rounds them."""
    exponents = np.arange(POW2_MIN, POW2_MAX + 1)
    with np.errstate(over="ignore"):
        return np.ldexp(1.0, exponents).astype(np.float32)


# An E8M0 byte b = E8M0_STEP * q + r (0 <= r < E8M0_STEP) decodes to
# 2^(E8M0_STEP * q - 127) * 2^r. Two small tables replace one of 256 entries,
# and the product of the powers of two is exact, 2^-127 included.
E8M0_STEP = 15


@functools.lru_cache(maxsize=1)
def e8m0_factors() -> tuple[np.ndarray, np.ndarray]:
    """Return float32 ``(high, low)``: byte ``b`` decodes to ``high[b // 15] * low[b % 15]``.

    Only byte 0xFF has ``b // 15 == 17``, and ``high[17]`` is NaN.
    """
    finite_high = np.ldexp(1.0, E8M0_STEP * np.arange(E8M0_NAN // E8M0_STEP) - 127).astype(np.float32)
    high = np.append(finite_high, np.float32(np.nan))
    low = np.ldexp(1.0, np.arange(E8M0_STEP)).astype(np.float32)
    return high, low
