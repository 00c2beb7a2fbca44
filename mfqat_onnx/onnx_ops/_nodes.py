"""Node builders and attaching the function bodies to a model."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import onnx
import onnx_ir
from onnx import helper

from mfqat_onnx.formats import MXFormat, get_format
from mfqat_onnx.onnx_ops._contract import (
    DEFAULT_AXIS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_OPSET,
    DEFAULT_SCALE_RULE,
    DEQUANTIZE_OP,
    DOMAIN,
    DOMAIN_VERSION,
    MIN_OPSET,
    QUANTIZE_OP,
    check_int,
    check_scale_rule,
)
from mfqat_onnx.onnx_ops._functions import dequantize_function, quantize_function
from mfqat_onnx.onnx_ops._schemas import register_schemas

logger = logging.getLogger(__name__)

# ONNX IR version that introduced opset 21.
_MIN_IR_VERSION = 10


def _block_attributes(fmt: str | MXFormat, axis: int, block_size: int, scale_rule: str) -> dict[str, object]:
    return {
        "format": get_format(fmt).name,
        "axis": check_int("axis", axis),
        "block_size": check_int("block_size", block_size, positive=True),
        "scale_rule": check_scale_rule(scale_rule),
    }


def make_dequantize_node(
    codes_name: str,
    scales_name: str,
    output_name: str,
    *,
    fmt: str | MXFormat,
    axis: int,
    block_size: int,
    axis_length: int,
    scale_rule: str = DEFAULT_SCALE_RULE,
    name: str | None = None,
) -> onnx.NodeProto:
    """Build an ``mfqat.MXDequantize`` node.

    Args:
        codes_name: Packed uint8 codes input.
        scales_name: uint8 E8M0 scale bytes input.
        output_name: float32 output.
        fmt: Format name, alias (stored as the canonical id) or :class:`MXFormat`.
        axis: Blocked axis of the output; negative values count from the end.
        block_size: Elements per block.
        axis_length: Length of the output along ``axis``.
        scale_rule: Rule that produced the scales (recorded only).
        name: Node name; empty when None.

    Raises:
        ValueError: Unknown format or scale rule, or a non-positive size.
        TypeError: An integer argument is not an integer.
    """
    attributes = _block_attributes(fmt, axis, block_size, scale_rule)
    attributes["axis_length"] = check_int("axis_length", axis_length, positive=True)
    return helper.make_node(
        DEQUANTIZE_OP, [codes_name, scales_name], [output_name], name=name, domain=DOMAIN, **attributes
    )


def make_quantize_node(
    input_name: str,
    codes_name: str,
    scales_name: str,
    *,
    fmt: str | MXFormat,
    axis: int = DEFAULT_AXIS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale_rule: str = DEFAULT_SCALE_RULE,
    name: str | None = None,
) -> onnx.NodeProto:
    """Build an ``mfqat.MXQuantize`` node.

    Args:
        input_name: float32, float16 or bfloat16 input.
        codes_name: Packed uint8 codes output.
        scales_name: uint8 E8M0 scale bytes output.
        fmt: Format name, alias (stored as the canonical id) or :class:`MXFormat`.
        axis: Blocked axis; negative values count from the end.
        block_size: Elements per block.
        scale_rule: ``floor`` (OCP default), ``rceil`` or ``even``.
        name: Node name; empty when None.

    Raises:
        ValueError: Unknown format or scale rule, or a non-positive block size.
        TypeError: An integer argument is not an integer.
    """
    attributes = _block_attributes(fmt, axis, block_size, scale_rule)
    return helper.make_node(
        QUANTIZE_OP, [input_name], [codes_name, scales_name], name=name, domain=DOMAIN, **attributes
    )


def function_protos(opset: int = DEFAULT_OPSET, formats: Iterable[str] | None = None) -> list[onnx.FunctionProto]:
    """Build the model-local functions of both operators (new protos on every call).

    Args:
        opset: Standard opset the bodies import; pass the model's own version,
            because the checker rejects a function whose imports differ from the model's.
        formats: Format names the bodies serve; every format when None. Nodes
            naming another format decode to NaN.

    Raises:
        ValueError: ``opset`` is below 21, or a name in ``formats`` is unknown.
    """
    _check_opset(opset)
    return [build(opset, formats) for build in _FUNCTION_BUILDERS.values()]


_FUNCTION_BUILDERS = {DEQUANTIZE_OP: dequantize_function, QUANTIZE_OP: quantize_function}


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(
            f"standard opset {opset} is too old: the {DOMAIN} function bodies need opset {MIN_OPSET} "
            f"or newer (IR version {_MIN_IR_VERSION}); convert the model first, for example with "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )


def _resolve_opset(imports: dict[str, int]) -> int:
    """Return the standard opset the bodies will import, given the model's imports."""
    opset = imports.get("", imports.get("ai.onnx", DEFAULT_OPSET))
    existing = imports.get(DOMAIN)
    if existing is not None and existing != DOMAIN_VERSION:
        raise ValueError(
            f"the model imports {DOMAIN} opset {existing}, but this version of mfqat_onnx writes "
            f"{DOMAIN} opset {DOMAIN_VERSION}"
        )
    _check_opset(opset)
    return opset


def _is_ours(domain: str, name: str) -> bool:
    return domain == DOMAIN and name in (DEQUANTIZE_OP, QUANTIZE_OP)


def attach_functions(model: onnx.ModelProto | onnx_ir.Model) -> None:
    """Add (or replace) the ``mfqat`` functions in ``model`` and import the opsets they need, in place.

    Afterwards ``model`` imports ``(mfqat, 1)`` and the standard opset it
    already had (``21`` when it had none), and has IR version 10 or newer.
    Accepts an ``onnx.ModelProto`` or an ``onnx_ir.Model``. Also registers
    the operator schemas (see :func:`register_schemas`), so that the checker
    and shape inference of this process see typed outputs.

    Raises:
        ValueError: The model's standard opset is below 21, or it imports
            another version of ``mfqat``.
        TypeError: ``model`` is neither model type.
    """
    register_schemas()
    if isinstance(model, onnx.ModelProto):
        _attach_to_proto(model)
        return
    if isinstance(model, onnx_ir.Model):
        _attach_to_ir(model)
        return
    raise TypeError(f"expected an onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def _proto_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Yield every node of the graph, its subgraphs and its other functions."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            yield node
            for attribute in node.attribute:
                graphs.extend([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs)
    for function in model.functions:
        yield from function.node


def _node_format(attribute: onnx.AttributeProto | onnx_ir.Attr | None) -> str | None:
    """Return the canonical format a node's ``format`` attribute names, or None when it names none."""
    if attribute is None:
        return None
    if isinstance(attribute, onnx.AttributeProto):
        text = attribute.s.decode() if attribute.type == onnx.AttributeProto.STRING else None
    else:
        # A reference to a caller's attribute has no value of its own.
        value = getattr(attribute, "value", None)
        text = value if isinstance(value, str) else None
    try:
        return get_format(text).name if text else None
    except ValueError:
        return None


def _needed_functions(nodes: Iterable[tuple[str, str | None]], opset: int) -> list[onnx.FunctionProto]:
    """Build the functions that ``(op_type, format)`` pairs of a model's ``mfqat`` nodes need.

    A file carries only the bodies it uses, each with the tables of the formats
    its nodes name. A weight-only model needs no MXQuantize body (about 13 KB),
    and the tables of every format would add about 7 KB to each file. A node with no
    known format (an attribute reference, a misspelt name) gets a body for
    every format. A model with no ``mfqat`` node yet gets both bodies for every format.
    """
    used: dict[str, set[str | None]] = {}
    for op_type, fmt in nodes:
        used.setdefault(op_type, set()).add(fmt)
    if not used:
        used = dict.fromkeys(_FUNCTION_BUILDERS, {None})
    return [
        build(opset, None if None in used[op_type] else sorted(used[op_type]))
        for op_type, build in _FUNCTION_BUILDERS.items()
        if op_type in used
    ]


def _attach_to_proto(model: onnx.ModelProto) -> None:
    imports = {entry.domain: entry.version for entry in model.opset_import}
    opset = _resolve_opset(imports)
    for domain, version in (("", opset), (DOMAIN, DOMAIN_VERSION)):
        if domain not in imports and not (domain == "" and "ai.onnx" in imports):
            model.opset_import.append(helper.make_opsetid(domain, version))
    if model.ir_version < _MIN_IR_VERSION:
        logger.info("raising IR version from %s to %s for opset %s", model.ir_version, _MIN_IR_VERSION, opset)
        model.ir_version = _MIN_IR_VERSION

    other_functions = [f for f in model.functions if not _is_ours(f.domain, f.name)]
    replaced = len(model.functions) - len(other_functions)
    used = [
        (node.op_type, _node_format(next((a for a in node.attribute if a.name == "format"), None)))
        for node in _proto_nodes(model)
        if _is_ours(node.domain, node.op_type)
    ]
    del model.functions[:]
    model.functions.extend(other_functions)
    model.functions.extend(_needed_functions(used, opset))
    logger.debug("attached %s functions (replaced %s) for opset %s", DOMAIN, replaced, opset)


def _attach_to_ir(model: onnx_ir.Model) -> None:
    imports = dict(model.opset_imports)
    opset = _resolve_opset(imports)
    for domain, version in (("", opset), (DOMAIN, DOMAIN_VERSION)):
        if domain not in imports and not (domain == "" and "ai.onnx" in imports):
            model.opset_imports[domain] = version
    if model.ir_version < _MIN_IR_VERSION:
        logger.info("raising IR version from %s to %s for opset %s", model.ir_version, _MIN_IR_VERSION, opset)
        model.ir_version = _MIN_IR_VERSION

    for key in [key for key in model.functions if _is_ours(key[0], key[1])]:
        del model.functions[key]
    used = [
        (node.op_type, _node_format(node.attributes.get("format")))
        for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph)
        if _is_ours(node.domain, node.op_type)
    ]
    for proto in _needed_functions(used, opset):
        function = onnx_ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function
