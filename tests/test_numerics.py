"""Properties of the numpy reference, checked against independent oracles.

Oracles: ml_dtypes element casts, the ONNX reference evaluator running standard
blocked DequantizeLinear, exhaustive code enumeration, and the Slice-and-Scale
identity with re-quantization.
"""

import math

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from mfqat_onnx import numerics as mx
from mfqat_onnx.formats import FORMATS, family_formats, get_format

FP_DTYPES = {
    "mxfp8_e4m3": ml_dtypes.float8_e4m3fn,
    "mxfp8_e5m2": ml_dtypes.float8_e5m2,
    "mxfp6_e3m2": ml_dtypes.float6_e3m2fn,
    "mxfp6_e2m3": ml_dtypes.float6_e2m3fn,
    "mxfp4_e2m1": ml_dtypes.float4_e2m1fn,
}
ALL_FORMATS = sorted(FORMATS)
RULES = ("floor", "rceil", "even")


def bits_of(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def random_tensor(rng, shape, spread=40.0):
    """Normal values times log-uniform magnitudes, so blocks span many binades."""
    scale = np.exp2(rng.uniform(-spread, spread, size=shape))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_every_code_round_trips(name):
    codes = mx.encodable_codes(name)
    values = mx.decode_table(name)[codes]
    again = mx.encode_elements(values, name)
    mismatched = codes[again != codes]
    assert mismatched.size == 0, f"{name}: codes {mismatched.tolist()} do not re-encode to themselves"


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_encodable_codes_cover_all_but_specials(name):
    fmt = get_format(name)
    table = mx.decode_table(name)
    specials = int((~np.isfinite(table)).sum())
    unused_int_min = 0 if fmt.is_float else 1
    assert mx.encodable_codes(name).size == fmt.num_codes - specials - unused_int_min


@pytest.mark.parametrize("name", sorted(FP_DTYPES))
def test_decode_table_matches_ml_dtypes(name):
    codes = np.arange(get_format(name).num_codes, dtype=np.uint8)
    expected = codes.view(FP_DTYPES[name]).astype(np.float32)
    np.testing.assert_array_equal(bits_of(mx.decode_table(name)), bits_of(expected))


@pytest.mark.parametrize("name", sorted(FP_DTYPES))
@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), log_range=st.integers(1, 30))
def test_element_rounding_matches_ml_dtypes(name, seed, log_range):
    fmt = get_format(name)
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal(4096) * np.exp2(rng.uniform(-log_range, log_range, 4096))).astype(np.float32)
    # ml_dtypes casts do not saturate, so clamp first; the encoder must agree on everything else.
    clamped = np.clip(v, -fmt.max_normal, fmt.max_normal)
    expected = clamped.astype(FP_DTYPES[name]).view(np.uint8)
    got = mx.encode_elements(v, name)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, f"{name}: inputs {v[bad[:5]].tolist()} give {got[bad[:5]]} not {expected[bad[:5]]}"


@pytest.mark.parametrize("name", sorted(FP_DTYPES))
def test_element_rounding_at_every_midpoint(name):
    # Probe each midpoint between neighbouring codes, and one float32 ulp either side of it.
    fmt = get_format(name)
    table = np.sort(np.unique(mx.decode_table(name)[mx.encodable_codes(name)]).astype(np.float32))
    mids = ((table[:-1].astype(np.float64) + table[1:]) / 2).astype(np.float32)
    probes = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    expected = np.clip(probes, -fmt.max_normal, fmt.max_normal).astype(FP_DTYPES[name]).view(np.uint8)
    np.testing.assert_array_equal(mx.encode_elements(probes, name), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_integer_rounding_is_rne_on_the_grid(bits):
    fmt = get_format(f"mxint{bits}")
    k = np.arange(-4 * fmt.int_max_code, 4 * fmt.int_max_code + 1) / 4.0
    v = np.ldexp(k, -fmt.mbits)
    expected = np.clip(np.rint(k), -fmt.int_max_code, fmt.int_max_code)
    decoded = mx.decode_table(fmt)[mx.encode_elements(v, fmt)]
    np.testing.assert_array_equal(decoded, np.ldexp(expected, -fmt.mbits).astype(np.float32))


def test_powers_of_two_probe_scale_boundaries():
    # At, just above and just below each power of two the floor exponent must step exactly there.
    powers = np.exp2(np.arange(-149, 128, dtype=np.float64)).astype(np.float32)
    above = np.nextafter(powers, np.float32(np.inf))
    below = np.nextafter(powers, np.float32(0))
    fmt = get_format("mxfp8_e4m3")
    for probe, expected_log in (
        (powers, np.arange(-149, 128)),
        (above, np.arange(-149, 128)),
        (below[1:], np.arange(-148, 128) - 1),
    ):
        blocks = np.zeros((probe.size, 32), np.float32)
        blocks[:, 0] = probe
        _, scale = mx.quantize(blocks, fmt)
        expected = np.clip(expected_log - fmt.emax_elem, -127, 127) + 127
        np.testing.assert_array_equal(scale[:, 0], expected.astype(np.uint8))


def _dequantize_linear_model(elem_type, shape, scale_shape, axis, block_size, opset):
    node = helper.make_node("DequantizeLinear", ["x", "scale"], ["y"], axis=axis, block_size=block_size)
    graph = helper.make_graph(
        [node],
        "dq",
        [
            helper.make_tensor_value_info("x", elem_type, shape),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, scale_shape),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize(
    ("name", "elem_type", "dtype", "opset"),
    [
        ("mxint8", TensorProto.INT8, np.int8, 21),
        ("mxfp8_e4m3", TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, 21),
        ("mxfp8_e5m2", TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2, 21),
        ("mxfp4_e2m1", TensorProto.FLOAT4E2M1, ml_dtypes.float4_e2m1fn, 23),
    ],
)
@pytest.mark.parametrize(
    ("shape", "axis", "block_size"), [((6, 96), 1, 32), ((40, 5), 0, 16), ((4, 64, 3, 3), 1, 32)]
)
def test_dequantize_matches_onnx_blocked_dequantize_linear(
    name, elem_type, dtype, opset, shape, axis, block_size
):
    rng = np.random.default_rng(21)
    x = random_tensor(rng, shape, spread=10.0)
    codes, scale = mx.quantize(x, name, axis=axis, block_size=block_size)
    fmt = get_format(name)
    if fmt.is_float:
        elements = codes.view(dtype)
        element_scale = 1.0
    else:
        elements = codes.view(np.int8)
        element_scale = 2.0**-fmt.mbits
    # ONNX has no E8M0 scale below opset 24, so pass 2^E (times the integer step) as float32.
    float_scale = (mx.e8m0_to_float(scale) * np.float32(element_scale)).astype(np.float32)
    model = _dequantize_linear_model(elem_type, list(shape), list(scale.shape), axis, block_size, opset)
    (expected,) = ReferenceEvaluator(model).run(None, {"x": elements, "scale": float_scale})
    got = mx.dequantize(codes, scale, name, axis=axis, block_size=block_size)
    np.testing.assert_array_equal(bits_of(got), bits_of(expected))


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("block_size", [32, 8, 5])
def test_pack_unpack_round_trip(name, block_size):
    rng = np.random.default_rng(3)
    fmt = get_format(name)
    codes = rng.integers(0, fmt.num_codes, size=(3, 2 * block_size + 3), dtype=np.uint8)
    packed = mx.pack_codes(codes, name, block_size=block_size)
    n_blocks = math.ceil(codes.shape[1] / block_size)
    assert packed.shape == (3, n_blocks * math.ceil(block_size * fmt.bits / 8))
    assert packed.shape == mx.packed_shape(codes.shape, name, block_size=block_size)
    unpacked = mx.unpack_codes(packed, name, block_size=block_size, axis_length=codes.shape[1])
    np.testing.assert_array_equal(unpacked, codes)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_packing_is_a_little_endian_bit_stream(name):
    # Rebuild each block's bytes bit by bit from the definition and compare.
    rng = np.random.default_rng(4)
    fmt = get_format(name)
    codes = rng.integers(0, fmt.num_codes, size=(2, 40), dtype=np.uint8)
    packed = mx.pack_codes(codes, name, block_size=32)
    per_block = math.ceil(32 * fmt.bits / 8)
    for row in range(2):
        for block in range(2):
            elements = np.zeros(32, np.int64)
            chunk = codes[row, block * 32 : (block + 1) * 32]
            elements[: chunk.size] = chunk
            stream = sum(int(c) << (i * fmt.bits) for i, c in enumerate(elements))
            expected = [(stream >> (8 * j)) & 0xFF for j in range(per_block)]
            got = packed[row, block * per_block : (block + 1) * per_block].tolist()
            assert got == expected, f"{name} row {row} block {block}"


def test_six_bit_codes_pack_four_into_three_bytes():
    codes = np.array([0b000001, 0b000010, 0b000011, 0b111111] * 8, np.uint8)
    packed = mx.pack_codes(codes, "mxfp6_e2m3")
    assert packed.size == 24
    assert packed[:3].tolist() == [0b10_000001, 0b0011_0000, 0b111111_00]


def test_conv_axis_packing_keeps_layout():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 16, size=(4, 40, 3, 3), dtype=np.uint8)
    packed = mx.pack_codes(codes, "mxint4", axis=1)
    assert packed.shape == (4, 2 * 16, 3, 3)
    np.testing.assert_array_equal(mx.unpack_codes(packed, "mxint4", axis=1, axis_length=40), codes)


ANCHOR_TARGETS = [
    (anchor.name, f.name) for anchor in family_formats("int") for f in family_formats("int") if f.bits <= anchor.bits
] + [
    (anchor, f.name) for anchor in ("mxfp8_e4m3", "mxfp8_e5m2") for f in family_formats("fp")
]


@pytest.mark.parametrize(("anchor", "target"), ANCHOR_TARGETS)
@pytest.mark.parametrize("rule", RULES)
def test_slice_and_scale_equals_requantizing(anchor, target, rule):
    rng = np.random.default_rng(hash((anchor, target, rule)) % 2**32)
    cases = [((7, 70), -1, 32), ((5, 33, 3, 3), 1, 32), ((100,), 0, 16), ((2, 3, 40), 2, 8)]
    for shape, axis, block_size in cases:
        x = random_tensor(rng, shape, spread=70.0)
        x.reshape(-1)[:5] = 0.0
        codes, scale = mx.quantize(x, anchor, axis=axis, block_size=block_size, scale_rule=rule)
        got = mx.slice_and_scale(codes, scale, anchor, target, axis=axis, block_size=block_size)
        expected = mx.requantize(codes, scale, anchor, target, axis=axis, block_size=block_size)
        np.testing.assert_array_equal(got[0], expected[0], err_msg=f"codes {shape} axis {axis}")
        np.testing.assert_array_equal(got[1], expected[1], err_msg=f"scales {shape} axis {axis}")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 4),
    length=st.integers(1, 100),
    block_size=st.sampled_from([1, 2, 7, 16, 32]),
    log_scale=st.integers(-140, 120),
)
def test_slice_and_scale_identity_random_shapes(seed, rows, length, block_size, log_scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, length)) * np.exp2(log_scale)).astype(np.float32)
    for anchor, target in (
        ("mxint8", "mxint4"),
        ("mxint8", "mxint2"),
        ("mxfp8_e4m3", "mxfp4_e2m1"),
        ("mxfp8_e4m3", "mxfp6_e3m2"),
    ):
        codes, scale = mx.quantize(x, anchor, block_size=block_size)
        got = mx.slice_and_scale(codes, scale, anchor, target, block_size=block_size)
        expected = mx.requantize(codes, scale, anchor, target, block_size=block_size)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("anchor", ["mxint8", "mxint6", "mxint4"])
@pytest.mark.parametrize("block_size", [32, 8, 7, 48])
def test_slice_and_scale_any_stored_int_codes(anchor, block_size):
    # Every valid code (the most negative one is unused) at scales from the
    # clamp to the top: the block peak must match what re-quantizing finds.
    rng = np.random.default_rng(block_size)
    fmt = get_format(anchor)
    codes = rng.integers(0, fmt.num_codes, size=(6, 5 * block_size + 3), dtype=np.uint8)
    codes[codes == fmt.num_codes // 2] = fmt.num_codes // 2 + 1
    codes[0, :block_size] = 0
    codes[1, : min(block_size, 4)] = 1
    n_blocks = -(-codes.shape[1] // block_size)
    scale = rng.integers(0, 255, size=(6, n_blocks), dtype=np.uint8)
    scale[2, 0] = 0
    for target in family_formats("int"):
        if target.bits > fmt.bits:
            continue
        got = mx.slice_and_scale(codes, scale, anchor, target.name, block_size=block_size)
        expected = mx.requantize(codes, scale, anchor, target.name, block_size=block_size)
        np.testing.assert_array_equal(got[0], expected[0], err_msg=target.name)
        np.testing.assert_array_equal(got[1], expected[1], err_msg=target.name)


def test_slice_and_scale_int8_formula():
    # MXINT8 -> MXINTb for a floor anchor: scale unchanged, code' = rne(code / 2^(8-b)) clamped.
    rng = np.random.default_rng(6)
    x = random_tensor(rng, (16, 64), spread=5.0)
    codes, scale = mx.quantize(x, "mxint8")
    for bits in (2, 4, 6):
        new_codes, new_scale = mx.slice_and_scale(codes, scale, "mxint8", f"mxint{bits}")
        np.testing.assert_array_equal(new_scale, scale)
        k = codes.view(np.int8).astype(np.float64)
        limit = 2 ** (bits - 1) - 1
        expected = np.clip(np.rint(k / 2 ** (8 - bits)), -limit, limit).astype(np.int64) & (2**bits - 1)
        np.testing.assert_array_equal(new_codes, expected.astype(np.uint8))


def test_slice_and_scale_keeps_zero_and_nan_blocks():
    x = np.ones((3, 32), np.float32)
    x[0] = 0.0
    x[0, 4] = -0.0
    x[1, 2] = np.nan
    codes, scale = mx.quantize(x, "mxfp8_e4m3")
    new_codes, new_scale = mx.slice_and_scale(codes, scale, "mxfp8_e4m3", "mxfp4_e2m1")
    assert new_scale[:, 0].tolist() == [0, 0xFF, 127 - 2]
    assert new_codes[0, 4] == 0x8
    assert not new_codes[1].any()


def test_slice_and_scale_clamped_anchor_keeps_value():
    # At the -127 clamp the E4M3 anchor stores 2^-127 as element 1.0; the plain shift E + 8 - 2 would
    # divide it by 64 and flush it, while the general form keeps E' at -127 and the value exact.
    x = np.zeros(32, np.float32)
    x[0] = np.float32(2.0**-127)
    codes, scale = mx.quantize(x, "mxfp8_e4m3")
    assert scale.tolist() == [0]
    new_codes, new_scale = mx.slice_and_scale(codes, scale, "mxfp8_e4m3", "mxfp4_e2m1")
    assert new_scale.tolist() == [0]
    assert mx.dequantize(new_codes, new_scale, "mxfp4_e2m1")[0] == np.float32(2.0**-127)


def test_convert_reports_method():
    rng = np.random.default_rng(7)
    codes, scale = mx.quantize(random_tensor(rng, (4, 64), 3.0), "mxfp8_e4m3")
    assert mx.convert(codes, scale, "mxfp8_e4m3", "mxfp4_e2m1")[2] == "slice_and_scale"
    new_codes, new_scale, method = mx.convert(codes, scale, "mxfp8_e4m3", "mxint4")
    assert method == "requantize"
    expected = mx.quantize(mx.dequantize(codes, scale, "mxfp8_e4m3"), "mxint4")
    np.testing.assert_array_equal(new_codes, expected[0])
    np.testing.assert_array_equal(new_scale, expected[1])


def test_slice_and_scale_rejects_other_family():
    codes, scale = mx.quantize(np.ones(32, np.float32), "mxint8")
    with pytest.raises(ValueError, match="use convert"):
        mx.slice_and_scale(codes, scale, "mxint8", "mxfp4")


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp4_e2m1", "mxint8", "mxint4"])
def test_half_precision_inputs_widen_exactly(dtype, name):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((8, 64)).astype(dtype)
    codes, scale = mx.quantize(x, name)
    codes32, scale32 = mx.quantize(x.astype(np.float32), name)
    np.testing.assert_array_equal(codes, codes32)
    np.testing.assert_array_equal(scale, scale32)
    out = mx.quantize_dequantize(x, name)
    assert out.dtype == x.dtype
    expected = mx.dequantize(codes, scale, name).astype(dtype)
    np.testing.assert_array_equal(out.view(np.uint16), expected.view(np.uint16))


def test_quantize_dequantize_is_idempotent():
    rng = np.random.default_rng(10)
    x = random_tensor(rng, (16, 96), 20.0)
    for name in ALL_FORMATS:
        once = mx.quantize_dequantize(x, name)
        np.testing.assert_array_equal(
            bits_of(mx.quantize_dequantize(once, name)), bits_of(once), err_msg=name
        )


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: mx.quantize(np.ones(4, np.float32), "mxfp5"), ValueError, "unknown MX format 'mxfp5'"),
        (
            lambda: mx.quantize(np.ones(4, np.float32), "mxint8", block_size=0),
            ValueError,
            "block_size must be a positive integer, got 0",
        ),
        (lambda: mx.quantize(np.ones(4, np.float32), "mxint8", block_size=-3), ValueError, "got -3"),
        (
            lambda: mx.quantize(np.ones((2, 4), np.float32), "mxint8", axis=2),
            ValueError,
            "axis 2 is out of range for a tensor of rank 2",
        ),
        (lambda: mx.quantize(np.ones(4, np.int32), "mxint8"), TypeError, "got dtype int32"),
        (lambda: mx.quantize(np.ones(4, np.complex64), "mxint8"), TypeError, "got dtype complex64"),
        (lambda: mx.quantize(np.ones(4, np.float64), "mxint8"), TypeError, "got dtype float64"),
        (
            lambda: mx.quantize(np.ones(4, np.float32), "mxint8", scale_rule="ceil"),
            ValueError,
            "unknown scale rule 'ceil'",
        ),
        (
            lambda: mx.unpack_codes(np.zeros(10, np.uint8), "mxfp4", axis_length=32),
            ValueError,
            "have 10 bytes along axis 0, but 32 elements",
        ),
        (
            lambda: mx.dequantize(np.zeros(32, np.uint8), np.zeros(2, np.uint8), "mxint8"),
            ValueError,
            r"scale_e8m0 has shape \(2,\)",
        ),
        (
            lambda: mx.dequantize(np.full(32, 16, np.uint8), np.zeros(1, np.uint8), "mxfp4"),
            ValueError,
            "code 16 does not fit mxfp4_e2m1",
        ),
        (
            lambda: mx.dequantize(np.zeros(32, np.int8), np.zeros(1, np.uint8), "mxint8"),
            TypeError,
            "codes must be uint8",
        ),
    ],
)
def test_bad_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_onnx_dequantize_linear_model_is_valid():
    model = _dequantize_linear_model(TensorProto.INT8, [2, 32], [2, 1], 1, 32, 21)
    onnx.checker.check_model(model, full_check=True)
