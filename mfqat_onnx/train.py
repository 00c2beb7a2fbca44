"""Train a reference workload with (multi-format) QAT and write a checkpoint folder.

Usage::

    python -m mfqat_onnx.train --model digits-cnn --formats mxint2,mxint4,mxint6,mxint8 --anchor mxint8 -o runs/digits
    python -m mfqat_onnx.train --model tiny-lm --formats none -o runs/lm-fp32      # fp32 baseline
    torchrun --nproc_per_node 2 -m mfqat_onnx.train --model digits-cnn --formats mxint4 -o runs/d2

Unset options come from the workload's recipe: its fine-tuning recipe with
``--init-from`` (or for a pretrained workload), its training recipe otherwise.
Under ``torchrun`` every process trains its shard of the data (gloo backend)
and rank 0 writes the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mfqat_onnx.evaluate import evaluate_formats, format_table, metric_columns
from mfqat_onnx.qat import QuantConfig, fit, prepare, read_checkpoint_info, save_checkpoint
from mfqat_onnx.qat._checkpoint import WEIGHTS_FILE
from mfqat_onnx.qat._config import MODES, SCALE_RULES, SCHEDULES
from mfqat_onnx.qat._distributed import barrier, is_main_process, shutdown_distributed

if TYPE_CHECKING:
    from models import Workload

logger = logging.getLogger(__name__)

FP32_NAMES = ("none", "fp32")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    from models import list_workloads

    parser = argparse.ArgumentParser(
        prog="python -m mfqat_onnx.train",
        description="Train a reference workload with multi-format QAT and save a checkpoint folder.",
    )
    parser.add_argument("--model", required=True, help=f"workload name: {', '.join(list_workloads())}")
    parser.add_argument(
        "--formats",
        required=True,
        help="comma-separated weight formats trained together, e.g. mxint2,mxint4,mxint6,mxint8; "
        "one format is single-format QAT; 'none' trains in fp32",
    )
    parser.add_argument("--anchor", help="8-bit export format, mxint8 or mxfp8 (default: the family's 8-bit format)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="sample", help="format schedule (default: sample)")
    parser.add_argument("--mode", choices=MODES, default="via_anchor", help="quantization path (default: via_anchor)")
    parser.add_argument("--scale-rule", choices=SCALE_RULES, default="floor", help="shared-exponent rule (default: floor)")
    parser.add_argument("--block-size", type=int, default=32, help="elements per shared scale (default: 32)")
    parser.add_argument("--act-format", help="also quantize layer inputs to this format (default: fp32 inputs)")
    parser.add_argument(
        "--quantize-first-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize the first and last quantizable layers too (default: the workload's choice)",
    )
    parser.add_argument("--include", action="append", metavar="GLOB", help="quantize only matching layer names")
    parser.add_argument("--exclude", action="append", metavar="GLOB", help="keep matching layer names in fp32")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: from the workload's recipe)")
    parser.add_argument("--batch-size", type=int, help="examples per step over all processes")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialization, data order and format draws")
    parser.add_argument("--init-from", type=Path, metavar="DIR", help="start from the weights of this checkpoint")
    parser.add_argument("-o", "--output", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--force", action="store_true", help="write into an existing non-empty output folder")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after training")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def make_config(args: argparse.Namespace, quant_defaults: dict[str, Any]) -> QuantConfig | None:
    """Build the quantization config of the command line, or ``None`` for fp32 training.

    Raises:
        ValueError: The formats, anchor or another setting is invalid.
    """
    formats = [part.strip() for part in args.formats.split(",") if part.strip()]
    if [f.lower() for f in formats] in ([name] for name in FP32_NAMES):
        if args.act_format is not None:
            raise ValueError("--act-format needs quantized weights; drop it or give --formats")
        return None
    if any(f.lower() in FP32_NAMES for f in formats):
        raise ValueError("--formats none trains in fp32 and cannot be combined with MX formats")
    fields: dict[str, Any] = {**quant_defaults}
    fields.update(
        formats=formats,
        anchor=args.anchor,
        schedule=args.schedule,
        mode=args.mode,
        scale_rule=args.scale_rule,
        block_size=args.block_size,
        act_format=args.act_format,
    )
    if args.quantize_first_last is not None:
        fields["quantize_first_last"] = args.quantize_first_last
    if args.include:
        fields["include"] = args.include
    if args.exclude:
        fields["exclude"] = args.exclude
    return QuantConfig(**fields)


def check_output(path: Path, force: bool) -> None:
    """Reject an output path that is a file, or a non-empty folder without ``force``."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {path} exists and is not a folder; choose a folder path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ValueError(f"output folder {path} exists and is not empty; pass --force to overwrite or choose another")


def build_initial_model(workload: Workload, init_from: Path | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the fp32 model, with the weights of checkpoint ``init_from`` if given.

    Returns:
        The model and its builder arguments.

    Raises:
        ValueError: ``init_from`` contains another workload or weights that do not fit.
    """
    if init_from is None:
        return workload.build_model(**workload.model_kwargs), dict(workload.model_kwargs)
    info = read_checkpoint_info(init_from)
    if info["model"] != workload.name:
        raise ValueError(f"--init-from {init_from} contains a {info['model']} model, expected {workload.name}")
    model = workload.build_model(**info["model_kwargs"])
    state = torch.load(init_from / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"--init-from {init_from} does not fit the {workload.name} model: {err}") from None
    return model, info["model_kwargs"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from models import get_workload

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    # Validate everything before any training starts.
    try:
        workload = get_workload(args.model)
        config = make_config(args, dict(workload.quant_defaults))
        recipe = workload.recipe_for(args.init_from is not None)
        recipe = recipe.replace(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
        check_output(args.output, args.force)
        if args.seed < 0:
            raise ValueError(f"--seed must be non-negative; got {args.seed}")
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1; got {args.threads}")
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)

    # Build the model, optionally from earlier weights, then swap in MX layers.
    torch.manual_seed(args.seed)
    try:
        model, model_kwargs = build_initial_model(workload, args.init_from)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if config is not None:
        prepare(model, config)
    data = workload.load_data()

    label = "fp32" if config is None else ",".join(config.formats)
    if is_main_process():
        settings = "fp32" if config is None else (
            f"formats {label}, anchor {config.anchor}, schedule {config.schedule}, mode {config.mode}, "
            f"scale rule {config.scale_rule}"
        )
        print(f"training {args.model}: {settings}; {recipe.steps} steps, batch {recipe.batch_size}, lr {recipe.lr:g}")
    result = fit(
        model, workload.loss_fn, data.train, recipe, config, seed=args.seed,
        progress=not args.no_progress, desc=f"{args.model} {label}",
    )

    # Rank 0 evaluates and writes; the others wait so the job ends together.
    if is_main_process():
        rows = []
        if not args.no_eval:
            formats = [] if config is None else list(config.formats)
            rows = evaluate_formats(model, config, workload.evaluate, data.eval, formats, progress=False)
            print(format_table(rows, ["format", "bits", *metric_columns(rows)]))
        extra = {
            "recipe": dataclasses.asdict(recipe),
            "seed": args.seed,
            "init_from": None if args.init_from is None else str(args.init_from),
            "train_seconds": result.seconds,
            "format_counts": result.format_counts,
            "final_losses": result.final_losses(),
            "metrics": rows,
        }
        save_checkpoint(args.output, model, config, args.model, model_kwargs, extra)
        print(f"wrote {args.output}")
    barrier()
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
