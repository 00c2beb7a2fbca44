"""End-to-end demo on real data: ``python -m mfqat_onnx.demo`` (what ``make demo`` runs).

For each MX family the demo

1. trains ``digits-cnn`` (scikit-learn's 8x8 digits) once with MF-QAT over the
   family's formats, via the 8-bit anchor;
2. exports the MXINT8 or MXFP8 anchor ONNX file;
3. retargets the anchor to every lower format of the family by Slice-and-Scale;
4. runs every file in ONNX Runtime with the native kernel library and
   compares its test accuracy and predictions with the torch model evaluated
   in the same format, and its latency with the fp32 ONNX model.

It prints one table and writes it with a plot of accuracy against bits per
weight into the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mfqat_onnx._export_trace import quiet_exporter
from mfqat_onnx.formats import MXFormat, get_format

logger = logging.getLogger(__name__)

WORKLOAD = "digits-cnn"
BLOCK_SIZE = 32


@dataclasses.dataclass(frozen=True)
class FamilyPlan:
    """One MX family of the demo: what is trained and what is deployed."""

    family: str
    anchor: str
    trained: tuple[str, ...]
    deployed: tuple[str, ...]


PLANS = (
    FamilyPlan(
        family="int",
        anchor="mxint8",
        trained=("mxint2", "mxint4", "mxint6", "mxint8"),
        deployed=("mxint8", "mxint7", "mxint6", "mxint5", "mxint4", "mxint3", "mxint2"),
    ),
    FamilyPlan(
        family="fp",
        anchor="mxfp8_e4m3",
        trained=("mxfp4_e2m1", "mxfp6_e2m3", "mxfp8_e4m3"),
        deployed=("mxfp8_e4m3", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1"),
    ),
)


@dataclasses.dataclass
class Row:
    """One line of the demo table."""

    family: str
    format: str
    bits_per_weight: float
    file_bytes: int
    ort_accuracy: float
    torch_accuracy: float
    same_prediction: float
    latency_ratio: float
    path: str


def _bits_per_weight(fmt: MXFormat) -> float:
    return fmt.bits + 8 / BLOCK_SIZE


def _median_latency(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train(plan: FamilyPlan, workload, data, steps: int | None, seed: int, out: Path):
    from mfqat_onnx.qat import QuantConfig, fit, prepare, save_checkpoint

    torch.manual_seed(seed)
    model = workload.build_model()
    config = QuantConfig(
        formats=list(plan.trained), anchor=plan.anchor, schedule="sample", mode="via_anchor", block_size=BLOCK_SIZE
    )
    prepare(model, config)
    recipe = workload.recipe if steps is None else workload.recipe.replace(steps=steps)
    fit(model, workload.loss_fn, data.train, recipe, config, seed=seed, desc=f"MF-QAT {','.join(plan.trained)}")
    checkpoint = out / f"checkpoint-{plan.family}"
    save_checkpoint(checkpoint, model, config, WORKLOAD, {}, {"recipe": dataclasses.asdict(recipe), "seed": seed})
    return model, checkpoint


def _export_fp32(model: torch.nn.Module, workload, path: Path) -> None:
    """Export the latent fp32 weights as a plain ONNX model (the speed baseline)."""
    from mfqat_onnx.qat import set_format

    set_format(model, None)
    model.eval()
    plain = workload.build_model()
    plain.load_state_dict(model.state_dict())
    plain.eval()
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            plain,
            workload.example_inputs(2, 0),
            dynamo=True,
            input_names=list(workload.input_names),
            output_names=list(workload.output_names),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=21,
            verbose=False,
        )
    program.save(str(path))


def _torch_logits(model: torch.nn.Module, fmt: str | None, images: torch.Tensor) -> np.ndarray:
    from mfqat_onnx.qat import set_format

    set_format(model, fmt)
    model.eval()
    with torch.no_grad():
        return model(images).numpy()


def run_demo(out: Path, *, steps: int | None = None, seed: int = 0, repeats: int = 30, batch: int = 32) -> list[Row]:
    """Run the whole pipeline and return the table rows."""
    from mfqat_onnx.export import export_checkpoint
    from mfqat_onnx.retarget import retarget_file
    from mfqat_onnx.runtime import build_kernels, open_session
    from models import get_workload

    out.mkdir(parents=True, exist_ok=True)
    workload = get_workload(WORKLOAD)
    data = workload.load_data()
    images, labels = data.eval.tensors
    images_np = images.numpy()
    labels_np = labels.numpy()
    input_name = workload.input_names[0]
    timing_batch = {input_name: images_np[:batch]}

    print("Building the ONNX Runtime kernel library (cached after the first run) ...", flush=True)
    build_kernels()

    rows: list[Row] = []
    for plan in PLANS:
        model, checkpoint = _train(plan, workload, data, steps, seed, out)

        fp32_path = out / f"digits.{plan.family}.fp32.onnx"
        _export_fp32(model, workload, fp32_path)
        fp32_session = open_session(fp32_path, kernels="functions")
        fp32_latency = _median_latency(lambda s=fp32_session: s.run(None, timing_batch), repeats)
        (fp32_logits,) = fp32_session.run(None, {input_name: images_np})
        torch_fp32 = _torch_logits(model, None, images).argmax(-1)
        rows.append(
            Row(
                family=plan.family,
                format="fp32",
                bits_per_weight=32.0,
                file_bytes=fp32_path.stat().st_size,
                ort_accuracy=100.0 * float((fp32_logits.argmax(-1) == labels_np).mean()),
                torch_accuracy=100.0 * float((torch_fp32 == labels_np).mean()),
                same_prediction=100.0 * float((fp32_logits.argmax(-1) == torch_fp32).mean()),
                latency_ratio=1.0,
                path=str(fp32_path),
            )
        )

        anchor_path = out / f"digits.{get_format(plan.anchor).name}.onnx"
        export_checkpoint(checkpoint, anchor_path, anchor=plan.anchor, force=True)

        for name in tqdm(plan.deployed, desc=f"retarget and run ({plan.family})"):
            fmt = get_format(name)
            if fmt.name == get_format(plan.anchor).name:
                path = anchor_path
            else:
                path, _ = retarget_file(anchor_path, fmt.name, out / f"digits.{fmt.name}.onnx", force=True)
            session = open_session(path, kernels="native", prefer="memory")
            (ort_logits,) = session.run(None, {input_name: images_np})
            torch_logits = _torch_logits(model, fmt.name, images)
            latency = _median_latency(lambda s=session: s.run(None, timing_batch), repeats)
            ort_pred = ort_logits.argmax(-1)
            torch_pred = torch_logits.argmax(-1)
            rows.append(
                Row(
                    family=plan.family,
                    format=fmt.name,
                    bits_per_weight=_bits_per_weight(fmt),
                    file_bytes=path.stat().st_size,
                    ort_accuracy=100.0 * float((ort_pred == labels_np).mean()),
                    torch_accuracy=100.0 * float((torch_pred == labels_np).mean()),
                    same_prediction=100.0 * float((ort_pred == torch_pred).mean()),
                    latency_ratio=latency / fp32_latency,
                    path=str(path),
                )
            )
    return rows


TABLE_NOTE = (
    "ORT accuracy: the file in ONNX Runtime with the native kernels (weights kept packed). torch accuracy: the "
    "trained model evaluated in the same format in PyTorch. same prediction: share of test images on which both "
    "predict the same class. latency vs fp32: median time of a batch of 32 over the fp32 ONNX model of the same "
    "run (above 1 is slower), measured on whatever else the machine is doing."
)


def format_table(rows: Sequence[Row]) -> str:
    """Render the rows as a Markdown table."""
    lines = [
        "| family | format | bits/weight | file size | ORT accuracy | torch accuracy | same prediction | latency vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.family} | {row.format} | {row.bits_per_weight:.2f} | {row.file_bytes / 1024:.1f} KiB | "
            f"{row.ort_accuracy:.2f} % | {row.torch_accuracy:.2f} % | {row.same_prediction:.2f} % | "
            f"{row.latency_ratio:.2f}x |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> None:
    """Draw accuracy against bits per weight, one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # MXINT labels sit left of and below their points, MXFP labels right and above, so the two
    # families' labels at the same width do not cover each other.
    styles = (("int", "MXINT (anchor MXINT8)", -11, "right"), ("fp", "MXFP (anchor MXFP8 E4M3)", 5, "left"))
    for family, label, label_offset, align in styles:
        points = sorted((r.bits_per_weight, r.ort_accuracy, r.format) for r in rows if r.family == family and r.format != "fp32")
        if not points:
            continue
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        seen_x: dict[float, int] = {}
        for x, y, name in points:
            # Formats of equal width (mxfp6_e2m3 and mxfp6_e3m2) share an x; stack their labels.
            stacked = seen_x.get(x, 0)
            seen_x[x] = stacked + 1
            ax.annotate(
                name.replace("mx", ""), (x, y), textcoords="offset points", ha=align,
                xytext=(4 if align == "left" else -4, label_offset + 9 * stacked * (1 if label_offset > 0 else -1)),
                fontsize=7,
            )
        for row in rows:
            if row.family == family and row.format == "fp32":
                ax.axhline(row.ort_accuracy, color=line.get_color(), linestyle="--", linewidth=0.8, label=f"fp32 ({family} run)")
    # A y range of a few points keeps small differences from looking like large ones.
    lowest = min(r.ort_accuracy for r in rows)
    ax.set_ylim(max(0.0, lowest - 3.0), 100.5)
    ax.set_xlabel("bits per weight (element bits + 8/32 for the shared scale)")
    ax.set_ylabel("test accuracy in ONNX Runtime (%)")
    ax.set_title("digits-cnn: one MF-QAT run, every format by Slice-and-Scale")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m mfqat_onnx.demo",
        description="Train, export, retarget and run digits-cnn in every MX format, and print one table.",
    )
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per family (default: the workload recipe)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and data order")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per file; the median latency is kept")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, args.threads))

    start = time.perf_counter()
    rows = run_demo(args.output, steps=args.steps, seed=args.seed, repeats=args.repeats)
    table = format_table(rows)
    plot_path = args.output / "accuracy_vs_bits.png"
    plot(rows, plot_path)
    (args.output / "results.md").write_text(
        "# digits-cnn demo\n\n" + table + "\n\n" + TABLE_NOTE + "\n\n![accuracy against bits per weight](accuracy_vs_bits.png)\n"
    )
    (args.output / "results.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    print()
    print(table)
    print()
    print(TABLE_NOTE)
    print(f"\nwrote {args.output / 'results.md'} and {plot_path} in {time.perf_counter() - start:.0f} s")
    worst = min(r.same_prediction for r in rows)
    if worst < 99.9:
        print(f"warning: ONNX Runtime and torch disagree on {100 - worst:.2f} % of test images in some format")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
