"""Multi-format quantization-aware training and elastic MX inference with ONNX."""

from mfqat_onnx.formats import MXFormat, get_format, list_formats

__version__ = "0.1.0"

__all__ = ["MXFormat", "__version__", "get_format", "list_formats"]
