"""Run ``mfqat`` ONNX models in ONNX Runtime, with the native MX kernels when they are built.

Python::

    from mfqat_onnx.runtime import build_kernels, open_session

    build_kernels()                                  # once; cached in .mfqat_cache/
    sess = open_session("anchor.onnx", format="mxfp4")
    y = sess.run(None, {"x": x})
    print(sess.execution_path, sess.weight_storage)  # "native", "fp32"

Command line::

    python -m mfqat_onnx.runtime MODEL [--format F] [--kernels auto|native|functions]
        [--prefer speed|memory] [--input NAME=FILE.npy ...] [--batch N] [--repeat N]
    python -m mfqat_onnx.runtime --build-kernels

The kernel library (``custom_ops/``) is built against the ONNX Runtime 1.17 C
API headers and loads into onnxruntime 1.17 or newer. Without it every model
still runs through the standard-op function bodies it carries.
"""

from mfqat_onnx.runtime._build import KernelBuildError, build_kernels, find_kernel_library
from mfqat_onnx.runtime._session import KernelLibraryError, MXSession, open_session

__all__ = [
    "KernelBuildError",
    "KernelLibraryError",
    "MXSession",
    "build_kernels",
    "find_kernel_library",
    "open_session",
]
