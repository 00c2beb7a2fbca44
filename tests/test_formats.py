import math

import pytest

from mfqat_onnx.formats import FORMATS, family_formats, get_format, list_formats

# name: (family, bits, ebits, mbits, bias, emax_elem, max_normal, has_inf, has_nan, in_spec)
EXPECTED = {
    "mxfp8_e4m3": ("fp", 8, 4, 3, 7, 8, 448.0, False, True, True),
    "mxfp8_e5m2": ("fp", 8, 5, 2, 15, 15, 57344.0, True, True, True),
    "mxfp6_e3m2": ("fp", 6, 3, 2, 3, 4, 28.0, False, False, True),
    "mxfp6_e2m3": ("fp", 6, 2, 3, 1, 2, 7.5, False, False, True),
    "mxfp4_e2m1": ("fp", 4, 2, 1, 1, 2, 6.0, False, False, True),
    "mxint8": ("int", 8, 0, 6, 0, 0, 127 / 64, False, False, True),
    "mxint7": ("int", 7, 0, 5, 0, 0, 63 / 32, False, False, False),
    "mxint6": ("int", 6, 0, 4, 0, 0, 31 / 16, False, False, True),
    "mxint5": ("int", 5, 0, 3, 0, 0, 15 / 8, False, False, False),
    "mxint4": ("int", 4, 0, 2, 0, 0, 7 / 4, False, False, True),
    "mxint3": ("int", 3, 0, 1, 0, 0, 3 / 2, False, False, False),
    "mxint2": ("int", 2, 0, 0, 0, 0, 1.0, False, False, True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_format_fields(name):
    fmt = get_format(name)
    family, bits, ebits, mbits, bias, emax, max_normal, has_inf, has_nan, in_spec = EXPECTED[name]
    assert fmt.family == family
    assert fmt.bits == bits
    assert fmt.ebits == ebits
    assert fmt.mbits == mbits
    assert fmt.bias == bias
    assert fmt.emax_elem == emax
    assert fmt.max_normal == max_normal
    assert fmt.has_inf == has_inf
    assert fmt.has_nan == has_nan
    assert fmt.in_ocp_spec == in_spec


def test_registry_has_every_format():
    assert set(FORMATS) == set(EXPECTED)


@pytest.mark.parametrize(
    ("name", "min_normal", "min_subnormal"),
    [
        ("mxfp8_e4m3", 2.0**-6, 2.0**-9),
        ("mxfp8_e5m2", 2.0**-14, 2.0**-16),
        ("mxfp6_e3m2", 0.25, 0.0625),
        ("mxfp6_e2m3", 1.0, 0.125),
        ("mxfp4_e2m1", 1.0, 0.5),
        ("mxint8", 1 / 64, 1 / 64),
    ],
)
def test_format_normal_ranges(name, min_normal, min_subnormal):
    fmt = get_format(name)
    assert fmt.min_normal == min_normal
    assert fmt.min_subnormal == min_subnormal


@pytest.mark.parametrize(("alias", "name"), [("mxfp8", "mxfp8_e4m3"), ("mxfp6", "mxfp6_e2m3"), ("MXFP4", "mxfp4_e2m1")])
def test_aliases(alias, name):
    assert get_format(alias) is FORMATS[name]


def test_unknown_format_lists_valid_names():
    with pytest.raises(ValueError, match="unknown MX format 'mxfp3'") as info:
        get_format("mxfp3")
    for name in list_formats():
        assert name in str(info.value)


def test_non_string_format_rejected():
    with pytest.raises(TypeError, match="format must be a string"):
        get_format(4)


def test_family_formats_widest_first():
    ints = family_formats("int")
    assert [f.bits for f in ints] == [8, 7, 6, 5, 4, 3, 2]
    assert [f.name for f in family_formats("int", include_extensions=False)] == ["mxint8", "mxint6", "mxint4", "mxint2"]
    assert all(math.isfinite(f.max_normal) for f in family_formats("fp"))
