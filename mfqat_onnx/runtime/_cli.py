"""``python -m mfqat_onnx.runtime``: run a model once on given or random inputs and time it."""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mfqat_onnx._onnx_io import check_output_path
from mfqat_onnx.runtime._build import KernelBuildError, build_kernels
from mfqat_onnx.runtime._session import MXSession, open_session

# ONNX Runtime type strings of the input dtypes the CLI can make up.
_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# Random integer inputs stay below this, so they are valid indices for any
# embedding table with at least this many rows.
_RANDOM_INT_HIGH = 10


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mfqat_onnx.runtime",
        description="Run an mfqat ONNX model in ONNX Runtime on given or random inputs, "
        "print an output summary, the execution path and the timing.",
        epilog="Exit status: 0 on success, 2 on invalid arguments or input files, 1 when the kernel build "
        "or ONNX Runtime fails.",
    )
    parser.add_argument("model", nargs="?", type=Path, help="ONNX model file")
    parser.add_argument("--format", help="retarget the model to this MX format in memory first, e.g. mxfp4")
    parser.add_argument(
        "--kernels",
        choices=("auto", "native", "functions"),
        default="auto",
        help="native kernel library or the ONNX function bodies (default: auto, the library when built)",
    )
    parser.add_argument(
        "--prefer",
        choices=("speed", "memory"),
        default="speed",
        help="fold constant weights to fp32 (speed) or keep them MX-packed (memory); default: speed",
    )
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="value of one model input; repeat for several. Inputs not given are random.",
    )
    parser.add_argument(
        "--batch", type=int, help="size of a dynamic first dimension of random inputs (default 1)"
    )
    parser.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=N",
        help="size of a named dynamic dimension; other dynamic dimensions are 1",
    )
    parser.add_argument(
        "--repeat", type=int, default=10, help="timed runs after one warm-up run (default 10)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument(
        "--save-outputs",
        type=Path,
        metavar="FILE.npz",
        help="write the outputs of the first run to a .npz file, one array per output name",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --save-outputs file")
    parser.add_argument("--build-kernels", action="store_true", help="build the kernel library first")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def _parse_pairs(pairs: Sequence[str], option: str) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{option} expects NAME=VALUE, got {pair!r}")
        if name in parsed:
            raise ValueError(f"{option} gives {name!r} twice ({parsed[name]!r} and {value!r}); give it once")
        parsed[name] = value
    return parsed


def _input_shape(
    dims: Sequence[object], batch: int, named: dict[str, int], defaulted: set[str]
) -> tuple[int, ...]:
    """Resolve dynamic dimensions; add the names of those set to 1 by default to ``defaulted``."""
    shape = []
    for position, dim in enumerate(dims):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif isinstance(dim, str) and dim in named:
            shape.append(named[dim])
        elif position == 0:
            shape.append(batch)
        else:
            shape.append(1)
            defaulted.add(str(dim))
    return tuple(shape)


def make_inputs(
    session: MXSession,
    given: dict[str, Path],
    *,
    batch: int,
    named_dims: dict[str, int],
    seed: int,
    defaulted: set[str] | None = None,
) -> dict[str, np.ndarray]:
    """Load the given inputs and make seeded random ones for the rest.

    Dynamic dimensions are ``batch`` in first place, ``named_dims`` by name,
    and 1 otherwise; the names set to 1 are added to ``defaulted``.

    Raises:
        ValueError: A name is not a model input, or a dtype is not supported or does not match.
    """
    inputs = {meta.name: meta for meta in session.get_inputs()}
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise ValueError(f"--input names {unknown} are not model inputs; the inputs are {sorted(inputs)}")

    rng = np.random.default_rng(seed)
    feed = {}
    for name, meta in inputs.items():
        dtype = _NUMPY_TYPES.get(meta.type)
        if name in given:
            array = np.load(given[name], allow_pickle=False)
            if dtype is not None and array.dtype != dtype:
                raise ValueError(
                    f"input {name!r} from {given[name]} has dtype {array.dtype}, the model expects "
                    f"{np.dtype(dtype)}; save the array with that dtype"
                )
            _check_shape(name, given[name], array.shape, meta.shape)
            feed[name] = array
            continue
        if dtype is None:
            raise ValueError(
                f"cannot make a random value for input {name!r} of type {meta.type}; pass --input"
            )
        shape = _input_shape(meta.shape, batch, named_dims, defaulted if defaulted is not None else set())
        if np.issubdtype(dtype, np.floating):
            feed[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feed[name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feed[name] = rng.integers(0, _RANDOM_INT_HIGH, shape).astype(dtype)
    return feed


def _check_shape(name: str, source: Path, shape: tuple[int, ...], dims: Sequence[object] | None) -> None:
    """Compare a given array's shape with the model input's rank and fixed dimensions."""
    if dims is None:
        return
    fixed = [dim if isinstance(dim, int) and dim >= 0 else None for dim in dims]
    matches = len(shape) == len(fixed) and all(want is None or want == got for want, got in zip(fixed, shape, strict=True))
    if not matches:
        expected = [dim if dim is not None else "any" for dim in fixed]
        raise ValueError(
            f"input {name!r} from {source} has shape {list(shape)}, the model expects {expected}; "
            "save the array with that shape"
        )


def _summary_rows(names: Sequence[str], outputs: Sequence[object]) -> list[tuple[str, ...]]:
    rows = []
    for name, value in zip(names, outputs, strict=True):
        array = np.asarray(value)
        if array.size and np.issubdtype(array.dtype, np.number):
            finite = array[np.isfinite(array)] if np.issubdtype(array.dtype, np.floating) else array
            low = f"{finite.min():.6g}" if finite.size else "-"
            high = f"{finite.max():.6g}" if finite.size else "-"
            mean = f"{finite.astype(np.float64).mean():.6g}" if finite.size else "-"
            nan = str(int(np.isnan(array).sum())) if np.issubdtype(array.dtype, np.floating) else "0"
        else:
            low = high = mean = nan = "-"
        rows.append((name, str(list(array.shape)), str(array.dtype), low, high, mean, nan))
    return rows


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def run(args: argparse.Namespace) -> int:
    """Open the session, run it and print the report; return the exit code."""
    start = time.perf_counter()
    session = open_session(args.model, format=args.format, kernels=args.kernels, prefer=args.prefer)
    open_s = time.perf_counter() - start

    given = {name: Path(value) for name, value in _parse_pairs(args.input, "--input").items()}
    named_dims = {name: int(value) for name, value in _parse_pairs(args.dim, "--dim").items()}
    defaulted: set[str] = set()
    batch = 1 if args.batch is None else args.batch
    feed = make_inputs(session, given, batch=batch, named_dims=named_dims, seed=args.seed, defaulted=defaulted)

    print(f"model           {args.model}" + (f" (retargeted to {args.format})" if args.format else ""))
    print(
        f"execution path  {session.execution_path}"
        + (f" ({session.kernel_library})" if session.kernel_library else "")
    )
    print(
        f"weight storage  {session.weight_storage}"
        + (f", {session.folded_weights} weights folded" if session.folded_weights else "")
    )
    if args.prefer == "memory" and session.execution_path == "functions":
        print("                --prefer memory needs the kernel library (see --build-kernels); weights are fp32")
    print("inputs          " + ", ".join(f"{name} {list(v.shape)} {v.dtype}" for name, v in feed.items()))
    if defaulted:
        print(
            f"                dynamic dimensions set to 1: {', '.join(sorted(defaulted))} (set with --dim NAME=N)"
        )
    if args.batch is not None and set(given) == set(feed):
        print("                --batch is not used: every input was given with --input")
    sys.stdout.flush()

    start = time.perf_counter()
    outputs = session.run(None, feed)
    first_ms = (time.perf_counter() - start) * 1e3
    names = [meta.name for meta in session.get_outputs()]
    if args.save_outputs is not None:
        _save_outputs(args.save_outputs, dict(zip(names, outputs, strict=True)))
    times_ms = []
    for _ in tqdm(range(args.repeat), desc="timed runs", leave=False, disable=args.repeat < 50):
        start = time.perf_counter()
        session.run(None, feed)
        times_ms.append((time.perf_counter() - start) * 1e3)

    print()
    _print_table(("output", "shape", "dtype", "min", "max", "mean", "NaN"), _summary_rows(names, outputs))
    print()
    timing = [("open session", f"{open_s * 1e3:.2f}"), ("first run", f"{first_ms:.3f}")]
    if times_ms:
        timing += [
            (f"median of {len(times_ms)}", f"{statistics.median(times_ms):.3f}"),
            (f"min of {len(times_ms)}", f"{min(times_ms):.3f}"),
        ]
    _print_table(("timing", "ms"), timing)
    if args.save_outputs is not None:
        print(f"\noutputs saved to {args.save_outputs}")
    return 0


def _save_outputs(path: Path, outputs: dict[str, np.ndarray]) -> None:
    """Write ``outputs`` to an .npz file atomically: a temporary file in the same folder, then a rename."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
        try:
            np.savez(handle, **outputs)
            handle.flush()
            os.fsync(handle.fileno())
            # Temporary files are private (0600); give the result the mode a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(handle.name, 0o666 & ~umask)
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.repeat < 0:
        parser.error(f"--repeat must be at least 0, got {args.repeat}")
    if args.build_kernels:
        try:
            print(f"kernel library  {build_kernels()}")
        except KernelBuildError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILURE
        if args.model is None:
            return 0
    if args.model is None:
        parser.error("MODEL is required unless --build-kernels is given")
    try:
        if args.save_outputs is not None:
            # Before the session opens, so a bad output path costs no model load.
            if args.save_outputs.suffix != ".npz":
                raise ValueError(f"--save-outputs expects a .npz file name, got {str(args.save_outputs)!r}")
            check_output_path(args.save_outputs, force=args.force, protected=[args.model])
        return run(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # onnxruntime's errors derive from Exception only
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
