"""End-to-end ONNX Runtime latency and peak memory of each MX format against fp32.

An MLP with three 2048x2048 hidden layers (12.6M quantized weights; the first
and last layers stay fp32) is exported once as fp32 ONNX and once as an
MXINT8 and an MXFP8 anchor, the anchors are retargeted to the lower formats,
and every file is timed at batch 1 and batch 32 in a fresh process that also
reports its peak resident memory. Weights are random: latency and memory do
not depend on training. Each MX file runs twice:

- ``packed``: the native kernel decodes the packed weights on every run
  (``prefer="memory"``);
- ``folded``: ONNX Runtime folds each weight's function body to fp32 at
  session start (``prefer="speed"``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

HIDDEN = 2048
FORMATS = {
    "mxint8": ["mxint8", "mxint6", "mxint4", "mxint2"],
    "mxfp8_e4m3": ["mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1"],
}

# Runs in a child process so that each measurement starts from an empty heap.
_CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np
from mfqat_onnx.runtime import open_session

path, kernels, prefer, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = open_session(path, kernels=kernels, prefer=prefer, session_options=options)
name = session.get_inputs()[0].name
result = {"path": session.execution_path, "weights": session.weight_storage}
for batch in (1, 32):
    x = np.random.default_rng(0).standard_normal((batch, HIDDEN_SIZE)).astype(np.float32)
    session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    result[f"batch{batch}_ms"] = 1e3 * statistics.median(times)
# Linux keeps ru_maxrss across exec, so it would report the parent's peak;
# VmHWM belongs to this process image alone.
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak_kb = int(line.split()[1])
except OSError:
    pass
result["peak_rss_mb"] = peak_kb / 1024
print(json.dumps(result))
""".replace("HIDDEN_SIZE", str(HIDDEN))


class MLP(nn.Module):
    """Input layer, three square hidden layers, output layer."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(hidden, hidden) for _ in range(5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers with ReLU in between."""
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def _measure(path: Path, kernels: str, prefer: str, repeats: int) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), kernels, prefer, str(repeats)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def _export_files(folder: Path) -> dict[str, Path]:
    from mfqat_onnx.export import export_model
    from mfqat_onnx.qat import QuantConfig, prepare
    from mfqat_onnx.retarget import retarget_file

    torch.manual_seed(0)
    example = (torch.randn(2, HIDDEN),)
    batch = torch.export.Dim("batch", min=1)
    files: dict[str, Path] = {}

    fp32 = MLP().eval()
    fp32_path = folder / "mlp.fp32.onnx"
    torch.onnx.export(fp32, example, dynamo=True, input_names=["x"], output_names=["y"],
                      dynamic_shapes=({0: batch},), opset_version=21).save(str(fp32_path))
    files["fp32"] = fp32_path

    for anchor, formats in FORMATS.items():
        model = MLP().eval()
        model.load_state_dict(fp32.state_dict())
        prepare(model, QuantConfig(formats=formats, anchor=anchor))
        anchor_path = folder / f"mlp.{anchor}.onnx"
        export_model(model, example, anchor_path, anchor=anchor, input_names=["x"], output_names=["y"],
                     dynamic_shapes=({0: batch},), force=True)
        files[anchor] = anchor_path
        for fmt in formats[1:]:
            files[fmt], _ = retarget_file(anchor_path, fmt, folder / f"mlp.{fmt}.onnx", force=True)
    return files


def run(repeats: int = 20) -> list[dict]:
    """Measure every file and return one row per format and weight storage."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = _export_files(Path(tmp))
        base = _measure(files["fp32"], "functions", "speed", repeats)
        for name, path in files.items():
            modes = [("fp32", "functions", "speed")] if name == "fp32" else [
                ("packed", "native", "memory"), ("folded", "native", "speed")]
            for label, kernels, prefer in modes:
                result = base if name == "fp32" else _measure(path, kernels, prefer, repeats)
                rows.append(
                    {
                        "benchmark": "inference",
                        "case": f"{name} {label}",
                        "file_mb": path.stat().st_size / 2**20,
                        "batch1_ms": result["batch1_ms"],
                        "batch32_ms": result["batch32_ms"],
                        "batch1_slowdown": result["batch1_ms"] / base["batch1_ms"],
                        "batch32_slowdown": result["batch32_ms"] / base["batch32_ms"],
                        "peak_rss_mb": result["peak_rss_mb"],
                        "rss_ratio": result["peak_rss_mb"] / base["peak_rss_mb"],
                    }
                )
    return rows


def main() -> None:
    """Print the inference table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per batch size; the median is kept")
    args = parser.parse_args()
    rows = run(args.repeats)
    print(f"{'case':22} {'file MB':>8} {'b1 ms':>8} {'b32 ms':>8} {'b1 x':>6} {'b32 x':>6} {'RSS MB':>7} {'RSS x':>6}")
    for r in rows:
        print(f"{r['case']:22} {r['file_mb']:8.1f} {r['batch1_ms']:8.2f} {r['batch32_ms']:8.2f} "
              f"{r['batch1_slowdown']:6.2f} {r['batch32_slowdown']:6.2f} {r['peak_rss_mb']:7.0f} {r['rss_ratio']:6.2f}")


if __name__ == "__main__":
    main()
