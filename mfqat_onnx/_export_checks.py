"""Checks of a model and export settings, and the context that runs its layers in the anchor format.

Each check raises before the slow tracing step, so bad input never leaves a
half-written file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from mfqat_onnx import onnx_ops
from mfqat_onnx._export_errors import AnchorFormatError, ExportError, UnsupportedLayerError
from mfqat_onnx._export_fold import FoldedWeight
from mfqat_onnx._onnx_io import ModelFileError
from mfqat_onnx.formats import MXFormat, get_format
from mfqat_onnx.qat import LayerQuant, MXConv2d, MXLinear

logger = logging.getLogger(__name__)

ANCHOR_FORMATS = ("mxint8", "mxfp8_e4m3", "mxfp8_e5m2")
SUPPORTED_LAYERS = (MXLinear, MXConv2d)


def quantized_layers(model: nn.Module) -> list[tuple[str, MXLinear | MXConv2d]]:
    """Return the MX layers of ``model``, rejecting quantized layer types the exporter cannot store."""
    layers = []
    for name, module in model.named_modules():
        is_quantized = isinstance(module, SUPPORTED_LAYERS) or isinstance(
            getattr(module, "quant", None), LayerQuant
        )
        if not is_quantized:
            continue
        # Exact types only, because a subclass may quantize in a forward the exporter has never seen.
        if type(module) not in SUPPORTED_LAYERS:
            raise UnsupportedLayerError(
                f"layer {name!r} is a quantized {type(module).__name__}, which the exporter does not support; "
                f"supported quantized layers are {', '.join(c.__name__ for c in SUPPORTED_LAYERS)} as created "
                "by mfqat_onnx.qat.prepare"
            )
        layers.append((name, module))
    if not layers:
        raise ExportError(
            f"{type(model).__name__} has no quantized layers, so there is nothing to store in an MX format; "
            "call mfqat_onnx.qat.prepare(model, config) first"
        )
    return layers


def resolve_anchor(anchor: str | MXFormat | None, family: str, trained_anchor: str) -> MXFormat:
    """Check that ``anchor`` is an 8-bit format of ``family`` and return it (None means ``trained_anchor``)."""
    if anchor is None:
        anchor = trained_anchor
    try:
        fmt = get_format(anchor)
    except (ValueError, TypeError):
        raise AnchorFormatError(
            f"unknown anchor format {anchor!r}; the anchor is one of {', '.join(ANCHOR_FORMATS)} "
            "(lower formats come from mfqat_onnx.retarget)"
        ) from None
    if fmt.bits != 8:
        raise AnchorFormatError(
            f"the anchor must be an 8-bit format ({', '.join(ANCHOR_FORMATS)}), got {fmt.name} with "
            f"{fmt.bits}-bit elements; export in the 8-bit anchor and convert with mfqat_onnx.retarget"
        )
    if fmt.family != family:
        expected = [name for name in ANCHOR_FORMATS if get_format(name).family == family]
        raise AnchorFormatError(
            f"anchor {fmt.name} is in the {fmt.family} family, but the model was trained with {family}-family "
            f"formats; use {' or '.join(expected)}"
        )
    if fmt.name != trained_anchor:
        logger.warning(
            "exporting in %s although the model was trained with anchor %s; formats retargeted from this "
            "file differ from the via-anchor weights seen in training",
            fmt.name,
            trained_anchor,
        )
    return fmt


def common_setting(layers: list[tuple[str, MXLinear | MXConv2d]], field: str) -> str:
    """Return the value of ``field`` that every layer's ``quant`` shares."""
    values = {getattr(layer.quant, field) for _, layer in layers}
    if len(values) != 1:
        by_value = {v: [n for n, layer in layers if getattr(layer.quant, field) == v] for v in values}
        raise ExportError(
            f"the quantized layers use different {field} values {by_value}; an anchor file records one, "
            "so prepare all layers with one QuantConfig"
        )
    return values.pop()


def check_weight_dtypes(layers: list[tuple[str, MXLinear | MXConv2d]]) -> None:
    for name, layer in layers:
        if layer.weight.dtype != torch.float32:
            raise ExportError(
                f"layer {name!r} has a {layer.weight.dtype} weight, but quantized weights are exported from "
                "float32; convert the model with model.float() before exporting"
            )


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an integer such as {onnx_ops.DEFAULT_OPSET}, got {opset!r}")
    if opset < onnx_ops.DEFAULT_OPSET:
        raise ExportError(
            f"opset {opset} is too old: MX files need standard opset {onnx_ops.DEFAULT_OPSET} or newer "
            "(blocked quantization and IR version 10)"
        )
    return opset


@contextlib.contextmanager
def layers_in_anchor(
    model: nn.Module, layers: list[tuple[str, MXLinear | MXConv2d]], anchor: str
) -> Iterator[None]:
    """Run every MX layer in ``anchor`` (weights quantized straight to it) and the model in eval mode."""
    saved_quant = [(layer, layer.quant) for _, layer in layers]
    saved_modes = [(module, module.training) for module in model.modules()]
    try:
        for layer, quant in saved_quant:
            layer.quant = dataclasses.replace(quant, weight_format=anchor, anchor=anchor)
        model.eval()
        yield
    finally:
        for layer, quant in saved_quant:
            layer.quant = quant
        for module, training in saved_modes:
            module.training = training


def check_folder_writable(folder: Path) -> None:
    """Create and delete a file in ``folder``, so a read-only folder fails before the export runs."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ModelFileError(
            f"cannot write to output folder {str(folder)!r}: {error.strerror or error}; choose a writable folder"
        ) from None


def weight_layer_names(model: nn.Module, layers: list[tuple[str, MXLinear | MXConv2d]]) -> dict[str, str]:
    """Map every parameter name of each MX layer's weight to the layer's name.

    A tied weight has several names (``embed.weight`` and ``head.weight``), and
    the traced graph calls it by the first one, which may belong to another module.
    """
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {
        weight_name: layer_name
        for layer_name, layer in layers
        for weight_name in names.get(id(layer.weight), [f"{layer_name}.weight"])
    }


def warn_unfolded(layer_of_weight: dict[str, str], weights: list[FoldedWeight]) -> None:
    """Log each MX layer whose weight was not stored packed."""
    packed_layers = {layer_of_weight[w.name] for w in weights if w.name in layer_of_weight}
    for name in dict.fromkeys(layer_of_weight.values()):
        if name not in packed_layers:
            logger.warning(
                "layer %s has no packed weight in the file: the traced forward does not use it, or its weight "
                "is computed rather than stored, so it is quantized at run time if at all",
                name,
            )
