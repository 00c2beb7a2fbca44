"""Block quantization in PyTorch, bit-identical to the numpy reference.

``quantize_mx`` and ``dequantize_mx`` produce and consume unpacked codes and
E8M0 scale bytes; ``fake_quantize_tensor`` is the quantize-dequantize round
trip that skips the codes. All three work on ``[..., n_blocks, block_size]``
views in float32 (float16 and bfloat16 widen exactly) with no loop over blocks.

Decoding is ``table[code] * 2**shared_exp`` as one float32 multiplication. The
round trip multiplies the rounded element value, which equals ``table[code]``
bit for bit, so both paths give the same bits. Every element of a NaN block
(scale byte 0xFF) decodes to the canonical quiet NaN of the output dtype,
whatever the inputs held.
"""

from __future__ import annotations

import dataclasses

import torch

from mfqat_onnx.formats import MXFormat, get_format
from mfqat_onnx.torch_quant import _blocks, _elements, _scale

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class BlockScales:
    """Per-block scale data, shaped ``[..., n_blocks]``.

    Attributes:
        shared_exp: int32 clamped shared exponent (meaningless where ``is_nan``).
        is_nan: Whether the block holds NaN or +-Inf (scale byte 0xFF).
        scale: float32 ``2**shared_exp``, NaN where ``is_nan``.
        inv_scale: float32 ``2**-shared_exp``.
    """

    shared_exp: torch.Tensor
    is_nan: torch.Tensor
    scale: torch.Tensor
    inv_scale: torch.Tensor

    def scale_e8m0(self) -> torch.Tensor:
        """Return the uint8 scale bytes ``shared_exp + 127``, 0xFF for NaN blocks."""
        biased = torch.where(self.is_nan, _scale.E8M0_NAN, self.shared_exp + 127)
        return biased.to(torch.uint8)


def check_input(x: torch.Tensor) -> None:
    """Check that ``x`` is a float32, float16 or bfloat16 tensor.

    Raises:
        TypeError: ``x`` is not a tensor or has another dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"expected a float32, float16 or bfloat16 tensor, got {x.dtype}; convert it with .float() first"
        )


def compute_block_scales(blocks: torch.Tensor, fmt: MXFormat, scale_rule: str) -> BlockScales:
    """Compute the shared exponent and scale of every block of a float blocks tensor."""
    amax_bits, is_nan = _scale.block_abs_max_bits(blocks)
    shared_exp = _scale.shared_exponent(amax_bits, fmt, scale_rule)
    scale = torch.where(is_nan, _scale.NAN, _scale.pow2(shared_exp))
    return BlockScales(shared_exp, is_nan, scale, _scale.pow2(-shared_exp))


def round_blocks(blocks: torch.Tensor, scales: BlockScales, fmt: MXFormat) -> torch.Tensor:
    """Return element values at scale 1 as a new float32 tensor (NaN blocks hold garbage)."""
    # The product is float32 whatever the input dtype, and exact: it only
    # shifts the exponent (or lands far below the element grid).
    scaled = torch.mul(blocks, scales.inv_scale.unsqueeze(-1))
    return _elements.round_elements_(scaled, fmt)


def fill_blocks_(blocks: torch.Tensor, selected: torch.Tensor, value: float) -> torch.Tensor:
    """Write ``value`` into every element of the blocks marked in ``selected``, in place.

    Only the marked blocks are touched. A Python NaN stored into a float tensor
    is the canonical quiet NaN of its dtype (0x7FC00000, 0x7E00, 0x7FC0).

    Returns:
        ``blocks``.
    """
    # Indexing with the positions of the marked blocks (not with the boolean
    # mask) costs time only for those blocks, and works on strided views.
    blocks[selected.nonzero(as_tuple=True)] = value
    return blocks


def fake_quantize_blocks(
    blocks: torch.Tensor, fmt: MXFormat, scale_rule: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Quantize-dequantize blocks; returns a new tensor of the same shape in ``dtype``."""
    return _decode_rounded(blocks, compute_block_scales(blocks, fmt, scale_rule), fmt, dtype)


def _decode_rounded(blocks: torch.Tensor, scales: BlockScales, fmt: MXFormat, dtype: torch.dtype) -> torch.Tensor:
    values = round_blocks(blocks, scales, fmt).mul_(scales.scale.unsqueeze(-1)).to(dtype)

    # NaN goes in after the cast because torch 2.13 on CPU turns float32 NaN
    # into bfloat16 0xFFFF, not the canonical 0x7FC0 of ml_dtypes.
    return fill_blocks_(values, scales.is_nan, _scale.NAN)


def fake_quantize_tensor(
    x: torch.Tensor,
    fmt: MXFormat,
    *,
    axis: int,
    block_size: int,
    scale_rule: str,
    anchor: MXFormat | None,
) -> torch.Tensor:
    """Quantize-dequantize ``x``; return a new contiguous tensor of ``x``'s shape and dtype.

    Arguments are already checked. With ``anchor``, ``x`` is quantized to the
    anchor with ``scale_rule`` and the decoded anchor (exact in float32) is
    re-quantized to ``fmt`` with the floor rule, which equals Slice-and-Scale
    of the anchor codes bit for bit.
    """
    layout = _blocks.make_layout(x.shape, axis, block_size)
    blocks = _blocks.to_blocks(x, layout)
    if anchor is not None:
        blocks = fake_quantize_blocks(blocks, anchor, scale_rule)
        scale_rule = "floor"
    out = fake_quantize_blocks(blocks, fmt, scale_rule, x.dtype)
    return _blocks.from_blocks(out, layout)


def ste_mask(
    x: torch.Tensor,
    fmt: MXFormat,
    *,
    axis: int,
    block_size: int,
    scale_rule: str,
    anchor: MXFormat | None,
) -> torch.Tensor:
    """Return bool, in ``x``'s layout: whether each element lies in its block's range.

    The range of a block is ``abs(x) <= max_normal * 2**shared_exp``; a NaN
    block has a NaN bound, so none of its elements is inside. With ``anchor``,
    an element must lie inside the anchor's range and its decoded anchor value
    inside the target's range.
    """
    _, inside = fake_quantize_with_mask(
        x, fmt, axis=axis, block_size=block_size, scale_rule=scale_rule, anchor=anchor
    )
    return inside


def _inside_scales(blocks: torch.Tensor, scales: BlockScales, fmt: MXFormat) -> torch.Tensor:
    bound = scales.scale * fmt.max_normal
    return blocks.abs() <= bound.unsqueeze(-1)


def fake_quantize_with_mask(
    x: torch.Tensor,
    fmt: MXFormat,
    *,
    axis: int,
    block_size: int,
    scale_rule: str,
    anchor: MXFormat | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``fake_quantize_tensor(x, ...)`` and ``ste_mask(x, ...)`` from one pass.

    Training needs both; computing the block scales once for each stage saves
    the second quantization that recomputing the mask in backward would cost.
    """
    layout = _blocks.make_layout(x.shape, axis, block_size)
    blocks = _blocks.to_blocks(x, layout)
    inside = None
    if anchor is not None:
        scales = compute_block_scales(blocks, anchor, scale_rule)
        inside = _inside_scales(blocks, scales, anchor)
        blocks = _decode_rounded(blocks, scales, anchor, torch.float32)
        scale_rule = "floor"
    scales = compute_block_scales(blocks, fmt, scale_rule)
    target_inside = _inside_scales(blocks, scales, fmt)
    inside = target_inside if inside is None else inside & target_inside
    out = _decode_rounded(blocks, scales, fmt, x.dtype)
    return _blocks.from_blocks(out, layout), _blocks.from_blocks(inside, layout)


def quantize_mx(
    x: torch.Tensor,
    fmt: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int = 32,
    scale_rule: str = "floor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to unpacked MX codes and E8M0 scale bytes.

    Args:
        x: float32, float16 or bfloat16 tensor.
        fmt: Format name (``"mxfp4"``, ``"mxint8"``, ...) or :class:`MXFormat`.
        axis: Axis along which blocks run.
        block_size: Elements per block; a partial last block is zero-padded.
        scale_rule: ``"floor"`` (OCP default), ``"rceil"`` or ``"even"``.

    Returns:
        ``(codes, scale_e8m0)``: uint8 codes shaped like ``x`` (one code per
        element, not packed) and uint8 scale bytes shaped like ``x`` with
        ``ceil(D / block_size)`` on ``axis``. NaN blocks get byte 0xFF and code 0.

    Raises:
        TypeError: ``x`` is not a float32/float16/bfloat16 tensor, or an
            argument has the wrong type.
        ValueError: Unknown format or scale rule, bad axis or block size.
    """
    check_input(x)
    fmt = get_format(fmt)
    _scale.check_scale_rule(scale_rule)
    layout = _blocks.make_layout(x.shape, axis, block_size)

    blocks = _blocks.to_blocks(x, layout)
    scales = compute_block_scales(blocks, fmt, scale_rule)
    codes = _elements.encode_elements(round_blocks(blocks, scales, fmt), fmt)
    fill_blocks_(codes, scales.is_nan, 0)
    return _blocks.from_blocks(codes, layout), _blocks.scales_from_blocks(scales.scale_e8m0(), layout)


def dequantize_mx(
    codes: torch.Tensor,
    scale_e8m0: torch.Tensor,
    fmt: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int = 32,
) -> torch.Tensor:
    """Decode unpacked MX codes and E8M0 scale bytes to float32.

    Args:
        codes: uint8 codes, one per element, shaped like the output.
        scale_e8m0: uint8 scale bytes shaped like ``codes`` with
            ``ceil(D / block_size)`` on ``axis``.
        fmt: Format name or :class:`MXFormat`.
        axis: Axis along which blocks run.
        block_size: Elements per block.

    Returns:
        float32 ``table[code] * 2**(byte - 127)``; every element of a block with
        byte 0xFF is NaN.

    Raises:
        TypeError: ``codes`` or ``scale_e8m0`` is not a uint8 tensor.
        ValueError: The scale shape does not match the codes, or a code is out
            of range for the format.
    """
    fmt = get_format(fmt)
    for name, tensor in (("codes", codes), ("scale_e8m0", scale_e8m0)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8:
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name} must be a uint8 tensor, got {got}")
    layout = _blocks.make_layout(codes.shape, axis, block_size)
    expected = list(codes.shape)
    expected[layout.axis] = layout.n_blocks
    if list(scale_e8m0.shape) != expected:
        raise ValueError(
            f"scale_e8m0 has shape {list(scale_e8m0.shape)} but codes of shape {list(codes.shape)} "
            f"with axis={axis}, block_size={block_size} need {expected}"
        )
    if codes.numel() and int(codes.max()) >= fmt.num_codes:
        raise ValueError(
            f"codes must be below {fmt.num_codes} for {fmt.name} ({fmt.bits}-bit), got {int(codes.max())}; "
            "unpack packed codes first"
        )

    table = _elements.decode_table(fmt, codes.device)
    values = table[_blocks.to_blocks(codes, layout).long()]
    scale = _scale.e8m0_to_float(_blocks.scales_to_blocks(scale_e8m0, layout)).unsqueeze(-1)
    values.mul_(scale)
    fill_blocks_(values, _blocks.scales_to_blocks(scale_e8m0, layout) == _scale.E8M0_NAN, _scale.NAN)
    return _blocks.from_blocks(values, layout)
