"""The ``mfqat`` ONNX operator domain: schemas, node builders and standard-op function bodies.

``MXDequantize(codes, scales) -> y`` and ``MXQuantize(x) -> (codes, scales)``
(domain ``mfqat``, version 1) follow ``docs/format.md``. Every model that uses
them carries one model-local function per operator, made of standard opset-21
ops only, so any ONNX runtime can run it and ONNX Runtime can constant-fold it.
Each function reads the ``format`` attribute at run time. It serves the formats
that the model's nodes name when :func:`attach_functions` builds it, and every
format of :data:`mfqat_onnx.formats.FORMATS` from :func:`function_protos` with
no format list.

The bodies accept the canonical format ids and the aliases ``mxfp8``,
``mxfp6`` and ``mxfp4`` (lowercase, exactly). The node builders accept any
spelling :func:`mfqat_onnx.formats.get_format` accepts and always store the
canonical id.
"""

from mfqat_onnx.onnx_ops._contract import (
    DEFAULT_OPSET,
    DEQUANTIZE_OP,
    DOMAIN,
    DOMAIN_VERSION,
    QUANTIZE_OP,
    SCALE_RULES,
)
from mfqat_onnx.onnx_ops._nodes import (
    attach_functions,
    function_protos,
    make_dequantize_node,
    make_quantize_node,
)
from mfqat_onnx.onnx_ops._schemas import register_schemas

__all__ = [
    "DEFAULT_OPSET",
    "DEQUANTIZE_OP",
    "DOMAIN",
    "DOMAIN_VERSION",
    "QUANTIZE_OP",
    "SCALE_RULES",
    "attach_functions",
    "function_protos",
    "make_dequantize_node",
    "make_quantize_node",
    "register_schemas",
]
