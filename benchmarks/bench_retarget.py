"""Retarget end to end (load, rewrite, save) against re-quantizing the same weights from fp32.

A synthetic anchor of about 100M weights (24 layers of 2048 x 2048 by default,
normal values quantized to the anchor format) is written to a temporary
folder, then retargeted file to file with the same calls as
``python -m mfqat_onnx.retarget``. Two baselines run in the same
process on the same weights, decoded from the anchor to float32:

- ``requantize_file``: the same job without Slice-and-Scale, end to end. It
  loads an fp32 model file of the weights, quantizes and packs each one with
  ``numerics.quantize`` and ``numerics.pack_codes``, and saves the target file
  with the same writer. ``speedup`` compares the two end-to-end times.
- ``quantize``: ``numerics.quantize`` plus ``numerics.pack_codes`` alone, with
  no file I/O. ``speedup_vs_quantize`` compares it with the whole retarget, and
  ``rewrite_speedup`` with the in-memory rewrite only.

The process is pinned to one CPU core. Targets: at most 2 s per 100M weights
end to end, and ``speedup`` of at least 5x. Times are wall times;
``cpu_s_per_100M`` is the process CPU time, the better figure on a busy
machine. Each end-to-end retarget starts after ``os.sync()``, so the
write-back of files written before it is not charged to it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from mfqat_onnx import numerics
from mfqat_onnx._onnx_io import load_model_with_files, save_model
from mfqat_onnx._retarget_synthetic import (
    IR_VERSION,
    SyntheticWeight,
    build_anchor_model,
    quantized_weight,
)
from mfqat_onnx.onnx_ops import DEFAULT_OPSET
from mfqat_onnx.retarget import retarget_model

CASES = [("mxint8", "mxint4"), ("mxfp8_e4m3", "mxfp4_e2m1")]
LAYER_SHAPE = (2048, 2048)
DEFAULT_WEIGHTS = 100e6
TARGET_SECONDS_PER_100M = 2.0
TARGET_SPEEDUP = 5.0


@contextlib.contextmanager
def _one_core(enabled: bool) -> Iterator[str]:
    """Pin this process to one CPU core (Linux) for the duration; yield a description."""
    if not enabled or not hasattr(os, "sched_getaffinity"):
        yield "all cores"
        return
    previous = os.sched_getaffinity(0)
    core = min(previous)
    os.sched_setaffinity(0, {core})
    try:
        yield f"core {core}"
    finally:
        os.sched_setaffinity(0, previous)


def _files_size(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def _write_anchor(folder: Path, anchor: str, n_layers: int, seed: int) -> tuple[Path, list[SyntheticWeight]]:
    # Quantized normal weights, as the exporter writes them: every block's peak
    # then has the anchor's top exponent. Uniformly random codes would not.
    rng = np.random.default_rng(seed)
    weights = [
        quantized_weight(f"layers.{i}.weight", rng.standard_normal(LAYER_SHAPE, dtype=np.float32), anchor)
        for i in range(n_layers)
    ]
    path = folder / f"anchor.{anchor}.onnx"
    save_model(build_anchor_model(weights, anchor), path, force=True)
    return path, weights


class _DecodedWeight(NamedTuple):
    """A weight decoded from the anchor to float32: what the baselines start from."""

    name: str
    values: np.ndarray
    axis: int


def _decode(weights: list[SyntheticWeight], anchor: str) -> list[_DecodedWeight]:
    return [
        _DecodedWeight(
            weight.name,
            numerics.dequantize(weight.codes, weight.scale_e8m0, anchor, axis=weight.axis),
            weight.axis,
        )
        for weight in weights
    ]


def _write_fp32(folder: Path, decoded: list[_DecodedWeight]) -> Path:
    """Write decoded weights as an fp32 model: one Gemm layer per weight."""
    nodes, inputs, outputs, initializers = [], [], [], []
    for weight in decoded:
        x, y = f"{weight.name}.input", f"{weight.name}.output"
        initializers.append(numpy_helper.from_array(weight.values, weight.name))
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", weight.values.shape[1]]))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", weight.values.shape[0]]))
        nodes.append(helper.make_node("Gemm", [x, weight.name], [y], transB=1))
    graph = helper.make_graph(nodes, "fp32", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)], ir_version=IR_VERSION)
    path = folder / "fp32.onnx"
    save_model(model, path, force=True)
    return path


def _time_requantize_file(fp32_path: Path, target: str, out_path: Path) -> float:
    """Return the wall seconds of loading the fp32 file, quantizing every weight and saving."""
    os.sync()
    start = time.perf_counter()
    model, files = load_model_with_files(fp32_path, require_mfqat=False)
    weights = [
        quantized_weight(tensor.name, numpy_helper.to_array(tensor), target) for tensor in model.graph.initializer
    ]
    del model
    save_model(build_anchor_model(weights, target), out_path, force=True, protected=files)
    return time.perf_counter() - start


def _time_retarget(anchor_path: Path, target: str, out_path: Path) -> dict[str, float | int]:
    # Flush the files written before (the anchor, earlier outputs), so the
    # kernel's write-back of them does not stall the timed write.
    os.sync()
    cpu_start = time.process_time()
    start = time.perf_counter()
    model, files = load_model_with_files(anchor_path)
    loaded = time.perf_counter()
    new_model, report = retarget_model(model, target)
    del model
    rewritten = time.perf_counter()
    written = save_model(new_model, out_path, force=True, protected=files)
    saved = time.perf_counter()
    return {
        "load_s": loaded - start,
        "rewrite_s": rewritten - loaded,
        "save_s": saved - rewritten,
        "total_s": saved - start,
        "cpu_s": time.process_time() - cpu_start,
        "layers": len(report.converted),
        "output_bytes": _files_size(written),
        "external_data": len(written) > 1,
    }


def _time_requantize(decoded: list[_DecodedWeight], target: str) -> tuple[float, float]:
    """Return (wall, CPU) seconds of quantizing and packing the decoded anchor weights."""
    wall = cpu = 0.0
    for weight in decoded:
        cpu_start = time.process_time()
        start = time.perf_counter()
        codes, _ = numerics.quantize(weight.values, target, axis=weight.axis)
        numerics.pack_codes(codes, target, axis=weight.axis)
        wall += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
    return wall, cpu


def run(
    weights: float = DEFAULT_WEIGHTS,
    repeats: int = 5,
    seed: int = 0,
    workdir: str | None = None,
    one_core: bool = True,
) -> list[dict]:
    """Measure each anchor/target case and return one row per case.

    Args:
        weights: Approximate number of weights; rounded to whole 2048 x 2048 layers.
        repeats: Timed end-to-end runs per case; the fastest is kept.
        seed: Seed of the random normal weights.
        workdir: Folder for the temporary files (default: the system temp folder).
        one_core: Pin the process to one CPU core while measuring.
    """
    n_layers = max(1, round(weights / (LAYER_SHAPE[0] * LAYER_SHAPE[1])))
    n_weights = n_layers * LAYER_SHAPE[0] * LAYER_SHAPE[1]
    per_100m = 100e6 / n_weights
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="bench_retarget.", dir=workdir) as tmp,
        _one_core(one_core) as cores,
    ):
        folder = Path(tmp)
        for anchor, target in CASES:
            anchor_path, synthetic = _write_anchor(folder, anchor, n_layers, seed)
            out_path = folder / f"out.{target}.onnx"
            timings = min(
                (_time_retarget(anchor_path, target, out_path) for _ in range(max(1, repeats))),
                key=lambda t: t["total_s"],
            )
            decoded = _decode(synthetic, anchor)
            quantize_s, quantize_cpu_s = _time_requantize(decoded, target)
            fp32_path = _write_fp32(folder, decoded)
            del decoded
            requantize_file_s = _time_requantize_file(fp32_path, target, out_path)
            fp32_path.unlink()
            seconds_per_100m = timings["total_s"] * per_100m
            speedup = requantize_file_s / timings["total_s"]
            rows.append(
                {
                    "benchmark": "retarget",
                    "case": f"{anchor} -> {target}",
                    "weights": n_weights,
                    "cpu": cores,
                    "load_average": os.getloadavg()[0],
                    "anchor_bytes": anchor_path.stat().st_size,
                    "output_bytes": timings["output_bytes"],
                    "external_data": timings["external_data"],
                    "load_s": timings["load_s"],
                    "rewrite_s": timings["rewrite_s"],
                    "save_s": timings["save_s"],
                    "s_per_100M": seconds_per_100m,
                    "cpu_s_per_100M": timings["cpu_s"] * per_100m,
                    "requantize_file_s_per_100M": requantize_file_s * per_100m,
                    "speedup": speedup,
                    "quantize_s_per_100M": quantize_s * per_100m,
                    "speedup_vs_quantize": quantize_s / timings["total_s"],
                    "cpu_speedup_vs_quantize": quantize_cpu_s / timings["cpu_s"],
                    "rewrite_speedup": quantize_s / timings["rewrite_s"],
                    "target": f"<= {TARGET_SECONDS_PER_100M:g} s, >= {TARGET_SPEEDUP:g}x",
                    "met": seconds_per_100m <= TARGET_SECONDS_PER_100M and speedup >= TARGET_SPEEDUP,
                }
            )
            anchor_path.unlink()
            out_path.unlink(missing_ok=True)
    return rows


def _print_table(rows: list[dict]) -> None:
    columns = [
        ("case", "{}"),
        ("weights", "{:,}"),
        ("load_s", "{:.2f}"),
        ("rewrite_s", "{:.2f}"),
        ("save_s", "{:.2f}"),
        ("s_per_100M", "{:.2f}"),
        ("cpu_s_per_100M", "{:.2f}"),
        ("requantize_file_s_per_100M", "{:.2f}"),
        ("speedup", "{:.1f}x"),
        ("quantize_s_per_100M", "{:.2f}"),
        ("speedup_vs_quantize", "{:.1f}x"),
        ("rewrite_speedup", "{:.1f}x"),
        ("output_bytes", "{:,}"),
        ("met", "{}"),
    ]
    cells = [[fmt.format(row[name]) for name, fmt in columns] for row in rows]
    widths = [max(len(name), *(len(c[i]) for c in cells)) for i, (name, _) in enumerate(columns)]
    print("  ".join(name.ljust(w) for (name, _), w in zip(columns, widths, strict=True)))
    for line in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


def main() -> None:
    """Print the retarget table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights",
        type=float,
        default=DEFAULT_WEIGHTS,
        help="approximate model size in weights, rounded to 2048x2048 layers (default 100e6)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed end-to-end runs per case; the best is kept"
    )
    parser.add_argument(
        "--workdir", help="folder for the temporary model files (default: system temp folder)"
    )
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one CPU core")
    args = parser.parse_args()
    rows = run(args.weights, repeats=args.repeats, workdir=args.workdir, one_core=not args.all_cores)
    print(
        f"retarget end to end on {rows[0]['cpu']} (1-minute load average {rows[0]['load_average']:.1f}); "
        f"targets <= {TARGET_SECONDS_PER_100M:g} s per 100M weights, >= {TARGET_SPEEDUP:g}x faster than "
        "re-quantizing from an fp32 file"
    )
    _print_table(rows)


if __name__ == "__main__":
    main()
