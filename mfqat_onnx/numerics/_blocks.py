"""Cutting a tensor into MX blocks along one axis, and putting it back.

Blocks never cross a row: the blocked axis is moved last, padded with zeros to
a whole number of blocks, and viewed as ``[rows, n_blocks, block_size]``.
Zero padding never changes a block's largest magnitude.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Geometry of one blocked tensor.

    Attributes:
        shape: Logical shape of the tensor.
        axis: Blocked axis, normalised to ``0 <= axis < ndim``.
        block_size: Elements per block.
    """

    shape: tuple[int, ...]
    axis: int
    block_size: int

    @property
    def axis_length(self) -> int:
        """Length of the blocked axis."""
        return self.shape[self.axis]

    @property
    def n_blocks(self) -> int:
        """Blocks per row, ``ceil(axis_length / block_size)``."""
        return math.ceil(self.axis_length / self.block_size)

    @property
    def moved_shape(self) -> tuple[int, ...]:
        """Shape with the blocked axis moved last."""
        rest = self.shape[: self.axis] + self.shape[self.axis + 1 :]
        return (*rest, self.axis_length)

    @property
    def rows(self) -> int:
        """Number of independent rows of blocks."""
        return math.prod(self.moved_shape[:-1])

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the scale array: the tensor's shape with ``n_blocks`` on the blocked axis."""
        return self.shape[: self.axis] + (self.n_blocks,) + self.shape[self.axis + 1 :]

    def to_blocks(self, a: np.ndarray, fill: int | float = 0) -> np.ndarray:
        """View ``a`` (of ``shape``) as ``[rows, n_blocks, block_size]``, padding with ``fill``."""
        moved = np.moveaxis(a, self.axis, -1).reshape(self.rows, self.axis_length)
        padded_length = self.n_blocks * self.block_size
        if padded_length != self.axis_length:
            padded = np.full((self.rows, padded_length), fill, dtype=a.dtype)
            padded[:, : self.axis_length] = moved
            moved = padded
        return moved.reshape(self.rows, self.n_blocks, self.block_size)

    def from_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """Invert :meth:`to_blocks`: drop the padding and restore the logical layout."""
        flat = blocks.reshape(self.rows, self.n_blocks * self.block_size)[:, : self.axis_length]
        return np.ascontiguousarray(np.moveaxis(flat.reshape(self.moved_shape), -1, self.axis))

    def scales_to_rows(self, scales: np.ndarray) -> np.ndarray:
        """View a scale array of ``scale_shape`` as ``[rows, n_blocks]``."""
        return np.moveaxis(scales, self.axis, -1).reshape(self.rows, self.n_blocks)

    def scales_from_rows(self, rows: np.ndarray) -> np.ndarray:
        """Invert :meth:`scales_to_rows`."""
        moved = rows.reshape(*self.moved_shape[:-1], self.n_blocks)
        return np.ascontiguousarray(np.moveaxis(moved, -1, self.axis))


def make_layout(shape: tuple[int, ...], axis: int, block_size: int) -> BlockLayout:
    """Validate ``axis`` and ``block_size`` against ``shape`` and return the layout.

    Raises:
        ValueError: ``block_size`` is not a positive integer, the tensor is a
            scalar, or ``axis`` is out of range for its rank.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("cannot block a 0-d tensor; pass an array with at least one axis")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis!r} is out of range for a tensor of rank {ndim} (shape {tuple(shape)})")
    return BlockLayout(tuple(int(d) for d in shape), int(axis) % ndim, int(block_size))
