"""Slice-and-Scale as a rewrite of the MX weights of an ONNX model, on onnx-ir.

A quantized weight ``W`` is two initializers, ``W.mx_codes`` (packed codes)
and ``W.mx_scales`` (E8M0 bytes), feeding ``mfqat::MXDequantize`` nodes. For a
target format ``T`` the rewrite replaces both initializers with::

    codes, scales = unpack_codes(W.mx_codes, S, axis, block_size, axis_length), W.mx_scales
    codes', scales', method = convert(codes, scales, S, T, axis, block_size)
    W.mx_codes, W.mx_scales = pack_codes(codes', T, axis, block_size), scales'

where ``S`` is the stored format. Within a family ``convert`` is
Slice-and-Scale: the new shared exponent is
``E' = clamp(E + p - emax_T, -127, 127)``, where ``p`` is the exponent of the
block's largest stored element, and each element is rounded to nearest with
ties to even. Across families ``convert`` decodes and re-quantizes with the
floor rule. Either way the new scales follow the floor rule, so the nodes'
``scale_rule`` attribute becomes ``floor``. ``format`` changes to ``T``, while
``axis``, ``block_size`` and ``axis_length`` stay. Activation quantizers
(``MXQuantize -> MXDequantize`` pairs) store no data, so retargeting them
only changes ``format`` on both nodes.

The rewrite mutates the onnx-ir model it is given; `retarget_model` works on
a fresh deserialized copy, so the caller's ``ModelProto`` is never changed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from mfqat_onnx import numerics
from mfqat_onnx._retarget_report import (
    ActivationChange,
    AnchorMetadataError,
    DerivedSourceError,
    LayerChange,
    PrecisionError,
    RetargetError,
    SkippedLayer,
    UnknownTargetError,
)
from mfqat_onnx.formats import ALIASES, FORMATS, MXFormat, get_format
from mfqat_onnx.onnx_ops import DEQUANTIZE_OP, DOMAIN, QUANTIZE_OP

logger = logging.getLogger(__name__)

CODES_SUFFIX = ".mx_codes"
SCALES_SUFFIX = ".mx_scales"
# Attribute defaults of the MXDequantize schema, for nodes that omit them.
DEFAULT_AXIS = -1
DEFAULT_BLOCK_SIZE = 32
DEFAULT_SCALE_RULE = "floor"
# Slice-and-Scale and re-quantization both produce floor-rule scales.
CONVERTED_SCALE_RULE = "floor"


@dataclasses.dataclass
class WeightSite:
    """A quantized weight found in the graph: its two initializers and the nodes that read them."""

    name: str
    codes: ir.Value
    scales: ir.Value
    nodes: list[ir.Node]
    fmt: MXFormat
    axis: int
    block_size: int
    axis_length: int

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes plus scales."""
        return _tensor_nbytes(self.codes) + _tensor_nbytes(self.scales)


@dataclasses.dataclass
class ActivationSite:
    """An ``MXQuantize`` node and the ``MXDequantize`` nodes that decode its output."""

    name: str
    quantize: ir.Node
    dequantize: list[ir.Node]
    fmt: MXFormat
    foreign_use: str = ""


def _tensor_nbytes(value: ir.Value) -> int:
    tensor = value.const_value
    return 0 if tensor is None else int(tensor.nbytes)


def _is_mfqat(node: ir.Node, op_type: str) -> bool:
    return node.domain == DOMAIN and node.op_type == op_type


def _node_label(node: ir.Node) -> str:
    return node.name or f"{node.op_type} -> {', '.join(str(v.name) for v in node.outputs)}"


def _read_format(node: ir.Node) -> MXFormat:
    name = node.attributes.get_string("format", None)
    if name is None:
        raise AnchorMetadataError(f"node {_node_label(node)!r} has no 'format' attribute")
    try:
        return get_format(name)
    except ValueError as exc:
        raise AnchorMetadataError(f"node {_node_label(node)!r} has an invalid format: {exc}") from None


def _weight_name(codes: ir.Value, scales: ir.Value, node: ir.Node) -> str:
    codes_name, scales_name = codes.name or "", scales.name or ""
    if codes_name.endswith(CODES_SUFFIX):
        stem = codes_name[: -len(CODES_SUFFIX)]
        if scales_name == stem + SCALES_SUFFIX:
            return stem
    return node.outputs[0].name or codes_name


def _is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None


@dataclasses.dataclass
class GraphSites:
    """The MX weights and activation quantizers of one model.

    Attributes:
        weights: Weights the rewrite may convert.
        kept_weights: Weights whose initializers other nodes also read, so their layout must stay.
        activations: Activation quantizers.
        skipped: Why each kept weight and each unusable ``MXDequantize`` node is left alone.
    """

    weights: list[WeightSite]
    kept_weights: list[WeightSite]
    activations: list[ActivationSite]
    skipped: list[SkippedLayer]


def find_sites(model: ir.Model) -> GraphSites:
    """Find the quantized weights and activation quantizers of a model, subgraphs included.

    Raises:
        AnchorMetadataError: Nodes sharing one weight disagree on its attributes,
            or a node's ``format`` is missing or unknown.
    """
    weights: dict[tuple[int, int], WeightSite] = {}
    found = GraphSites(weights=[], kept_weights=[], activations=[], skipped=[])

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if _is_mfqat(node, QUANTIZE_OP):
            found.activations.append(_activation_site(node))
            continue
        if not _is_mfqat(node, DEQUANTIZE_OP) or len(node.inputs) < 2:
            continue
        codes, scales = node.inputs[0], node.inputs[1]
        if codes is not None and codes.producer() is not None and _is_mfqat(codes.producer(), QUANTIZE_OP):
            continue  # a decoded activation, handled with its MXQuantize
        if not (_is_initializer(codes) and _is_initializer(scales)):
            found.skipped.append(SkippedLayer(_node_label(node), "codes or scales are not initializers"))
            continue
        assert codes is not None and scales is not None
        key = (id(codes), id(scales))
        if key in weights:
            _add_reader(weights[key], node)
        else:
            weights[key] = _weight_site(codes, scales, node)

    for site in weights.values():
        reason = _foreign_use(site)
        if reason:
            found.kept_weights.append(site)
            found.skipped.append(SkippedLayer(site.name, reason))
        else:
            found.weights.append(site)
    return found


def _weight_site(codes: ir.Value, scales: ir.Value, node: ir.Node) -> WeightSite:
    attributes = node.attributes
    axis_length = attributes.get_int("axis_length", None)
    if axis_length is None:
        raise AnchorMetadataError(
            f"node {_node_label(node)!r} has no 'axis_length' attribute, so the logical weight shape "
            "cannot be recovered; re-export the model"
        )
    return WeightSite(
        name=_weight_name(codes, scales, node),
        codes=codes,
        scales=scales,
        nodes=[node],
        fmt=_read_format(node),
        axis=attributes.get_int("axis", DEFAULT_AXIS),
        block_size=attributes.get_int("block_size", DEFAULT_BLOCK_SIZE),
        axis_length=axis_length,
    )


def _add_reader(site: WeightSite, node: ir.Node) -> None:
    """Attach a second ``MXDequantize`` reading the same initializers, if it decodes them the same way."""
    other = _weight_site(site.codes, site.scales, node)
    ours = (site.fmt.name, site.axis, site.block_size, site.axis_length)
    theirs = (other.fmt.name, other.axis, other.block_size, other.axis_length)
    if ours != theirs:
        raise AnchorMetadataError(
            f"weight {site.name!r} is decoded by two MXDequantize nodes with different attributes "
            f"(format, axis, block_size, axis_length): {ours} and {theirs}"
        )
    site.nodes.append(node)


def _foreign_use(site: WeightSite) -> str:
    """Return why the initializers cannot change layout, or "" when only our nodes read them."""
    readers = {id(node) for node in site.nodes}
    for value in (site.codes, site.scales):
        if value.is_graph_output():
            return f"{value.name!r} is also a graph output; changing its layout would change that output"
        for consumer in value.consumers():
            if id(consumer) not in readers:
                return (
                    f"{value.name!r} is also read by {consumer.op_type} node {_node_label(consumer)!r}; "
                    "changing its layout would break that node"
                )
    return ""


def _activation_site(node: ir.Node) -> ActivationSite:
    decoders: list[ir.Node] = []
    for output in node.outputs:
        for consumer in output.consumers():
            if _is_mfqat(consumer, DEQUANTIZE_OP) and consumer not in decoders:
                decoders.append(consumer)
    source = node.inputs[0] if node.inputs else None
    name = (source.name if source is not None and source.name else None) or _node_label(node)
    site = ActivationSite(name=name, quantize=node, dequantize=decoders, fmt=_read_format(node))
    for output in node.outputs:
        if output.is_graph_output():
            site.foreign_use = f"its output {output.name!r} is a graph output"
        elif any(consumer not in decoders for consumer in output.consumers()):
            site.foreign_use = f"its output {output.name!r} is read by nodes other than MXDequantize"
    return site


# ---------------------------------------------------------------------------
# Planning: which format each weight gets, and whether that is allowed


def describe_targets(stored: MXFormat | None = None) -> str:
    """List the target names valid for codes stored in ``stored`` (every format for None), same family first."""
    allowed = sorted(
        (fmt for fmt in FORMATS.values() if stored is None or fmt.bits <= stored.bits),
        key=lambda fmt: (stored is not None and fmt.family != stored.family, -fmt.bits, fmt.name),
    )
    alias_of = {canonical: alias for alias, canonical in ALIASES.items()}
    names = [f"{fmt.name} ({alias_of[fmt.name]})" if fmt.name in alias_of else fmt.name for fmt in allowed]
    return ", ".join(names)


def resolve_target(name: str, stored: MXFormat | None = None) -> MXFormat:
    """Resolve a target format name, listing the valid names for ``stored`` codes when unknown.

    Raises:
        UnknownTargetError: ``name`` is not a known format.
        TypeError: ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"target format must be a string such as 'mxfp4', got {type(name).__name__}")
    try:
        return get_format(name)
    except ValueError:
        where = f"for a model stored in {stored.name} " if stored is not None else ""
        raise UnknownTargetError(
            f"unknown target format {name!r}; valid targets {where}are: {describe_targets(stored)}"
        ) from None


def plan_targets(
    sites: list[WeightSite],
    target: MXFormat,
    layers: Mapping[str, str] | None,
    anchor: MXFormat,
    *,
    allow_requantize_lowbit: bool,
) -> list[MXFormat]:
    """Choose each weight's format (in the order of ``sites``) and check that the conversion is allowed.

    ``layers`` maps glob patterns (``fnmatch``, case-sensitive) on weight names
    to formats; the first matching pattern wins and unmatched weights get
    ``target``.

    Raises:
        UnknownTargetError: A format in ``layers`` is unknown.
        RetargetError: A pattern matches no weight.
        PrecisionError: A target has more bits than a weight's stored format.
        DerivedSourceError: A weight is not in the anchor format any more and
            ``allow_requantize_lowbit`` is off.
    """
    patterns = {pattern: resolve_target(fmt, anchor) for pattern, fmt in (layers or {}).items()}
    used: set[str] = set()
    plan: list[MXFormat] = []
    for site in sites:
        chosen = target
        for pattern, fmt in patterns.items():
            if fnmatch.fnmatchcase(site.name, pattern):
                chosen = fmt
                used.add(pattern)
                break
        _check_conversion(site, chosen, anchor, allow_requantize_lowbit=allow_requantize_lowbit)
        plan.append(chosen)

    unused = [pattern for pattern in patterns if pattern not in used]
    if unused:
        names = ", ".join(site.name for site in sites[:20]) + (", ..." if len(sites) > 20 else "")
        raise RetargetError(
            f"layer pattern(s) {', '.join(map(repr, unused))} match no quantized weight; weights are: {names}"
        )
    return plan


def _check_conversion(
    site: WeightSite, target: MXFormat, anchor: MXFormat, *, allow_requantize_lowbit: bool
) -> None:
    stored = site.fmt
    if target.name == stored.name:
        return
    if target.bits > stored.bits:
        raise PrecisionError(
            f"weight {site.name!r} is stored in {stored.name} ({stored.bits} bits), so it cannot be "
            f"retargeted to {target.name} ({target.bits} bits): the stored codes lack the precision. "
            f"Retarget the {anchor.name} anchor file instead; valid targets here are: {describe_targets(stored)}"
        )
    if stored.name != anchor.name and not allow_requantize_lowbit:
        raise DerivedSourceError(
            f"weight {site.name!r} is stored in {stored.name}, already derived from the {anchor.name} anchor; "
            f"converting it again to {target.name} rounds twice and loses accuracy. Retarget the anchor "
            "file instead, or pass --allow-lowbit-source (allow_requantize_lowbit=True from Python) to do it anyway"
        )


# ---------------------------------------------------------------------------
# Rewriting


def convert_weight(site: WeightSite, target: MXFormat) -> LayerChange:
    """Replace one weight's codes and scales with their ``target`` version, in place.

    Raises:
        AnchorMetadataError: The initializers do not match the node attributes.
    """
    assert site.codes.const_value is not None and site.scales.const_value is not None
    bytes_before = site.nbytes
    packed = site.codes.const_value.numpy()
    scales = site.scales.const_value.numpy()
    try:
        codes = numerics.unpack_codes(
            packed, site.fmt, axis=site.axis, block_size=site.block_size, axis_length=site.axis_length
        )
        new_codes, new_scales, method = numerics.convert(
            codes, scales, site.fmt, target, axis=site.axis, block_size=site.block_size
        )
        new_packed = numerics.pack_codes(new_codes, target, axis=site.axis, block_size=site.block_size)
    except (TypeError, ValueError) as exc:
        raise AnchorMetadataError(
            f"weight {site.name!r} does not match its MXDequantize attributes "
            f"(format={site.fmt.name}, axis={site.axis}, block_size={site.block_size}, "
            f"axis_length={site.axis_length}): {exc}"
        ) from None

    _replace_initializer(site.codes, new_packed)
    _replace_initializer(site.scales, np.ascontiguousarray(new_scales))
    for node in site.nodes:
        node.attributes.add(ir.AttrString("format", target.name))
        node.attributes.add(ir.AttrString("scale_rule", CONVERTED_SCALE_RULE))

    change = LayerChange(
        name=site.name,
        old_format=site.fmt.name,
        new_format=target.name,
        method=method,
        num_weights=int(codes.size),
        bytes_before=bytes_before,
        bytes_after=site.nbytes,
    )
    site.fmt = target
    logger.debug("%s: %s -> %s by %s", site.name, change.old_format, change.new_format, method)
    return change


def _replace_initializer(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.Tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def convert_weights(sites: list[WeightSite], plan: list[MXFormat], *, progress: bool) -> list[LayerChange]:
    """Convert every weight whose planned format differs from its stored one."""
    pending = [(site, fmt) for site, fmt in zip(sites, plan, strict=True) if fmt.name != site.fmt.name]
    changes = []
    for site, fmt in tqdm(pending, desc="retarget", unit="layer", disable=not progress or not pending):
        changes.append(convert_weight(site, fmt))
    return changes


def retarget_activations(
    sites: list[ActivationSite], target: MXFormat
) -> tuple[list[ActivationChange], list[SkippedLayer]]:
    """Set ``format`` on each activation quantizer and its decoders."""
    changes = []
    skipped = []
    for site in sites:
        if site.fmt.name == target.name:
            skipped.append(SkippedLayer(site.name, f"activation quantizer already in {target.name}"))
            continue
        if site.foreign_use:
            skipped.append(SkippedLayer(site.name, f"activation quantizer kept: {site.foreign_use}"))
            continue
        for node in (site.quantize, *site.dequantize):
            node.attributes.add(ir.AttrString("format", target.name))
        changes.append(ActivationChange(site.name, site.fmt.name, target.name))
        site.fmt = target
    return changes, skipped
