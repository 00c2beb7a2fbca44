"""Evaluate a checkpoint in fp32 and in every MX format of its family (PyTorch fake-quant).

Usage::

    python -m mfqat_onnx.evaluate runs/digits
    python -m mfqat_onnx.evaluate runs/digits --formats mxint4,mxint2 --json runs/digits/eval.json

A quantized checkpoint is evaluated with its own settings (mode, anchor, scale
rule), optionally with ``--mode`` overridden. An fp32 checkpoint is evaluated
by post-training quantization (direct, the family's 8-bit anchor) in each
requested format.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mfqat_onnx.formats import family_formats, get_format
from mfqat_onnx.qat import QuantConfig, load_checkpoint, ptq, quantized_modules, set_format
from mfqat_onnx.qat._config import MODES, canonical_format
from mfqat_onnx.qat._files import write_json_atomic

logger = logging.getLogger(__name__)

FP32 = "fp32"


def default_formats(config: QuantConfig | None) -> list[str]:
    """Return the OCP formats of the config's family, widest first, plus any trained extension format."""
    if config is None:
        return []
    names = [f.name for f in family_formats(config.family, include_extensions=False)]
    extra = [f for f in config.formats if f not in names]
    return sorted([*names, *extra], key=lambda name: -get_format(name).bits)


def evaluate_formats(
    model: nn.Module,
    config: QuantConfig | None,
    evaluate: Any,
    eval_data: Any,
    formats: Sequence[str],
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Return one row per format, fp32 first: ``{"format", "bits", "trained", "method", **metrics}``.

    A model with MX layers is switched between formats with ``set_format`` and
    ends at its widest trained format. An fp32 model (``config`` is ``None``)
    is post-training quantized per format and left unchanged.
    """
    trained = set(config.formats) if config is not None else set()
    has_layers = next(quantized_modules(model), None) is not None
    rows = []
    for name in tqdm([FP32, *formats], desc="evaluate", disable=not progress, leave=False):
        if name == FP32:
            set_format(model, None)
            metrics, method, bits = evaluate(model, eval_data), "fp32", 32
        elif has_layers:
            set_format(model, name)
            method = "qat" if name in trained else f"untrained ({config.mode if config else 'direct'})"
            metrics, bits = evaluate(model, eval_data), get_format(name).bits
        else:
            metrics, method, bits = evaluate(ptq(model, name), eval_data), "ptq (direct)", get_format(name).bits
        rows.append({"format": name, "bits": bits, "method": method, **metrics})
    if has_layers:
        set_format(model, config.widest_format() if config is not None else None)
    return rows


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Render ``rows`` as a plain-text table with the given columns (floats with 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Return the metric names of ``rows`` in first-seen order."""
    fixed = {"format", "bits", "method"}
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in fixed and k not in columns]
    return columns


def parse_formats(text: str) -> list[str]:
    """Parse a comma-separated format list into canonical names.

    Raises:
        argparse.ArgumentTypeError: A name is unknown or the list is empty.
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of formats such as mxint4,mxint8")
    try:
        return [canonical_format(name) for name in names]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m mfqat_onnx.evaluate",
        description="Print a checkpoint's metric in fp32 and in each MX format of its family.",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder written by python -m mfqat_onnx.train")
    parser.add_argument(
        "--formats",
        type=parse_formats,
        help="comma-separated formats to evaluate (default: the OCP formats of the checkpoint's family; "
        "required for an fp32 checkpoint, which is then post-training quantized)",
    )
    parser.add_argument("--mode", choices=MODES, help="override the checkpoint's quantization mode")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1; got {args.threads}")
    torch.set_num_threads(args.threads)

    from models import get_workload

    try:
        model, config, info = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if config is not None and args.mode is not None and args.mode != config.mode:
        for _, layer in quantized_modules(model):
            layer.quant.mode = args.mode
        config = QuantConfig.from_dict({**config.to_dict(), "mode": args.mode})
    formats = args.formats if args.formats is not None else default_formats(config)
    if config is not None and config.mode == "via_anchor":
        foreign = [f for f in formats if get_format(f).family != config.family]
        if foreign:
            parser.error(
                f"formats {', '.join(foreign)} are outside the {config.family} family of the anchor "
                f"{config.anchor}; pass --mode direct to quantize the fp32 weights to them instead"
            )

    workload = get_workload(info["model"])
    data = workload.load_data()
    rows = evaluate_formats(model, config, workload.evaluate, data.eval, formats, progress=not args.no_progress)

    columns = ["format", "bits", "method", *metric_columns(rows)]
    print(f"{info['model']} checkpoint {args.checkpoint} ({workload.metric}, "
          f"{'higher' if workload.higher_is_better else 'lower'} is better)")
    print(format_table(rows, columns))
    if args.json is not None:
        write_json_atomic(
            args.json,
            {
                "checkpoint": str(args.checkpoint),
                "model": info["model"],
                "metric": workload.metric,
                "higher_is_better": workload.higher_is_better,
                "quant_config": None if config is None else config.to_dict(),
                "results": rows,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
