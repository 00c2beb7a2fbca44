"""Errors and the report of the retarget rewrite."""

from __future__ import annotations

import dataclasses
from pathlib import Path


class RetargetError(ValueError):
    """A model cannot be retargeted as requested."""


class UnknownTargetError(RetargetError):
    """The target format name is not a known MX format."""


class PrecisionError(RetargetError):
    """The target has more bits than the stored codes can provide."""


class DerivedSourceError(RetargetError):
    """The stored codes were already derived from the anchor, so converting them again rounds twice."""


class AnchorMetadataError(RetargetError):
    """The model lacks valid ``mfqat`` metadata or MX nodes are inconsistent."""


@dataclasses.dataclass(frozen=True)
class LayerChange:
    """One weight the rewrite converted.

    Attributes:
        name: Weight name (the initializers are ``<name>.mx_codes`` and ``<name>.mx_scales``).
        old_format: Stored format before the rewrite.
        new_format: Format after the rewrite.
        method: ``"slice_and_scale"`` within a family, ``"requantize"`` across families.
        num_weights: Elements of the logical weight tensor.
        bytes_before: Bytes of packed codes plus scales before.
        bytes_after: Bytes of packed codes plus scales after.
    """

    name: str
    old_format: str
    new_format: str
    method: str
    num_weights: int
    bytes_before: int
    bytes_after: int


@dataclasses.dataclass(frozen=True)
class ActivationChange:
    """One activation quantizer whose ``format`` attribute the rewrite changed.

    Attributes:
        name: Name of the quantized activation (input of ``MXQuantize``).
        old_format: Format before the rewrite.
        new_format: Format after the rewrite.
    """

    name: str
    old_format: str
    new_format: str


@dataclasses.dataclass(frozen=True)
class SkippedLayer:
    """A weight or activation quantizer the rewrite left unchanged, with the reason."""

    name: str
    reason: str


@dataclasses.dataclass
class RetargetReport:
    """Record of the changes and skips of one retarget rewrite.

    Attributes:
        anchor_format: Format the model was exported in (``mfqat.anchor_format``).
        target: Canonical id of the requested default target format.
        converted: Weights whose codes and scales were replaced.
        activations: Activation quantizers whose format changed.
        skipped: Weights and activation quantizers left as they were.
        layer_count: MX weights found in the graph, converted or not.
        weight_bytes_before: Bytes of every MX weight (codes plus scales) before.
        weight_bytes_after: Bytes of every MX weight after.
        seconds: Wall time of the rewrite, serialization included.
        input_files: Files read (model, then external data); set by ``retarget_file``.
        output_files: Files written (model, then external data); set by ``retarget_file``.
    """

    anchor_format: str
    target: str
    converted: list[LayerChange] = dataclasses.field(default_factory=list)
    activations: list[ActivationChange] = dataclasses.field(default_factory=list)
    skipped: list[SkippedLayer] = dataclasses.field(default_factory=list)
    layer_count: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    seconds: float = 0.0
    input_files: tuple[Path, ...] = ()
    output_files: tuple[Path, ...] = ()

    @property
    def methods(self) -> list[str]:
        """Distinct conversion methods used, in the order first seen."""
        return list(dict.fromkeys(change.method for change in self.converted))

    @property
    def requantized(self) -> list[LayerChange]:
        """Weights converted across families by decoding and re-quantizing."""
        return [change for change in self.converted if change.method == "requantize"]
