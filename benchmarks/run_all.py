"""Run every benchmark in this folder and write one table of side-by-side ratios.

Each ``bench_*.py`` module exposes ``run() -> list[dict]``; every row names its
case and carries numbers measured against a baseline in the same process. The
results go to ``benchmarks/results.md`` (one table per benchmark), the raw rows
to ``benchmarks/results.json``, and a bar chart of the ratios to
``benchmarks/results.png``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATIO_KEYS = ("speedup", "ratio", "slowdown")


def _format_cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or math.isnan(value):
            return f"{value:g}"
        magnitude = abs(value)
        if magnitude >= 1e6:
            return f"{value:.3g}"
        if magnitude >= 100:
            return f"{value:.0f}"
        return f"{value:.3g}"
    return str(value)


def _markdown_table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns and key != "benchmark":
                columns.append(key)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(key, "")) for key in columns) + " |")
    return "\n".join(lines)


def _ratio_of(row: dict) -> tuple[str, float] | None:
    for key, value in row.items():
        if any(word in key for word in RATIO_KEYS) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, float(value)
    return None


def _plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for name, rows in results.items():
        for row in rows:
            found = _ratio_of(row)
            if found:
                case = " ".join(str(row[key]) for key in ("case", "format") if row.get(key))
                labels.append(f"{name}: {case} ({found[0]})")
                values.append(found[1])
    if not values:
        return
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(values) + 1.5))
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ratio against the same-run baseline (log scale)")
    ax.set_title("mfqat_onnx benchmarks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks named on the command line (default: all) and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmark modules to run, e.g. bench_numerics (default: all)")
    parser.add_argument("--output", type=Path, default=HERE, help="folder for results.md/.json/.png")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    names = args.names or sorted(p.stem for p in HERE.glob("bench_*.py"))
    results: dict[str, list[dict]] = {}
    failures: dict[str, str] = {}
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            rows = importlib.import_module(name).run()
        except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others
            failures[name] = traceback.format_exc(limit=3)
            print(failures[name], file=sys.stderr)
            continue
        results[name] = rows
        print(_markdown_table(rows))
        print(f"({time.perf_counter() - start:.0f} s)\n", flush=True)

    args.output.mkdir(parents=True, exist_ok=True)
    header = [
        "# Benchmark results",
        "",
        f"Written by `benchmarks/run_all.py` on {time.strftime('%Y-%m-%d')} with {os.cpu_count()} CPU cores.",
        "Every ratio compares two measurements taken in the same run.",
        "",
    ]
    body = [f"## {name}\n\n{_markdown_table(rows)}\n" for name, rows in results.items()]
    body += [f"## {name} (failed)\n\n```\n{text}```\n" for name, text in failures.items()]
    (args.output / "results.md").write_text("\n".join(header + body) + "\n![ratios](results.png)\n")
    (args.output / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    _plot(results, args.output / "results.png")
    print(f"wrote {args.output / 'results.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
