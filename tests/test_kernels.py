"""Native MXDequantize / MXQuantize kernels against the numpy reference, bit for bit.

Every test runs the kernel library inside ONNX Runtime on a single-node model
and compares codes, scale bytes and float32 outputs as bit patterns (NaN and
-0.0 included) with ``mfqat_onnx.numerics`` or with values worked out by hand.
The library is built once per session; a failed build errors every test here.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from mfqat_onnx import numerics
from mfqat_onnx.formats import FORMATS, get_format
from mfqat_onnx.runtime import build_kernels
from mfqat_onnx.runtime._build import build_library

ORT_ERRORS = (Fail, InvalidArgument, RuntimeException)
RULES = ("floor", "rceil", "even")
FORMAT_NAMES = list(FORMATS)

# (shape, axis, block_size): last-axis and strided blocks, partial last
# blocks, block sizes that are not multiples of the packing group.
LAYOUTS = [
    ((4, 70), -1, 32),
    ((3, 37, 5), 1, 16),
    ((2, 9), 0, 4),
    ((5, 64), 1, 7),
    ((6, 50), 0, 32),
    ((2, 3, 11), -1, 1),
]


@pytest.fixture(scope="session")
def kernel_library() -> Path:
    return build_kernels()


# ---------------------------------------------------------------------------
# Single-node models


def _model(node, inputs, outputs):
    graph = helper.make_graph([node], "kernel_test", inputs, outputs)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("mfqat", 1)]
    )
    # The node needs no standard op, so IR 8 / opset 17 lets onnxruntime 1.17
    # (which stops at IR 9 / opset 20) load the same models.
    model.ir_version = 8
    return model


def dequantize_model(fmt, *, axis=-1, block_size=32, axis_length, **extra):
    attrs = {"format": fmt, "axis": axis, "block_size": block_size, "axis_length": axis_length, **extra}
    attrs = {key: value for key, value in attrs.items() if value is not None}
    node = helper.make_node("MXDequantize", ["codes", "scales"], ["y"], domain="mfqat", name="dq", **attrs)
    return _model(
        node,
        [
            helper.make_tensor_value_info("codes", TensorProto.UINT8, None),
            helper.make_tensor_value_info("scales", TensorProto.UINT8, None),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )


def quantize_model(fmt, *, axis=-1, block_size=32, scale_rule="floor"):
    node = helper.make_node(
        "MXQuantize",
        ["x"],
        ["codes", "scales"],
        domain="mfqat",
        name="q",
        format=fmt,
        axis=axis,
        block_size=block_size,
        scale_rule=scale_rule,
    )
    return _model(
        node,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [
            helper.make_tensor_value_info("codes", TensorProto.UINT8, None),
            helper.make_tensor_value_info("scales", TensorProto.UINT8, None),
        ],
    )


def make_session(library, model, threads=1):
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def kernel_quantize(library, x, fmt, *, axis=-1, block_size=32, scale_rule="floor", threads=1):
    session = make_session(
        library, quantize_model(fmt, axis=axis, block_size=block_size, scale_rule=scale_rule), threads
    )
    codes, scales = session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})
    return codes, scales


def kernel_dequantize(library, packed, scales, fmt, *, axis=-1, block_size=32, axis_length, threads=1):
    model = dequantize_model(fmt, axis=axis, block_size=block_size, axis_length=axis_length)
    (y,) = make_session(library, model, threads).run(None, {"codes": packed, "scales": scales})
    return y


def reference(x, fmt, *, axis=-1, block_size=32, scale_rule="floor"):
    """Return (packed codes, scale bytes, decoded float32) from the numpy reference."""
    codes, scales = numerics.quantize(x, fmt, axis=axis, block_size=block_size, scale_rule=scale_rule)
    packed = numerics.pack_codes(codes, fmt, axis=axis, block_size=block_size)
    # rceil and even may round a block near the float32 maximum up to a scale
    # whose product overflows to Inf; the kernel must produce the same Inf.
    with np.errstate(over="ignore"):
        decoded = numerics.dequantize(codes, scales, fmt, axis=axis, block_size=block_size)
    return packed, scales, decoded


def bits(a):
    a = np.asarray(a, dtype=np.float32)
    return a.view(np.uint32)


def assert_bits_equal(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.dtype == np.float32:
        actual, expected = bits(actual), bits(expected)
    mismatch = np.flatnonzero(actual.ravel() != expected.ravel())
    assert mismatch.size == 0, (
        f"{what}: {mismatch.size} of {actual.size} differ, first at flat index {mismatch[0]}: "
        f"{actual.ravel()[mismatch[0]]:#x} != {expected.ravel()[mismatch[0]]:#x}"
    )


def random_values(rng, shape):
    """Values over a wide exponent range, with zeros, -0.0, float32 subnormals and huge values."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-40, 40, size=shape))
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=min(flat.size, 8), replace=False)
    specials = [0.0, -0.0, 1e-40, -3e-39, 3.0e38, -1.5e38, 2.0**-130, 6.0]
    flat[picks] = specials[: picks.size]
    return x.astype(np.float32)


def with_special_blocks(x, axis, block_size, rng):
    """Put a NaN, an Inf and an all-zero block into ``x`` (when it has enough blocks)."""
    x = np.moveaxis(x.copy(), axis, -1)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] >= 3:
        rows[0, rng.integers(0, min(block_size, rows.shape[1]))] = np.nan
        rows[1, 0] = -np.inf
        rows[2, : min(block_size, rows.shape[1])] = 0.0
        rows[2, 0] = -0.0
    return np.ascontiguousarray(np.moveaxis(rows.reshape(x.shape), -1, axis))


# ---------------------------------------------------------------------------
# Against the numpy reference


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("rule", RULES)
def test_quantize_matches_reference(kernel_library, fmt, rule):
    rng = np.random.default_rng([FORMAT_NAMES.index(fmt), RULES.index(rule)])
    for shape, axis, block_size in LAYOUTS:
        x = with_special_blocks(random_values(rng, shape), axis, block_size, rng)
        packed, scales, decoded = reference(x, fmt, axis=axis, block_size=block_size, scale_rule=rule)
        where = f"{fmt} {rule} shape={shape} axis={axis} block_size={block_size}"

        codes_k, scales_k = kernel_quantize(
            kernel_library, x, fmt, axis=axis, block_size=block_size, scale_rule=rule
        )
        assert_bits_equal(scales_k, scales, f"scales, {where}")
        assert_bits_equal(codes_k, packed, f"codes, {where}")

        y = kernel_dequantize(
            kernel_library, packed, scales, fmt, axis=axis, block_size=block_size, axis_length=shape[axis]
        )
        assert_bits_equal(y, decoded, f"decoded, {where}")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_dequantize_arbitrary_codes(kernel_library, fmt):
    # Codes the encoder never writes (NaN/Inf codes, the integer minimum) and
    # every scale byte, NaN blocks with non-zero codes included.
    info = get_format(fmt)
    rng = np.random.default_rng(100 + FORMAT_NAMES.index(fmt))
    for shape, axis, block_size in LAYOUTS:
        codes = rng.integers(0, info.num_codes, size=shape, dtype=np.uint8)
        scale_shape = list(shape)
        scale_shape[axis] = -(-shape[axis] // block_size)
        scales = rng.integers(0, 256, size=scale_shape, dtype=np.uint8)
        scales.reshape(-1)[:3] = [0, 255, 254]
        packed = numerics.pack_codes(codes, fmt, axis=axis, block_size=block_size)
        # Large codes under scale bytes near 254 overflow float32 to Inf in
        # both implementations; the quantizer never writes such blocks.
        with np.errstate(over="ignore"):
            expected = numerics.dequantize(codes, scales, fmt, axis=axis, block_size=block_size)
        y = kernel_dequantize(
            kernel_library, packed, scales, fmt, axis=axis, block_size=block_size, axis_length=shape[axis]
        )
        assert_bits_equal(y, expected, f"{fmt} shape={shape} axis={axis} block_size={block_size}")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_decode_every_code(kernel_library, fmt):
    info = get_format(fmt)
    codes = np.tile(np.arange(info.num_codes, dtype=np.uint8), (7, 1))
    scale_bytes = np.array([0, 1, 100, 127, 200, 254, 255], dtype=np.uint8)
    block_size = info.num_codes
    scales = scale_bytes[:, None]
    packed = numerics.pack_codes(codes, fmt, axis=1, block_size=block_size)
    with np.errstate(over="ignore"):
        expected = numerics.dequantize(codes, scales, fmt, axis=1, block_size=block_size)
    y = kernel_dequantize(
        kernel_library, packed, scales, fmt, axis=1, block_size=block_size, axis_length=block_size
    )
    assert_bits_equal(y, expected, fmt)
    # Row 3 has scale 1, so it is the decode table itself.
    assert_bits_equal(y[3], numerics.decode_table(fmt), f"{fmt} table")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_rounding_probes(kernel_library, fmt):
    # Every element value, every midpoint between neighbours, and the floats
    # just above and below each, in blocks whose largest value pins byte 127.
    info = get_format(fmt)
    table = numerics.decode_table(fmt).astype(np.float64)
    grid = np.unique(np.abs(table[np.isfinite(table)]))
    grid = grid[grid <= info.max_normal]  # drops the unused integer minimum
    midpoints = (grid[:-1] + grid[1:]) / 2
    points = np.concatenate([grid, midpoints]).astype(np.float32)
    # Values past max_normal saturate; below 2^(emax_elem + 1) they keep byte 127.
    top = np.float32(2.0 ** (info.emax_elem + 1))
    saturating = np.array([(info.max_normal + top) / 2, np.nextafter(top, np.float32(0))], np.float32)
    probes = np.concatenate(
        [points, np.nextafter(points, np.float32(np.inf)), np.nextafter(points, np.float32(0)), saturating]
    )
    probes = np.concatenate([probes, -probes])
    block = 32
    per_block = block - 1
    n_blocks = -(-probes.size // per_block)
    body = np.zeros(n_blocks * per_block, dtype=np.float32)
    body[: probes.size] = probes
    x = np.concatenate(
        [np.full((n_blocks, 1), info.max_normal, np.float32), body.reshape(n_blocks, per_block)], axis=1
    )
    packed, scales, decoded = reference(x, fmt, block_size=block)
    assert np.all(scales == 127)
    codes_k, scales_k = kernel_quantize(kernel_library, x, fmt, block_size=block)
    assert_bits_equal(scales_k, scales, "scales")
    assert_bits_equal(codes_k, packed, "codes")


def test_parallel_tasks_match_reference(kernel_library):
    # Large enough for several tasks on the intra-op thread pool, in both layouts.
    rng = np.random.default_rng(7)
    for shape, axis in (((64, 4100), 1), ((4100, 70), 0)):
        x = random_values(rng, shape)
        for fmt in ("mxfp4_e2m1", "mxint8", "mxfp6_e3m2"):
            packed, scales, decoded = reference(x, fmt, axis=axis)
            codes_k, scales_k = kernel_quantize(kernel_library, x, fmt, axis=axis, threads=2)
            assert_bits_equal(codes_k, packed, f"codes {fmt} {shape}")
            assert_bits_equal(scales_k, scales, f"scales {fmt} {shape}")
            y = kernel_dequantize(
                kernel_library, packed, scales, fmt, axis=axis, axis_length=shape[axis], threads=2
            )
            assert_bits_equal(y, decoded, f"decoded {fmt} {shape}")


def test_empty_tensors(kernel_library):
    x = np.zeros((0, 40), dtype=np.float32)
    codes, scales = kernel_quantize(kernel_library, x, "mxfp4")
    assert codes.shape == (0, 32)
    assert scales.shape == (0, 2)
    y = kernel_dequantize(kernel_library, codes, scales, "mxfp4", axis_length=40)
    assert y.shape == (0, 40)


# ---------------------------------------------------------------------------
# Edge cases with hand-computed values


def pad32(values):
    out = np.zeros(32, dtype=np.float32)
    out[: len(values)] = values
    return out


def quantize_and_decode(library, x, fmt, *, axis=-1, block_size=32, scale_rule="floor"):
    x = np.asarray(x, dtype=np.float32)
    codes, scales = kernel_quantize(library, x, fmt, axis=axis, block_size=block_size, scale_rule=scale_rule)
    y = kernel_dequantize(
        library, codes, scales, fmt, axis=axis, block_size=block_size, axis_length=x.shape[axis]
    )
    return codes, scales, y


def test_e4m3_block_max_saturates_to_896(kernel_library):
    # Scale 2^(9-8) = 2, so 957/2 = 478.5 clamps to 448 and decodes to 896.
    x = [957, 957, 902.4, 960, 832, 291.7882, -124.8256, 783.546, 927.3255, -233.117, 583.4501, 57.7898,
         136.0891, 851.1933, -857.9279, -825.7414, -959.5632, 665.2397, 556.3135, 740.0243, 957.2367,
         598.3171, -77.0413, 561.0583, -763.4512, 279.842, -713.2934, 889.3378, 43.6966, -170.6761,
         -470.8888, 548.4674]  # fmt: skip
    expected = [896, 896, 896, 896, 832, 288, -128, 768, 896, -240, 576, 56, 144, 832, -832, -832, -896, 640,
                576, 768, 896, 576, -80, 576, -768, 288, -704, 896, 44, -176, -480, 576]  # fmt: skip
    codes, scales, y = quantize_and_decode(kernel_library, [x], "mxfp8_e4m3")
    assert scales.tolist() == [[128]]
    assert_bits_equal(y[0], np.array(expected, np.float32), "decoded")
    assert set(codes[0][np.abs(np.array(x)) >= 864].tolist()) <= {0x7E, 0xFE}
    assert not np.isnan(y).any()


def test_fp8_saturates_instead_of_nan_or_inf(kernel_library):
    codes, scales, y = quantize_and_decode(kernel_library, [pad32([465.0, 1.0])], "mxfp8_e4m3")
    assert scales.tolist() == [[127]]
    assert codes[0, :2].tolist() == [0x7E, 0x38]
    assert y[0, :2].tolist() == [448.0, 1.0]

    codes, scales, y = quantize_and_decode(kernel_library, [pad32([62000.0, 1.0])], "mxfp8_e5m2")
    assert scales.tolist() == [[127]]
    assert codes[0, 0] == 0x7B
    assert y[0, :2].tolist() == [57344.0, 1.0]


def test_fp4_ties_round_to_even(kernel_library):
    x = pad32([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0])
    codes, scales, y = quantize_and_decode(kernel_library, [x], "mxfp4_e2m1")
    assert scales.tolist() == [[127]]
    # Codes 0x7,0x0,0x2,0x2,0x4,0x4,0x6,0x6,0x8,0xC,0xE, two per byte, low nibble first.
    assert codes[0].tolist() == [0x07, 0x22, 0x44, 0x66, 0xC8, 0x0E] + [0] * 10
    expected = pad32([6, 0, 1, 1, 2, 2, 4, 4, -0.0, -2, -4])
    assert_bits_equal(y[0], expected, "decoded")


@pytest.mark.parametrize(
    ("fmt", "values", "expected"),
    [
        ("mxfp4_e2m1", [6.0, np.float32(0.25000006), 0.25, -np.float32(0.25000006)], [6, 0.5, 0, -0.5]),
        ("mxfp8_e4m3", [300.0, 1.8131605, 1.8125, 1.8124999, -1.8131605], [288, 1.875, 1.75, 1.75, -1.875]),
        ("mxfp6_e2m3", [7.5, 0.0625, 0.0625001, 0.1875, 0.9375, -0.0625], [7.5, 0, 0.125, 0.25, 1.0, -0.0]),
        ("mxfp6_e3m2", [28, 0.03125, 0.03125001, 0.09375, 0.21875], [28, 0, 0.0625, 0.125, 0.25]),
    ],
)
def test_sticky_bits_and_subnormals(kernel_library, fmt, values, expected):
    codes, scales, y = quantize_and_decode(kernel_library, [pad32(values)], fmt)
    assert scales.tolist() == [[127]]
    assert_bits_equal(y[0], pad32(expected), "decoded")


def test_fp4_sticky_bit_input_pattern():
    # The probe above must be the float just past 0.25 (bit pattern 0x3E800002).
    assert np.float32(0.25000006).view(np.uint32) == 0x3E800002


@pytest.mark.parametrize(
    ("fmt", "values", "scale", "expected"),
    [
        ("mxint8", [1.999, 1.0, 0.5078125, 0.5234375, -1.999, -0.00390625], 127,
         [1.984375, 1.0, 0.5, 0.53125, -1.984375, 0.0]),
        ("mxint8", [-2.0, 1.0, 0.015625], 128, [-2.0, 1.0, 0.0]),
        ("mxint6", [1.999, 1.0, 0.53125, 0.375], 127, [1.9375, 1.0, 0.5, 0.375]),
        ("mxint4", [1.999, 1.0, 0.53125, 0.375], 127, [1.75, 1.0, 0.5, 0.5]),
    ],
)  # fmt: skip
def test_int_ties_and_symmetric_clamp(kernel_library, fmt, values, scale, expected):
    codes, scales, y = quantize_and_decode(kernel_library, [pad32(values)], fmt)
    assert scales.tolist() == [[scale]]
    assert_bits_equal(y[0], pad32(expected), "decoded")


def test_int8_never_uses_minus_128(kernel_library):
    codes, _, _ = quantize_and_decode(kernel_library, [pad32([1.999, -1.999])], "mxint8")
    assert codes[0, :2].tolist() == [127, 0x81]


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1", "mxint8"])
def test_all_zero_block(kernel_library, fmt):
    x = np.zeros(32, dtype=np.float32)
    x[3] = -0.0
    codes, scales, y = quantize_and_decode(kernel_library, [x], fmt)
    assert scales.tolist() == [[0]]
    assert np.all(y == 0)
    sign = np.signbit(y[0])
    assert sign[3] == get_format(fmt).is_float
    assert not sign[np.arange(32) != 3].any()


def test_zero_row_leaves_other_rows_alone(kernel_library):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[2] = 0.0
    packed, scales, decoded = reference(x, "mxfp8_e4m3")
    codes_k, scales_k, y = quantize_and_decode(kernel_library, x, "mxfp8_e4m3")
    assert scales_k[2].tolist() == [0, 0]
    assert not (scales_k == 0xFF).any()
    assert np.all(y[2] == 0)
    assert_bits_equal(codes_k, packed, "codes")
    assert_bits_equal(y, decoded, "decoded")


def test_signed_zero(kernel_library):
    codes, scales, y = quantize_and_decode(kernel_library, [pad32([4.0, -0.0, -0.1, -0.2])], "mxfp4_e2m1")
    assert scales.tolist() == [[127]]
    assert codes[0, :2].tolist() == [0x86, 0x88]
    assert_bits_equal(y[0, :4], np.array([4.0, -0.0, -0.0, -0.0], np.float32), "fp4")

    codes, scales, y = quantize_and_decode(kernel_library, [pad32([256.0, -0.0, -1e-4])], "mxfp8_e4m3")
    assert scales.tolist() == [[127]]
    assert codes[0, :3].tolist() == [0x78, 0x80, 0x80]
    assert_bits_equal(y[0, :3], np.array([256.0, -0.0, -0.0], np.float32), "e4m3")

    codes, scales, y = quantize_and_decode(kernel_library, [pad32([1.0, -0.0, -0.001])], "mxint8")
    assert scales.tolist() == [[127]]
    assert codes[0, :3].tolist() == [0x40, 0x00, 0x00]
    assert_bits_equal(y[0, :3], np.array([1.0, 0.0, 0.0], np.float32), "int8")


def test_blocks_stay_inside_rows(kernel_library):
    x = np.stack([np.full(36, 1.0), np.full(36, 96.0)]).astype(np.float32)
    codes, scales, y = quantize_and_decode(kernel_library, x, "mxfp4_e2m1")
    assert codes.shape == (2, 32)
    assert scales.tolist() == [[125, 125], [131, 131]]
    assert_bits_equal(y, x, "decoded")

    x = np.array([1.0] * 32 + [3.0], dtype=np.float32)
    codes, scales, y = quantize_and_decode(kernel_library, x, "mxfp4_e2m1")
    assert scales.tolist() == [125, 126]
    assert_bits_equal(y, x, "decoded")


def test_conv_weight_blocks_along_input_channels(kernel_library):
    w = np.zeros((1, 32, 1, 2), dtype=np.float32)
    w[0, :, 0, 0] = 1.0
    w[0, :, 0, 1] = 64.0
    codes, scales, y = quantize_and_decode(kernel_library, w, "mxfp4_e2m1", axis=1)
    assert scales.shape == (1, 1, 1, 2)
    assert scales.reshape(-1).tolist() == [125, 131]
    assert_bits_equal(y, w, "decoded")


def test_non_last_axis_blocks_are_contiguous(kernel_library):
    codes = np.full((1, 64), 0x38, dtype=np.uint8)
    scales = np.array([[127, 128]], dtype=np.uint8)
    y = kernel_dequantize(kernel_library, codes, scales, "mxfp8_e4m3", axis=1, axis_length=64)
    assert_bits_equal(y, np.array([[1.0] * 32 + [2.0] * 32], np.float32), "decoded")

    # The same blocks along axis 0 of the transposed tensor.
    y = kernel_dequantize(
        kernel_library, codes.T.copy(), scales.T.copy(), "mxfp8_e4m3", axis=0, axis_length=64
    )
    assert_bits_equal(y, np.array([[1.0] * 32 + [2.0] * 32], np.float32).T, "decoded, axis 0")


def test_nan_and_inf_blocks(kernel_library):
    x = np.ones((3, 32), dtype=np.float32)
    x[0, 5] = np.nan
    x[1, 31] = np.inf
    x[2, 0] = -np.inf
    for fmt in ("mxfp8_e5m2", "mxfp4_e2m1", "mxint8"):
        codes, scales, y = quantize_and_decode(kernel_library, x, fmt)
        assert scales.reshape(-1).tolist() == [255, 255, 255]
        assert not codes.any()
        assert np.isnan(y).all()


def test_tiny_and_huge_scales(kernel_library):
    # amax 2^-130 clamps the shared exponent to -127 (byte 0), where E4M3's
    # smallest subnormal is 2^-9 * 2^-127 = 2^-136: 2^-135 (a float32
    # subnormal) survives, 2^-137 is a tie that rounds to even, 0.
    tiny = pad32([2.0**-130, 2.0**-135, 2.0**-137])
    codes, scales, y = quantize_and_decode(kernel_library, [tiny], "mxfp8_e4m3")
    assert scales.tolist() == [[0]]
    assert y[0, :3].tolist() == [2.0**-130, 2.0**-135, 0.0]
    # amax 2^127 with MXINT8 needs E = 127 (byte 254), the largest finite scale.
    huge = pad32([2.0**127, -(2.0**126)])
    codes, scales, y = quantize_and_decode(kernel_library, [huge], "mxint8")
    assert scales.tolist() == [[254]]
    assert y[0, :2].tolist() == [2.0**127, -(2.0**126)]


@pytest.mark.parametrize(
    ("amax", "rule", "scale", "decoded"),
    [
        (1.0, "floor", 119, 1.0),
        (1.0, "rceil", 119, 1.0),
        (1.9, "floor", 119, 1.75),
        (1.9, "rceil", 120, 1.875),
        (500.0, "floor", 127, 448.0),
        (500.0, "rceil", 128, 512.0),
    ],
)
def test_scale_rules_e4m3(kernel_library, amax, rule, scale, decoded):
    codes, scales, y = quantize_and_decode(kernel_library, [pad32([amax])], "mxfp8_e4m3", scale_rule=rule)
    assert scales.tolist() == [[scale]]
    assert y[0, 0] == np.float32(decoded)


def test_even_rule_rounds_amax_up_a_binade(kernel_library):
    # 7.9 rounds to 8.0 at FP4's one mantissa bit, so "even" picks E = 3 - 2 = 1
    # (byte 128) where "floor" picks E = 0 and saturates 7.9 to 6.
    codes, scales, y = quantize_and_decode(kernel_library, [pad32([7.9])], "mxfp4_e2m1", scale_rule="even")
    assert scales.tolist() == [[128]]
    assert y[0, 0] == 8.0
    codes, scales, y = quantize_and_decode(kernel_library, [pad32([7.9])], "mxfp4_e2m1", scale_rule="floor")
    assert scales.tolist() == [[127]]
    assert y[0, 0] == 6.0


# ---------------------------------------------------------------------------
# Bad input: errors, never a crash


def test_unknown_format_fails_at_session_start(kernel_library):
    with pytest.raises(ORT_ERRORS, match=r"unknown MX format 'mxfp9'; valid formats are mxfp8_e4m3"):
        make_session(kernel_library, dequantize_model("mxfp9", axis_length=32))


def test_unknown_scale_rule(kernel_library):
    with pytest.raises(ORT_ERRORS, match=r"unknown scale_rule 'ceil'; expected floor, rceil or even"):
        make_session(kernel_library, quantize_model("mxfp4", scale_rule="ceil"))


def test_missing_axis_length(kernel_library):
    with pytest.raises(ORT_ERRORS, match=r"missing required int attribute 'axis_length'"):
        make_session(kernel_library, dequantize_model("mxfp4", axis_length=None))


def test_bad_block_size(kernel_library):
    with pytest.raises(ORT_ERRORS, match=r"block_size must be a positive integer, got 0"):
        make_session(kernel_library, dequantize_model("mxfp4", block_size=0, axis_length=32))


def test_codes_size_mismatch(kernel_library):
    session = make_session(kernel_library, dequantize_model("mxfp4", axis_length=36))
    with pytest.raises(InvalidArgument, match=r"axis 1 must hold 2 blocks x 16 bytes = 32 bytes, got 17"):
        session.run(None, {"codes": np.zeros((2, 17), np.uint8), "scales": np.zeros((2, 2), np.uint8)})
    with pytest.raises(InvalidArgument, match=r"scales have shape \[2, 3\], expected \[2, 2\]"):
        session.run(None, {"codes": np.zeros((2, 32), np.uint8), "scales": np.zeros((2, 3), np.uint8)})
    # The session still works afterwards.
    (y,) = session.run(None, {"codes": np.zeros((2, 32), np.uint8), "scales": np.full((2, 2), 127, np.uint8)})
    assert y.shape == (2, 36)


def test_axis_out_of_range(kernel_library):
    session = make_session(kernel_library, dequantize_model("mxint8", axis=2, axis_length=32))
    with pytest.raises(InvalidArgument, match=r"axis 2 is out of range for input 'codes' of rank 2"):
        session.run(None, {"codes": np.zeros((1, 32), np.uint8), "scales": np.zeros((1, 1), np.uint8)})


def test_scalar_input_rejected(kernel_library):
    session = make_session(kernel_library, quantize_model("mxint8"))
    with pytest.raises(InvalidArgument, match=r"input 'x' is 0-d"):
        session.run(None, {"x": np.array(1.0, dtype=np.float32)})


def test_unknown_operator_in_domain(kernel_library):
    model = dequantize_model("mxfp4", axis_length=32)
    model.graph.node[0].op_type = "MXDecode"
    with pytest.raises(ORT_ERRORS, match=r"mfqat:MXDecode"):
        make_session(kernel_library, model)


def test_library_for_newer_api_reports_error(kernel_library):
    # A library that requests C API version 1000 simulates one built
    # with headers newer than the installed onnxruntime.
    library = build_library(kernel_library.parent / "test-api-1000", ort_api_version=1000)
    options = ort.SessionOptions()
    with pytest.raises(ORT_ERRORS, match=r"needs ONNX Runtime C API version 1000 .* the loaded onnxruntime "):
        options.register_custom_ops_library(str(library))


def test_library_exports_only_register_symbol(kernel_library):
    assert ctypes.CDLL(str(kernel_library)).RegisterCustomOps is not None
    if not sys.platform.startswith("linux"):
        pytest.skip("the symbol listing below reads an ELF file with binutils' nm")
    listing = subprocess.run(
        ["nm", "-D", "--defined-only", str(kernel_library)], capture_output=True, text=True, check=True
    )
    exported = {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}
    assert exported == {"RegisterCustomOps"}
