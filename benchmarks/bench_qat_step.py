"""Time of one MF-QAT training step over one fp32 step of the same model, in the same run.

An MF-QAT step with the ``sample`` schedule runs one forward and backward pass
in one drawn format, so its extra cost is the fake quantization of every
weight (through the 8-bit anchor in via-anchor mode). Steps of the two models
alternate, so that load changes on a shared machine hit both alike. The table
reports medians and their ratio (target: at most 1.5).

Usage: ``python benchmarks/bench_qat_step.py [--workloads digits-cnn,tiny-lm] [--repeat 20]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mfqat_onnx.qat import FormatSchedule, QuantConfig, prepare, train_step
from mfqat_onnx.qat._train import iterate_batches, make_optimizer
from models import get_workload

INT_FORMATS = ["mxint2", "mxint4", "mxint6", "mxint8"]
CASES = [("sample", "via_anchor"), ("sample", "direct"), ("all", "via_anchor")]


def time_steps(workload_name: str, repeat: int, cases: list[tuple[str, str]]) -> list[dict]:
    """Return one row per (schedule, mode) case for one workload."""
    workload = get_workload(workload_name)
    data = workload.load_data()
    recipe = workload.recipe
    torch.manual_seed(0)
    base = workload.build_model()

    rows = []
    for schedule_kind, mode in cases:
        config = QuantConfig(formats=INT_FORMATS, schedule=schedule_kind, mode=mode, **workload.quant_defaults)
        fp32_model = copy.deepcopy(base)
        mx_model = prepare(copy.deepcopy(base), config)
        fp32_opt = make_optimizer(fp32_model, recipe)
        mx_opt = make_optimizer(mx_model, recipe)
        schedule = FormatSchedule(config.formats, config.schedule, seed=0)
        batches = iterate_batches(data.train, recipe.batch_size, seed=0)

        fp32_times, mx_times = [], []
        for step in range(repeat + 3):
            batch = next(batches)
            start = time.perf_counter()
            train_step(fp32_model, batch, workload.loss_fn, fp32_opt, [None], grad_clip=recipe.grad_clip)
            fp32_seconds = time.perf_counter() - start
            start = time.perf_counter()
            train_step(mx_model, batch, workload.loss_fn, mx_opt, schedule.formats_at(step), grad_clip=recipe.grad_clip)
            mx_seconds = time.perf_counter() - start
            if step >= 3:  # the first steps include one-time allocation and op registration
                fp32_times.append(fp32_seconds)
                mx_times.append(mx_seconds)

        fp32_ms = 1e3 * statistics.median(fp32_times)
        mx_ms = 1e3 * statistics.median(mx_times)
        rows.append(
            {
                "case": f"{workload_name} {schedule_kind} {mode}",
                "batch": recipe.batch_size,
                "fp32_step_ms": fp32_ms,
                "mfqat_step_ms": mx_ms,
                "ratio": mx_ms / fp32_ms,
                "target": "<= 1.5" if schedule_kind == "sample" else f"~{len(INT_FORMATS)} (one pass per format)",
            }
        )
    return rows


def run(workloads: tuple[str, ...] = ("digits-cnn", "tiny-lm"), repeat: int = 20) -> list[dict]:
    """Measure every case of every workload on one CPU thread; return the table rows."""
    torch.set_num_threads(1)
    rows: list[dict] = []
    for name in workloads:
        rows += time_steps(name, repeat, CASES)
    return rows


def main() -> None:
    """Print the step-time table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="digits-cnn,tiny-lm", help="comma-separated workload names")
    parser.add_argument("--repeat", type=int, default=20, help="timed steps per model and case")
    args = parser.parse_args()
    rows = run(tuple(args.workloads.split(",")), args.repeat)
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns))


if __name__ == "__main__":
    main()
