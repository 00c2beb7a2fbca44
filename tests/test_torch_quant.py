"""PyTorch fake quantization against the numpy reference and hand-computed cases.

Oracles: ``mfqat_onnx.numerics`` (codes, scale bytes and values compared as bit
patterns, NaN and -0 included), expected values worked out by hand from the
OCP MX v1.0 rules, and the numpy Slice-and-Scale path for via-anchor mode.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mfqat_onnx.torch_quant as tq
from mfqat_onnx import numerics as mx
from mfqat_onnx.formats import FORMATS, family_formats, get_format
from mfqat_onnx.torch_quant import dequantize_mx, fake_quantize, quantize_mx

ALL_FORMATS = sorted(FORMATS)
RULES = ("floor", "rceil", "even")
DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, ml_dtypes.bfloat16),
}
# (shape, axis, block_size): partial last blocks, non-last axes, block sizes 1..64.
LAYOUTS = [
    ((6, 70), -1, 32),
    ((3, 33, 4), 1, 16),
    ((40, 3), 0, 7),
    ((2, 64), 1, 64),
    ((5, 3), -1, 1),
]
NAN = float("nan")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- helpers


def unsigned_bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def torch_bits(t: torch.Tensor) -> np.ndarray:
    signed = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return unsigned_bits(t.detach().contiguous().view(signed).numpy())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Return ``t`` as numpy with the same dtype (bfloat16 via ml_dtypes)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_same_bits(expected: np.ndarray, got: np.ndarray, label: str) -> None:
    """Compare bit patterns; on failure list a few mismatching positions."""
    expected_bits, got_bits = unsigned_bits(expected), unsigned_bits(got)
    assert expected_bits.shape == got_bits.shape, f"{label}: shape {got_bits.shape} != {expected_bits.shape}"
    wrong = np.argwhere(expected_bits != got_bits)
    examples = [(tuple(i), hex(expected_bits[tuple(i)]), hex(got_bits[tuple(i)])) for i in wrong[:5]]
    assert wrong.size == 0, f"{label}: {len(wrong)} mismatches (index, expected, got): {examples}"


def wide_random(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values over a huge exponent range, with zeros, -0, NaN and Inf sprinkled in."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-150, 125, size=shape[:-1] + (1,)))
    x = x.astype(np.float32)
    u = rng.random(shape)
    x[u < 0.03] = 0.0
    x[(u >= 0.03) & (u < 0.05)] = -0.0
    x[u > 0.997] = np.nan
    x[(u > 0.99) & (u < 0.992)] = -np.inf
    return x


def compare_with_numpy(x: torch.Tensor, fmt: str, axis: int, block_size: int, rule: str) -> None:
    """Check codes, scales, decoded values and the fake-quant round trip bit for bit."""
    nx = to_numpy(x)
    label = f"{fmt} {rule} {x.dtype} shape={tuple(x.shape)} axis={axis} block={block_size}"

    codes, scales = mx.quantize(nx, fmt, axis=axis, block_size=block_size, scale_rule=rule)
    got_codes, got_scales = quantize_mx(x, fmt, axis=axis, block_size=block_size, scale_rule=rule)
    assert_same_bits(scales, got_scales.numpy(), f"scales {label}")
    assert_same_bits(codes, got_codes.numpy(), f"codes {label}")

    # rceil and even may round a block max up past the largest float16, or
    # past the largest float32 for blocks near 2**128; both sides give Inf.
    with np.errstate(over="ignore"):
        decoded = mx.dequantize(codes, scales, fmt, axis=axis, block_size=block_size)
        expected = mx.quantize_dequantize(nx, fmt, axis=axis, block_size=block_size, scale_rule=rule)
    got_decoded = dequantize_mx(got_codes, got_scales, fmt, axis=axis, block_size=block_size)
    assert_same_bits(decoded, got_decoded.numpy(), f"dequantize {label}")

    got = fake_quantize(x, fmt, axis=axis, block_size=block_size, scale_rule=rule)
    assert got.dtype == x.dtype
    assert_same_bits(expected, to_numpy(got), f"fake_quantize {label}")


def one_block(values: list[float], length: int = 32) -> torch.Tensor:
    return torch.tensor(values + [0.0] * (length - len(values)), dtype=torch.float32)


def check_block(
    x: torch.Tensor,
    fmt: str,
    expected: list[float],
    scale: int,
    codes: list[int] | None = None,
    rule: str = "floor",
) -> None:
    """Check a hand-computed block: scale byte, leading values (bits, so -0 counts) and codes."""
    got_codes, got_scales = quantize_mx(x, fmt, scale_rule=rule)
    assert got_scales.tolist() == [scale]
    y = fake_quantize(x, fmt, scale_rule=rule)
    n = len(expected)
    assert_same_bits(np.array(expected, np.float32), y[:n].numpy(), f"{fmt} values")
    assert_same_bits(np.zeros(x.numel() - n, np.float32), y[n:].numpy(), f"{fmt} zero padding")
    if codes is not None:
        assert got_codes[: len(codes)].tolist() == codes


# ---------------------------------------------------------------- API


def test_public_api():
    assert sorted(tq.__all__) == ["SCALE_RULES", "dequantize_mx", "fake_quantize", "quantize_mx"]
    assert tq.SCALE_RULES == mx.SCALE_RULES


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_decode_table_matches_numpy(fmt):
    from mfqat_onnx.torch_quant._elements import decode_table

    assert_same_bits(mx.decode_table(fmt), decode_table(get_format(fmt)).numpy(), fmt)


# ---------------------------------------------------------------- bit-exact against numpy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_random_matches_numpy(fmt, rule, dtype):
    rng = np.random.default_rng([ALL_FORMATS.index(fmt), RULES.index(rule), list(DTYPES).index(dtype)])
    for shape, axis, block_size in LAYOUTS:
        x = torch.from_numpy(wide_random(rng, shape)).to(DTYPES[dtype][0])
        compare_with_numpy(x, fmt, axis, block_size, rule)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_grid_probes_match_numpy(fmt, rule):
    """Every element value, every midpoint and their float32 neighbours, at extreme scales."""
    f = get_format(fmt)
    table = mx.decode_table(fmt).astype(np.float64)
    grid = np.unique(np.abs(table[np.isfinite(table)]))
    grid = grid[grid <= f.max_normal]
    midpoints = (grid[:-1] + grid[1:]) / 2
    probes = np.concatenate([grid, midpoints, [f.max_normal * 1.5, f.max_normal * 2]]).astype(np.float32)
    probes = np.concatenate(
        [probes, np.nextafter(probes, np.float32(np.inf)), np.nextafter(probes, np.float32(0))]
    )
    probes = np.concatenate([probes, -probes])

    # Rows of [max_normal, probe] pin the shared exponent. The exponents reach
    # both clamps and the float32 subnormal range.
    for exp in (-149, -140, -127, -120, -30, 0, 17, 100, 127 - f.emax_elem):
        head = np.float32(math.ldexp(f.max_normal, min(exp, 127 - f.emax_elem)))
        with np.errstate(over="ignore"):  # probes past max_normal at the top exponent become Inf
            scaled = np.ldexp(probes.astype(np.float64), exp).astype(np.float32)
        rows = np.stack([np.full_like(scaled, head), scaled], axis=1)
        compare_with_numpy(torch.from_numpy(rows), fmt, -1, 2, rule)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_float32_extremes_match_numpy(fmt):
    tiny = np.float32(2.0**-149)
    big = np.finfo(np.float32).max
    blocks = np.array(
        [
            [big, -big, 1.0, tiny],
            [2.0**127, 2.0**126 * 1.5, -(2.0**100), 3.0],
            [tiny, -tiny, 2 * tiny, 0.0],
            [2.0**-126, 2.0**-127, -(2.0**-130), tiny * 7],
            [np.float32(1.9999999), 1.0, -0.0, 0.0],
            [-0.0, -0.0, -0.0, -0.0],
            [np.inf, 1.0, 2.0, 3.0],
            [1.0, np.nan, -np.inf, 0.0],
        ],
        dtype=np.float32,
    )
    for rule in RULES:
        compare_with_numpy(torch.from_numpy(blocks), fmt, -1, 4, rule)


@settings(derandomize=True, max_examples=120, deadline=None)
@given(data=st.data())
def test_hypothesis_matches_numpy(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=24), label="shape")
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
    x = data.draw(hnp.arrays(np.float32, shape, elements=floats), label="x")
    fmt = data.draw(st.sampled_from(ALL_FORMATS), label="fmt")
    rule = data.draw(st.sampled_from(RULES), label="rule")
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    block_size = data.draw(st.sampled_from([1, 2, 5, 8, 32]), label="block_size")
    dtype = data.draw(st.sampled_from(list(DTYPES)), label="dtype")
    compare_with_numpy(torch.from_numpy(x).to(DTYPES[dtype][0]), fmt, axis, block_size, rule)


def test_non_contiguous_input_and_input_untouched():
    rng = np.random.default_rng(7)
    base = torch.from_numpy(wide_random(rng, (48, 40)))
    before = base.clone()
    x = base.t()  # a transposed view
    compare_with_numpy(x, "mxfp4", 0, 32, "floor")
    compare_with_numpy(x, "mxint8", 1, 32, "floor")
    assert_same_bits(before.numpy(), base.numpy(), "input after quantization")


# ---------------------------------------------------------------- hand-computed edge cases


def test_e4m3_block_above_448_saturates():
    # scale 2 (byte 128) because floor(log2 960) = 9 and emax_elem = 8; 957/2 is
    # above 448 so it clamps to 448 * 2 = 896, and 864/2 = 432 is a tie that
    # goes to the even code 448.
    x = torch.tensor(
        [
            957,
            957,
            902.4,
            960,
            832,
            291.7882,
            -124.8256,
            783.546,
            927.3255,
            -233.117,
            583.4501,
            57.7898,
            136.0891,
            851.1933,
            -857.9279,
            -825.7414,
            -959.5632,
            665.2397,
            556.3135,
            740.0243,
            957.2367,
            598.3171,
            -77.0413,
            561.0583,
            -763.4512,
            279.842,
            -713.2934,
            889.3378,
            43.6966,
            -170.6761,
            -470.8888,
            548.4674,
        ]
    )
    expected = [
        896,
        896,
        896,
        896,
        832,
        288,
        -128,
        768,
        896,
        -240,
        576,
        56,
        144,
        832,
        -832,
        -832,
        -896,
        640,
        576,
        768,
        896,
        576,
        -80,
        576,
        -768,
        288,
        -704,
        896,
        44,
        -176,
        -480,
        576,
    ]
    check_block(x, "mxfp8_e4m3", expected, 128)
    codes, _ = quantize_mx(x, "mxfp8_e4m3")
    assert codes[0].item() == 0x7E
    assert codes[16].item() == 0xFE
    assert not (codes & 0x7F == 0x7F).any()


def test_fp8_saturates_instead_of_nan_or_inf():
    check_block(one_block([465.0, 1.0]), "mxfp8_e4m3", [448.0, 1.0], 127, codes=[0x7E, 0x38])
    check_block(one_block([62000.0, 1.0]), "mxfp8_e5m2", [57344.0, 1.0], 127, codes=[0x7B, 0x3C])


def test_fp4_ties_round_to_even():
    x = one_block([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0])
    expected = [6, 0, 1, 1, 2, 2, 4, 4, -0.0, -2, -4]
    codes = [0x7, 0x0, 0x2, 0x2, 0x4, 0x4, 0x6, 0x6, 0x8, 0xC, 0xE]
    check_block(x, "mxfp4_e2m1", expected, 127, codes=codes)


def test_values_just_past_midpoints():
    above_quarter = float(np.array([0x3E800002], np.uint32).view(np.float32)[0])  # 0.25000006
    check_block(one_block([6.0, above_quarter, 0.25, -above_quarter]), "mxfp4_e2m1", [6, 0.5, 0, -0.5], 127)
    check_block(
        one_block([300.0, 1.8131605, 1.8125, 1.8124999, -1.8131605]),
        "mxfp8_e4m3",
        [288, 1.875, 1.75, 1.75, -1.875],
        127,
    )
    check_block(
        one_block([7.5, 0.0625, 0.0625001, 0.1875, 0.9375, -0.0625]),
        "mxfp6_e2m3",
        [7.5, 0, 0.125, 0.25, 1.0, -0.0],
        127,
    )
    check_block(
        one_block([28, 0.03125, 0.03125001, 0.09375, 0.21875]),
        "mxfp6_e3m2",
        [28, 0, 0.0625, 0.125, 0.25],
        127,
    )


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_code_round_trips(fmt):
    """Decode every finite in-range code under byte 127 and quantize it again."""
    f = get_format(fmt)
    table = mx.decode_table(fmt)
    codes = np.flatnonzero(np.isfinite(table) & (np.abs(table) <= f.max_normal)).astype(np.uint8)
    max_code = int(np.flatnonzero(table == f.max_normal)[0])
    # Blocks of [max_normal, code] keep the shared exponent at 0.
    pairs = np.stack([np.full_like(codes, max_code), codes], axis=1)
    scales = np.full((len(codes), 1), 127, np.uint8)
    values = dequantize_mx(torch.from_numpy(pairs), torch.from_numpy(scales), fmt, block_size=2)
    again, again_scales = quantize_mx(values, fmt, block_size=2)
    assert (again_scales.numpy() == 127).all()
    wrong = codes[again[:, 1].numpy() != codes]
    assert wrong.size == 0, f"{fmt}: codes {wrong.tolist()} do not round-trip"


def test_int_ties_to_even_and_symmetric_clamp():
    # 1.999 * 64 = 127.94 clamps to 127 (never -128); 32.5 and 33.5 are ties.
    check_block(
        one_block([1.999, 1.0, 0.5078125, 0.5234375, -1.999, -0.00390625]),
        "mxint8",
        [1.984375, 1.0, 0.5, 0.53125, -1.984375, 0.0],
        127,
        codes=[127, 64, 32, 34, 129, 0],
    )
    # floor(log2 2) = 1, so scale 2; 0.015625 / 2 * 64 = 0.5 is a tie that goes to 0.
    check_block(one_block([-2.0, 1.0, 0.015625]), "mxint8", [-2.0, 1.0, 0.0], 128)
    x = one_block([1.999, 1.0, 0.53125, 0.375])
    check_block(x, "mxint6", [1.9375, 1.0, 0.5, 0.375], 127)
    check_block(x, "mxint4", [1.75, 1.0, 0.5, 0.5], 127)


def test_scale_rules_on_single_element_blocks():
    # E4M3, emax_elem 8, max 448. floor: 2**(floor(log2 amax) - 8); rceil: the
    # smallest 2**E with amax / 2**E <= 448; even: amax rounded to 3 mantissa
    # bits first (1.9 -> 1.875, 500 -> 512).
    cases = {
        1.0: {"floor": (119, 1.0), "rceil": (119, 1.0), "even": (119, 1.0)},
        1.9: {"floor": (119, 1.75), "rceil": (120, 1.875), "even": (119, 1.75)},
        500.0: {"floor": (127, 448.0), "rceil": (128, 512.0), "even": (128, 512.0)},
    }
    for amax, by_rule in cases.items():
        for rule, (scale, value) in by_rule.items():
            check_block(one_block([amax]), "mxfp8_e4m3", [value], scale, rule=rule)


@pytest.mark.parametrize(
    ("fmt", "negative_zero_code"), [("mxfp8_e4m3", 0x80), ("mxfp4_e2m1", 0x8), ("mxint8", 0)]
)
def test_all_zero_block(fmt, negative_zero_code):
    x = one_block([0.0, 0.0, 0.0, -0.0])
    signed_zero = -0.0 if negative_zero_code else 0.0
    check_block(x, fmt, [0.0, 0.0, 0.0, signed_zero], 0, codes=[0, 0, 0, negative_zero_code])

    # A zero row among random rows: its scales are 0x00 and the others keep theirs.
    rng = np.random.default_rng(8)
    rows = rng.standard_normal((4, 64)).astype(np.float32)
    rows[2] = 0.0
    y = fake_quantize(torch.from_numpy(rows), fmt)
    _, scales = quantize_mx(torch.from_numpy(rows), fmt)
    assert scales[2].tolist() == [0, 0]
    assert_same_bits(np.zeros(64, np.float32), y[2].numpy(), "zero row")
    alone = fake_quantize(torch.from_numpy(rows[[0, 1, 3]]), fmt)
    assert_same_bits(alone.numpy(), y[[0, 1, 3]].numpy(), "other rows")


def test_signed_zero():
    check_block(
        one_block([4.0, -0.0, -0.1, -0.2]), "mxfp4_e2m1", [4, -0.0, -0.0, -0.0], 127, codes=[6, 8, 8, 8]
    )
    check_block(
        one_block([256.0, -0.0, -1e-4]), "mxfp8_e4m3", [256, -0.0, -0.0], 127, codes=[0x78, 0x80, 0x80]
    )
    check_block(one_block([1.0, -0.0, -0.001]), "mxint8", [1.0, 0.0, 0.0], 127, codes=[0x40, 0, 0])


def test_partial_last_block_stays_in_row():
    x = torch.cat([torch.full((1, 36), 1.0), torch.full((1, 36), 96.0)])
    codes, scales = quantize_mx(x, "mxfp4_e2m1")
    assert scales.tolist() == [[125, 125], [131, 131]]
    assert codes.shape == (2, 36)
    assert_same_bits(x.numpy(), fake_quantize(x, "mxfp4_e2m1").numpy(), "rows of 36")

    x = torch.tensor([1.0] * 32 + [3.0])
    assert quantize_mx(x, "mxfp4_e2m1")[1].tolist() == [125, 126]
    assert_same_bits(x.numpy(), fake_quantize(x, "mxfp4_e2m1").numpy(), "length 33")


def test_conv_weight_blocks_along_input_channels():
    w = torch.zeros(1, 32, 1, 2)
    w[0, :, 0, 0] = 1.0
    w[0, :, 0, 1] = 64.0
    _, scales = quantize_mx(w, "mxfp4_e2m1", axis=1)
    assert scales.shape == (1, 1, 1, 2)
    assert scales.flatten().tolist() == [125, 131]
    assert_same_bits(w.numpy(), fake_quantize(w, "mxfp4_e2m1", axis=1).numpy(), "axis 1")

    # Blocking along the last axis mixes 1.0 with 64.0 and flushes the 1.0s.
    _, scales = quantize_mx(w, "mxfp4_e2m1", axis=-1)
    assert scales.shape == (1, 32, 1, 1)
    assert (scales == 131).all()
    assert (fake_quantize(w, "mxfp4_e2m1", axis=-1)[0, :, 0, 0] == 0).all()


def test_nan_and_inf_blocks():
    x = torch.tensor([[1.0, NAN, 2.0, -0.0], [3.0, -math.inf, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    for fmt in ("mxfp8_e4m3", "mxint4"):
        codes, scales = quantize_mx(x, fmt, block_size=4)
        assert scales.flatten().tolist()[:2] == [0xFF, 0xFF]
        assert (codes[:2] == 0).all()
        for dtype, nan_bits in (
            (torch.float32, 0x7FC00000),
            (torch.float16, 0x7E00),
            (torch.bfloat16, 0x7FC0),
        ):
            y = fake_quantize(x.to(dtype), fmt, block_size=4)
            assert (torch_bits(y[:2]) == nan_bits).all(), f"{fmt} {dtype}: {torch_bits(y[:2])}"
            assert torch.isfinite(y[2]).all()


# ---------------------------------------------------------------- via anchor


@pytest.mark.parametrize("family", ["fp", "int"])
def test_via_anchor_matches_slice_and_scale(family):
    rng = np.random.default_rng(21)
    x = wide_random(rng, (5, 80))
    x[1, :32] = 0.0
    formats = family_formats(family)
    for anchor in formats:
        for target in formats:
            if target.bits > anchor.bits:
                continue
            for rule in RULES:
                codes, scales = mx.quantize(x, anchor, axis=1, scale_rule=rule)
                codes, scales = mx.slice_and_scale(codes, scales, anchor, target, axis=1)
                expected = mx.dequantize(codes, scales, target, axis=1)
                got = fake_quantize(
                    torch.from_numpy(x), target.name, axis=1, scale_rule=rule, anchor=anchor.name
                )
                assert_same_bits(expected, got.numpy(), f"{anchor.name} -> {target.name} {rule}")


def test_anchor_equal_to_format_is_direct():
    x = torch.from_numpy(wide_random(np.random.default_rng(3), (4, 64)))
    direct = fake_quantize(x, "mxint8")
    assert_same_bits(direct.numpy(), fake_quantize(x, "mxint8", anchor="mxint8").numpy(), "anchor == fmt")


def test_via_anchor_keeps_dtype():
    x = torch.from_numpy(wide_random(np.random.default_rng(4), (4, 64))).to(torch.bfloat16)
    expected = mx.quantize_dequantize(
        mx.quantize_dequantize(x.float().numpy(), "mxfp8_e4m3"), "mxfp4_e2m1"
    ).astype(ml_dtypes.bfloat16)
    got = fake_quantize(x, "mxfp4", anchor="mxfp8")
    assert got.dtype == torch.bfloat16
    assert_same_bits(expected, to_numpy(got), "bfloat16 via anchor")


# ---------------------------------------------------------------- straight-through gradient


def expected_ste_mask(x: np.ndarray, fmt: str, rule: str, axis: int, block_size: int) -> np.ndarray:
    _, scales = mx.quantize(x, fmt, axis=axis, block_size=block_size, scale_rule=rule)
    bound = np.repeat(mx.e8m0_to_float(scales).astype(np.float64), block_size, axis=axis)
    bound = np.take(bound, np.arange(x.shape[axis]), axis=axis) * get_format(fmt).max_normal
    return np.abs(x.astype(np.float64)) <= bound  # NaN blocks: NaN bound, nothing inside


@pytest.mark.parametrize(
    ("fmt", "rule"), [("mxfp8_e4m3", "floor"), ("mxint4", "floor"), ("mxfp4_e2m1", "rceil")]
)
def test_straight_through_gradient(fmt, rule):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((6, 40)) * 3).astype(np.float32)
    x[0, :4] = [500.0, 448.0, 449.0, -460.0]  # E4M3 scale 1: 448 is inside, 449 and 460 are not
    x[1, 7] = np.nan
    x[2, 35] = np.inf
    expected_mask = expected_ste_mask(x, fmt, rule, axis=1, block_size=32)
    assert not expected_mask[1, :32].any()
    assert not expected_mask[2, 32:].any()
    if fmt == "mxfp8_e4m3":
        assert expected_mask[0, :4].tolist() == [False, True, False, False]

    upstream = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    tx = torch.from_numpy(x).requires_grad_()
    fake_quantize(tx, fmt, axis=1, scale_rule=rule).backward(upstream)
    expected = np.where(expected_mask, upstream.numpy(), np.float32(0))
    assert_same_bits(expected, tx.grad.numpy(), f"gradient {fmt} {rule}")


def test_straight_through_gradient_via_anchor():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x[0, 0] = 40.0  # the anchor scale makes the rest of the block small
    anchor, target = "mxint8", "mxint4"
    codes, scales = mx.quantize(x, anchor)
    decoded = mx.dequantize(codes, scales, anchor)
    expected_mask = expected_ste_mask(x, anchor, "floor", -1, 32) & expected_ste_mask(
        decoded, target, "floor", -1, 32
    )
    assert 0 < expected_mask.sum() < expected_mask.size

    tx = torch.from_numpy(x).requires_grad_()
    fake_quantize(tx, target, anchor=anchor).sum().backward()
    assert_same_bits(expected_mask.astype(np.float32), tx.grad.numpy(), "gradient via anchor")


def test_gradient_keeps_dtype():
    x = torch.randn(
        2, 32, dtype=torch.bfloat16, requires_grad=True, generator=torch.Generator().manual_seed(0)
    )
    fake_quantize(x, "mxfp4").sum().backward()
    assert x.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- custom op and export


def test_custom_op_passes_opcheck():
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(5), requires_grad=True)
    for args in ((x, "mxfp4_e2m1", -1, 32, "floor", None), (x, "mxint4", 1, 16, "rceil", "mxint8")):
        torch.library.opcheck(torch.ops.mfqat.fake_quantize.default, args)


class _QuantLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 48, generator=torch.Generator().manual_seed(6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize(self.weight, "mxint4", anchor="mxint8")
        return torch.nn.functional.linear(fake_quantize(x, "mxfp8"), weight)


def test_torch_export_sees_one_opaque_op():
    module = _QuantLinear()
    x = torch.randn(2, 48, generator=torch.Generator().manual_seed(7))
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    nodes = [node for node in program.graph.nodes if node.op == "call_function"]
    targets = [str(node.target) for node in nodes]
    assert targets.count("mfqat.fake_quantize.default") == 2, targets
    assert not any("bitwise" in t or "round" in t for t in targets), targets

    # The attributes reach the graph as plain constants, with canonical format names.
    calls = [node.args[1:] for node in nodes if str(node.target) == "mfqat.fake_quantize.default"]
    assert ("mxfp8_e4m3", -1, 32, "floor", None) in calls
    assert ("mxint4", -1, 32, "floor", "mxint8") in calls

    longer = torch.randn(5, 48, generator=torch.Generator().manual_seed(8))
    for inputs in (x, longer):
        assert_same_bits(
            module(inputs).detach().numpy(), program.module()(inputs).detach().numpy(), "exported"
        )


# ---------------------------------------------------------------- input errors


def test_invalid_arguments_raise():
    x = torch.randn(2, 32)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fake_quantize(x.double(), "mxfp4")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_mx(x.int(), "mxfp4")
    with pytest.raises(ValueError, match="unknown MX format"):
        fake_quantize(x, "mxfp5")
    with pytest.raises(ValueError, match="scale_rule"):
        fake_quantize(x, "mxfp4", scale_rule="ceil")
    with pytest.raises(ValueError, match="out of range"):
        fake_quantize(x, "mxfp4", axis=2)
    with pytest.raises(ValueError, match="at least 1"):
        fake_quantize(x, "mxfp4", block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        quantize_mx(x, "mxfp4", block_size=32.0)
    with pytest.raises(ValueError, match="int family"):
        fake_quantize(x, "mxint4", anchor="mxfp8")
    with pytest.raises(ValueError, match="at least as wide"):
        fake_quantize(x, "mxint8", anchor="mxint4")


def test_dequantize_rejects_mismatched_inputs():
    codes, scales = quantize_mx(torch.randn(2, 40), "mxfp4")
    with pytest.raises(ValueError, match="need"):
        dequantize_mx(codes, scales[:, :1], "mxfp4")
    with pytest.raises(ValueError, match="below 16"):
        dequantize_mx(codes | 0x10, scales, "mxfp4")
    with pytest.raises(TypeError, match="uint8"):
        dequantize_mx(codes.int(), scales, "mxfp4")


@pytest.mark.parametrize(("fmt", "anchor"), [("mxint4", "mxint8"), ("mxfp4_e2m1", "mxfp8_e4m3"), ("mxint8", None)])
def test_training_op_matches_recomputed_mask(fmt, anchor):
    # The training path returns the STE mask from the forward pass; it must give the same output
    # and gradient as the export op, whose backward recomputes the mask.
    torch.manual_seed(0)
    x = torch.randn(6, 80) * torch.logspace(-3, 3, 80)
    x[:, 0] = 1.999  # saturates in every format, so the mask has zeros
    x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(6, 80)
    out = fake_quantize(x, fmt, anchor=anchor)
    out.backward(grad)
    out_ref = torch.ops.mfqat.fake_quantize(x_ref, get_format(fmt).name, -1, 32, "floor", None if anchor is None else get_format(anchor).name)
    out_ref.backward(grad)
    assert torch.equal(out.detach().view(torch.int32), out_ref.detach().view(torch.int32))
    assert torch.equal(x.grad, x_ref.grad)
    assert (x.grad == 0).any()
