"""Retargeting anchor models: the onnx-ir rewrite, the file wrapper and the CLI.

Oracles: the numpy reference (unpack_codes, slice_and_scale, convert, pack_codes,
dequantize), hand-computed edge cases, onnx.checker with full_check, and ONNX
Runtime running the model-local function bodies.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from mfqat_onnx import numerics
from mfqat_onnx._onnx_io import CorruptModelError, ModelNotFoundError, NotAnOnnxModelError, OpsetError
from mfqat_onnx._retarget_synthetic import build_anchor_model, quantized_weight, random_weight
from mfqat_onnx.formats import family_formats, get_format
from mfqat_onnx.retarget import (
    AnchorMetadataError,
    DerivedSourceError,
    PrecisionError,
    RetargetError,
    UnknownTargetError,
    main,
    retarget_file,
    retarget_model,
)

SAME_FAMILY = [
    (anchor, fmt.name)
    for anchor in ("mxint8", "mxfp8_e4m3")
    for fmt in family_formats(get_format(anchor).family)
    if fmt.name != anchor and fmt.bits <= 8
]


def random_float(rng, shape, spread=6.0):
    """Normal values times log-uniform magnitudes, so blocks span several binades."""
    return (rng.standard_normal(shape) * np.exp2(rng.uniform(-spread, spread, size=shape))).astype(np.float32)


def anchor_weights(anchor, seed=0):
    """A linear weight with a partial last block, a conv weight (axis 1) and a small linear."""
    rng = np.random.default_rng(seed)
    return [
        quantized_weight("fc1", random_float(rng, (16, 80)), anchor),
        quantized_weight("conv", random_float(rng, (4, 40, 3, 3)), anchor),
        quantized_weight("head", random_float(rng, (3, 32)), anchor),
    ]


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_attrs(model, weight):
    for node in model.graph.node:
        if node.domain == "mfqat" and node.op_type == "MXDequantize" and node.output[0] == weight:
            return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    raise KeyError(weight)


def metadata(model):
    return {p.key: p.value for p in model.metadata_props}


def stored_codes(model, weight, fmt):
    """Unpack a weight of ``model`` with its node attributes."""
    attrs = node_attrs(model, weight)
    inits = initializers(model)
    codes = numerics.unpack_codes(
        inits[f"{weight}.mx_codes"],
        fmt,
        axis=attrs["axis"],
        block_size=attrs["block_size"],
        axis_length=attrs["axis_length"],
    )
    return codes, inits[f"{weight}.mx_scales"]


def bits_of(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def snapshot(folder):
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def anchors():
    return {anchor: build_anchor_model(anchor_weights(anchor), anchor) for anchor in ("mxint8", "mxfp8_e4m3")}


# ---------------------------------------------------------------------------
# Bit-exact Slice-and-Scale of the stored codes


@pytest.mark.parametrize(("anchor", "target"), SAME_FAMILY)
def test_codes_match_reference(anchors, anchor, target):
    model = anchors[anchor]
    new_model, report = retarget_model(model, target)
    onnx.checker.check_model(new_model, full_check=True)
    assert [c.method for c in report.converted] == ["slice_and_scale"] * 3

    inits = initializers(new_model)
    for weight in anchor_weights(anchor):
        ref_codes, ref_scales = numerics.slice_and_scale(
            weight.codes, weight.scale_e8m0, anchor, target, axis=weight.axis
        )
        codes, scales = stored_codes(new_model, weight.name, target)
        np.testing.assert_array_equal(codes, ref_codes, err_msg=weight.name)
        np.testing.assert_array_equal(scales, ref_scales, err_msg=weight.name)
        packed = numerics.pack_codes(ref_codes, target, axis=weight.axis)
        assert inits[f"{weight.name}.mx_codes"].tobytes() == packed.tobytes(), weight.name


@pytest.mark.parametrize(("anchor", "target"), SAME_FAMILY)
def test_attributes_and_metadata_updated(anchors, anchor, target):
    new_model, _ = retarget_model(anchors[anchor], target)
    for weight in anchor_weights(anchor):
        attrs = node_attrs(new_model, weight.name)
        old = node_attrs(anchors[anchor], weight.name)
        assert attrs["format"] == target.encode()
        assert attrs["scale_rule"] == b"floor"
        for key in ("axis", "block_size", "axis_length"):
            assert attrs[key] == old[key], key
    meta = metadata(new_model)
    assert meta["mfqat.anchor_format"] == anchor
    assert meta["mfqat.derived_from"] == anchor
    assert meta["mfqat.scale_rule"] == "floor"
    assert json.loads(meta["mfqat.weights"]) == {"fc1": target, "conv": target, "head": target}


def test_input_model_not_modified(anchors):
    before = anchors["mxint8"].SerializeToString()
    retarget_model(anchors["mxint8"], "mxint4", activations=None)
    assert anchors["mxint8"].SerializeToString() == before


def test_conv_keeps_axis_one(anchors):
    new_model, _ = retarget_model(anchors["mxint8"], "mxint4")
    attrs = node_attrs(new_model, "conv")
    assert attrs["axis"] == 1
    # [4, 40, 3, 3] blocked along 40 channels: 2 blocks of 16 bytes each on axis 1.
    assert initializers(new_model)["conv.mx_codes"].shape == (4, 32, 3, 3)
    assert initializers(new_model)["conv.mx_scales"].shape == (4, 2, 3, 3)


# ---------------------------------------------------------------------------
# ONNX Runtime through the function bodies


def feeds_for(model, seed=1):
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 2 for d in value.type.tensor_type.shape.dim]
        if len(dims) == 4:
            dims[2:] = [5, 5]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


@pytest.mark.parametrize(
    ("anchor", "target"),
    [("mxint8", "mxint4"), ("mxint8", "mxint3"), ("mxfp8_e4m3", "mxfp4_e2m1"), ("mxfp8_e4m3", "mxint4")],
)
def test_ort_decodes_reference_exactly(anchor, target):
    weights = anchor_weights(anchor)
    model = build_anchor_model(weights, anchor, expose_weights=True)
    new_model, _ = retarget_model(model, target)
    names = [w.name for w in weights]
    session = ort.InferenceSession(new_model.SerializeToString(), providers=["CPUExecutionProvider"])
    decoded = dict(zip(names, session.run(names, feeds_for(new_model)), strict=True))
    for weight in weights:
        codes, scales, _ = numerics.convert(weight.codes, weight.scale_e8m0, anchor, target, axis=weight.axis)
        expected = numerics.dequantize(codes, scales, target, axis=weight.axis)
        np.testing.assert_array_equal(bits_of(decoded[weight.name]), bits_of(expected), err_msg=weight.name)


# ---------------------------------------------------------------------------
# Edge cases with hand-computed results, through the retarget path


def retarget_single(w_hp, anchor, target, *, axis=1):
    model = build_anchor_model([quantized_weight("w", w_hp, anchor, axis=axis)], anchor, expose_weights=True)
    new_model, report = retarget_model(model, target)
    onnx.checker.check_model(new_model, full_check=True)
    codes, scales = stored_codes(new_model, "w", target)
    decoded = numerics.dequantize(codes, scales, target, axis=axis)
    return new_model, codes, scales, decoded


def test_zero_rows_stay_zero():
    # Pruned rows: all-zero blocks keep byte 0x00, decode to zeros, and -0.0 keeps its sign in FP.
    rng = np.random.default_rng(8)
    w = random_float(rng, (4, 64))
    w[2] = 0.0
    w[2, 3] = -0.0
    for anchor, target in (("mxfp8_e4m3", "mxfp4_e2m1"), ("mxfp8_e4m3", "mxfp6_e3m2"), ("mxint8", "mxint4")):
        _, codes, scales, decoded = retarget_single(w, anchor, target)
        assert scales[2].tolist() == [0, 0], (anchor, target)
        assert 0xFF not in scales
        assert np.all(decoded[2] == 0.0)
        sign_of_index_3 = bool(np.signbit(decoded[2, 3]))
        assert sign_of_index_3 is get_format(target).is_float, (anchor, target)
        anchor_codes, anchor_scales = numerics.quantize(w, anchor, axis=1)
        ref_codes, ref_scales = numerics.slice_and_scale(anchor_codes, anchor_scales, anchor, target, axis=1)
        np.testing.assert_array_equal(codes, ref_codes)
        np.testing.assert_array_equal(scales, ref_scales)


def test_partial_blocks_stay_in_row():
    # [2, 36]: row 0 all 1.0, row 1 all 96.0; MXFP4 scales [[125, 125], [131, 131]], exact values.
    w = np.stack([np.full(36, 1.0), np.full(36, 96.0)]).astype(np.float32)
    _, _, scales, decoded = retarget_single(w, "mxfp8_e4m3", "mxfp4_e2m1")
    assert scales.tolist() == [[125, 125], [131, 131]]
    np.testing.assert_array_equal(bits_of(decoded), bits_of(w))


def test_partial_block_one_dimensional():
    # Length 33: [1.0] * 32 + [3.0] gives MXFP4 bytes [125, 126] and an exact round trip.
    w = np.array([1.0] * 32 + [3.0], dtype=np.float32)
    _, _, scales, decoded = retarget_single(w, "mxfp8_e4m3", "mxfp4_e2m1", axis=0)
    assert scales.tolist() == [125, 126]
    np.testing.assert_array_equal(bits_of(decoded), bits_of(w))


def test_conv_blocks_along_input_channels():
    # [1, 32, 1, 2] with w[0,:,0,0] = 1 and w[0,:,0,1] = 64: scales [1, 1, 1, 2] = [125, 131], exact.
    w = np.zeros((1, 32, 1, 2), dtype=np.float32)
    w[0, :, 0, 0] = 1.0
    w[0, :, 0, 1] = 64.0
    new_model, _, scales, decoded = retarget_single(w, "mxfp8_e4m3", "mxfp4_e2m1")
    assert node_attrs(new_model, "w")["axis"] == 1
    assert scales.shape == (1, 1, 1, 2)
    assert scales.ravel().tolist() == [125, 131]
    np.testing.assert_array_equal(bits_of(decoded), bits_of(w))


def test_int_ties_and_clamp():
    # MXINT8 anchor of [1.999, 1.0, 0.53125, 0.375]: MXINT6 gives [1.9375, 1, 0.5, 0.375], MXINT4 [1.75, 1, 0.5, 0.5].
    w = np.zeros((1, 32), dtype=np.float32)
    w[0, :4] = [1.999, 1.0, 0.53125, 0.375]
    _, _, scales6, decoded6 = retarget_single(w, "mxint8", "mxint6")
    _, _, scales4, decoded4 = retarget_single(w, "mxint8", "mxint4")
    assert scales6.tolist() == [[127]]
    assert scales4.tolist() == [[127]]
    assert decoded6[0, :4].tolist() == [1.9375, 1.0, 0.5, 0.375]
    assert decoded4[0, :4].tolist() == [1.75, 1.0, 0.5, 0.5]


def test_signed_zero_fp4_packing():
    # [4.0, -0.0, -0.1, -0.2] via an E4M3 anchor: FP4 codes 6, 8, 8, 8 packed as 0x86, 0x88, byte 127.
    w = np.zeros((1, 32), dtype=np.float32)
    w[0, :4] = [4.0, -0.0, -0.1, -0.2]
    new_model, codes, scales, _ = retarget_single(w, "mxfp8_e4m3", "mxfp4_e2m1")
    assert scales.tolist() == [[127]]
    assert codes[0, :4].tolist() == [0x6, 0x8, 0x8, 0x8]
    assert initializers(new_model)["w.mx_codes"][0, :2].tolist() == [0x86, 0x88]


# ---------------------------------------------------------------------------
# Across families, same format, derived files, refusals


def test_cross_family_requantizes(anchors):
    new_model, report = retarget_model(anchors["mxfp8_e4m3"], "mxint4")
    assert [c.method for c in report.converted] == ["requantize"] * 3
    assert report.requantized == report.converted
    for weight in anchor_weights("mxfp8_e4m3"):
        decoded = numerics.dequantize(weight.codes, weight.scale_e8m0, "mxfp8_e4m3", axis=weight.axis)
        ref_codes, ref_scales = numerics.quantize(decoded, "mxint4", axis=weight.axis)
        codes, scales = stored_codes(new_model, weight.name, "mxint4")
        np.testing.assert_array_equal(codes, ref_codes)
        np.testing.assert_array_equal(scales, ref_scales)


def test_same_format_is_a_copy(anchors):
    model = anchors["mxint8"]
    new_model, report = retarget_model(model, "mxint8")
    assert report.converted == []
    assert [s.reason for s in report.skipped] == ["already in mxint8"] * 3
    assert {k: v.tobytes() for k, v in initializers(new_model).items()} == {
        k: v.tobytes() for k, v in initializers(model).items()
    }
    assert "mfqat.derived_from" not in metadata(new_model)


def test_alias_target(anchors):
    _, report = retarget_model(anchors["mxfp8_e4m3"], "MXFP4")
    assert {c.new_format for c in report.converted} == {"mxfp4_e2m1"}


def test_unknown_target_lists_valid_names(anchors):
    with pytest.raises(UnknownTargetError) as info:
        retarget_model(anchors["mxint8"], "mxint9")
    message = str(info.value)
    assert "'mxint9'" in message
    for name in ("mxint7", "mxint4", "mxint2", "mxfp4_e2m1 (mxfp4)"):
        assert name in message


def test_public_api():
    import mfqat_onnx.retarget as retarget

    assert sorted(retarget.__all__) == [
        "ActivationChange",
        "AnchorMetadataError",
        "DerivedSourceError",
        "LayerChange",
        "PrecisionError",
        "RetargetError",
        "RetargetReport",
        "SkippedLayer",
        "UnknownTargetError",
        "anchor_format_of",
        "default_output_path",
        "describe_targets",
        "main",
        "retarget_file",
        "retarget_model",
    ]
    for name in retarget.__all__:
        assert getattr(retarget, name) is not None, name


def derived_model(anchors, fmt="mxint4"):
    return retarget_model(anchors["mxint8"], fmt)[0]


def test_derived_source_refused(anchors):
    with pytest.raises(DerivedSourceError, match="anchor"):
        retarget_model(derived_model(anchors), "mxint2")


def test_derived_source_allowed_by_flag(anchors):
    derived = derived_model(anchors)
    new_model, report = retarget_model(derived, "mxint2", allow_requantize_lowbit=True)
    assert len(report.converted) == 3
    for weight in ("fc1", "conv", "head"):
        axis = node_attrs(derived, weight)["axis"]
        codes4, scales4 = stored_codes(derived, weight, "mxint4")
        ref_codes, ref_scales = numerics.slice_and_scale(codes4, scales4, "mxint4", "mxint2", axis=axis)
        codes2, scales2 = stored_codes(new_model, weight, "mxint2")
        np.testing.assert_array_equal(codes2, ref_codes)
        np.testing.assert_array_equal(scales2, ref_scales)
    assert metadata(new_model)["mfqat.derived_from"] == "mxint8"


def test_derived_same_format_is_allowed(anchors):
    _, report = retarget_model(derived_model(anchors), "mxint4")
    assert report.converted == []


@pytest.mark.parametrize("allow", [False, True])
def test_target_above_stored_bits_refused(anchors, allow):
    with pytest.raises(PrecisionError, match="6 bits"):
        retarget_model(derived_model(anchors), "mxint6", allow_requantize_lowbit=allow)


def test_missing_anchor_metadata(anchors):
    model = onnx.ModelProto()
    model.CopyFrom(anchors["mxint8"])
    kept = [p for p in model.metadata_props if p.key != "mfqat.anchor_format"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    with pytest.raises(AnchorMetadataError, match="mfqat.anchor_format"):
        retarget_model(model, "mxint4")


def test_invalid_weights_metadata(anchors):
    model = onnx.ModelProto()
    model.CopyFrom(anchors["mxint8"])
    onnx.helper.set_model_props(model, {**metadata(model), "mfqat.weights": "{not json"})
    with pytest.raises(AnchorMetadataError, match="not valid JSON"):
        retarget_model(model, "mxint4")


def test_invalid_format_in_weights_metadata(anchors):
    model = onnx.ModelProto()
    model.CopyFrom(anchors["mxint8"])
    onnx.helper.set_model_props(model, {**metadata(model), "mfqat.weights": '{"fc1": "mxint9"}'})
    with pytest.raises(AnchorMetadataError, match="invalid format"):
        retarget_model(model, "mxint4")


def test_rceil_anchor_gets_floor_scales():
    # Slice-and-Scale output equals floor-rule re-quantization of the decoded anchor,
    # whatever rule made the anchor, so the rewrite records "floor".
    rng = np.random.default_rng(7)
    w = random_float(rng, (8, 64))
    weight = quantized_weight("w", w, "mxfp8_e4m3", scale_rule="rceil")
    model = build_anchor_model([weight], "mxfp8_e4m3", scale_rule="rceil")
    new_model, _ = retarget_model(model, "mxfp4_e2m1")
    assert node_attrs(new_model, "w")["scale_rule"] == b"floor"
    assert metadata(new_model)["mfqat.scale_rule"] == "floor"
    decoded = numerics.dequantize(weight.codes, weight.scale_e8m0, "mxfp8_e4m3", axis=1)
    ref_codes, ref_scales = numerics.quantize(decoded, "mxfp4_e2m1", axis=1, scale_rule="floor")
    codes, scales = stored_codes(new_model, "w", "mxfp4_e2m1")
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales, ref_scales)


def test_external_data_in_memory_refused(anchors, tmp_path):
    from mfqat_onnx._onnx_io import load_model, save_model

    save_model(anchors["mxint8"], tmp_path / "a.onnx", external_data=True)
    with pytest.raises(RetargetError, match="external file"):
        retarget_model(load_model(tmp_path / "a.onnx", load_external_data=False), "mxint4")


def test_not_a_model_type():
    with pytest.raises(TypeError, match="ModelProto"):
        retarget_model(b"bytes", "mxint4")


# ---------------------------------------------------------------------------
# Mixed precision, activations, foreign readers


def test_layer_patterns(anchors):
    new_model, report = retarget_model(
        anchors["mxint8"], "mxint8", layers={"fc*": "mxint4", "con?": "mxint6"}
    )
    formats = {c.name: c.new_format for c in report.converted}
    assert formats == {"fc1": "mxint4", "conv": "mxint6"}
    assert json.loads(metadata(new_model)["mfqat.weights"]) == {
        "fc1": "mxint4",
        "conv": "mxint6",
        "head": "mxint8",
    }
    assert metadata(new_model)["mfqat.derived_from"] == "mxint8"


def test_layer_pattern_first_match_wins(anchors):
    _, report = retarget_model(anchors["mxint8"], "mxint8", layers={"fc1": "mxint3", "*": "mxint5"})
    assert {c.name: c.new_format for c in report.converted} == {
        "fc1": "mxint3",
        "conv": "mxint5",
        "head": "mxint5",
    }


def test_layer_pattern_matching_nothing(anchors):
    with pytest.raises(RetargetError, match="match no quantized weight"):
        retarget_model(anchors["mxint8"], "mxint4", layers={"decoder.*": "mxint2"})


def test_layer_pattern_unknown_format(anchors):
    with pytest.raises(UnknownTargetError, match="mxint1"):
        retarget_model(anchors["mxint8"], "mxint4", layers={"fc*": "mxint1"})


def test_activation_quantizers_retargeted():
    weights = anchor_weights("mxint8")
    model = build_anchor_model(weights, "mxint8", activations="mxint8")
    new_model, report = retarget_model(model, "mxint4", activations="mxint6")
    assert sorted(a.name for a in report.activations) == ["conv.input", "fc1.input", "head.input"]
    # The quantizer reads "<w>.input" and its decoder "<w>.input.mx_codes".
    act_nodes = [n for n in new_model.graph.node if n.domain == "mfqat" and ".input" in n.input[0]]
    assert len(act_nodes) == 6
    for node in act_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["format"] == b"mxint6", node.name
    onnx.checker.check_model(new_model, full_check=True)
    session = ort.InferenceSession(new_model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds_for(new_model))
    assert all(np.isfinite(o).all() for o in outputs)


def test_activation_format_without_quantizers(anchors):
    with pytest.raises(RetargetError, match="no activation quantizers"):
        retarget_model(anchors["mxint8"], "mxint4", activations="mxint4")


def test_activations_kept_are_reported():
    model = build_anchor_model(anchor_weights("mxint8"), "mxint8", activations="mxint8")
    _, report = retarget_model(model, "mxint4")
    reasons = [s.reason for s in report.skipped]
    assert reasons.count("activation quantizer kept in mxint8 (no activation format given)") == 3


def test_codes_read_by_other_node_are_skipped():
    model = build_anchor_model(anchor_weights("mxint8"), "mxint8")
    # A second reader of fc1's packed codes, which would break if their layout changed.
    model.graph.node.append(onnx.helper.make_node("Identity", ["fc1.mx_codes"], ["raw_codes"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("raw_codes", onnx.TensorProto.UINT8, None))
    new_model, report = retarget_model(model, "mxint4")
    assert {c.name for c in report.converted} == {"conv", "head"}
    skipped = {s.name: s.reason for s in report.skipped}
    assert "Identity" in skipped["fc1"]
    assert report.layer_count == 3
    assert node_attrs(new_model, "fc1")["format"] == b"mxint8"
    assert json.loads(metadata(new_model)["mfqat.weights"])["fc1"] == "mxint8"


def test_shared_weight_converted_once():
    weights = anchor_weights("mxint8")[:1]
    model = build_anchor_model(weights, "mxint8")
    twin = onnx.helper.make_node(
        "MXDequantize",
        ["fc1.mx_codes", "fc1.mx_scales"],
        ["fc1_twin"],
        domain="mfqat",
        format="mxint8",
        axis=1,
        block_size=32,
        axis_length=80,
        scale_rule="floor",
    )
    model.graph.node.append(twin)
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("fc1_twin", onnx.TensorProto.FLOAT, [16, 80])
    )
    new_model, report = retarget_model(model, "mxint4")
    assert [c.name for c in report.converted] == ["fc1"]
    assert node_attrs(new_model, "fc1_twin")["format"] == b"mxint4"


# ---------------------------------------------------------------------------
# File sizes


@pytest.mark.parametrize(
    "target", ["mxint8", "mxint6", "mxint4", "mxint3", "mxint2", "mxfp6_e2m3", "mxfp4_e2m1"]
)
def test_file_size_follows_bits(tmp_path_factory, target):
    # 1M weights: packed codes plus scales are bits + 0.25 per weight; the rest of
    # the file (function bodies, graph, metadata) is a fixed amount.
    folder = tmp_path_factory.mktemp("size")
    rng = np.random.default_rng(3)
    anchor = "mxint8" if target.startswith("mxint") else "mxfp8_e4m3"
    model = build_anchor_model([random_weight("w", (1024, 1024), anchor, rng)], anchor)
    onnx.save(model, folder / "anchor.onnx")
    out, report = retarget_file(folder / "anchor.onnx", target)
    fmt = get_format(target)
    expected_payload = 2**20 * (fmt.bits + 0.25) / 8
    assert report.weight_bytes_after == expected_payload

    stripped = onnx.load(out)
    for tensor in stripped.graph.initializer:
        tensor.ClearField("raw_data")
    fixed = stripped.ByteSize()
    size = out.stat().st_size
    assert abs(size - fixed - expected_payload) <= 0.05 * expected_payload
    assert size < expected_payload + 64 * 1024


# ---------------------------------------------------------------------------
# retarget_file: outputs and refusals that leave the folder untouched


@pytest.fixture
def anchor_file(tmp_path, anchors):
    path = tmp_path / "model.onnx"
    onnx.save(anchors["mxint8"], path)
    return path


def test_retarget_file_default_name(anchor_file):
    out, report = retarget_file(anchor_file, "mxint4")
    assert out == anchor_file.with_name("model.mxint4.onnx")
    assert report.output_files == (out,)
    assert report.input_files == (anchor_file.resolve(),)
    onnx.checker.check_model(str(out), full_check=True)
    assert metadata(onnx.load(out))["mfqat.derived_from"] == "mxint8"
    assert sorted(p.name for p in anchor_file.parent.iterdir()) == ["model.mxint4.onnx", "model.onnx"]


def test_retarget_file_external_anchor(tmp_path, anchors):
    from mfqat_onnx._onnx_io import save_model

    save_model(anchors["mxint8"], tmp_path / "model.onnx", external_data=True)
    out, _ = retarget_file(tmp_path / "model.onnx", "mxint4", tmp_path / "small.onnx")
    reference, _ = retarget_model(anchors["mxint8"], "mxint4")
    assert {k: v.tobytes() for k, v in initializers(onnx.load(out)).items()} == {
        k: v.tobytes() for k, v in initializers(reference).items()
    }


def write_opset(anchors, path, opset):
    model = onnx.ModelProto()
    model.CopyFrom(anchors["mxint8"])
    for entry in model.opset_import:
        if entry.domain == "":
            entry.version = opset
    onnx.save(model, path)


BAD_INPUTS = {
    "missing": (lambda d, a: None, ModelNotFoundError),
    "not_onnx": (lambda d, a: (d / "model.onnx").write_text("not a model"), NotAnOnnxModelError),
    "truncated": (
        lambda d, a: (d / "model.onnx").write_bytes(a["mxint8"].SerializeToString()[:5000]),
        CorruptModelError,
    ),
    "old_opset": (lambda d, a: write_opset(a, d / "model.onnx", 20), OpsetError),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_retarget_file_bad_input_writes_nothing(tmp_path, anchors, case):
    make, error = BAD_INPUTS[case]
    make(tmp_path, anchors)
    before = snapshot(tmp_path)
    with pytest.raises(error):
        retarget_file(tmp_path / "model.onnx", "mxint4")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("target", "kwargs", "error"),
    [
        ("mxint9", {}, UnknownTargetError),
        ("../mxint4", {}, UnknownTargetError),
        ("mxint4", {"layers": {"nothing*": "mxint2"}}, RetargetError),
        ("mxint4", {"activations": "mxint4"}, RetargetError),
    ],
)
def test_retarget_file_bad_request_writes_nothing(anchor_file, target, kwargs, error):
    before = snapshot(anchor_file.parent)
    with pytest.raises(error):
        retarget_file(anchor_file, target, **kwargs)
    assert snapshot(anchor_file.parent) == before


def test_retarget_file_derived_input_writes_nothing(tmp_path, anchors):
    onnx.save(derived_model(anchors), tmp_path / "model.mxint4.onnx")
    before = snapshot(tmp_path)
    with pytest.raises(DerivedSourceError):
        retarget_file(tmp_path / "model.mxint4.onnx", "mxint2")
    with pytest.raises(PrecisionError):
        retarget_file(tmp_path / "model.mxint4.onnx", "mxint8")
    assert snapshot(tmp_path) == before


def test_retarget_file_refuses_input_as_output(anchor_file):
    before = snapshot(anchor_file.parent)
    with pytest.raises(ValueError, match="input file"):
        retarget_file(anchor_file, "mxint4", anchor_file, force=True)
    assert snapshot(anchor_file.parent) == before


def test_retarget_file_existing_output(anchor_file):
    out = anchor_file.with_name("model.mxint4.onnx")
    out.write_bytes(b"previous")
    before = snapshot(anchor_file.parent)
    with pytest.raises(ValueError, match="already exists"):
        retarget_file(anchor_file, "mxint4")
    assert snapshot(anchor_file.parent) == before
    retarget_file(anchor_file, "mxint4", force=True)
    assert onnx.load(out).graph.node


# ---------------------------------------------------------------------------
# Command line


def test_cli_writes_and_prints_table(anchor_file, capsys):
    assert main([str(anchor_file), "--format", "mxint4"]) == 0
    printed = capsys.readouterr().out
    assert "mxint4" in printed
    assert "3/3" in printed
    assert "slice_and_scale" in printed
    assert anchor_file.with_name("model.mxint4.onnx").is_file()


def test_cli_cross_family_note(tmp_path, anchors, capsys):
    onnx.save(anchors["mxfp8_e4m3"], tmp_path / "model.onnx")
    assert main([str(tmp_path / "model.onnx"), "--format", "mxint4", "-o", str(tmp_path / "x.onnx")]) == 0
    assert "re-quantized" in capsys.readouterr().out


def test_cli_all_formats(anchor_file, capsys):
    assert main([str(anchor_file), "--all"]) == 0
    names = sorted(p.name for p in anchor_file.parent.iterdir())
    expected = sorted(["model.onnx"] + [f"model.mxint{b}.onnx" for b in (7, 6, 5, 4, 3, 2)])
    assert names == expected
    for bits in (7, 6, 5, 4, 3, 2):
        out = onnx.load(anchor_file.with_name(f"model.mxint{bits}.onnx"))
        assert set(json.loads(metadata(out)["mfqat.weights"]).values()) == {f"mxint{bits}"}
    assert capsys.readouterr().out.count("slice_and_scale") == 6


def test_cli_all_into_folder(tmp_path, anchors):
    onnx.save(anchors["mxfp8_e4m3"], tmp_path / "model.onnx")
    (tmp_path / "out").mkdir()
    assert main([str(tmp_path / "model.onnx"), "--all", "-o", str(tmp_path / "out")]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(
        f"model.{f}.onnx" for f in ("mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1")
    )


def test_cli_all_stops_before_writing_when_one_exists(anchor_file, capsys):
    anchor_file.with_name("model.mxint3.onnx").write_bytes(b"keep")
    before = snapshot(anchor_file.parent)
    assert main([str(anchor_file), "--all"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert snapshot(anchor_file.parent) == before


def test_cli_layers_and_activations(tmp_path, capsys):
    model = build_anchor_model(anchor_weights("mxint8"), "mxint8", activations="mxint8")
    onnx.save(model, tmp_path / "model.onnx")
    argv = [str(tmp_path / "model.onnx"), "--format", "mxint8", "--layers", "fc*=mxint4", "--layers", "conv=mxint2"]
    assert main([*argv, "--activations", "mxint6", "-o", str(tmp_path / "mixed.onnx"), "-v"]) == 0
    out = onnx.load(tmp_path / "mixed.onnx")
    assert json.loads(metadata(out)["mfqat.weights"]) == {"fc1": "mxint4", "conv": "mxint2", "head": "mxint8"}
    printed = capsys.readouterr().out
    assert "activations mxint8 -> mxint6" in printed
    assert "head: skipped, already in mxint8" in printed
    assert "mixed: mxint2, mxint4" in printed


def test_cli_stored_format_with_default_name(tmp_path, anchors, capsys):
    onnx.save(anchors["mxint8"], tmp_path / "model.mxint8.onnx")
    before = snapshot(tmp_path)
    assert main([str(tmp_path / "model.mxint8.onnx"), "--format", "mxint8"]) == 2
    assert "is already named for mxint8" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert main([str(tmp_path / "model.mxint8.onnx"), "--format", "mxint8", "-o", str(tmp_path / "copy.onnx")]) == 0


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["--format", "mxint9"], "unknown target format"),
        (["--format", "mxint4", "--layers", "zzz*=mxint2"], "match no quantized weight"),
        (["--all", "--layers", "fc*=mxint2"], "--layers"),
        (["--format", "mxint4", "-o", "{input}"], "input file"),
    ],
)
def test_cli_errors_exit_2_and_write_nothing(anchor_file, capsys, argv_tail, message):
    before = snapshot(anchor_file.parent)
    argv = [str(anchor_file), *(a.replace("{input}", str(anchor_file)) for a in argv_tail)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert snapshot(anchor_file.parent) == before


def test_cli_missing_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.onnx"), "--format", "mxint4"]) == 2
    assert "not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_usage_errors(anchor_file):
    for argv in (
        [str(anchor_file)],
        [str(anchor_file), "--format", "mxint4", "--all"],
        [str(anchor_file), "--format", "mxint4", "--layers", "no-equals-sign"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2


def test_cli_allow_lowbit_source(tmp_path, anchors):
    onnx.save(derived_model(anchors), tmp_path / "model.mxint4.onnx")
    assert main([str(tmp_path / "model.mxint4.onnx"), "--format", "mxint2"]) == 2
    assert main([str(tmp_path / "model.mxint4.onnx"), "--format", "mxint2", "--allow-lowbit-source"]) == 0
    assert (tmp_path / "model.mxint2.onnx").is_file()


def test_cli_all_on_derived_file(tmp_path, anchors, capsys):
    onnx.save(derived_model(anchors), tmp_path / "model.mxint4.onnx")
    before = snapshot(tmp_path)
    assert main([str(tmp_path / "model.mxint4.onnx"), "--all"]) == 2
    assert "run it on the anchor" in capsys.readouterr().err
    assert snapshot(tmp_path) == before

    # With the flag, only the formats below the stored mxint4 weights are written.
    assert main([str(tmp_path / "model.mxint4.onnx"), "--all", "--allow-lowbit-source"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["model.mxint2.onnx", "model.mxint3.onnx", "model.mxint4.onnx"]


def test_cli_module_entry_point(anchor_file):
    result = subprocess.run(
        [sys.executable, "-m", "mfqat_onnx.retarget", str(anchor_file), "--format", "mxint2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "mxint2" in result.stdout
    assert anchor_file.with_name("model.mxint2.onnx").is_file()
    failed = subprocess.run(
        [sys.executable, "-m", "mfqat_onnx.retarget", str(anchor_file), "--format", "mxfp3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2
    assert "unknown target format 'mxfp3'" in failed.stderr


def test_default_output_replaces_format_suffix(tmp_path):
    from mfqat_onnx._retarget_api import default_output_path

    assert default_output_path(tmp_path / "digits.mxint8.onnx", "mxint4") == tmp_path / "digits.mxint4.onnx"
    assert default_output_path(tmp_path / "model.onnx", "mxfp4") == tmp_path / "model.mxfp4.onnx"
    assert default_output_path(tmp_path / "v1.2.onnx", "mxint4") == tmp_path / "v1.2.mxint4.onnx"
