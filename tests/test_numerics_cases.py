"""Named MX corner cases with their expected bytes and values.

Each case comes from a fault reported against an MX tool; the comment on each
test explains what went wrong there and why the expected value is right.
"""

import numpy as np
import pytest

from mfqat_onnx import numerics as mx
from mfqat_onnx.formats import get_format


def block(values, length=32):
    out = np.zeros(length, dtype=np.float32)
    out[: len(values)] = np.asarray(values, dtype=np.float32)
    return out


def bits_of(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def test_e4m3_block_max_above_448x_saturates():
    # 957 with X = 2 is 478.5 > 448, so it must clamp to 448 * 2 = 896; 864/2 = 432 is a tie to 448.
    x = np.array(
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
        ],
        dtype=np.float32,
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
    codes, scale = mx.quantize(x, "mxfp8_e4m3")
    assert scale.tolist() == [128]
    np.testing.assert_array_equal(mx.dequantize(codes, scale, "mxfp8_e4m3"), np.float32(expected))
    assert set(codes[np.abs(x) >= 864].tolist()) <= {0x7E, 0xFE}
    assert 0x7F not in codes.tolist()
    assert 0xFF not in codes.tolist()


def test_fp8_saturates_instead_of_nan_or_inf():
    # A raw ml_dtypes cast gives NaN for 465 in E4M3 and Inf past 61440 in E5M2.
    codes, scale = mx.quantize(block([465.0, 1.0]), "mxfp8_e4m3")
    assert scale.tolist() == [127]
    assert codes[0] == 0x7E
    assert mx.dequantize(codes, scale, "mxfp8_e4m3")[0] == 448.0

    codes, scale = mx.quantize(block([62000.0, 1.0]), "mxfp8_e5m2")
    assert scale.tolist() == [127]
    assert codes[0] == 0x7B
    assert mx.dequantize(codes, scale, "mxfp8_e5m2")[0] == 57344.0


def test_element_encoder_clamps_before_casting():
    codes = mx.encode_elements(np.array([448, 464, 465, 1000, -1000], np.float32), "mxfp8_e4m3")
    decoded = mx.decode_table("mxfp8_e4m3")[codes]
    np.testing.assert_array_equal(decoded, np.float32([448, 448, 448, 448, -448]))


def test_fp4_ties_round_to_even():
    # An encoder using ">=" at each threshold rounds these midpoints away from zero.
    x = block([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0])
    codes, scale = mx.quantize(x, "mxfp4_e2m1")
    assert scale.tolist() == [127]
    assert codes[:11].tolist() == [0x7, 0x0, 0x2, 0x2, 0x4, 0x4, 0x6, 0x6, 0x8, 0xC, 0xE]
    values = mx.dequantize(codes, scale, "mxfp4_e2m1")[:11]
    np.testing.assert_array_equal(values, np.float32([6, 0, 1, 1, 2, 2, 4, 4, -0.0, -2, -4]))
    assert np.signbit(values[8])


def test_fp4_sticky_bits_past_midpoint():
    # 0.25000006 is just above the 0.25 midpoint between 0 and 0.5.
    just_above = np.uint32(0x3E800002).view(np.float32)
    codes, scale = mx.quantize(block([6.0, just_above, 0.25, -just_above]), "mxfp4_e2m1")
    assert scale.tolist() == [127]
    np.testing.assert_array_equal(
        mx.dequantize(codes, scale, "mxfp4_e2m1")[:4], np.float32([6, 0.5, 0, -0.5])
    )


def test_e4m3_sticky_bits_past_midpoint():
    # 1.8131605 lies above the 1.8125 midpoint, so it rounds up to 1.875; 1.8125 itself ties to even 1.75.
    codes, scale = mx.quantize(block([300.0, 1.8131605, 1.8125, 1.8124999, -1.8131605]), "mxfp8_e4m3")
    assert scale.tolist() == [127]
    np.testing.assert_array_equal(
        mx.dequantize(codes, scale, "mxfp8_e4m3")[:5], np.float32([288, 1.875, 1.75, 1.75, -1.875])
    )


def test_e2m3_subnormal_rounding():
    codes, scale = mx.quantize(block([7.5, 0.0625, 0.0625001, 0.1875, 0.9375, -0.0625]), "mxfp6_e2m3")
    assert scale.tolist() == [127]
    values = mx.dequantize(codes, scale, "mxfp6_e2m3")[:6]
    np.testing.assert_array_equal(bits_of(values), bits_of([7.5, 0, 0.125, 0.25, 1.0, -0.0]))


def test_e3m2_subnormal_rounding():
    codes, scale = mx.quantize(block([28, 0.03125, 0.03125001, 0.09375, 0.21875]), "mxfp6_e3m2")
    assert scale.tolist() == [127]
    np.testing.assert_array_equal(
        mx.dequantize(codes, scale, "mxfp6_e3m2")[:5], np.float32([28, 0, 0.0625, 0.125, 0.25])
    )


def test_mxint8_ties_to_even_and_symmetric_clamp():
    # 32.5 and 33.5 (in units of 1/64) tie to 32 and 34; -127.94 clamps to -127, never -128.
    codes, scale = mx.quantize(block([1.999, 1.0, 0.5078125, 0.5234375, -1.999, -0.00390625]), "mxint8")
    assert scale.tolist() == [127]
    values = mx.dequantize(codes, scale, "mxint8")[:6]
    np.testing.assert_array_equal(bits_of(values), bits_of([1.984375, 1.0, 0.5, 0.53125, -1.984375, 0.0]))
    assert 0x80 not in codes.tolist()


def test_mxint8_negative_power_of_two_max():
    codes, scale = mx.quantize(block([-2.0, 1.0, 0.015625]), "mxint8")
    assert scale.tolist() == [128]
    np.testing.assert_array_equal(mx.dequantize(codes, scale, "mxint8")[:3], np.float32([-2.0, 1.0, 0.0]))


@pytest.mark.parametrize(
    ("fmt", "expected"), [("mxint6", [1.9375, 1.0, 0.5, 0.375]), ("mxint4", [1.75, 1.0, 0.5, 0.5])]
)
def test_mxint_narrow_widths(fmt, expected):
    codes, scale = mx.quantize(block([1.999, 1.0, 0.53125, 0.375]), fmt)
    assert scale.tolist() == [127]
    np.testing.assert_array_equal(mx.dequantize(codes, scale, fmt)[:4], np.float32(expected))


@pytest.mark.parametrize(
    ("amax", "rule", "byte", "value"),
    [
        (1.0, "floor", 119, 1.0),
        (1.0, "rceil", 119, 1.0),
        (1.9, "floor", 119, 1.75),
        (1.9, "rceil", 120, 1.875),
        (500.0, "floor", 127, 448.0),
        (500.0, "rceil", 128, 512.0),
    ],
)
def test_scale_rules_floor_and_rceil(amax, rule, byte, value):
    # An RNE cast of amax/448 to E8M0 would give byte 118 for amax 1.0 and clip it to 0.875: wrong in any mode.
    codes, scale = mx.quantize(block([amax]), "mxfp8_e4m3", scale_rule=rule)
    assert scale.tolist() == [byte]
    assert mx.dequantize(codes, scale, "mxfp8_e4m3")[0] == np.float32(value)


def test_default_scale_rule_is_floor():
    x = block([1.9])
    np.testing.assert_array_equal(
        mx.quantize(x, "mxfp8_e4m3")[1], mx.quantize(x, "mxfp8_e4m3", scale_rule="floor")[1]
    )


def test_e8m0_round_up_uses_every_mantissa_bit():
    # A mask of 0x4FFFFF instead of 0x7FFFFF turned 1.125, 1.25 and 5.0 into 1, 1 and 4.
    np.testing.assert_array_equal(mx.e8m0_round_up([1.125, 1.25, 5.0, 1.0, 4.0]), np.float32([2, 2, 8, 1, 4]))


def test_even_rule_bumps_scale_when_amax_rounds_up():
    # amax 7.9 rounds to 8.0 at E2M1's one mantissa bit, so "even" takes the next binade.
    _, floor_scale = mx.quantize(block([7.9]), "mxfp4_e2m1", scale_rule="floor")
    _, even_scale = mx.quantize(block([7.9]), "mxfp4_e2m1", scale_rule="even")
    assert floor_scale.tolist() == [127 + 2 - 2]
    assert even_scale.tolist() == [127 + 3 - 2]


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1", "mxint8"])
def test_all_zero_block_gives_zeros_not_nan(fmt):
    # amax = 0 made other tools divide 0/0 or store a 0xFF scale.
    x = np.zeros(32, np.float32)
    x[3] = -0.0
    codes, scale = mx.quantize(x, fmt)
    assert scale.tolist() == [0]
    values = mx.dequantize(codes, scale, fmt)
    assert np.all(values == 0)
    is_float = fmt != "mxint8"
    assert bool(np.signbit(values[3])) == is_float
    assert not np.signbit(np.delete(values, 3)).any()


def test_zero_row_leaves_other_rows_alone():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[2] = 0
    codes, scale = mx.quantize(x, "mxfp4_e2m1")
    assert scale[2].tolist() == [0, 0]
    for row in (0, 1, 3):
        row_codes, row_scale = mx.quantize(x[row], "mxfp4_e2m1")
        np.testing.assert_array_equal(codes[row], row_codes)
        np.testing.assert_array_equal(scale[row], row_scale)
    assert 0xFF not in scale.ravel().tolist()


def test_signed_zero_fp4_and_packing():
    codes, scale = mx.quantize(block([4.0, -0.0, -0.1, -0.2]), "mxfp4_e2m1")
    assert scale.tolist() == [127]
    assert codes[:4].tolist() == [0x6, 0x8, 0x8, 0x8]
    assert mx.pack_codes(codes, "mxfp4_e2m1")[:2].tolist() == [0x86, 0x88]
    values = mx.dequantize(codes, scale, "mxfp4_e2m1")[:4]
    np.testing.assert_array_equal(bits_of(values), bits_of([4.0, -0.0, -0.0, -0.0]))


def test_signed_zero_e4m3():
    codes, scale = mx.quantize(block([256.0, -0.0, -1e-4]), "mxfp8_e4m3")
    assert codes[:3].tolist() == [0x78, 0x80, 0x80]
    values = mx.dequantize(codes, scale, "mxfp8_e4m3")[:3]
    np.testing.assert_array_equal(bits_of(values), bits_of([256.0, -0.0, -0.0]))


def test_signed_zero_int8_has_no_negative_zero():
    codes, scale = mx.quantize(block([1.0, -0.0, -0.001]), "mxint8")
    assert codes[:3].tolist() == [0x40, 0x00, 0x00]
    values = mx.dequantize(codes, scale, "mxint8")[:3]
    np.testing.assert_array_equal(bits_of(values), bits_of([1.0, 0.0, 0.0]))


def test_partial_blocks_stay_inside_rows():
    # Flat blocking would put row 0's tail with row 1's head (byte 131) and flush it to zero.
    x = np.empty((2, 36), np.float32)
    x[0], x[1] = 1.0, 96.0
    codes, scale = mx.quantize(x, "mxfp4_e2m1")
    assert scale.shape == (2, 2)
    assert scale.tolist() == [[125, 125], [131, 131]]
    np.testing.assert_array_equal(mx.dequantize(codes, scale, "mxfp4_e2m1"), x)


def test_partial_block_padding_keeps_amax():
    x = np.array([1.0] * 32 + [3.0], np.float32)
    codes, scale = mx.quantize(x, "mxfp4_e2m1")
    assert scale.tolist() == [125, 126]
    np.testing.assert_array_equal(mx.dequantize(codes, scale, "mxfp4_e2m1"), x)


def test_conv_weight_blocks_along_input_channels():
    # Blocking OIHW weights along KW puts 1.0 and 64.0 in one block and flushes every 1.0 to zero.
    w = np.empty((1, 32, 1, 2), np.float32)
    w[0, :, 0, 0] = 1.0
    w[0, :, 0, 1] = 64.0
    codes, scale = mx.quantize(w, "mxfp4_e2m1", axis=1)
    assert scale.shape == (1, 1, 1, 2)
    assert scale.ravel().tolist() == [125, 131]
    np.testing.assert_array_equal(mx.dequantize(codes, scale, "mxfp4_e2m1", axis=1), w)


def test_non_last_axis_blocks_are_contiguous():
    # Interleaving the block index with the in-block index gives an alternating 1/2 pattern.
    codes = np.full((1, 64), 0x38, np.uint8)
    scale = np.array([[127, 128]], np.uint8)
    values = mx.dequantize(codes, scale, "mxfp8_e4m3", axis=1)
    np.testing.assert_array_equal(values, np.float32([[1.0] * 32 + [2.0] * 32]))


def test_nan_or_inf_block_gets_nan_scale():
    x = np.ones((3, 32), np.float32)
    x[0, 5] = np.nan
    x[1, 7] = -np.inf
    for fmt in ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp4_e2m1", "mxint8"):
        codes, scale = mx.quantize(x, fmt)
        assert scale.ravel().tolist() == [0xFF, 0xFF, 127 - get_format(fmt).emax_elem]
        assert not codes[:2].any()
        values = mx.dequantize(codes, scale, fmt)
        assert np.isnan(values[:2]).all()
        assert np.isfinite(values[2]).all()


def test_tiny_block_clamps_exponent_and_flushes():
    # floor(log2(2^-140)) - 8 = -148 clamps to -127, so the elements fall below E4M3's smallest subnormal.
    tiny = np.float32(2.0**-140)
    codes, scale = mx.quantize(block([tiny, -tiny]), "mxfp8_e4m3")
    assert scale.tolist() == [0]
    values = mx.dequantize(codes, scale, "mxfp8_e4m3")
    np.testing.assert_array_equal(bits_of(values[:2]), bits_of([0.0, -0.0]))


def test_smallest_scale_decodes_exactly():
    codes = np.array([0x01, 0x7E], np.uint8)
    values = mx.dequantize(codes, np.array([0], np.uint8), "mxfp8_e4m3", block_size=2)
    np.testing.assert_array_equal(values, np.float32([2.0**-9 * 2.0**-127, 448 * 2.0**-127]))
