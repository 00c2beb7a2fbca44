"""Retarget an anchor ONNX model to a lower MX format by Slice-and-Scale.

Command line::

    python -m mfqat_onnx.retarget model.onnx --format mxfp4 [-o out.onnx] [--force] [--all]
        [--layers PATTERN=FORMAT ...] [--activations FORMAT] [--allow-lowbit-source]

Python::

    new_model, report = retarget_model(onnx.load("model.onnx"), "mxfp4")
    path, report = retarget_file("model.onnx", "mxint4")  # writes model.mxint4.onnx

The anchor stores every weight once in an 8-bit MX format. Within its family
(MXINT8 to MXINT7..2, MXFP8 to MXFP6/MXFP4) the codes and scale bytes are
converted directly (Slice-and-Scale), which equals re-quantizing the decoded
anchor with the floor rule bit for bit. Across families the decoded anchor is
re-quantized, and the report records that method per layer. Targets with more bits than the stored
codes are rejected, and so are files already derived from an anchor, because
rounding twice loses accuracy (``allow_requantize_lowbit`` overrides that).
"""

from __future__ import annotations

from mfqat_onnx._retarget_api import anchor_format_of, default_output_path, retarget_file, retarget_model
from mfqat_onnx._retarget_cli import main
from mfqat_onnx._retarget_report import (
    ActivationChange,
    AnchorMetadataError,
    DerivedSourceError,
    LayerChange,
    PrecisionError,
    RetargetError,
    RetargetReport,
    SkippedLayer,
    UnknownTargetError,
)
from mfqat_onnx._retarget_rewrite import describe_targets

__all__ = [
    "ActivationChange",
    "AnchorMetadataError",
    "DerivedSourceError",
    "LayerChange",
    "PrecisionError",
    "RetargetError",
    "RetargetReport",
    "SkippedLayer",
    "UnknownTargetError",
    "anchor_format_of",
    "default_output_path",
    "describe_targets",
    "main",
    "retarget_file",
    "retarget_model",
]

if __name__ == "__main__":
    raise SystemExit(main())
