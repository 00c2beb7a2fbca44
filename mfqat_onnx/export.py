"""Export a QAT model to an anchor ONNX file: ``python -m mfqat_onnx.export``.

The anchor file stores every quantized weight once, packed, in an 8-bit MX
format (``mxint8``, ``mxfp8_e4m3`` or ``mxfp8_e5m2``), as laid out in
``docs/format.md``:

1. Every ``MXLinear`` / ``MXConv2d`` layer is set to the anchor format for the
   duration of the export, so each weight runs through ``fake_quantize(w,
   anchor)`` and each quantized input through ``fake_quantize(x,
   act_format)``. The layers' settings and train/eval modes are restored
   afterwards.
2. ``torch.onnx.export(dynamo=True)`` traces the model; a custom translation
   turns each ``mfqat::fake_quantize`` node into ``MXQuantize ->
   MXDequantize`` with the same format, axis, block size and scale rule.
   Standard opset 21 is the default; the exporter writes ops of opset 18 and
   converts them.
3. Every ``MXQuantize`` of a constant weight ``W`` is folded into the
   initializers ``W.mx_codes`` (packed codes) and ``W.mx_scales`` (E8M0
   bytes), computed by the numpy reference from the latent fp32 weight, so
   the codes are exactly ``numerics.quantize(W, anchor)``. ``MXDequantize``
   then feeds the MatMul / Gemm / Conv. Activation pairs stay in the graph.
4. The model-local function bodies of both operators are attached, so plain
   ONNX Runtime runs the file, and the metadata records
   ``mfqat.anchor_format``, ``mfqat.scale_rule``, ``mfqat.producer_version``
   and ``mfqat.weights`` (JSON: weight name -> format).
5. The file is checked with ``onnx.checker.check_model(full_check=True)`` and
   written atomically; past 2 GiB the tensors go to ``<file>.data`` beside it.

Via-anchor layers trained lower formats as Slice-and-Scale of this anchor
quantization, so ``python -m mfqat_onnx.retarget`` later reproduces them from
the file alone. Batch and sequence axes stay dynamic when ``dynamic_shapes``
marks them. The axis an activation is blocked along must be static.

Example::

    python -m mfqat_onnx.export --checkpoint runs/digits --anchor mxint8 -o digits.mxint8.onnx
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
from torch import nn
from tqdm.auto import tqdm

from mfqat_onnx import onnx_ops
from mfqat_onnx._export_checks import (
    ANCHOR_FORMATS,
    check_folder_writable,
    check_opset,
    check_weight_dtypes,
    common_setting,
    layers_in_anchor,
    quantized_layers,
    resolve_anchor,
    warn_unfolded,
    weight_layer_names,
)
from mfqat_onnx._export_errors import AnchorFormatError, CheckpointError, ExportError, UnsupportedLayerError
from mfqat_onnx._export_fold import FoldedWeight, fold_weight_quantizers
from mfqat_onnx._export_graph import (
    activation_quantizers,
    other_initializer_bytes,
    strip_trace_metadata,
    write_metadata,
)
from mfqat_onnx._export_report import ExportReport
from mfqat_onnx._export_trace import dynamic_shapes_from_axes, trace_model
from mfqat_onnx._onnx_io import ModelFileError, check_output_path, save_model
from mfqat_onnx.formats import MXFormat, get_format
from mfqat_onnx.qat import QuantConfig
from mfqat_onnx.qat import load_checkpoint as _load_checkpoint
from mfqat_onnx.qat import read_checkpoint_info as _read_checkpoint_info

__all__ = [
    "ANCHOR_FORMATS",
    "AnchorFormatError",
    "CheckpointError",
    "ExportError",
    "ExportReport",
    "FoldedWeight",
    "UnsupportedLayerError",
    "dynamic_shapes_from_axes",
    "export_checkpoint",
    "export_model",
    "export_workload",
    "main",
]

logger = logging.getLogger(__name__)

# torch.export specializes sizes 0 and 1, so 2 is the smallest example size that stays symbolic.
DEFAULT_EXAMPLE_BATCH = 2


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tensor or a tuple of the model's positional inputs, got "
            f"{type(example_inputs).__name__}"
        )
    return example_inputs


def export_model(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    anchor: str | MXFormat | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes: Any = None,
    force: bool = False,
    opset: int = onnx_ops.DEFAULT_OPSET,
    protected: Sequence[str | Path] = (),
    external_data: bool | None = None,
    keep_debug_info: bool = False,
    progress: bool = False,
) -> ExportReport:
    """Export a model prepared with ``mfqat_onnx.qat.prepare`` to an anchor ONNX file.

    The model is left as it was: its layers' formats and train/eval modes are
    restored after tracing.

    Args:
        model: A float32 model holding ``MXLinear`` / ``MXConv2d`` layers.
        example_inputs: Positional inputs for tracing (a tensor or a tuple).
            Give dynamic axes a size of 2 or more, since ``torch.export``
            specializes sizes 0 and 1.
        path: Output ``.onnx`` file; its folder must exist.
        anchor: Storage format, an 8-bit format of the model's family. None
            means the anchor the layers were trained with.
        input_names: Names of the graph inputs.
        output_names: Names of the graph outputs.
        dynamic_shapes: ``torch.export`` dynamic shapes of the inputs, for
            example ``({0: torch.export.Dim("batch")},)``; None keeps every
            shape static.
        force: Replace an existing output file.
        opset: Standard ONNX opset, 21 or newer.
        protected: Paths the output must never replace (such as the checkpoint).
        external_data: Store tensors of 1 KiB or more in ``<file>.data`` beside
            the model. None does so only when the file would pass the 2 GiB
            protobuf limit.
        keep_debug_info: Keep each node's module path and the types of
            intermediate values (about 200 bytes per node), which help when
            reading the graph in a viewer.
        progress: Show a tqdm progress bar.

    Returns:
        What was written, with per-weight sizes.

    Raises:
        TypeError: ``model`` is not a module or ``example_inputs`` is not a
            tensor or tuple.
        ExportError: No quantized layers, mixed anchors or scale rules, an old
            opset, a non-float32 weight, or tracing failed.
        AnchorFormatError: The anchor is unknown, not 8-bit, or of another family.
        UnsupportedLayerError: A quantized layer type the exporter cannot store.
        mfqat_onnx._onnx_io.ModelFileError: The output folder is missing or
            not writable, or the output exists and ``force`` is off.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    layers = quantized_layers(model)
    trained_anchor = common_setting(layers, "anchor")
    anchor_fmt = resolve_anchor(anchor, get_format(trained_anchor).family, trained_anchor)
    scale_rule = common_setting(layers, "scale_rule")
    check_weight_dtypes(layers)
    opset = check_opset(opset)
    out_path = check_output_path(path, force=force, protected=protected)
    check_folder_writable(out_path.parent)

    # Progress steps: tracing, one per weight, writing.
    bar = tqdm(
        total=len(layers) + 2,
        desc=f"export {anchor_fmt.name}",
        unit="step",
        disable=not progress,
        leave=False,
    )
    try:
        # Trace with every layer in the anchor format.
        bar.set_postfix_str("tracing")
        with layers_in_anchor(model, layers, anchor_fmt.name):
            ir_model = trace_model(
                model,
                inputs,
                opset=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
            )
        bar.update()

        # Pack the weights with the numpy reference.
        bar.set_postfix_str("packing weights")
        weights = fold_weight_quantizers(ir_model.graph, on_weight=lambda _: bar.update())
        layer_of_weight = weight_layer_names(model, layers)
        warn_unfolded(layer_of_weight, weights)

        # Functions, metadata, check and save.
        bar.set_postfix_str("checking and writing")
        strip_trace_metadata(ir_model.graph, keep_debug_info=keep_debug_info)
        onnx_ops.attach_functions(ir_model)
        write_metadata(ir_model, anchor_fmt.name, scale_rule, weights)
        activations = activation_quantizers(ir_model.graph)
        other_bytes = other_initializer_bytes(ir_model.graph, weights)
        # NOTE: the whole model is serialized to one in-memory protobuf before the tensors move to
        # external data. That path is tested with small models only, never with one past 2 GiB.
        files = save_model(
            ir.serde.serialize_model(ir_model),
            out_path,
            force=force,
            protected=protected,
            external_data=external_data,
        )
        bar.update(bar.total - bar.n)
    finally:
        bar.close()

    report = ExportReport(
        files=tuple(files),
        anchor_format=anchor_fmt.name,
        scale_rule=scale_rule,
        opset=opset,
        weights=tuple(weights),
        layer_names=tuple(layer_of_weight.get(w.name, w.name) for w in weights),
        activation_quantizers=activations,
        other_initializer_bytes=other_bytes,
        file_bytes=sum(p.stat().st_size for p in files),
    )
    logger.info(
        "exported %d weights in %s to %s (%d bytes)",
        len(weights),
        anchor_fmt.name,
        out_path,
        report.file_bytes,
    )
    return report


# ---------------------------------------------------------------------------
# Checkpoints


def _load(checkpoint: Path) -> tuple[nn.Module, QuantConfig, dict[str, Any]]:
    """Rebuild the model of a checkpoint folder, turning every failure into a ``CheckpointError``."""
    from models import get_workload

    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint folder {str(checkpoint)!r} not found")
    if not checkpoint.is_dir():
        raise CheckpointError(
            f"checkpoint path {str(checkpoint)!r} is not a folder; give the training output folder"
        )
    try:
        info = _read_checkpoint_info(checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise CheckpointError(
            f"{str(checkpoint)!r} is not an mfqat_onnx checkpoint folder: {error}"
        ) from None

    model_name = info.get("model")
    try:
        get_workload(model_name)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} names {error}") from None
    if info.get("quant_config") is None:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} contains an fp32 {model_name} model with no quantization config; "
            "export a checkpoint trained with QAT (python -m mfqat_onnx.train with --formats)"
        )
    try:
        model, config, info = _load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"cannot rebuild the model of checkpoint {str(checkpoint)!r}: {error}"
        ) from None
    assert config is not None  # checked through info["quant_config"] above
    return model, config, info


def export_workload(
    model: nn.Module,
    workload: Any,
    path: str | Path,
    *,
    anchor: str | MXFormat | None = None,
    force: bool = False,
    opset: int = onnx_ops.DEFAULT_OPSET,
    example_batch: int = DEFAULT_EXAMPLE_BATCH,
    example_seq: int | None = None,
    dynamic: bool = True,
    protected: Sequence[str | Path] = (),
    keep_debug_info: bool = False,
    progress: bool = False,
) -> ExportReport:
    """Export a prepared model of a reference workload (``models.get_workload``) to an anchor file.

    The workload supplies the example inputs, the input and output names and
    the dynamic axes. Other arguments are those of `export_model` and
    `export_checkpoint`.
    """
    if example_seq is None:
        inputs = workload.example_inputs(example_batch)
    else:
        inputs = workload.example_inputs(example_batch, example_seq)
    dynamic_shapes = dynamic_shapes_from_axes(workload.input_names, workload.dynamic_axes) if dynamic else None
    return export_model(
        model,
        inputs,
        path,
        anchor=anchor,
        input_names=workload.input_names,
        output_names=workload.output_names,
        dynamic_shapes=dynamic_shapes,
        force=force,
        opset=opset,
        protected=protected,
        keep_debug_info=keep_debug_info,
        progress=progress,
    )


def export_checkpoint(
    checkpoint: str | Path,
    path: str | Path,
    *,
    anchor: str | MXFormat | None = None,
    force: bool = False,
    opset: int = onnx_ops.DEFAULT_OPSET,
    example_batch: int = DEFAULT_EXAMPLE_BATCH,
    example_seq: int | None = None,
    dynamic: bool = True,
    keep_debug_info: bool = False,
    progress: bool = False,
) -> ExportReport:
    """Export a checkpoint folder written by ``mfqat_onnx.qat.save_checkpoint``.

    The workload named in the checkpoint supplies the example inputs, the
    input and output names and the dynamic axes (batch, and sequence where
    the model has one).

    Args:
        checkpoint: The checkpoint folder.
        path: Output ``.onnx`` file.
        anchor: Storage format; None means the checkpoint's anchor.
        force: Replace an existing output file.
        opset: Standard ONNX opset, 21 or newer.
        example_batch: Batch size of the tracing inputs (2 or more keeps it dynamic).
        example_seq: Sequence length of the tracing inputs; None uses the
            workload's default.
        dynamic: Keep the workload's dynamic axes dynamic; False fixes every
            shape to the example inputs.
        keep_debug_info: See `export_model`.
        progress: Show a tqdm progress bar.

    Raises:
        CheckpointError: The folder is missing, not a checkpoint, names an
            unknown model, contains an fp32 model, or its weights do not load.
        ExportError: See `export_model`, which raises the other errors.
    """
    checkpoint = Path(checkpoint)
    model, config, info = _load(checkpoint)

    from models import get_workload

    workload = get_workload(info["model"])
    protected = [checkpoint / name for name in (info.get("weights_file", "checkpoint.pt"), "config.json")]
    try:
        return export_workload(
            model,
            workload,
            path,
            anchor=anchor,
            force=force,
            opset=opset,
            example_batch=example_batch,
            example_seq=example_seq,
            dynamic=dynamic,
            protected=protected,
            keep_debug_info=keep_debug_info,
            progress=progress,
        )
    except AnchorFormatError as error:
        # The anchor is checked before tracing; name the checkpoint's formats in the message.
        raise AnchorFormatError(
            f"checkpoint {str(checkpoint)!r} (formats {', '.join(config.formats)}): {error}"
        ) from None


# ---------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mfqat_onnx.export",
        description="Export a QAT checkpoint to an ONNX file whose weights are stored once, packed, in an "
        "8-bit MX anchor format.",
    )
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint folder written by training"
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="output .onnx file")
    parser.add_argument(
        "--anchor",
        help=f"storage format, one of {', '.join(ANCHOR_FORMATS)} in the checkpoint's family "
        "(default: the checkpoint's anchor)",
    )
    parser.add_argument("--force", action="store_true", help="replace the output file if it exists")
    parser.add_argument(
        "--opset",
        type=int,
        default=onnx_ops.DEFAULT_OPSET,
        help="standard ONNX opset, 21 or newer (default: 21)",
    )
    parser.add_argument(
        "--example-batch",
        type=_positive_int,
        default=DEFAULT_EXAMPLE_BATCH,
        help="batch size of the tracing inputs; 2 or more keeps the batch axis dynamic (default: 2)",
    )
    parser.add_argument(
        "--example-seq",
        type=_positive_int,
        help="sequence length of the tracing inputs (default: the workload's), for models with a sequence axis",
    )
    parser.add_argument(
        "--static-shapes", action="store_true", help="fix every input shape to the example inputs"
    )
    parser.add_argument(
        "--keep-debug-info",
        action="store_true",
        help="keep each node's module path and the types of intermediate values (about 200 bytes per node)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 on success, 2 on bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        report = export_checkpoint(
            args.checkpoint,
            args.output,
            anchor=args.anchor,
            force=args.force,
            opset=args.opset,
            example_batch=args.example_batch,
            example_seq=args.example_seq,
            dynamic=not args.static_shapes,
            keep_debug_info=args.keep_debug_info,
            progress=True,
        )
    except (ExportError, ModelFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {report.path}")
    print(report.format_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
