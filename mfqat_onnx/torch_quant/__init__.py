"""PyTorch MX fake quantization, bit-identical to the numpy reference in ``mfqat_onnx.numerics``.

``fake_quantize`` is the training-time round trip. It runs as the custom op
``mfqat::fake_quantize`` with a straight-through gradient. ``quantize_mx`` and
``dequantize_mx`` produce and consume unpacked codes and E8M0 scale bytes.
"""

from mfqat_onnx.torch_quant._mx import dequantize_mx, quantize_mx
from mfqat_onnx.torch_quant._op import fake_quantize
from mfqat_onnx.torch_quant._scale import SCALE_RULES

__all__ = ["SCALE_RULES", "dequantize_mx", "fake_quantize", "quantize_mx"]
