"""Linear and Conv2d layers that fake-quantize their weight (and input) to an MX format.

Weights block along the input-feature axis, axis 1 for both layers (Linear
``[out, in]``, Conv2d ``[O, I, kH, kW]``), so each output unit owns its blocks.
Inputs block along the feature axis they are reduced over: the last axis of a
Linear input, the channel axis (1) of a Conv2d input.

In via-anchor mode a lower weight format is Slice-and-Scale of the anchor
quantization, the exact weight a retargeted ONNX file holds. The fake-quant op
passes gradients straight through (STE), so the latent fp32 weight trains.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mfqat_onnx import torch_quant
from mfqat_onnx.qat._config import LayerQuant


class _MXLayer:
    """Shared behaviour of the swapped layers; mixed in before the torch layer class."""

    weight_axis: ClassVar[int] = 1
    act_axis: ClassVar[int]
    weight: nn.Parameter
    quant: LayerQuant

    def quantized_weight(self) -> torch.Tensor:
        """Return the weight fake-quantized to the active format (the fp32 weight when none is active)."""
        q = self.quant
        if q.weight_format is None:
            return self.weight
        via_anchor = q.mode == "via_anchor" and q.weight_format != q.anchor
        return torch_quant.fake_quantize(
            self.weight,
            q.weight_format,
            axis=self.weight_axis,
            block_size=q.block_size,
            scale_rule=q.scale_rule,
            anchor=q.anchor if via_anchor else None,
        )

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """Return the input fake-quantized to the activation format, if one is set and a format is active."""
        q = self.quant
        if q.weight_format is None or q.act_format is None:
            return x
        return torch_quant.fake_quantize(
            x, q.act_format, axis=self.act_axis, block_size=q.block_size, scale_rule=q.scale_rule
        )

    def export_spec(self) -> dict[str, Any]:
        """Describe the quantization for the exporter.

        Returns:
            ``weight_axis``, ``block_size``, ``scale_rule``, ``anchor``,
            ``act_format`` (``None`` for fp32 activations), ``act_axis``, and
            also the active ``weight_format`` and the ``mode``.
        """
        q = self.quant
        return {
            "weight_axis": self.weight_axis,
            "block_size": q.block_size,
            "scale_rule": q.scale_rule,
            "anchor": q.anchor,
            "act_format": q.act_format,
            "act_axis": self.act_axis,
            "weight_format": q.weight_format,
            "mode": q.mode,
        }

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        q = self.quant
        return f"{base}, weight_format={q.weight_format}, act_format={q.act_format}, anchor={q.anchor}, mode={q.mode}"


class MXLinear(_MXLayer, nn.Linear):
    """``nn.Linear`` with an MX fake-quantized weight and, optionally, input."""

    act_axis: ClassVar[int] = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the linear layer with the active formats."""
        return nn.functional.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class MXConv2d(_MXLayer, nn.Conv2d):
    """``nn.Conv2d`` with an MX fake-quantized weight and, optionally, input."""

    act_axis: ClassVar[int] = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the convolution with the active formats."""
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


# Exact classes only: a subclass may bypass forward (nn.MultiheadAttention reads
# out_proj.weight directly), and swapping it would silently skip quantization.
SWAPPABLE: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: MXLinear, nn.Conv2d: MXConv2d}


def swap_module(module: nn.Module, quant: LayerQuant) -> nn.Module:
    """Return an MX version of ``module`` that shares its parameters, buffers and hooks."""
    mx_cls = SWAPPABLE[type(module)]
    swapped = mx_cls.__new__(mx_cls)
    # Sharing the attribute dict keeps Parameter identity, so an optimizer
    # built before the swap still updates the weights the layer uses.
    swapped.__dict__.update(module.__dict__)
    swapped.quant = quant
    return swapped
