"""Trace a PyTorch model to ONNX, lowering ``mfqat::fake_quantize`` to ``MXQuantize -> MXDequantize``.

``torch.onnx.export(dynamo=True)`` captures the model with ``torch.export``, in
which the fake-quant custom op stays one opaque node. A custom translation
turns each such node into the ``mfqat`` pair with the same format, axis, block
size and scale rule, so the traced graph computes what the PyTorch model
computes. The weight pairs are folded into packed initializers afterwards (see
``_export_fold``); the activation pairs stay.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import onnx_ir as ir
import torch
from onnxscript.values import Opset
from torch import nn

from mfqat_onnx import onnx_ops
from mfqat_onnx._export_errors import ExportError

logger = logging.getLogger(__name__)

_MFQAT = Opset(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION)


def _translate_fake_quantize(
    x: Any, fmt: str, axis: int, block_size: int, scale_rule: str, anchor: str | None
) -> Any:
    """Emit ``MXQuantize -> MXDequantize`` for one ``mfqat::fake_quantize`` call.

    The parameter names match the custom op's schema, because the exporter
    passes the op's arguments by name.
    """
    if anchor is not None:
        # The exporter sets every layer to the anchor format before tracing, so a
        # Slice-and-Scale from another anchor here means a layer escaped that.
        raise ExportError(
            f"a fake-quant node converts {anchor} to {fmt} by Slice-and-Scale; the exported graph "
            "stores weights in the anchor format, so every quantized layer must run in it"
        )
    rank = len(x.shape)
    axis_length = x.shape[axis % rank]
    if not isinstance(axis_length, int):
        raise ExportError(
            f"a tensor of shape {x.shape} is quantized along axis {axis}, whose length {axis_length} is "
            "dynamic; MX blocks need a fixed length along the blocked axis, so keep that axis static"
        )
    codes, scales = _MFQAT.MXQuantize(x, format=fmt, axis=axis, block_size=block_size, scale_rule=scale_rule)
    return _MFQAT.MXDequantize(
        codes,
        scales,
        format=fmt,
        axis=axis,
        block_size=block_size,
        axis_length=axis_length,
        scale_rule=scale_rule,
    )


def dynamic_shapes_from_axes(
    input_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]]
) -> tuple[dict[int, torch.export.Dim], ...]:
    """Turn ``{input: {axis: name}}`` into ``torch.export`` dynamic shapes, one dict per input.

    Axes that share a name share one ``torch.export.Dim``, so the exported
    graph records that, for example, ``input_ids`` and ``attention_mask`` have the
    same sequence length. Output axes need no entry: they follow the inputs.
    """
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    for input_name in input_names:
        axes = dynamic_axes.get(input_name, {})
        shapes.append({axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in axes.items()})
    return tuple(shapes)


def _export_error_in_chain(error: BaseException) -> ExportError | None:
    """Return an ``ExportError`` raised inside the exporter, which wraps it in its own errors."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ExportError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence exporter messages that carry no information about the user's model.

    torch 2.13 logs one warning per torchvision op it cannot register when
    torchvision is missing, and warns that ``LeafSpec`` is deprecated while
    it pickles its own tree specs.
    """
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def trace_model(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    opset: int,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_shapes: Any,
) -> ir.Model:
    """Export ``model`` with the dynamo exporter and return the optimized ONNX IR model.

    Raises:
        ExportError: ``torch.export`` or the ONNX translation failed; the
            message carries the exporter's first line and the cause is chained.
    """
    onnx_ops.register_schemas()
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                model,
                example_inputs,
                dynamo=True,
                opset_version=opset,
                input_names=list(input_names) if input_names is not None else None,
                output_names=list(output_names) if output_names is not None else None,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table={torch.ops.mfqat.fake_quantize.default: _translate_fake_quantize},
                optimize=True,
                verbose=False,
            )
    except Exception as error:
        ours = _export_error_in_chain(error)
        if ours is not None:
            raise ours from None
        summary = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(
            f"torch.onnx.export could not trace {type(model).__name__}: {summary}; check that the example "
            "inputs run through the model and that dynamic_shapes matches them"
        ) from error

    ir_model = program.model
    standard = ir_model.opset_imports.get("", ir_model.opset_imports.get("ai.onnx"))
    if standard != opset:
        raise ExportError(
            f"the exporter wrote standard opset {standard} instead of the requested {opset}; "
            f"export with opset {onnx_ops.DEFAULT_OPSET}, which torch {torch.__version__} converts to"
        )
    logger.debug("traced %s: %d nodes, opset %s", type(model).__name__, len(ir_model.graph), standard)
    return ir_model
