"""Registry of OCP Microscaling (MX) element formats.

An MX block is ``block_size`` elements sharing one E8M0 scale ``2**shared_exp``.
Each element is either a small float (sign, ``ebits`` exponent bits with
``bias``, ``mbits`` stored mantissa bits) or a two's complement integer with an
implicit binary point, so that an element's value at scale 1 is
``code * 2**-(bits - 2)``.

``emax_elem`` is the exponent of the largest power of two the element can hold.
The OCP v1.0 floor rule sets ``shared_exp = floor(log2(amax)) - emax_elem``.
Every other module reads these fields and never branches on a format's name.

The odd integer widths (mxint3, mxint5, mxint7) follow the same integer rule but
are not part of the OCP MX v1.0 specification.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

__all__ = [
    "ALIASES",
    "FORMATS",
    "MXFormat",
    "family_formats",
    "get_format",
    "list_formats",
]

Family = Literal["fp", "int"]


@dataclasses.dataclass(frozen=True)
class MXFormat:
    """Description of one MX element format.

    Attributes:
        name: Canonical id, for example ``mxfp8_e4m3`` or ``mxint4``.
        family: ``"fp"`` for small floats, ``"int"`` for two's complement integers.
        bits: Bits per element code, sign included.
        ebits: Exponent bits (0 for integers).
        mbits: Stored mantissa bits, without sign or hidden bit. For integers the
            bits below the implicit binary point (``bits - 2``).
        bias: Exponent bias (0 for integers).
        emax_elem: Exponent of the largest power of two the element can represent.
        max_normal: Largest finite magnitude at scale 1.
        min_normal: Smallest normal magnitude at scale 1 (the step for integers).
        min_subnormal: Smallest non-zero magnitude at scale 1.
        has_inf: Whether some code decodes to an infinity.
        has_nan: Whether some code decodes to NaN.
        in_ocp_spec: False for the extension widths outside OCP MX v1.0.
    """

    name: str
    family: Family
    bits: int
    ebits: int
    mbits: int
    bias: int
    emax_elem: int
    max_normal: float
    min_normal: float
    min_subnormal: float
    has_inf: bool
    has_nan: bool
    in_ocp_spec: bool = True

    @property
    def is_float(self) -> bool:
        """Whether elements are small floats rather than integers."""
        return self.family == "fp"

    @property
    def emin_elem(self) -> int:
        """Exponent of the smallest normal power of two (``1 - bias`` for floats)."""
        return 1 - self.bias if self.is_float else -self.mbits

    @property
    def int_max_code(self) -> int:
        """Largest integer code magnitude, ``2**(bits-1) - 1`` (integers only)."""
        return (1 << (self.bits - 1)) - 1

    @property
    def num_codes(self) -> int:
        """Number of distinct element codes, ``2**bits``."""
        return 1 << self.bits

    def code_values(self) -> tuple[float, ...]:
        """Return the value at scale 1 of every code ``0 .. 2**bits - 1``.

        Float codes decode as ``2^(1-bias) * m / 2^mbits`` when the exponent
        field is 0 and ``2^(e-bias) * (1 + m / 2^mbits)`` otherwise; codes above
        ``max_normal`` are the specials (Inf for a zero mantissa when the format
        has Inf, NaN otherwise). Negative codes keep their sign, so the E4M3
        code 0xFF is a NaN with the sign bit set. Integer codes are two's
        complement ``k * 2^-mbits``.
        """
        return _code_values(self)


@functools.cache
def _code_values(fmt: MXFormat) -> tuple[float, ...]:
    if not fmt.is_float:
        half = fmt.num_codes // 2
        return tuple((code - fmt.num_codes if code >= half else code) * 2.0**-fmt.mbits for code in range(fmt.num_codes))

    exponent_mask = (1 << fmt.ebits) - 1
    mantissa_mask = (1 << fmt.mbits) - 1
    values = []
    for code in range(fmt.num_codes):
        exponent_field = (code >> fmt.mbits) & exponent_mask
        mantissa = code & mantissa_mask
        if exponent_field == 0:
            magnitude = mantissa * fmt.min_subnormal
        else:
            magnitude = (1.0 + mantissa / (1 << fmt.mbits)) * 2.0 ** (exponent_field - fmt.bias)
        if magnitude > fmt.max_normal:
            magnitude = math.inf if fmt.has_inf and mantissa == 0 else math.nan
        # Negation flips the sign bit even of NaN.
        values.append(-magnitude if code >> (fmt.bits - 1) else magnitude)
    return tuple(values)


def _float_format(name: str, ebits: int, mbits: int, *, ieee_special: bool, nan_only: bool) -> MXFormat:
    """Build a small-float description from its exponent and mantissa widths.

    ``ieee_special`` reserves the top exponent for Inf/NaN (E5M2). ``nan_only``
    reserves only the all-ones code for NaN (E4M3 "fn" layout).
    """
    bias = (1 << (ebits - 1)) - 1
    top_exp = (1 << ebits) - 1
    if ieee_special:
        emax = top_exp - 1 - bias
        max_mantissa = (1 << mbits) - 1
    elif nan_only:
        emax = top_exp - bias
        max_mantissa = (1 << mbits) - 2
    else:
        emax = top_exp - bias
        max_mantissa = (1 << mbits) - 1
    max_normal = 2.0**emax * (1.0 + max_mantissa / (1 << mbits))
    emin = 1 - bias
    return MXFormat(
        name=name,
        family="fp",
        bits=1 + ebits + mbits,
        ebits=ebits,
        mbits=mbits,
        bias=bias,
        emax_elem=emax,
        max_normal=max_normal,
        min_normal=2.0**emin,
        min_subnormal=2.0 ** (emin - mbits),
        has_inf=ieee_special,
        has_nan=ieee_special or nan_only,
    )


def _int_format(bits: int) -> MXFormat:
    """Build a two's complement integer description with ``bits - 2`` fraction bits."""
    frac = bits - 2
    step = 2.0**-frac
    return MXFormat(
        name=f"mxint{bits}",
        family="int",
        bits=bits,
        ebits=0,
        mbits=frac,
        bias=0,
        emax_elem=0,
        max_normal=((1 << (bits - 1)) - 1) * step,
        min_normal=step,
        min_subnormal=step,
        has_inf=False,
        has_nan=False,
        in_ocp_spec=bits in (2, 4, 6, 8),
    )


FORMATS: dict[str, MXFormat] = {
    f.name: f
    for f in (
        _float_format("mxfp8_e4m3", 4, 3, ieee_special=False, nan_only=True),
        _float_format("mxfp8_e5m2", 5, 2, ieee_special=True, nan_only=False),
        _float_format("mxfp6_e3m2", 3, 2, ieee_special=False, nan_only=False),
        _float_format("mxfp6_e2m3", 2, 3, ieee_special=False, nan_only=False),
        _float_format("mxfp4_e2m1", 2, 1, ieee_special=False, nan_only=False),
        *(_int_format(bits) for bits in (8, 7, 6, 5, 4, 3, 2)),
    )
}

ALIASES: dict[str, str] = {
    "mxfp8": "mxfp8_e4m3",
    "mxfp6": "mxfp6_e2m3",
    "mxfp4": "mxfp4_e2m1",
}


def list_formats() -> list[str]:
    """Return every accepted format name: canonical ids, then aliases."""
    return [*FORMATS, *ALIASES]


def get_format(name: str | MXFormat) -> MXFormat:
    """Look up a format by canonical id or alias (case-insensitive).

    Raises:
        ValueError: The name is not a known format; the message lists valid names.
    """
    if isinstance(name, MXFormat):
        return name
    if not isinstance(name, str):
        raise TypeError(f"format must be a string such as 'mxfp4', got {type(name).__name__}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    try:
        return FORMATS[key]
    except KeyError:
        raise ValueError(
            f"unknown MX format {name!r}; valid names are: {', '.join(list_formats())}"
        ) from None


def family_formats(family: Family, *, include_extensions: bool = True) -> list[MXFormat]:
    """Return the formats of one family, widest first."""
    found = [
        f for f in FORMATS.values() if f.family == family and (include_extensions or f.in_ocp_spec)
    ]
    return sorted(found, key=lambda f: -f.bits)
