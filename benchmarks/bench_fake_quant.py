"""PyTorch MX fake quantization against a plain copy and against torchao's MX emulation.

Everything runs in one process on one 16M-element float32 tensor. The table
gives the elements per second of ``fake_quantize`` for four formats and its
time relative to ``x.clone()``. When ``torchao.prototype.mx_formats`` imports,
it also times torchao's ``MXTensor.to_mx(...).dequantize()`` round trip for
the formats torchao has (MXFP8 E4M3 and MXFP4 E2M1, floor scale rule, block
size 32). Rows without a torchao counterpart give the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import torch
from _timing import best_time

from mfqat_onnx.torch_quant import fake_quantize

FORMATS = ("mxint8", "mxint4", "mxfp8", "mxfp4")
BLOCK_SIZE = 32
COLUMNS = 4096


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Silence import-time warnings (torchao reports its missing CUDA kernels on import)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _torchao_round_trip() -> tuple[Callable[[torch.Tensor, str], torch.Tensor] | None, dict[str, str]]:
    """Return torchao's MX round trip and, per format, why it cannot run (empty when it can)."""
    try:
        with _quiet_loggers("torchao", "torch.utils._pytree"):
            from torchao.prototype.mx_formats.mx_tensor import MXTensor
    except Exception as error:  # noqa: BLE001 - any import failure just means "no peer"
        reason = f"torchao.prototype.mx_formats does not import: {type(error).__name__}: {error}"
        return None, {name: reason for name in FORMATS}

    element_dtypes = {"mxfp8": torch.float8_e4m3fn, "mxfp4": getattr(torch, "float4_e2m1fn_x2", None)}

    def round_trip(x: torch.Tensor, name: str) -> torch.Tensor:
        return MXTensor.to_mx(x, element_dtypes[name], block_size=BLOCK_SIZE).dequantize(torch.float32)

    missing = {}
    for name in FORMATS:
        if name not in element_dtypes:
            missing[name] = "torchao MX formats have no integer element type"
        elif element_dtypes[name] is None:
            missing[name] = "this torch build has no torch.float4_e2m1fn_x2"
    return round_trip, missing


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> float:
    """Return the fraction of elements whose float32 bit patterns agree."""
    return (a.view(torch.int32) == b.view(torch.int32)).double().mean().item()


def run(
    elements: int = 16 * 2**20, repeats: int = 3, threads: int | None = None, seed: int = 0
) -> list[dict]:
    """Measure every format and return one row per format.

    Args:
        elements: Tensor size; rounded down to whole rows of 4096.
        repeats: Timed repetitions after one warm-up; the best is kept.
        threads: torch intra-op threads (default: every CPU core).
        seed: Seed of the normal random input.
    """
    previous_threads = torch.get_num_threads()
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(max(elements // COLUMNS, 1), COLUMNS, generator=generator)
        clone_time = best_time(x.clone, repeats)
        torchao, torchao_missing = _torchao_round_trip()

        rows = []
        for name in FORMATS:
            ours_time = best_time(lambda name=name: fake_quantize(x, name, block_size=BLOCK_SIZE), repeats)
            row = {
                "benchmark": "fake_quant",
                "case": f"fake_quantize {name}",
                "threads": threads,
                "elements_per_s": x.numel() / ours_time,
                "clone_elements_per_s": x.numel() / clone_time,
                "slowdown_vs_clone": ours_time / clone_time,
            }
            if name in torchao_missing:
                row["torchao"] = f"not run: {torchao_missing[name]}"
            else:
                theirs_time = best_time(lambda name=name: torchao(x, name), repeats)
                row["torchao_elements_per_s"] = x.numel() / theirs_time
                row["speedup_vs_torchao"] = theirs_time / ours_time
                row["same_bits_as_torchao"] = _same_bits(fake_quantize(x, name), torchao(x, name))
                row["met"] = theirs_time > ours_time
            rows.append(row)
        return rows
    finally:
        torch.set_num_threads(previous_threads)


def main() -> None:
    """Print the fake-quantization table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--elements", type=int, default=16 * 2**20, help="tensor size in elements (default 16M)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repetitions after a warm-up; the best is kept"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: all CPU cores)"
    )
    args = parser.parse_args()
    rows = run(args.elements, args.repeats, args.threads)

    print(
        f"{rows[0]['threads']} thread(s), {args.elements / 2**20:.0f}M float32 elements, block size {BLOCK_SIZE}"
    )
    print(f"x.clone(): {rows[0]['clone_elements_per_s'] / 1e6:.0f} Melem/s")
    print(
        f"{'format':8} {'Melem/s':>8} {'time/clone':>10} {'torchao Melem/s':>16} {'ours/torchao':>13} {'same bits':>10}"
    )
    skipped = []
    for row in rows:
        name = row["case"].split()[-1]
        line = f"{name:8} {row['elements_per_s'] / 1e6:8.0f} {row['slowdown_vs_clone']:9.2f}x"
        if "speedup_vs_torchao" in row:
            line += (
                f" {row['torchao_elements_per_s'] / 1e6:16.0f} {row['speedup_vs_torchao']:12.2f}x"
                f" {row['same_bits_as_torchao']:10.2%}"
            )
        else:
            line += f" {'-':>16} {'-':>13} {'-':>10}"
            skipped.append(f"{name}: {row['torchao']}")
        print(line)
    for line in skipped:
        print(line)


if __name__ == "__main__":
    main()
