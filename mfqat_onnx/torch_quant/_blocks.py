"""Cut a tensor into MX blocks along one axis and put it back together.

A block is ``block_size`` consecutive elements along ``axis`` inside one row:
the axis is moved last, zero-padded to a multiple of ``block_size`` and split
into ``[..., n_blocks, block_size]``. Zero padding never changes a block's
largest magnitude, so the padded elements do not affect any shared exponent.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Block geometry of one tensor, enough to undo the cut.

    Attributes:
        axis: Non-negative index of the blocked axis in the original tensor.
        length: Length ``D`` of the blocked axis.
        block_size: Elements per block.
        n_blocks: ``ceil(D / block_size)``.
    """

    axis: int
    length: int
    block_size: int
    n_blocks: int

    @property
    def padding(self) -> int:
        """Zero elements appended to the last block of every row."""
        return self.n_blocks * self.block_size - self.length


def normalize_axis(axis: int, ndim: int) -> int:
    """Return ``axis`` as a non-negative index into a tensor of rank ``ndim``.

    Raises:
        TypeError: ``axis`` is not an int.
        ValueError: ``axis`` is outside ``[-ndim, ndim)``.
    """
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if ndim == 0:
        raise ValueError("MX quantization needs a tensor with at least one dimension, got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {ndim}; use -{ndim}..{ndim - 1}")
    return axis % ndim


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` after checking that it is a positive int.

    Raises:
        TypeError: ``block_size`` is not an int.
        ValueError: ``block_size`` is smaller than 1.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    return block_size


def make_layout(shape: torch.Size, axis: int, block_size: int) -> BlockLayout:
    """Describe the blocks of a tensor of ``shape`` along ``axis``."""
    axis = normalize_axis(axis, len(shape))
    block_size = check_block_size(block_size)
    length = shape[axis]
    return BlockLayout(axis, length, block_size, (length + block_size - 1) // block_size)


def to_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Return ``x`` as ``[..., n_blocks, block_size]`` with the blocked axis moved last.

    The result is a view of ``x`` when no move or padding is needed, so callers
    must not modify it in place.
    """
    moved = x.movedim(layout.axis, -1)
    if layout.padding:
        moved = F.pad(moved, (0, layout.padding))
    return moved.reshape(*moved.shape[:-1], layout.n_blocks, layout.block_size)


def from_blocks(blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Undo :func:`to_blocks`: drop the padding and move the axis back (contiguous result)."""
    flat = blocks.reshape(*blocks.shape[:-2], layout.n_blocks * layout.block_size)
    if layout.padding:
        flat = flat[..., : layout.length]
    return flat.movedim(-1, layout.axis).contiguous()


def scales_from_blocks(per_block: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Move a ``[..., n_blocks]`` tensor of per-block values to the scale layout.

    The scale layout is the tensor's shape with ``n_blocks`` on the blocked axis.
    """
    return per_block.movedim(-1, layout.axis).contiguous()


def scales_to_blocks(scales: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Undo :func:`scales_from_blocks`: return ``[..., n_blocks]``."""
    return scales.movedim(layout.axis, -1)
