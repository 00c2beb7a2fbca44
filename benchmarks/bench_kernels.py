"""MXDequantize / MXQuantize kernels against ONNX Runtime's own blocked DequantizeLinear.

Every case decodes or encodes the same number of elements (a 4096 x 4096
weight by default), with graph inputs rather than initializers so that ONNX
Runtime cannot fold anything, in one process and one thread pool size:

- ``DequantizeLinear``: opset 21, int8 codes, float32 scales, block 32 on axis 1;
  the baseline of every ``ratio`` (baseline time / case time, above 1 is faster).
- ``MXDequantize kernel``: the native library, per format.
- ``MXDequantize body``: the standard-op function body, no library.
- ``MXQuantize kernel`` / ``MXQuantize body``: float32 to packed codes and scales.

Usage: ``python benchmarks/bench_kernels.py [--rows 4096] [--cols 4096] [--threads 1] [--repeat 20]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from mfqat_onnx import numerics
from mfqat_onnx.onnx_ops import attach_functions, make_dequantize_node, make_quantize_node
from mfqat_onnx.runtime import build_kernels

DEQUANTIZE_FORMATS = ("mxint8", "mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1", "mxint4")
QUANTIZE_FORMATS = ("mxint8", "mxfp8_e4m3", "mxfp4_e2m1")
BLOCK = 32


def _model(nodes, inputs, outputs, *, functions: bool):
    graph = helper.make_graph(nodes, "bench", inputs, outputs)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("mfqat", 1)]
    )
    model.ir_version = 10
    if functions:
        attach_functions(model)
    return model


def _session(model, *, library: str | None, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _median_ms(run: Callable[[], object], repeat: int) -> float:
    run()  # warm-up: allocations and thread pool start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _dequantize_linear_ms(rows: int, cols: int, threads: int, repeat: int, rng: np.random.Generator) -> float:
    node = helper.make_node("DequantizeLinear", ["x", "scale"], ["y"], axis=1, block_size=BLOCK)
    model = _model(
        [node],
        [
            helper.make_tensor_value_info("x", TensorProto.INT8, [rows, cols]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [rows, cols // BLOCK]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])],
        functions=False,
    )
    session = _session(model, library=None, threads=threads)
    feed = {
        "x": rng.integers(-127, 128, size=(rows, cols), dtype=np.int8),
        "scale": np.exp2(rng.integers(-8, 8, size=(rows, cols // BLOCK))).astype(np.float32),
    }
    return _median_ms(lambda: session.run(None, feed), repeat)


def _dequantize_ms(fmt, rows, cols, threads, repeat, rng, *, library: str | None) -> float:
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    codes, scales = numerics.quantize(x, fmt, axis=1, block_size=BLOCK)
    packed = numerics.pack_codes(codes, fmt, axis=1, block_size=BLOCK)
    node = make_dequantize_node("codes", "scales", "y", fmt=fmt, axis=1, block_size=BLOCK, axis_length=cols)
    model = _model(
        [node],
        [
            helper.make_tensor_value_info("codes", TensorProto.UINT8, list(packed.shape)),
            helper.make_tensor_value_info("scales", TensorProto.UINT8, list(scales.shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])],
        functions=library is None,
    )
    session = _session(model, library=library, threads=threads)
    feed = {"codes": packed, "scales": scales}
    return _median_ms(lambda: session.run(None, feed), repeat)


def _quantize_ms(fmt, rows, cols, threads, repeat, rng, *, library: str | None) -> float:
    node = make_quantize_node("x", "codes", "scales", fmt=fmt, axis=1, block_size=BLOCK)
    model = _model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, cols])],
        [
            helper.make_tensor_value_info("codes", TensorProto.UINT8, None),
            helper.make_tensor_value_info("scales", TensorProto.UINT8, None),
        ],
        functions=library is None,
    )
    session = _session(model, library=library, threads=threads)
    feed = {"x": rng.standard_normal((rows, cols)).astype(np.float32)}
    return _median_ms(lambda: session.run(None, feed), repeat)


def run(
    rows: int = 4096, cols: int = 4096, *, threads: int = 1, repeat: int = 20, body_repeat: int = 1
) -> list[dict[str, object]]:
    """Time every case and return one dict per row of the table.

    Keys: ``case``, ``format``, ``ms`` (median), ``melem_per_s``, and
    ``ratio`` (DequantizeLinear time / case time; None for quantize rows).
    """
    library = str(build_kernels())
    rng = np.random.default_rng(0)
    elements = rows * cols
    results: list[dict[str, object]] = []

    def add(case: str, fmt: str, ms: float, ratio: float | None) -> None:
        results.append(
            {"case": case, "format": fmt, "ms": ms, "melem_per_s": elements / ms / 1e3, "ratio": ratio}
        )

    baseline = _dequantize_linear_ms(rows, cols, threads, repeat, rng)
    add("DequantizeLinear (int8, float scales)", "int8", baseline, 1.0)
    for fmt in DEQUANTIZE_FORMATS:
        ms = _dequantize_ms(fmt, rows, cols, threads, repeat, rng, library=library)
        add("MXDequantize kernel", fmt, ms, baseline / ms)
    for fmt in ("mxint8", "mxfp4_e2m1"):
        ms = _dequantize_ms(fmt, rows, cols, threads, body_repeat, rng, library=None)
        add("MXDequantize body", fmt, ms, baseline / ms)
    for fmt in QUANTIZE_FORMATS:
        add(
            "MXQuantize kernel",
            fmt,
            _quantize_ms(fmt, rows, cols, threads, repeat, rng, library=library),
            None,
        )
    for fmt in ("mxint8", "mxfp4_e2m1"):
        add(
            "MXQuantize body",
            fmt,
            _quantize_ms(fmt, rows, cols, threads, body_repeat, rng, library=None),
            None,
        )
    return results


def _print_table(results: Sequence[dict[str, object]], rows: int, cols: int, threads: int) -> None:
    print(f"{rows} x {cols} elements, intra_op_num_threads={threads}, onnxruntime {ort.__version__}")
    header = ("case", "format", "median ms", "Melem/s", "vs DequantizeLinear")
    table = [
        (
            str(r["case"]),
            str(r["format"]),
            f"{r['ms']:.2f}",
            f"{r['melem_per_s']:.0f}",
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *table)) for i in range(len(header))]
    for row in (header, tuple("-" * w for w in widths), *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096, help="multiple of 32")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every session")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per kernel case")
    parser.add_argument("--body-repeat", type=int, default=1, help="timed runs per function-body case")
    args = parser.parse_args(argv)
    results = run(
        args.rows, args.cols, threads=args.threads, repeat=args.repeat, body_repeat=args.body_repeat
    )
    _print_table(results, args.rows, args.cols, args.threads)


if __name__ == "__main__":
    main()
