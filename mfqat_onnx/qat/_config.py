"""Quantization settings of a model (``QuantConfig``) and of one layer (``LayerQuant``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from mfqat_onnx.formats import MXFormat, get_format
from mfqat_onnx.torch_quant import SCALE_RULES

SCHEDULES = ("all", "sample", "cycle")
MODES = ("via_anchor", "direct")


def canonical_format(name: str | MXFormat, *, field: str = "format") -> str:
    """Return the canonical id of a format name or alias.

    Raises:
        ValueError: ``name`` is not a known format; the message starts with ``field``.
        TypeError: ``name`` is neither a string nor an ``MXFormat``.
    """
    try:
        return get_format(name).name
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from None


def _check_choice(value: Any, choices: tuple[str, ...], field: str) -> str:
    if value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _as_patterns(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{field} must be a list of module-name glob patterns such as ['layers.*']; got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Quantization and training settings of (multi-format) QAT.

    Attributes:
        formats: Weight formats trained together, for example
            ``["mxint2", "mxint4", "mxint6", "mxint8"]``. One format is
            single-format QAT. Names are stored canonically (``mxfp4`` becomes
            ``mxfp4_e2m1``).
        anchor: The 8-bit format the weights are exported in. ``None`` picks the
            8-bit format of the family of ``formats`` (``mxint8`` or
            ``mxfp8_e4m3``). Every format must be in the anchor's family.
        schedule: ``"all"`` sums the losses of every format each step,
            ``"sample"`` draws one format per step (seeded), ``"cycle"`` takes
            the formats in turn.
        mode: ``"via_anchor"`` fake-quantizes a lower format as Slice-and-Scale
            of the anchor quantization, which is what a retargeted model
            computes. ``"direct"`` quantizes the fp32 weight to the format.
        scale_rule: Shared-exponent rule: ``"floor"`` (OCP v1.0 default),
            ``"rceil"`` or ``"even"``. In via-anchor mode it applies to the
            anchor, and Slice-and-Scale derives the lower scales from it.
        block_size: Elements per shared scale.
        act_format: Format of the input activations of each quantized layer
            (blocks along the last axis of a Linear input and the channel
            axis of a Conv2d input), or ``None`` for fp32 activations.
            Activations are quantized directly, never through the anchor.
        include: Glob patterns on module names (``fnmatch``); a layer is
            quantized only if some pattern matches.
        exclude: Glob patterns of layers kept in fp32.
        quantize_first_last: Also quantize the first and last quantizable
            layers, which stay fp32 by default because they are the most
            sensitive to quantization.
    """

    formats: tuple[str, ...]
    anchor: str | None = None
    schedule: str = "sample"
    mode: str = "via_anchor"
    scale_rule: str = "floor"
    block_size: int = 32
    act_format: str | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    quantize_first_last: bool = False

    def __post_init__(self) -> None:
        # Formats: known, unique, one family.
        if isinstance(self.formats, (str, MXFormat)):
            raise TypeError(f"formats must be a list of format names such as ['mxint4', 'mxint8']; got {self.formats!r}")
        formats = tuple(canonical_format(f, field="formats") for f in self.formats)
        if not formats:
            raise ValueError("formats is empty; give at least one weight format such as ['mxint4']")
        duplicates = sorted({f for f in formats if formats.count(f) > 1})
        if duplicates:
            raise ValueError(f"formats lists {', '.join(duplicates)} more than once; give each format once")

        # Anchor: 8-bit, same family as every format.
        family = get_format(formats[0]).family
        if self.anchor is None:
            anchor = "mxint8" if family == "int" else "mxfp8_e4m3"
        else:
            anchor = canonical_format(self.anchor, field="anchor")
        anchor_fmt = get_format(anchor)
        if anchor_fmt.bits != 8:
            raise ValueError(
                f"anchor must be an 8-bit format (mxint8 or mxfp8), got {anchor!r} with {anchor_fmt.bits} bits"
            )
        for name in formats:
            fmt = get_format(name)
            if fmt.family != anchor_fmt.family:
                raise ValueError(
                    f"format {name!r} is in the {fmt.family} family but the anchor {anchor!r} is in the "
                    f"{anchor_fmt.family} family; Slice-and-Scale works within one family, so use "
                    f"{'mxint8' if fmt.family == 'int' else 'mxfp8'} as the anchor or drop {name!r}"
                )

        _check_choice(self.schedule, SCHEDULES, "schedule")
        _check_choice(self.mode, MODES, "mode")
        _check_choice(self.scale_rule, SCALE_RULES, "scale_rule")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer such as 32; got {self.block_size!r}")
        act_format = None if self.act_format is None else canonical_format(self.act_format, field="act_format")
        if not isinstance(self.quantize_first_last, bool):
            raise TypeError(f"quantize_first_last must be True or False; got {self.quantize_first_last!r}")

        object.__setattr__(self, "formats", formats)
        object.__setattr__(self, "anchor", anchor)
        object.__setattr__(self, "act_format", act_format)
        object.__setattr__(self, "include", _as_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _as_patterns(self.exclude, "exclude"))

    @property
    def family(self) -> str:
        """Format family shared by the anchor and every trained format (``"int"`` or ``"fp"``)."""
        return get_format(self.anchor).family

    def widest_format(self) -> str:
        """Return the trained format with the most bits (the first one on a tie)."""
        return max(self.formats, key=lambda name: get_format(name).bits)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict that ``from_dict`` turns back into this config."""
        data = dataclasses.asdict(self)
        for key in ("formats", "include", "exclude"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Build a config from ``to_dict`` output.

        Raises:
            ValueError: A key is unknown or ``formats`` is missing, or a value is invalid.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a quantization config must be a mapping; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown quantization config keys {unknown}; valid keys are {sorted(known)}")
        if "formats" not in data:
            raise ValueError("quantization config has no 'formats' entry")
        return cls(**data)


@dataclasses.dataclass
class LayerQuant:
    """Quantization state of one swapped layer.

    Attributes:
        weight_format: Active weight format, or ``None`` to run the layer in fp32
            (activations included).
        act_format: Input activation format, or ``None`` for fp32 activations.
        anchor: 8-bit format the weight is exported in.
        mode: ``"via_anchor"`` or ``"direct"`` (see ``QuantConfig.mode``).
        block_size: Elements per shared scale.
        scale_rule: Shared-exponent rule of the weight (of the anchor in
            via-anchor mode) and of the activations.
    """

    weight_format: str | None
    act_format: str | None
    anchor: str
    mode: str
    block_size: int
    scale_rule: str

    @classmethod
    def from_config(cls, config: QuantConfig) -> LayerQuant:
        """Build the layer state of ``config``, starting at its widest format."""
        return cls(
            weight_format=config.widest_format(),
            act_format=config.act_format,
            anchor=config.anchor,
            mode=config.mode,
            block_size=config.block_size,
            scale_rule=config.scale_rule,
        )
