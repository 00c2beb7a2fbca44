# Where the ONNX Runtime C/C++ API headers come from when ORT_INCLUDE_DIR is
# not given: the amd-quark 0.13 wheel on PyPI ships the onnxruntime 1.17
# headers (C API version 17). The wheel is pinned by its sha256, and only the
# header files below are extracted. mfqat_onnx/runtime reads this file too, so
# the pin lives in one place.
set(MFQAT_ORT_HEADERS_PACKAGE "amd-quark")
set(MFQAT_ORT_HEADERS_VERSION "0.13")
set(MFQAT_ORT_HEADERS_WHEEL "amd_quark-0.13-py3-none-any.whl")
set(MFQAT_ORT_HEADERS_WHEEL_SHA256 "3b3e58a4cbbcff20d27815b641aa4de4d698efde3c782306cb4a6a05bcf55c8c")
set(MFQAT_ORT_HEADERS_PREFIX "quark/onnx/operators/custom_ops/include/onnxruntime-1.17.0/onnxruntime/core/session")
set(MFQAT_ORT_HEADERS_FILES "onnxruntime_c_api.h;onnxruntime_cxx_api.h;onnxruntime_cxx_inline.h;onnxruntime_float16.h")
set(MFQAT_ORT_HEADERS_API_VERSION "17")
