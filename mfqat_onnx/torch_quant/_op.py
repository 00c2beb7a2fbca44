"""The ``mfqat::fake_quantize`` custom op, its fake kernel and its straight-through gradient.

The op is opaque to ``torch.export`` and ``torch.onnx.export(dynamo=True)``:
the graph holds one ``mfqat.fake_quantize`` node with the format, axis, block
size, scale rule and anchor as attributes, and the exporter lowers that node.

Gradient (straight-through estimator): the incoming gradient passes unchanged
for every element inside its block's range, ``abs(x) <= max_normal *
2**shared_exp``, and is zero for saturated elements. Elements of a NaN block
(one holding NaN or +-Inf) get zero gradient, because their output is NaN
whatever they hold. With an anchor, an element must be inside the anchor's
range and its decoded anchor value inside the target's range.
"""

from __future__ import annotations

import torch

from mfqat_onnx.formats import FORMATS, MXFormat, get_format
from mfqat_onnx.torch_quant import _blocks, _mx, _scale


@torch.library.custom_op("mfqat::fake_quantize", mutates_args=())
def _fake_quantize_op(
    x: torch.Tensor,
    fmt: str,
    axis: int,
    block_size: int,
    scale_rule: str,
    anchor: str | None,
) -> torch.Tensor:
    anchor_fmt = None if anchor is None else get_format(anchor)
    return _mx.fake_quantize_tensor(
        x, get_format(fmt), axis=axis, block_size=block_size, scale_rule=scale_rule, anchor=anchor_fmt
    )


@_fake_quantize_op.register_fake
def _fake_quantize_fake(
    x: torch.Tensor,
    fmt: str,
    axis: int,
    block_size: int,
    scale_rule: str,
    anchor: str | None,
) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("mfqat::fake_quantize_ste_mask", mutates_args=())
def _ste_mask_op(
    x: torch.Tensor,
    fmt: str,
    axis: int,
    block_size: int,
    scale_rule: str,
    anchor: str | None,
) -> torch.Tensor:
    anchor_fmt = None if anchor is None else get_format(anchor)
    return _mx.ste_mask(
        x, get_format(fmt), axis=axis, block_size=block_size, scale_rule=scale_rule, anchor=anchor_fmt
    )


@_ste_mask_op.register_fake
def _ste_mask_fake(
    x: torch.Tensor,
    fmt: str,
    axis: int,
    block_size: int,
    scale_rule: str,
    anchor: str | None,
) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.bool)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, *options = inputs
    ctx.save_for_backward(x)
    ctx.options = tuple(options)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    (x,) = ctx.saved_tensors
    inside = torch.ops.mfqat.fake_quantize_ste_mask(x, *ctx.options)
    return (torch.where(inside, grad, 0), *(None for _ in ctx.options))


_fake_quantize_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mfqat::fake_quantize_with_mask", mutates_args=())
def _fake_quantize_with_mask_op(
    x: torch.Tensor,
    fmt: str,
    axis: int,
    block_size: int,
    scale_rule: str,
    anchor: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    anchor_fmt = None if anchor is None else get_format(anchor)
    return _mx.fake_quantize_with_mask(
        x, get_format(fmt), axis=axis, block_size=block_size, scale_rule=scale_rule, anchor=anchor_fmt
    )


@_fake_quantize_with_mask_op.register_fake
def _fake_quantize_with_mask_fake(
    x: torch.Tensor,
    fmt: str,
    axis: int,
    block_size: int,
    scale_rule: str,
    anchor: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.bool)


def _setup_context_with_mask(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(output[1])
    ctx.option_count = len(inputs) - 1


def _backward_with_mask(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, _mask_grad: None) -> tuple:
    (inside,) = ctx.saved_tensors
    return (torch.where(inside, grad, 0), *(None for _ in range(ctx.option_count)))


_fake_quantize_with_mask_op.register_autograd(_backward_with_mask, setup_context=_setup_context_with_mask)


def _resolve_format(fmt: str | MXFormat, role: str) -> MXFormat:
    resolved = get_format(fmt)
    if FORMATS.get(resolved.name) != resolved:
        raise ValueError(
            f"{role} {resolved.name!r} is not a registered format; pass one of {', '.join(FORMATS)}"
        )
    return resolved


def _resolve_anchor(anchor: str | MXFormat | None, target: MXFormat) -> MXFormat | None:
    if anchor is None:
        return None
    resolved = _resolve_format(anchor, "anchor")
    if resolved == target:
        return None
    if resolved.family != target.family:
        raise ValueError(
            f"anchor {resolved.name} ({resolved.family} family) cannot be sliced to {target.name} "
            f"({target.family} family); use an anchor of the {target.family} family or anchor=None"
        )
    if resolved.bits < target.bits:
        raise ValueError(
            f"anchor {resolved.name} has {resolved.bits}-bit elements, fewer than {target.name} "
            f"({target.bits}-bit); the anchor must be at least as wide as the target"
        )
    return resolved


def fake_quantize(
    x: torch.Tensor,
    fmt: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int = 32,
    scale_rule: str = "floor",
    anchor: str | MXFormat | None = None,
) -> torch.Tensor:
    """Quantize ``x`` to an MX format and decode it again, with a straight-through gradient.

    Args:
        x: float32, float16 or bfloat16 tensor.
        fmt: Target format name (``"mxfp4"``, ``"mxint8"``, ...) or :class:`MXFormat`.
        axis: Axis along which blocks run (``1`` for Conv weights ``[O, I, kH, kW]``).
        block_size: Elements per block; a partial last block is zero-padded.
        scale_rule: ``"floor"`` (OCP default), ``"rceil"`` or ``"even"``.
        anchor: Optional wider format of the same family. When set and
            different from ``fmt``, ``x`` is quantized to ``anchor`` with
            ``scale_rule`` and then Slice-and-Scaled to ``fmt``, which is what a
            model exported in ``anchor`` and retargeted to ``fmt`` computes.

    Returns:
        A new tensor with ``x``'s shape and dtype. Every element of a block
        holding NaN or +-Inf is NaN.

    Raises:
        TypeError: ``x`` is not a float32/float16/bfloat16 tensor, or ``axis``
            or ``block_size`` is not an int.
        ValueError: Unknown format or scale rule, bad axis or block size, or an
            anchor of another family or narrower than ``fmt``.
    """
    _mx.check_input(x)
    target = _resolve_format(fmt, "format")
    anchor_fmt = _resolve_anchor(anchor, target)
    _scale.check_scale_rule(scale_rule)
    _blocks.normalize_axis(axis, x.dim())
    _blocks.check_block_size(block_size)
    anchor_name = None if anchor_fmt is None else anchor_fmt.name
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_exporting():
        # Training: the mask comes out of the forward pass, so backward does
        # not quantize again. Exported graphs keep the single-output op.
        out, _ = torch.ops.mfqat.fake_quantize_with_mask(x, target.name, axis, block_size, scale_rule, anchor_name)
        return out
    return torch.ops.mfqat.fake_quantize(x, target.name, axis, block_size, scale_rule, anchor_name)
