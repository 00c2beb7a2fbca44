"""The mfqat ONNX domain: function bodies in ONNX Runtime and onnx.reference against the numpy reference.

Every comparison is bit for bit (float32 viewed as uint32, NaN and -0.0
included). Each model is built once per parameter set. The inputs contain the
hard cases: NaN/Inf blocks, all-zero blocks with -0.0, subnormal and huge
blocks, partial last blocks, every code of every format.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from mfqat_onnx import numerics
from mfqat_onnx.formats import FORMATS, get_format
from mfqat_onnx.onnx_ops import (
    DEFAULT_OPSET,
    DOMAIN,
    DOMAIN_VERSION,
    attach_functions,
    function_protos,
    make_dequantize_node,
    make_quantize_node,
    register_schemas,
)

FORMAT_NAMES = list(FORMATS)
SCALE_RULES = ("floor", "rceil", "even")
RUNTIMES = ("onnxruntime", "reference")

# id -> (shape, axis, block_size); each has a partial last block or a non-last axis.
GEOMETRIES = {
    "linear_partial": ((3, 37), -1, 32),
    "conv_input_channels": ((4, 20, 3, 2), 1, 8),
    "vector": ((13,), 0, 16),
    "middle_negative_axis": ((5, 9, 2), -2, 16),
}


# ---------------------------------------------------------------------------
# Model building and running


def _value_info(name: str, elem_type: int, rank: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, [f"{name}_{i}" for i in range(rank)])


def _model(nodes, inputs, outputs, *, opset: int = DEFAULT_OPSET, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    attach_functions(model)
    return model


def _ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], options=None) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


class _Runner:
    """One model, run in ONNX Runtime or onnx.reference."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self._session: ort.InferenceSession | None = None
        self._reference: ReferenceEvaluator | None = None

    def run(self, runtime: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if runtime == "onnxruntime":
            if self._session is None:
                self._session = ort.InferenceSession(
                    self.model.SerializeToString(), providers=["CPUExecutionProvider"]
                )
            return self._session.run(None, feeds)
        if self._reference is None:
            self._reference = ReferenceEvaluator(self.model)
        # The bodies divide by zero on purpose (1 / -0.0 reveals the sign bit).
        with np.errstate(all="ignore"):
            return self._reference.run(None, feeds)


@functools.cache
def _dequantize_runner(fmt: str, shape: tuple[int, ...], axis: int, block_size: int) -> _Runner:
    rank = len(shape)
    node = make_dequantize_node(
        "codes", "scales", "y", fmt=fmt, axis=axis, block_size=block_size, axis_length=shape[axis]
    )
    inputs = [_value_info("codes", TensorProto.UINT8, rank), _value_info("scales", TensorProto.UINT8, rank)]
    return _Runner(_model([node], inputs, [_value_info("y", TensorProto.FLOAT, rank)]))


@functools.cache
def _quantize_runner(
    fmt: str, rank: int, axis: int, block_size: int, scale_rule: str, elem_type: int = TensorProto.FLOAT
) -> _Runner:
    node = make_quantize_node(
        "x", "codes", "scales", fmt=fmt, axis=axis, block_size=block_size, scale_rule=scale_rule
    )
    outputs = [_value_info("codes", TensorProto.UINT8, rank), _value_info("scales", TensorProto.UINT8, rank)]
    return _Runner(_model([node], [_value_info("x", elem_type, rank)], outputs))


@functools.cache
def _round_trip_runner(
    fmt: str, shape: tuple[int, ...], axis: int, block_size: int, scale_rule: str
) -> _Runner:
    rank = len(shape)
    nodes = [
        make_quantize_node(
            "x", "codes", "scales", fmt=fmt, axis=axis, block_size=block_size, scale_rule=scale_rule
        ),
        make_dequantize_node(
            "codes", "scales", "y", fmt=fmt, axis=axis, block_size=block_size, axis_length=shape[axis]
        ),
    ]
    outputs = [
        _value_info("codes", TensorProto.UINT8, rank),
        _value_info("scales", TensorProto.UINT8, rank),
        _value_info("y", TensorProto.FLOAT, rank),
    ]
    return _Runner(_model(nodes, [_value_info("x", TensorProto.FLOAT, rank)], outputs))


def _round_trip(runtime, fmt, x, *, axis=-1, block_size=32, scale_rule="floor"):
    """Return (packed codes, scale bytes, decoded values) of ``x`` through MXQuantize -> MXDequantize."""
    x = np.asarray(x, dtype=np.float32)
    runner = _round_trip_runner(fmt, x.shape, axis, block_size, scale_rule)
    return runner.run(runtime, {"x": x})


def _block(values, length: int = 32) -> np.ndarray:
    """One row: ``values`` followed by zeros up to ``length``."""
    row = np.zeros(length, dtype=np.float32)
    row[: len(values)] = np.asarray(values, dtype=np.float32)
    return row[None, :]


# ---------------------------------------------------------------------------
# Bit-exact comparison


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint32) if a.dtype == np.float32 else a


def assert_bit_equal(
    actual: np.ndarray, expected: np.ndarray, what: str, inputs: np.ndarray | None = None
) -> None:
    """Fail once, listing the first mismatches (and their inputs when shapes agree)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    wrong = np.argwhere(_bits(actual) != _bits(expected))
    if wrong.size:
        lines = []
        for index in map(tuple, wrong[:8]):
            source = "" if inputs is None or inputs.shape != actual.shape else f" input {inputs[index]!r}"
            lines.append(f"  at {index}:{source} got {actual[index]!r}, expected {expected[index]!r}")
        raise AssertionError(f"{what}: {len(wrong)} of {actual.size} differ\n" + "\n".join(lines))


# ---------------------------------------------------------------------------
# Inputs


def _wide_random(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values over a wide exponent range, with +0.0 and -0.0 sprinkled in."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-24, 24, shape))
    x[rng.random(shape) < 0.08] = 0.0
    x[rng.random(shape) < 0.08] = -0.0
    return x.astype(np.float32)


def _quantize_input(seed: int, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """Random values whose rows start with special blocks: NaN, +Inf, -Inf, zeros, subnormal, huge."""
    rng = np.random.default_rng(seed)
    moved = np.moveaxis(_wide_random(rng, shape), axis, -1).copy()
    rows = moved.reshape(-1, shape[axis])
    first = slice(0, min(block_size, shape[axis]))
    for r, row in enumerate(rows):
        kind = r % 7
        if kind == 0:
            row[first.stop // 2] = np.nan
        elif kind == 1:
            row[0] = np.inf
        elif kind == 2:
            row[-1] = -np.inf
        elif kind == 3:
            row[first] = 0.0
            row[first.stop - 1] = -0.0
        elif kind == 4:
            row[first] *= np.float32(2.0**-120)  # subnormal block: the exponent clamps at -127
        elif kind == 5:
            row[first] = rng.uniform(-3.4e38, 3.4e38, first.stop).astype(np.float32)
    return np.moveaxis(rows.reshape(moved.shape), -1, axis)


def _probe_blocks(fmt_name: str) -> np.ndarray:
    """Blocks that probe the element rounding and the scale at every power of two.

    Element probes: each block starts with ``max_normal`` (shared exponent 0
    under every rule), followed by every representable value, the midpoints
    between neighbours (ties) and the floats just beside each midpoint, and
    values past ``max_normal``. Scale probes: one-element blocks holding
    ``±2^k`` and its two float32 neighbours for every ``k`` from -149 to 127.
    """
    fmt = get_format(fmt_name)
    table = numerics.decode_table(fmt).astype(np.float64)
    grid = np.unique(np.abs(table[np.isfinite(table)]))
    grid = grid[grid <= fmt.max_normal]
    mids = (grid[:-1] + grid[1:]) / 2
    past = fmt.max_normal * np.array([1.0 + 2.0**-20, 1.02, 1.1, 1.5, 1.99])
    probes = np.concatenate([grid, mids, past]).astype(np.float32)
    probes = np.concatenate(
        [probes, np.nextafter(probes, np.float32(0)), np.nextafter(probes, np.float32(np.inf))]
    )
    probes = np.concatenate([probes, -probes])
    n_rows = -(-probes.size // 31)
    element_rows = np.zeros((n_rows, 32), dtype=np.float32)
    element_rows[:, 0] = fmt.max_normal
    element_rows[:, 1:].flat[: probes.size] = probes

    powers = np.ldexp(np.float32(1.0), np.arange(-149, 128)).astype(np.float32)
    amax = np.concatenate(
        [powers, np.nextafter(powers, np.float32(0)), np.nextafter(powers, np.float32(np.inf))]
    )
    amax = amax[np.isfinite(amax) & (amax > 0)]
    scale_rows = np.zeros((2 * amax.size, 32), dtype=np.float32)
    scale_rows[: amax.size, 0] = amax
    scale_rows[amax.size :, 5] = -amax
    return np.concatenate([element_rows, scale_rows])


# ---------------------------------------------------------------------------
# Function bodies against the numpy reference


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_dequantize_matches_reference(fmt, geometry, runtime):
    shape, axis, block_size = GEOMETRIES[geometry]
    rng = np.random.default_rng(FORMAT_NAMES.index(fmt))
    fmt_info = get_format(fmt)
    # Every code value (NaN and Inf codes included) and every scale byte, 0x00 and 0xFF included.
    codes = rng.integers(0, fmt_info.num_codes, shape, dtype=np.uint8)
    scale_shape = list(shape)
    scale_shape[axis] = -(-shape[axis] // block_size)
    scales = rng.integers(0, 256, scale_shape, dtype=np.uint8)
    scales.flat[:3] = [0, 255, 254][: scales.size]
    packed = numerics.pack_codes(codes, fmt, axis=axis, block_size=block_size)

    (y,) = _dequantize_runner(fmt, shape, axis, block_size).run(runtime, {"codes": packed, "scales": scales})

    # Large codes under large scale bytes overflow to ±Inf in float32, in the oracle as in the bodies.
    with np.errstate(over="ignore"):
        expected = numerics.dequantize(codes, scales, fmt, axis=axis, block_size=block_size)
    assert_bit_equal(y, expected, f"{fmt} {geometry} decoded values")


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_quantize_matches_reference(fmt, geometry, runtime):
    shape, axis, block_size = GEOMETRIES[geometry]
    x = _quantize_input(FORMAT_NAMES.index(fmt), shape, axis, block_size)

    codes, scales = _quantize_runner(fmt, len(shape), axis, block_size, "floor").run(runtime, {"x": x})

    ref_codes, ref_scales = numerics.quantize(x, fmt, axis=axis, block_size=block_size)
    assert_bit_equal(scales, ref_scales, f"{fmt} {geometry} scale bytes")
    packed = numerics.pack_codes(ref_codes, fmt, axis=axis, block_size=block_size)
    assert_bit_equal(codes, packed, f"{fmt} {geometry} packed codes")


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("scale_rule", SCALE_RULES)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_quantize_probes_match_reference(fmt, scale_rule, runtime):
    x = _probe_blocks(fmt)

    codes, scales = _quantize_runner(fmt, 2, -1, 32, scale_rule).run(runtime, {"x": x})

    ref_codes, ref_scales = numerics.quantize(x, fmt, scale_rule=scale_rule)
    assert_bit_equal(
        scales[:, 0], ref_scales[:, 0], f"{fmt} {scale_rule} scale bytes", inputs=np.abs(x).max(axis=1)
    )
    unpacked = numerics.unpack_codes(codes, fmt, axis_length=32)
    assert_bit_equal(unpacked, ref_codes, f"{fmt} {scale_rule} element codes", inputs=x)
    assert_bit_equal(codes, numerics.pack_codes(ref_codes, fmt), f"{fmt} {scale_rule} packed codes")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_quantize_float16_input(runtime):
    x = np.random.default_rng(5).standard_normal((4, 40)).astype(np.float16)
    x[1, :7] = np.float16(-0.0)

    runner = _quantize_runner("mxfp6_e3m2", 2, -1, 32, "floor", TensorProto.FLOAT16)
    codes, scales = runner.run(runtime, {"x": x})

    ref_codes, ref_scales = numerics.quantize(x, "mxfp6_e3m2")
    assert_bit_equal(scales, ref_scales, "scale bytes")
    assert_bit_equal(codes, numerics.pack_codes(ref_codes, "mxfp6_e3m2"), "packed codes")


# ONNX Runtime 1.32 reads a 1-D scale with one entry as per-tensor and then rejects block_size,
# so the single-block vector geometry cannot be expressed as a blocked DequantizeLinear there.
@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if g != "vector"])
def test_blocked_dequantize_linear_agrees_on_mxint8(geometry):
    # MXINT8 element k is k * 2^-6, so DequantizeLinear(int8 k, scale 2^(byte-133)) decodes the
    # same codes. Both products are exact, so they must agree bit for bit (NaN for byte 0xFF).
    shape, axis, block_size = GEOMETRIES[geometry]
    rng = np.random.default_rng(11)
    codes = rng.integers(0, 256, shape, dtype=np.uint8)
    scale_shape = list(shape)
    scale_shape[axis] = -(-shape[axis] // block_size)
    scales = rng.integers(0, 256, scale_shape, dtype=np.uint8)
    scales.flat[:2] = [0, 255][: scales.size]
    float_scales = np.ldexp(1.0, scales.astype(np.int32) - 133).astype(np.float32)
    float_scales[scales == 255] = np.nan

    axis_index = axis % len(shape)
    node = helper.make_node("DequantizeLinear", ["x", "scale"], ["y"], axis=axis_index, block_size=block_size)
    rank = len(shape)
    graph = helper.make_graph(
        [node],
        "dql",
        [_value_info("x", TensorProto.INT8, rank), _value_info("scale", TensorProto.FLOAT, rank)],
        [_value_info("y", TensorProto.FLOAT, rank)],
    )
    dql = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    feeds = {"x": codes.view(np.int8), "scale": float_scales}
    standard_ort = _ort_run(dql, feeds)[0]
    standard_ref = ReferenceEvaluator(dql).run(None, feeds)[0]

    packed = numerics.pack_codes(codes, "mxint8", axis=axis, block_size=block_size)
    runner = _dequantize_runner("mxint8", shape, axis, block_size)
    ours = runner.run("onnxruntime", {"codes": packed, "scales": scales})[0]
    assert_bit_equal(ours, standard_ort, "MXDequantize vs DequantizeLinear in onnxruntime")
    assert_bit_equal(standard_ref, standard_ort, "DequantizeLinear in onnx.reference vs onnxruntime")


def test_blocked_dequantize_linear_contiguous_blocks():
    # Expected values for the oracle above: blocks along axis 1 are contiguous, not interleaved.
    node = helper.make_node("DequantizeLinear", ["x", "scale", "zero"], ["y"], axis=1, block_size=2)
    graph = helper.make_graph(
        [node],
        "dql",
        [
            helper.make_tensor_value_info("x", TensorProto.INT8, [1, 8]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("zero", TensorProto.INT8, [1, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    feeds = {
        "x": np.full((1, 8), 9, np.int8),
        "scale": np.array([[1, 2, 3, 4]], np.float32),
        "zero": np.array([[1, 2, 3, 4]], np.int8),
    }
    y = _ort_run(model, feeds)[0]
    np.testing.assert_array_equal(y, [[8, 8, 14, 14, 18, 18, 20, 20]])


# ---------------------------------------------------------------------------
# Edge cases with expected values written out


def _assert_values(actual: np.ndarray, expected) -> None:
    assert_bit_equal(actual, np.asarray(expected, dtype=np.float32), "decoded values")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_e4m3_large_block_saturates_to_896(runtime):
    x = [957, 957, 902.4, 960, 832, 291.7882, -124.8256, 783.546, 927.3255, -233.117, 583.4501, 57.7898,
         136.0891, 851.1933, -857.9279, -825.7414, -959.5632, 665.2397, 556.3135, 740.0243, 957.2367,
         598.3171, -77.0413, 561.0583, -763.4512, 279.842, -713.2934, 889.3378, 43.6966, -170.6761,
         -470.8888, 548.4674]  # fmt: skip
    codes, scales, y = _round_trip(runtime, "mxfp8_e4m3", [x])
    assert scales.tolist() == [[128]]
    _assert_values(y[0], [896, 896, 896, 896, 832, 288, -128, 768, 896, -240, 576, 56, 144, 832, -832, -832,
                          -896, 640, 576, 768, 896, 576, -80, 576, -768, 288, -704, 896, 44, -176, -480, 576])  # fmt: skip
    # Saturated elements take the max-normal codes, never the NaN codes 0x7F / 0xFF.
    assert codes[0, 0] == 0x7E
    assert codes[0, 16] == 0xFE


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fp8_saturates_instead_of_nan_or_inf(runtime):
    codes, scales, y = _round_trip(runtime, "mxfp8_e4m3", _block([465.0, 1.0]))
    assert scales.tolist() == [[127]]
    assert codes[0, :2].tolist() == [0x7E, 0x38]
    _assert_values(y[0, :2], [448.0, 1.0])

    codes, scales, y = _round_trip(runtime, "mxfp8_e5m2", _block([62000.0, 1.0]))
    assert scales.tolist() == [[127]]
    assert codes[0, :2].tolist() == [0x7B, 0x3C]
    _assert_values(y[0, :2], [57344.0, 1.0])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fp4_ties_round_to_even(runtime):
    x = _block([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0])
    codes, scales, y = _round_trip(runtime, "mxfp4_e2m1", x)
    assert scales.tolist() == [[127]]
    # Low nibble first: codes 7,0 | 2,2 | 4,4 | 6,6 | 8,C | E,0 | zeros.
    assert codes.tolist() == [[0x07, 0x22, 0x44, 0x66, 0xC8, 0x0E] + [0] * 10]
    _assert_values(y[0, :11], [6, 0, 1, 1, 2, 2, 4, 4, -0.0, -2, -4])


@pytest.mark.parametrize(
    ("fmt", "x", "expected"),
    [
        ("mxfp4_e2m1", [6.0, np.uint32(0x3E800002).view(np.float32), 0.25, -0.25000006], [6, 0.5, 0, -0.5]),
        (
            "mxfp8_e4m3",
            [300.0, 1.8131605, 1.8125, 1.8124999, -1.8131605],
            [288, 1.875, 1.75, 1.75, -1.875],
        ),
        (
            "mxfp6_e2m3",
            [7.5, 0.0625, 0.0625001, 0.1875, 0.9375, -0.0625],
            [7.5, 0, 0.125, 0.25, 1.0, -0.0],
        ),
        ("mxfp6_e3m2", [28, 0.03125, 0.03125001, 0.09375, 0.21875], [28, 0, 0.0625, 0.125, 0.25]),
    ],
    ids=["fp4", "e4m3", "e2m3", "e3m2"],
)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sticky_bits_and_subnormal_rounding(runtime, fmt, x, expected):
    _, scales, y = _round_trip(runtime, fmt, _block(x))
    assert scales.tolist() == [[127]]
    _assert_values(y[0, : len(expected)], expected)


@pytest.mark.parametrize(
    ("fmt", "x", "byte", "expected"),
    [
        (
            "mxint8",
            [1.999, 1.0, 0.5078125, 0.5234375, -1.999, -0.00390625],
            127,
            [1.984375, 1.0, 0.5, 0.53125, -1.984375, 0.0],
        ),
        ("mxint8", [-2.0, 1.0, 0.015625], 128, [-2.0, 1.0, 0.0]),
        ("mxint6", [1.999, 1.0, 0.53125, 0.375], 127, [1.9375, 1.0, 0.5, 0.375]),
        ("mxint4", [1.999, 1.0, 0.53125, 0.375], 127, [1.75, 1.0, 0.5, 0.5]),
    ],
    ids=["int8_ties", "int8_negative_max", "int6", "int4"],
)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_int_ties_and_symmetric_clamp(runtime, fmt, x, byte, expected):
    _, scales, y = _round_trip(runtime, fmt, _block(x))
    assert scales.tolist() == [[byte]]
    _assert_values(y[0, : len(expected)], expected)


@pytest.mark.parametrize(
    ("amax", "scale_rule", "byte", "decoded"),
    [
        (1.0, "floor", 119, 1.0),
        (1.0, "rceil", 119, 1.0),
        (1.9, "floor", 119, 1.75),
        (1.9, "rceil", 120, 1.875),
        (500.0, "floor", 127, 448.0),
        (500.0, "rceil", 128, 512.0),
    ],
)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_scale_rules_on_e4m3(runtime, amax, scale_rule, byte, decoded):
    _, scales, y = _round_trip(runtime, "mxfp8_e4m3", _block([amax]), scale_rule=scale_rule)
    assert scales.tolist() == [[byte]]
    _assert_values(y[0, :1], [decoded])


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1", "mxint8"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_all_zero_block_gives_zeros_and_byte_0(runtime, fmt):
    x = np.zeros((1, 32), np.float32)
    x[0, 3] = -0.0
    _, scales, y = _round_trip(runtime, fmt, x)
    assert scales.tolist() == [[0]]
    expected = np.zeros(32, np.float32)
    if get_format(fmt).is_float:
        expected[3] = -0.0  # integers have no -0
    _assert_values(y[0], expected)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_zero_row_leaves_other_rows_alone(runtime):
    x = np.random.default_rng(8).standard_normal((4, 64)).astype(np.float32)
    x[2] = 0.0
    codes, scales, y = _round_trip(runtime, "mxfp4_e2m1", x)
    assert scales[2].tolist() == [0, 0]
    assert_bit_equal(y[2], np.zeros(64, np.float32), "zero row")
    for row in (0, 1, 3):
        assert_bit_equal(y[row], numerics.quantize_dequantize(x[row], "mxfp4_e2m1"), f"row {row}")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_signed_zero_codes(runtime):
    codes, scales, y = _round_trip(runtime, "mxfp4_e2m1", _block([4.0, -0.0, -0.1, -0.2]))
    assert scales.tolist() == [[127]]
    assert codes[0, :2].tolist() == [0x86, 0x88]
    _assert_values(y[0, :4], [4.0, -0.0, -0.0, -0.0])

    codes, _, y = _round_trip(runtime, "mxfp8_e4m3", _block([256.0, -0.0, -1e-4]))
    assert codes[0, :3].tolist() == [0x78, 0x80, 0x80]
    _assert_values(y[0, :3], [256.0, -0.0, -0.0])

    codes, _, y = _round_trip(runtime, "mxint8", _block([1.0, -0.0, -0.001]))
    assert codes[0, :3].tolist() == [0x40, 0x00, 0x00]
    _assert_values(y[0, :3], [1.0, 0.0, 0.0])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_partial_blocks_stay_inside_rows(runtime):
    x = np.stack([np.full(36, 1.0), np.full(36, 96.0)]).astype(np.float32)
    codes, scales, y = _round_trip(runtime, "mxfp4_e2m1", x)
    assert scales.tolist() == [[125, 125], [131, 131]]
    assert codes.shape == (2, 32)
    assert_bit_equal(y, x, "round trip")

    x = np.array([1.0] * 32 + [3.0], np.float32)
    _, scales, y = _round_trip(runtime, "mxfp4_e2m1", x)
    assert scales.tolist() == [125, 126]
    assert_bit_equal(y, x, "round trip")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_conv_weight_blocks_along_input_channels(runtime):
    w = np.zeros((1, 32, 1, 2), np.float32)
    w[0, :, 0, 0] = 1.0
    w[0, :, 0, 1] = 64.0
    codes, scales, y = _round_trip(runtime, "mxfp4_e2m1", w, axis=1)
    assert scales.shape == (1, 1, 1, 2)
    assert scales.ravel().tolist() == [125, 131]
    assert codes.shape == (1, 16, 1, 2)
    assert_bit_equal(y, w, "round trip")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_non_last_axis_blocks_are_contiguous(runtime):
    codes = np.full((1, 64), 0x38, np.uint8)  # E4M3 1.0
    runner = _dequantize_runner("mxfp8_e4m3", (1, 64), 1, 32)
    (y,) = runner.run(runtime, {"codes": codes, "scales": np.array([[127, 128]], np.uint8)})
    _assert_values(y, [[1.0] * 32 + [2.0] * 32])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_extreme_scale_bytes(runtime):
    # E2M1 6.0 under byte 0x00 is 6 * 2^-127 (a float32 subnormal); byte 0xFF is NaN.
    codes = np.array([[0x07] + [0] * 15] * 2, np.uint8)
    runner = _dequantize_runner("mxfp4_e2m1", (2, 32), -1, 32)
    (y,) = runner.run(runtime, {"codes": codes, "scales": np.array([[0], [255]], np.uint8)})
    _assert_values(y[0, :2], [np.ldexp(6.0, -127), 0.0])
    assert np.isnan(y[1]).all()


# ---------------------------------------------------------------------------
# Attributes as the bodies read them


def _raw_round_trip_model(attributes: dict, axis_length: int) -> onnx.ModelProto:
    """Q -> DQ nodes built without the builders, so aliases, defaults and bad names reach the bodies."""
    nodes = [
        helper.make_node("MXQuantize", ["x"], ["codes", "scales"], domain=DOMAIN, **attributes),
        helper.make_node(
            "MXDequantize", ["codes", "scales"], ["y"], domain=DOMAIN, axis_length=axis_length, **attributes
        ),
    ]
    outputs = [
        _value_info("codes", TensorProto.UINT8, 2),
        _value_info("scales", TensorProto.UINT8, 2),
        _value_info("y", TensorProto.FLOAT, 2),
    ]
    graph = helper.make_graph(nodes, "raw", [_value_info("x", TensorProto.FLOAT, 2)], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    model.functions.extend(function_protos())
    model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


_EXPLICIT = {"axis": -1, "block_size": 32, "scale_rule": "floor"}


@pytest.mark.parametrize(
    ("runtime", "attributes"),
    [
        ("onnxruntime", {"format": "mxfp6"}),
        ("reference", {"format": "mxfp6", **_EXPLICIT}),
    ],
    ids=["onnxruntime_defaults", "reference_explicit"],
)
def test_alias_format_in_body(runtime, attributes):
    # onnx.reference 1.23 ignores FunctionProto attribute defaults, so only ONNX Runtime runs the
    # node with axis, block_size and scale_rule left out. The builders always write them.
    x = _wide_random(np.random.default_rng(3), (3, 40))
    codes, scales, y = _Runner(_raw_round_trip_model(attributes, 40)).run(runtime, {"x": x})
    ref_codes, ref_scales = numerics.quantize(x, "mxfp6_e2m3")  # axis -1, block 32, floor
    assert_bit_equal(scales, ref_scales, "scale bytes")
    assert_bit_equal(codes, numerics.pack_codes(ref_codes, "mxfp6_e2m3"), "packed codes")
    assert_bit_equal(y, numerics.dequantize(ref_codes, ref_scales, "mxfp6_e2m3"), "decoded values")


@pytest.mark.parametrize(
    "attributes",
    [{**_EXPLICIT, "format": "mxfp5"}, {**_EXPLICIT, "format": "mxint4", "scale_rule": "ceil"}],
    ids=["unknown_format", "unknown_scale_rule"],
)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_unknown_attribute_values_give_nan_blocks(runtime, attributes):
    x = np.ones((2, 40), np.float32)
    codes, scales, y = _Runner(_raw_round_trip_model(attributes, 40)).run(runtime, {"x": x})
    assert (scales == 0xFF).all()
    assert (codes == 0).all()
    assert np.isnan(y).all()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_format_outside_body_decodes_to_nan(runtime):
    # A format the body does not serve reads like an unknown name: 8-bit codes that all decode to NaN.
    model = onnx.ModelProto()
    model.CopyFrom(_dequantize_runner("mxint4", (2, 40), -1, 32).model)
    del model.functions[:]
    model.functions.extend(f for f in function_protos(formats=["mxint8"]) if f.name == "MXDequantize")
    rng = np.random.default_rng(8)
    feeds = {
        "codes": rng.integers(0, 256, size=(2, 64), dtype=np.uint8),
        "scales": rng.integers(100, 150, size=(2, 2), dtype=np.uint8),
    }
    (y,) = _Runner(model).run(runtime, feeds)
    assert y.shape == (2, 40)
    assert np.isnan(y).all()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_attached_body_serves_formats_of_nodes(runtime):
    rng = np.random.default_rng(9)
    formats = ("mxint4", "mxfp4_e2m1")
    nodes, inputs, outputs, feeds, expected = [], [], [], {}, {}
    for fmt in formats:
        codes, scales = numerics.quantize(_wide_random(rng, (3, 40)), fmt)
        feeds[f"{fmt}_codes"] = numerics.pack_codes(codes, fmt)
        feeds[f"{fmt}_scales"] = scales
        expected[fmt] = numerics.dequantize(codes, scales, fmt)
        nodes.append(
            make_dequantize_node(
                f"{fmt}_codes", f"{fmt}_scales", f"{fmt}_y", fmt=fmt, axis=-1, block_size=32, axis_length=40
            )
        )
        inputs += [
            _value_info(f"{fmt}_codes", TensorProto.UINT8, 2),
            _value_info(f"{fmt}_scales", TensorProto.UINT8, 2),
        ]
        outputs.append(_value_info(f"{fmt}_y", TensorProto.FLOAT, 2))
    model = _model(nodes, inputs, outputs)

    decoded = _Runner(model).run(runtime, feeds)
    for fmt, y in zip(formats, decoded, strict=True):
        assert_bit_equal(y, expected[fmt], fmt)
    (body,) = model.functions
    every_format = function_protos()[0]
    assert body.ByteSize() < every_format.ByteSize() / 2


# ---------------------------------------------------------------------------
# Schemas, checker and shape inference


def _checked_round_trip_model(codes_dims=None) -> onnx.ModelProto:
    nodes = [
        make_quantize_node("x", "codes", "scales", fmt="mxfp4", axis=1),
        make_dequantize_node("codes", "scales", "y", fmt="mxfp4", axis=1, block_size=32, axis_length=36),
    ]
    graph = helper.make_graph(
        nodes,
        "checked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 36])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 36])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    attach_functions(model)
    return model


def test_full_check_and_typed_outputs():
    model = _checked_round_trip_model()
    onnx.checker.check_model(model, full_check=True)

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    assert types["codes"].elem_type == TensorProto.UINT8
    assert [(d.dim_param, d.dim_value) for d in types["codes"].shape.dim] == [("batch", 0), ("", 32)]
    assert types["scales"].elem_type == TensorProto.UINT8
    assert [(d.dim_param, d.dim_value) for d in types["scales"].shape.dim] == [("batch", 0), ("", 2)]


def test_model_without_domain_import_fails_check():
    node = make_dequantize_node("codes", "scales", "y", fmt="mxfp4", axis=1, block_size=32, axis_length=32)
    graph = helper.make_graph(
        [node],
        "no_import",
        [
            helper.make_tensor_value_info("codes", TensorProto.UINT8, [1, 16]),
            helper.make_tensor_value_info("scales", TensorProto.UINT8, [1, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    with pytest.raises(onnx.checker.ValidationError, match="No opset import for domain"):
        onnx.checker.check_model(model)

    attach_functions(model)
    assert helper.make_opsetid(DOMAIN, DOMAIN_VERSION) in model.opset_import
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"format": "mxfp5"}, "unknown format 'mxfp5'"),
        ({"axis": 2}, "axis 2 is out of range"),
        ({"axis_length": 40}, "codes .* has 16 entries along the blocked axis, expected 32"),
        ({"scale_rule": "ceil"}, "unknown scale_rule 'ceil'"),
    ],
    ids=["unknown_format", "axis_out_of_range", "codes_length", "unknown_scale_rule"],
)
def test_schema_rejects_bad_nodes(overrides, message):
    register_schemas()
    attributes = {"format": "mxfp4", "axis": 1, "block_size": 32, "axis_length": 32, **overrides}
    node = helper.make_node("MXDequantize", ["codes", "scales"], ["y"], domain=DOMAIN, **attributes)
    graph = helper.make_graph(
        [node],
        "bad",
        [
            helper.make_tensor_value_info("codes", TensorProto.UINT8, [1, 16]),
            helper.make_tensor_value_info("scales", TensorProto.UINT8, [1, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)], ir_version=10
    )
    with pytest.raises(onnx.shape_inference.InferenceError, match=message):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_register_schemas_is_idempotent():
    register_schemas()
    register_schemas()
    for op in ("MXDequantize", "MXQuantize"):
        schema = onnx.defs.get_schema(op, DOMAIN_VERSION, DOMAIN)
        assert schema.has_type_and_shape_inference_function
    assert set(onnx.defs.get_schema("MXDequantize", 1, DOMAIN).attributes) == {
        "format",
        "axis",
        "block_size",
        "axis_length",
        "scale_rule",
    }


# ---------------------------------------------------------------------------
# Builders and attach_functions


def test_builders_store_canonical_attributes():
    node = make_dequantize_node("c", "s", "y", fmt="MXFP4", axis=1, block_size=16, axis_length=20, name="dq")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, node.op_type, node.name) == (DOMAIN, "MXDequantize", "dq")
    assert attrs == {
        "format": b"mxfp4_e2m1",
        "axis": 1,
        "block_size": 16,
        "axis_length": 20,
        "scale_rule": b"floor",
    }

    node = make_quantize_node("x", "c", "s", fmt=get_format("mxint8"), scale_rule="rceil")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"format": b"mxint8", "axis": -1, "block_size": 32, "scale_rule": b"rceil"}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"fmt": "mxfp5"}, ValueError, "unknown MX format"),
        ({"block_size": 0}, ValueError, "block_size must be a positive integer"),
        ({"axis_length": -3}, ValueError, "axis_length must be a positive integer"),
        ({"axis": "1"}, TypeError, "axis must be an integer"),
        ({"scale_rule": "ceil"}, ValueError, "unknown scale rule"),
    ],
)
def test_builder_rejects_bad_arguments(kwargs, error, message):
    arguments = {"fmt": "mxint4", "axis": -1, "block_size": 32, "axis_length": 64, **kwargs}
    with pytest.raises(error, match=message):
        make_dequantize_node("c", "s", "y", **arguments)


def test_attach_functions_rejects_old_opset():
    graph = helper.make_graph([], "old", [], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    with pytest.raises(ValueError, match="standard opset 20 is too old.*opset 21 or newer"):
        attach_functions(model)


def test_attach_functions_replaces_and_follows_model_opset():
    model = _checked_round_trip_model()
    model.opset_import[0].version = 23
    model.ir_version = 11
    attach_functions(model)
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, "MXDequantize"), (DOMAIN, "MXQuantize")]
    assert all(f.opset_import[0].version == 23 for f in model.functions)
    onnx.checker.check_model(model, full_check=True)

    x = _wide_random(np.random.default_rng(4), (3, 36))
    y = _ort_run(model, {"x": x})[0]
    assert_bit_equal(y, numerics.quantize_dequantize(x, "mxfp4_e2m1", axis=1), "opset 23 round trip")


def test_attach_functions_on_onnx_ir_model():
    graph = helper.make_graph(
        [make_quantize_node("x", "codes", "scales", fmt="mxint4")],
        "ir",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 40])],
        [
            helper.make_tensor_value_info("codes", TensorProto.UINT8, ["batch", 32]),
            helper.make_tensor_value_info("scales", TensorProto.UINT8, ["batch", 2]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    model = onnx_ir.serde.deserialize_model(proto)
    attach_functions(model)
    attach_functions(model)
    assert model.opset_imports[DOMAIN] == DOMAIN_VERSION
    # Only the operators the graph uses get a body.
    assert sorted(name for _, name, _ in model.functions) == ["MXQuantize"]

    back = onnx_ir.serde.serialize_model(model)
    onnx.checker.check_model(back, full_check=True)
    x = _wide_random(np.random.default_rng(6), (2, 40))
    codes, scales = _ort_run(back, {"x": x})
    ref_codes, ref_scales = numerics.quantize(x, "mxint4")
    assert_bit_equal(scales, ref_scales, "scale bytes")
    assert_bit_equal(codes, numerics.pack_codes(ref_codes, "mxint4"), "packed codes")


def test_attach_functions_rejects_other_types():
    with pytest.raises(TypeError, match="expected an onnx.ModelProto or onnx_ir.Model"):
        attach_functions("model.onnx")


# ---------------------------------------------------------------------------
# Constant weights in ONNX Runtime


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxint5"])
def test_constant_weight_matches_float_model(fmt):
    # ONNX Runtime 1.32 inlines the body and folds it into a float32 initializer at session start.
    # Whether or not it folds, the result must equal a float32 model holding the reference weight.
    rng = np.random.default_rng(9)
    w = rng.standard_normal((48, 70)).astype(np.float32)
    codes, scales = numerics.quantize(w, fmt, axis=1)
    w_reference = numerics.dequantize(codes, scales, fmt, axis=1)
    x_info = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 70])]
    y_info = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 48])]
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    dequantize = make_dequantize_node(
        "w.mx_codes", "w.mx_scales", "w", fmt=fmt, axis=1, block_size=32, axis_length=70
    )
    packed_weight = [
        numpy_helper.from_array(numerics.pack_codes(codes, fmt, axis=1), "w.mx_codes"),
        numpy_helper.from_array(scales, "w.mx_scales"),
    ]
    quantized = _model([dequantize, gemm], x_info, y_info, initializers=packed_weight)
    float_model = _model([gemm], x_info, y_info, initializers=[numpy_helper.from_array(w_reference, "w")])
    x = rng.standard_normal((5, 70)).astype(np.float32)

    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y_optimized = _ort_run(quantized, {"x": x})[0]
    y_plain = _ort_run(quantized, {"x": x}, plain)[0]
    y_float = _ort_run(float_model, {"x": x})[0]
    assert_bit_equal(y_optimized, y_float, "optimized session vs float32 model")
    assert_bit_equal(y_plain, y_float, "unoptimized session vs float32 model")


def test_public_api():
    from mfqat_onnx import onnx_ops

    assert sorted(onnx_ops.__all__) == [
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
    assert (onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION, onnx_ops.DEFAULT_OPSET) == ("mfqat", 1, 21)


def test_attach_functions_only_for_used_ops():
    weight_only = helper.make_graph(
        [make_dequantize_node("c", "s", "y", fmt="mxint4", axis=-1, block_size=32, axis_length=32)],
        "weights",
        [helper.make_tensor_value_info("c", TensorProto.UINT8, [1, 16]), helper.make_tensor_value_info("s", TensorProto.UINT8, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
    )
    model = helper.make_model(weight_only, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    attach_functions(model)
    assert [f.name for f in model.functions] == ["MXDequantize"]
    onnx.checker.check_model(model, full_check=True)

    empty = helper.make_model(helper.make_graph([], "empty", [], []), opset_imports=[helper.make_opsetid("", 21)])
    attach_functions(empty)
    assert sorted(f.name for f in empty.functions) == ["MXDequantize", "MXQuantize"]
