"""Shared exponents and E8M0 scale bytes of MX blocks, on int32 bit views.

Every quantity comes from float32 bit patterns, never from a float log2:
a finite non-negative float32 ``a`` is ``2**p * (1 + mant / 2**23)``, where
``p`` is ``floor(log2(a))`` and ``mant`` the 23-bit normalized mantissa (float32
subnormals are normalized first). With ``emax_elem`` and ``max_normal`` from the
format record, the shared exponent ``shared_exp`` of a block with largest
magnitude ``amax`` is (OCP MX v1.0 section 6.3 for ``floor``):

- ``floor``: ``p - emax_elem``;
- ``rceil``: the smallest ``E`` with ``amax / 2**E <= max_normal``, which is
  ``p - p_max`` or one more when ``amax``'s mantissa exceeds ``max_normal``'s
  (``p_max`` being ``floor(log2(max_normal))``);
- ``even``: ``p' - emax_elem`` where ``p'`` is the exponent of ``amax`` rounded
  to ``mbits`` stored mantissa bits with ties to even.

The result is clamped to ``[-127, 127]`` and stored as the byte
``shared_exp + 127``. A block holding NaN or +-Inf gets byte 0xFF instead. An
all-zero block has ``p = -inf`` in effect, so it lands on the clamp: byte 0x00.
"""

from __future__ import annotations

import struct

import torch

from mfqat_onnx.formats import MXFormat

SCALE_RULES = ("floor", "rceil", "even")

E8M0_NAN = 0xFF
MIN_SHARED_EXP = -127
MAX_SHARED_EXP = 127

_MANT_MASK = 0x007FFFFF
_INF_BITS = 0x7F800000
# A Python NaN written into a float32 tensor is the canonical quiet NaN 0x7FC00000.
NAN = float("nan")
# Float32 subnormals are m * 2**-149 with a 23-bit integer m.
_SUBNORMAL_EXP = -149


def check_scale_rule(scale_rule: str) -> str:
    """Return ``scale_rule`` after checking that it names a known rule.

    Raises:
        ValueError: The rule is not one of ``floor``, ``rceil``, ``even``.
    """
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown scale_rule {scale_rule!r}; expected one of {', '.join(SCALE_RULES)}")
    return scale_rule


def float32_bits(value: float) -> int:
    """Return the IEEE float32 bit pattern of ``value`` as a Python int."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def split_exponent(abs_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split non-negative finite float32 bit patterns into ``floor(log2)`` and mantissa.

    Args:
        abs_bits: int32 bit patterns of non-negative finite float32 values.

    Returns:
        ``(p, mant)``: int32 ``floor(log2(a))`` and the 23-bit mantissa of ``a``
        normalized to ``[1, 2)``. Zero gives ``p = -276``, far below any clamp.
    """
    biased = abs_bits >> 23
    mant = abs_bits & _MANT_MASK

    # A subnormal is mant * 2**-149; converting the integer mant to float32 is
    # exact and puts its leading bit in the exponent field.
    sub_bits = mant.to(torch.float32).view(torch.int32)
    sub_p = (sub_bits >> 23) - 127 + _SUBNORMAL_EXP
    is_sub = biased == 0
    p = torch.where(is_sub, sub_p, biased - 127)
    mant = torch.where(is_sub, sub_bits & _MANT_MASK, mant)
    return p, mant


def shared_exponent(amax_bits: torch.Tensor, fmt: MXFormat, scale_rule: str) -> torch.Tensor:
    """Compute the clamped shared exponent of each block from its largest magnitude.

    Args:
        amax_bits: int32 bit patterns of each block's finite largest magnitude.
        fmt: Element format.
        scale_rule: One of :data:`SCALE_RULES`.

    Returns:
        int32 shared exponents in ``[-127, 127]``.
    """
    p, mant = split_exponent(amax_bits)
    if scale_rule == "floor":
        exp = p - fmt.emax_elem
    elif scale_rule == "rceil":
        max_bits = float32_bits(fmt.max_normal)
        max_p = (max_bits >> 23) - 127
        max_mant = max_bits & _MANT_MASK
        exp = p - max_p + (mant > max_mant).to(torch.int32)
    else:
        # Round the 24-bit significand (hidden bit included) to mbits stored
        # bits. A carry into bit 24 moves amax to the next power of two.
        shift = 23 - fmt.mbits
        significand = mant | (1 << 23)
        odd = (significand >> shift) & 1
        rounded = significand + ((1 << shift) >> 1) - 1 + odd
        exp = p + (rounded >> 24) - fmt.emax_elem
    return exp.clamp(MIN_SHARED_EXP, MAX_SHARED_EXP).to(torch.int32)


def pow2(exp: torch.Tensor) -> torch.Tensor:
    """Return ``2.0**exp`` as float32, exactly, for int32 ``exp`` in ``[-149, 127]``."""
    normal = (exp + 127).clamp_min(0) << 23
    subnormal = torch.ones_like(exp) << (exp - _SUBNORMAL_EXP).clamp(0, 22)
    return torch.where(exp >= -126, normal, subnormal).view(torch.float32)


def e8m0_to_float(scale_e8m0: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 scale bytes to float32 ``2**(byte - 127)``; 0xFF gives NaN."""
    exp = scale_e8m0.to(torch.int32) - 127
    value = pow2(exp)
    return torch.where(scale_e8m0 == E8M0_NAN, NAN, value)


def block_abs_max_bits(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return each block's largest magnitude as float32 bits, and whether it is NaN/Inf.

    Args:
        blocks: float tensor ``[..., n_blocks, block_size]``.

    Returns:
        ``(amax_bits, non_finite)``: int32 ``[..., n_blocks]`` and bool ``[..., n_blocks]``.
    """
    # Two reductions that only read the blocks, rather than one over a fresh
    # full-size tensor of magnitudes; both propagate NaN.
    largest = blocks.amax(dim=-1).float().abs_()
    smallest = blocks.amin(dim=-1).float().abs_()
    amax = torch.maximum(largest, smallest)
    return amax.view(torch.int32), ~torch.isfinite(amax)
