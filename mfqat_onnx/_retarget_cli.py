"""Command line of ``python -m mfqat_onnx.retarget``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import onnx

from mfqat_onnx import _onnx_io
from mfqat_onnx._onnx_io import DERIVED_FROM_KEY
from mfqat_onnx._retarget_api import (
    anchor_format_of,
    default_output_path,
    retarget_file,
    retarget_model,
    weights_metadata,
)
from mfqat_onnx._retarget_report import DerivedSourceError, RetargetReport
from mfqat_onnx.formats import MXFormat, family_formats, get_format

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the retarget command."""
    parser = argparse.ArgumentParser(
        prog="python -m mfqat_onnx.retarget",
        description=(
            "Convert the MX weights of an anchor ONNX model to a lower MX format by Slice-and-Scale "
            "(decode and re-quantize across families) and write a new model file."
        ),
    )
    parser.add_argument("model", help="anchor model (.onnx) written by mfqat_onnx.export")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--format", dest="target", metavar="FORMAT", help="target MX format, e.g. mxfp4 or mxint4"
    )
    choice.add_argument(
        "--all",
        action="store_true",
        help="write one file per lower format of the anchor's family",
    )
    parser.add_argument(
        "-o",
        "--output",
        help="output file (default: <model>.<format>.onnx beside the input); with --all, an existing folder",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing output files (never the input)"
    )
    parser.add_argument(
        "--layers",
        action="append",
        default=[],
        metavar="PATTERN=FORMAT",
        help="mixed precision: weights whose name matches the glob PATTERN get FORMAT; repeat the option "
        "for several patterns (first match wins)",
    )
    parser.add_argument("--activations", metavar="FORMAT", help="format of the activation quantizers")
    parser.add_argument(
        "--allow-lowbit-source",
        action="store_true",
        help="convert a model that is no longer in its anchor format (rounds twice, loses accuracy)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also list every converted and skipped layer"
    )
    return parser


def _parse_layers(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, str]:
    layers: dict[str, str] = {}
    for item in items:
        pattern, sep, fmt = item.rpartition("=")
        if not sep or not pattern or not fmt:
            parser.error(f"--layers expects PATTERN=FORMAT, got {item!r}")
        layers[pattern] = fmt
    return layers


def _files_size(paths: Sequence[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


def _print_table(rows: list[dict[str, str]]) -> None:
    columns = list(rows[0])
    widths = {col: max(len(col), *(len(row[col]) for row in rows)) for col in columns}
    print("  ".join(col.ljust(widths[col]) for col in columns))
    print("  ".join("-" * widths[col] for col in columns))
    for row in rows:
        print("  ".join(row[col].ljust(widths[col]) for col in columns))


def _table_row(report: RetargetReport, out: Path, seconds: float) -> dict[str, str]:
    bytes_before = _files_size(report.input_files)
    bytes_after = _files_size(report.output_files)
    # With --layers the weights can end up in several formats, none of them the --format one.
    formats = sorted({change.new_format for change in report.converted})
    format_label = report.target
    if len(formats) == 1:
        format_label = formats[0]
    elif formats:
        format_label = "mixed: " + ", ".join(formats)
    return {
        "format": format_label,
        "layers": f"{len(report.converted)}/{report.layer_count}",
        "method": ", ".join(report.methods) or "unchanged",
        "bytes before": f"{bytes_before:,}",
        "bytes after": f"{bytes_after:,}",
        "ratio": f"{bytes_after / bytes_before:.3f}" if bytes_before else "-",
        "seconds": f"{seconds:.2f}",
        "output": str(out),
    }


def _print_details(report: RetargetReport) -> None:
    for change in report.converted:
        print(
            f"  {change.name}: {change.old_format} -> {change.new_format} ({change.method}), "
            f"{change.bytes_before:,} -> {change.bytes_after:,} bytes"
        )
    for activation in report.activations:
        print(f"  {activation.name}: activations {activation.old_format} -> {activation.new_format}")
    for skipped in report.skipped:
        print(f"  {skipped.name}: skipped, {skipped.reason}")


def _notes(report: RetargetReport) -> list[str]:
    requantized = report.requantized
    if not requantized:
        return []
    pairs = sorted({f"{c.old_format} -> {c.new_format}" for c in requantized})
    return [
        f"note: {len(requantized)} layer(s) crossed families ({', '.join(pairs)}): decoded and re-quantized "
        "with the floor rule, not Slice-and-Scaled"
    ]


def _run_single(args: argparse.Namespace, layers: dict[str, str]) -> list[tuple[RetargetReport, Path, float]]:
    start = time.perf_counter()
    out, report = retarget_file(
        args.model,
        args.target,
        args.output,
        force=args.force,
        layers=layers,
        activations=args.activations,
        allow_requantize_lowbit=args.allow_lowbit_source,
        progress=True,
    )
    return [(report, out, time.perf_counter() - start)]


def _run_all(args: argparse.Namespace, layers: dict[str, str]) -> list[tuple[RetargetReport, Path, float]]:
    if layers:
        raise ValueError(
            "--layers sets formats per weight, which --all cannot apply; use --format with --layers"
        )
    if args.output is not None and not Path(args.output).is_dir():
        raise ValueError(f"with --all, -o/--output must be an existing folder, got {args.output!r}")
    in_path = Path(args.model)
    model, files = _onnx_io.load_model_with_files(in_path)
    anchor = anchor_format_of(model)
    stored = _stored_formats(model, anchor, in_path, allow_derived=args.allow_lowbit_source)
    lowest_bits = min(fmt.bits for fmt in stored)
    targets = [fmt for fmt in family_formats(anchor.family) if fmt.bits <= lowest_bits and fmt not in stored]

    # Check every output before converting anything, so a clash stops the run with nothing written.
    outputs = []
    for fmt in targets:
        out = default_output_path(in_path, fmt.name)
        outputs.append(Path(args.output) / out.name if args.output is not None else out)
    for out in outputs:
        _onnx_io.check_output_path(out, force=args.force, protected=files)

    results = []
    created: list[Path] = []
    try:
        for fmt, out in zip(targets, outputs, strict=True):
            start = time.perf_counter()
            new_model, report = retarget_model(
                model,
                fmt.name,
                activations=args.activations,
                allow_requantize_lowbit=args.allow_lowbit_source,
                progress=True,
            )
            existed = {p for p in (out, out.with_name(out.name + ".data")) if os.path.lexists(p)}
            report.input_files = files
            report.output_files = _onnx_io.save_model(new_model, out, force=args.force, protected=files)
            created += [p for p in report.output_files if p not in existed]
            del new_model
            results.append((report, out, time.perf_counter() - start))
    except BaseException:
        # An error part way leaves no partial set of new files behind.
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return results


def _stored_formats(
    model: onnx.ModelProto, anchor: MXFormat, path: Path, *, allow_derived: bool
) -> set[MXFormat]:
    """Return the formats the weights are stored in; raise DerivedSourceError for a derived file unless allowed.

    ``--all`` writes every other format of the family with no more bits than
    the fewest-bit stored format. For an anchor file that is every format up
    to the anchor's width.
    """
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    if DERIVED_FROM_KEY not in metadata:
        return {anchor}
    stored = {get_format(name) for name in weights_metadata(metadata).values()} or {anchor}
    if not allow_derived:
        raise DerivedSourceError(
            f"{str(path)!r} was retargeted from the {anchor.name} anchor (weights in "
            f"{', '.join(sorted(f.name for f in stored))}); --all converts an anchor file, so run it on the "
            "anchor, or pass --allow-lowbit-source to convert these weights again (rounding twice)"
        )
    return stored


def main(argv: Sequence[str] | None = None) -> int:
    """Run the retarget command; return the process exit code (2 on any error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    layers = _parse_layers(parser, args.layers)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    try:
        results = _run_all(args, layers) if args.all else _run_single(args, layers)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not results:
        print(f"{args.model}: no lower format in the anchor's family; nothing written")
        return 0

    print(f"{args.model}: anchor format {results[0][0].anchor_format}")
    _print_table([_table_row(report, out, seconds) for report, out, seconds in results])
    for report, _, _ in results:
        for note in _notes(report):
            print(note)
        if args.verbose:
            print(f"{report.target}:")
            _print_details(report)
    return 0
