"""Names, attribute checks and shape rules of the ``mfqat`` operators.

The node builders raise the ``ValueError``/``TypeError`` of these checks for bad
arguments. The schema inference functions turn the same messages into
``onnx.shape_inference.InferenceError``.
"""

from __future__ import annotations

import math

import numpy as np

from mfqat_onnx.formats import ALIASES, FORMATS, MXFormat

DOMAIN = "mfqat"
DOMAIN_VERSION = 1
DEFAULT_OPSET = 21
# The bodies use ops up to opset 20 (RegexFullMatch). The project writes opset 21
# (blocked Q/DQ, IR 10) and rejects anything older.
MIN_OPSET = 21

DEQUANTIZE_OP = "MXDequantize"
QUANTIZE_OP = "MXQuantize"

SCALE_RULES = ("floor", "rceil", "even")
DEFAULT_AXIS = -1
DEFAULT_BLOCK_SIZE = 32
DEFAULT_SCALE_RULE = "floor"


def accepted_format_names() -> list[str]:
    """Return every ``format`` string the function bodies accept: canonical ids, then aliases."""
    return [*FORMATS, *ALIASES]


def check_int(name: str, value: object, *, positive: bool = False) -> int:
    """Return ``value`` as an int, rejecting bools, non-integers and (optionally) values below 1.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``positive`` is set and ``value`` is below 1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if positive and value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def check_scale_rule(scale_rule: str) -> str:
    """Return ``scale_rule`` if it is one of :data:`SCALE_RULES`.

    Raises:
        ValueError: Unknown rule.
    """
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown scale rule {scale_rule!r}; valid rules are: {', '.join(SCALE_RULES)}")
    return scale_rule


def normalize_axis(axis: int, rank: int) -> int:
    """Return ``axis`` in ``[0, rank)``.

    Raises:
        ValueError: ``axis`` is outside ``[-rank, rank)`` or the tensor is 0-d.
    """
    if rank == 0:
        raise ValueError("cannot block a 0-d tensor; the input needs at least one axis")
    if not -rank <= axis < rank:
        raise ValueError(
            f"axis {axis} is out of range for a tensor of rank {rank}; use -{rank} .. {rank - 1}"
        )
    return axis % rank


def n_blocks(axis_length: int, block_size: int) -> int:
    """Return the blocks per row, ``ceil(axis_length / block_size)``."""
    return math.ceil(axis_length / block_size)


def bytes_per_block(fmt: MXFormat, block_size: int) -> int:
    """Return the bytes of one packed block, ``ceil(block_size * bits / 8)``."""
    return math.ceil(block_size * fmt.bits / 8)


def packed_length(fmt: MXFormat, axis_length: int, block_size: int) -> int:
    """Return the packed byte count along the blocked axis for ``axis_length`` elements."""
    return n_blocks(axis_length, block_size) * bytes_per_block(fmt, block_size)
