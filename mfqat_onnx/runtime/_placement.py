"""Placement of ``mfqat`` nodes on the native kernel or on their function bodies.

ONNX Runtime inlines a model-local function and constant-folds it when every
input is constant, so a weight's ``MXDequantize`` body becomes an fp32
initializer at session start: fp32 speed and fp32 memory. A registered kernel
takes precedence over the function and is never folded (custom domains count
as non-deterministic for ONNX Runtime's constant folding), so the weight stays
packed and is decoded on every run.

To get both in one session, :func:`route_constant_weights` moves the
``MXDequantize`` nodes whose inputs are all constant into a private domain
that has only the function body (a copy of ``mfqat.MXDequantize``). ONNX
Runtime inlines and folds those, while activation quantizers keep the kernel.
"""

from __future__ import annotations

import logging

import onnx
from onnx import helper

logger = logging.getLogger(__name__)

DOMAIN = "mfqat"
DOMAIN_VERSION = 1
DEQUANTIZE_OP = "MXDequantize"
QUANTIZE_OP = "MXQuantize"
# Private domain of weight decoders that ONNX Runtime should fold; it never
# appears in a saved file.
FOLD_DOMAIN = "mfqat.fold"


def iter_nodes(graph: onnx.GraphProto):
    """Yield every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from iter_nodes(subgraph)


def mx_op_types(model: onnx.ModelProto) -> set[str]:
    """Return the ``mfqat`` operator types the model's graphs use."""
    return {node.op_type for node in iter_nodes(model.graph) if node.domain == DOMAIN}


def check_domain(model: onnx.ModelProto) -> None:
    """Check that the model imports ``mfqat`` version 1 wherever it uses the domain.

    ONNX Runtime resolves custom-domain nodes by name, whatever domain version
    the model imports. An unsupported version would therefore run version 1
    semantics silently, so this check rejects it first.

    Raises:
        ValueError: The model imports another ``mfqat`` version, uses
            ``mfqat`` nodes without importing the domain, or uses an
            ``mfqat`` operator that does not exist.
    """
    imported = {entry.domain: entry.version for entry in model.opset_import}
    version = imported.get(DOMAIN)
    if version is not None and version != DOMAIN_VERSION:
        raise ValueError(
            f"the model imports operator domain {DOMAIN!r} version {version}, but this runtime implements "
            f"version {DOMAIN_VERSION} only; re-export the model with this mfqat_onnx version"
        )
    used = mx_op_types(model)
    if used and version is None:
        raise ValueError(
            f"the model uses {DOMAIN} operators ({', '.join(sorted(used))}) but its opset_import lacks "
            f"({DOMAIN!r}, {DOMAIN_VERSION}); add it with onnx.helper.make_opsetid({DOMAIN!r}, {DOMAIN_VERSION})"
        )
    unknown = used - {DEQUANTIZE_OP, QUANTIZE_OP}
    if unknown:
        raise ValueError(
            f"the model uses unknown {DOMAIN} operators {sorted(unknown)}; this runtime implements "
            f"{DEQUANTIZE_OP} and {QUANTIZE_OP}"
        )


def missing_functions(model: onnx.ModelProto) -> set[str]:
    """Return the ``mfqat`` operator types used by the model that have no model-local function."""
    present = {f.name for f in model.functions if f.domain == DOMAIN}
    return mx_op_types(model) - present


def ensure_functions(model: onnx.ModelProto) -> bool:
    """Attach the ``mfqat`` function bodies when some used operator lacks one, in place.

    Returns:
        True when functions were attached.

    Raises:
        ImportError: ``mfqat_onnx.onnx_ops`` is not available.
    """
    if not missing_functions(model):
        return False
    from mfqat_onnx.onnx_ops import attach_functions

    attach_functions(model)
    logger.debug("attached the mfqat function bodies to the model")
    return True


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    # An initializer that is also a graph input can be overridden at run time,
    # so ONNX Runtime does not fold it either.
    inputs = {value.name for value in graph.input}
    names = {tensor.name for tensor in graph.initializer if tensor.name not in inputs}
    names |= {
        node.output[0] for node in graph.node if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
    }
    return names


def route_constant_weights(model: onnx.ModelProto) -> int:
    """Send top-level ``MXDequantize`` nodes with constant inputs to their function body, in place.

    Returns:
        The number of nodes moved to the private fold domain.

    Raises:
        ValueError: The model lacks the function bodies and they cannot be
            attached (its standard opset is below 21); the model is unchanged.
        ImportError: ``mfqat_onnx.onnx_ops`` is not available.
    """
    constants = _constant_names(model.graph)
    weight_nodes = [
        node
        for node in model.graph.node
        if node.domain == DOMAIN
        and node.op_type == DEQUANTIZE_OP
        and node.input
        and all(name in constants for name in node.input)
    ]
    if not weight_nodes:
        return 0

    ensure_functions(model)
    body = next(f for f in model.functions if f.domain == DOMAIN and f.name == DEQUANTIZE_OP)
    folded = onnx.FunctionProto()
    folded.CopyFrom(body)
    folded.domain = FOLD_DOMAIN
    model.functions.append(folded)
    model.opset_import.append(helper.make_opsetid(FOLD_DOMAIN, DOMAIN_VERSION))
    for node in weight_nodes:
        node.domain = FOLD_DOMAIN
    return len(weight_nodes)
