"""Round scaled values to MX element values, and convert them to and from codes.

After division by the block scale, an element value ``v`` is rounded to the
nearest value of the element format with ties to even, then saturated to
``+-max_normal``:

- small floats: the quantum of ``v`` is ``2**(e - mbits)`` with
  ``e = max(floor(log2(abs(v))), emin)``, so ``v * 2**(mbits - e)`` is rounded to
  an integer by ``torch.round`` (ties to even) and scaled back. Both products are
  exact because they only change the exponent. Subnormal elements use
  ``e = emin``. The sign of ``v`` survives, so negative values that round to
  zero give -0.
- integers: the quantum is ``2**-mbits`` everywhere, and scaled values stay
  below 4 in magnitude, so adding and subtracting ``1.5 * 2**(23 - mbits)``
  rounds ``v`` to that grid in float32 arithmetic, ties to even. The result
  has no -0 because two's complement has none.

Codes follow the ``ml_dtypes`` bit layouts for floats and are the low ``bits``
bits of the two's complement value for integers.
"""

from __future__ import annotations

import functools

import torch

from mfqat_onnx.formats import MXFormat


def round_elements_(v: torch.Tensor, fmt: MXFormat) -> torch.Tensor:
    """Round scaled float32 values to element values in place and return ``v``.

    Args:
        v: float32 values already divided by their block scale. Modified in place.
        fmt: Element format.

    Returns:
        ``v``, holding exact element values in ``[-max_normal, max_normal]``
        (NaN stays NaN).
    """
    if fmt.is_float:
        _round_float_(v, fmt)
    else:
        magic = 1.5 * 2.0 ** (23 - fmt.mbits)
        v.add_(magic).sub_(magic)
    return v.clamp_(-fmt.max_normal, fmt.max_normal)


def _round_float_(v: torch.Tensor, fmt: MXFormat) -> None:
    """Round to the nearest small-float value (no saturation), in place."""
    # The quantum 2**(e - mbits) built as float32 bits from v's exponent field,
    # raised to the element's smallest normal exponent so subnormals share it.
    quantum = v.view(torch.int32) & 0x7F800000
    quantum.clamp_(min=(fmt.emin_elem + 127) << 23).sub_(fmt.mbits << 23)
    quantum = quantum.view(torch.float32)

    # Dividing and multiplying by a power of two is exact.
    v.div_(quantum).round_().mul_(quantum)


def encode_elements(values: torch.Tensor, fmt: MXFormat) -> torch.Tensor:
    """Convert exact element values (output of :func:`round_elements_`) to uint8 codes."""
    if not fmt.is_float:
        ints = (values * 2.0**fmt.mbits).to(torch.int32)
        return (ints & (fmt.num_codes - 1)).to(torch.uint8)

    bits = values.view(torch.int32)
    sign = (bits < 0).to(torch.int32) << (fmt.bits - 1)
    magnitude = bits & 0x7FFFFFFF

    # Normal elements: re-bias the float32 exponent and keep the top mbits of
    # the mantissa. Subnormal elements are integer multiples of min_subnormal.
    normal = (magnitude >> (23 - fmt.mbits)) - ((127 - fmt.bias) << fmt.mbits)
    subnormal = (values.abs() * (1.0 / fmt.min_subnormal)).to(torch.int32)
    is_normal = magnitude >= (fmt.emin_elem + 127) << 23
    return (torch.where(is_normal, normal, subnormal) | sign).to(torch.uint8)


@functools.cache
def decode_table(fmt: MXFormat, device: torch.device | str | None = None) -> torch.Tensor:
    """Return float32 ``[2**bits]``: the value of every code at scale 1."""
    return torch.tensor(fmt.code_values(), dtype=torch.float32, device=device)
