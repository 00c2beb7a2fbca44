"""Exceptions raised by ``mfqat_onnx.export``, one class per kind of bad input."""

from __future__ import annotations

__all__ = ["AnchorFormatError", "CheckpointError", "ExportError", "UnsupportedLayerError"]


class ExportError(ValueError):
    """The model or its settings cannot be exported to an anchor ONNX file."""


class CheckpointError(ExportError):
    """The checkpoint folder is missing, is not an mfqat_onnx checkpoint, or cannot be rebuilt."""


class AnchorFormatError(ExportError):
    """The requested anchor format is unknown, not 8-bit, or outside the model's format family."""


class UnsupportedLayerError(ExportError, TypeError):
    """The model contains a quantized layer type that the exporter cannot store as a packed weight."""
