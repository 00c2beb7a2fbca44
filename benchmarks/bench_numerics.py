"""Slice-and-Scale against quantizing the decoded anchor from scratch (numpy reference).

Both sides run in this process on the same 16M-element tensor; the table
reports elements per second and the speed-up of Slice-and-Scale.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
from _timing import best_time

from mfqat_onnx import numerics as mx

PAIRS = [("mxint8", "mxint4"), ("mxint8", "mxint2"), ("mxfp8_e4m3", "mxfp4_e2m1"), ("mxfp8_e4m3", "mxfp6_e2m3")]
TARGET_SPEEDUP = 5.0


def run(elements: int = 16 * 2**20, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Measure every anchor/target pair and return one row per pair."""
    rng = np.random.default_rng(seed)
    columns = 4096
    x = rng.standard_normal((elements // columns, columns)).astype(np.float32)
    rows = []
    for anchor, target in PAIRS:
        codes, scale = mx.quantize(x, anchor)
        decoded = mx.dequantize(codes, scale, anchor)
        slice_time = best_time(functools.partial(mx.slice_and_scale, codes, scale, anchor, target), repeats)
        requant_time = best_time(functools.partial(mx.quantize, decoded, target), repeats)
        rows.append(
            {
                "benchmark": "numerics",
                "case": f"slice_and_scale {anchor} -> {target}",
                "baseline": "quantize decoded anchor",
                "elements_per_s": x.size / slice_time,
                "baseline_elements_per_s": x.size / requant_time,
                "speedup": requant_time / slice_time,
                "target": f">= {TARGET_SPEEDUP:g}x",
                "met": requant_time / slice_time >= TARGET_SPEEDUP,
            }
        )
    return rows


def main() -> None:
    """Print the Slice-and-Scale table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--elements", type=int, default=16 * 2**20, help="tensor size in elements (default 16M)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is kept")
    args = parser.parse_args()
    rows = run(args.elements, args.repeats)
    print(f"{'case':40} {'Melem/s':>9} {'baseline':>9} {'speedup':>8}  target")
    for row in rows:
        print(
            f"{row['case']:40} {row['elements_per_s'] / 1e6:9.1f} {row['baseline_elements_per_s'] / 1e6:9.1f} "
            f"{row['speedup']:7.1f}x  {row['target']} {'met' if row['met'] else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
