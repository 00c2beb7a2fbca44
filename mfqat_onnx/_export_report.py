"""The summary of one export: files written, packed weights and their sizes, and the CLI table."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from mfqat_onnx._export_fold import FoldedWeight

__all__ = ["ExportReport"]


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """Summary of one export: the files written and the size of each packed weight.

    Attributes:
        files: The model file, then its external data file if any.
        anchor_format: Format of the stored weights.
        scale_rule: Rule of the stored scales.
        opset: Standard ONNX opset of the file.
        weights: The packed weights, in graph order.
        layer_names: Module name of each packed weight (same order).
        activation_quantizers: ``MXQuantize -> MXDequantize`` pairs left for
            activations, by format.
        other_initializer_bytes: Bytes of the initializers that are not packed
            weights (fp32 layers, biases, norms, embeddings, shape constants).
        file_bytes: Size of the written files.
    """

    files: tuple[Path, ...]
    anchor_format: str
    scale_rule: str
    opset: int
    weights: tuple[FoldedWeight, ...]
    layer_names: tuple[str, ...]
    activation_quantizers: Mapping[str, int]
    other_initializer_bytes: int
    file_bytes: int

    @property
    def path(self) -> Path:
        """The model file."""
        return self.files[0]

    @property
    def fp32_weight_bytes(self) -> int:
        """Bytes the packed weights would take in float32."""
        return sum(w.fp32_bytes for w in self.weights)

    @property
    def packed_weight_bytes(self) -> int:
        """Bytes of the packed codes and scales."""
        return sum(w.packed_bytes for w in self.weights)

    def format_table(self) -> str:
        """Return the summary table the CLI prints: one row per weight, then totals."""
        header = ("layer", "weight", "shape", "format", "fp32 bytes", "packed bytes", "ratio")
        rows = [
            (
                layer,
                w.name,
                "x".join(str(d) for d in w.shape),
                w.format,
                f"{w.fp32_bytes:,}",
                f"{w.packed_bytes:,}",
                f"{w.packed_bytes / w.fp32_bytes:.3f}",
            )
            for layer, w in zip(self.layer_names, self.weights, strict=True)
        ]
        fp32, packed = self.fp32_weight_bytes, self.packed_weight_bytes
        rows.append(
            (
                "total",
                f"{len(self.weights)} weights",
                "",
                "",
                f"{fp32:,}",
                f"{packed:,}",
                f"{packed / fp32:.3f}" if fp32 else "-",
            )
        )
        widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
        numeric = {4, 5, 6}

        def line(row: Sequence[str]) -> str:
            cells = [
                str(c).rjust(w) if i in numeric else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        lines = [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows[:-1])]
        lines += [line(["-" * w for w in widths]), line(rows[-1])]
        acts = ", ".join(f"{n} in {fmt}" for fmt, n in self.activation_quantizers.items()) or "none"
        lines += [
            "",
            f"anchor format: {self.anchor_format}   scale rule: {self.scale_rule}   opset: {self.opset}",
            f"activation quantizers: {acts}",
            f"other initializers: {self.other_initializer_bytes:,} bytes",
            f"file: {', '.join(str(p) for p in self.files)} ({self.file_bytes:,} bytes)",
        ]
        return "\n".join(lines)
