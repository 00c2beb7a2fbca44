"""Safe loading and atomic saving of ONNX files (mfqat_onnx._onnx_io).

Every bad input must raise its own exception class and leave the folder as it
was: the same file names, bytes and modification times.
"""

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mfqat_onnx import _onnx_io
from mfqat_onnx._onnx_io import (
    CorruptModelError,
    ExternalDataError,
    ModelCheckError,
    ModelFileError,
    ModelNotFoundError,
    NotAnOnnxModelError,
    OpsetError,
    OutputExistsError,
    UnsafeExternalDataError,
    load_model,
    load_model_with_files,
    save_model,
)
from mfqat_onnx._retarget_synthetic import build_anchor_model, random_weight


def snapshot(folder):
    """Map every file below ``folder`` to its bytes and mtime, to prove nothing changed."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def small_anchor(seed=0, shape=(16, 64)):
    rng = np.random.default_rng(seed)
    return build_anchor_model([random_weight("fc", shape, "mxint8", rng)], "mxint8")


def raw_bytes_by_name(model):
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def write_raw(path, model):
    path.write_bytes(model.SerializeToString())
    return path


def external_model(tmp_path, location, *, length=None):
    """A model whose codes initializer points at ``location`` (other tensors inline)."""
    model = small_anchor()
    codes = model.graph.initializer[0]
    raw = codes.raw_data
    codes.ClearField("raw_data")
    codes.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length or len(raw)))):
        entry = codes.external_data.add()
        entry.key, entry.value = key, value
    return write_raw(tmp_path / "model.onnx", model), raw


# ---------------------------------------------------------------------------
# load_model: good files


def test_load_round_trip(tmp_path):
    model = small_anchor()
    path = write_raw(tmp_path / "m.onnx", model)
    loaded = load_model(path)
    assert raw_bytes_by_name(loaded) == raw_bytes_by_name(model)


def test_load_external_data(tmp_path):
    model = small_anchor()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    loaded, files = load_model_with_files(tmp_path / "m.onnx")
    assert raw_bytes_by_name(loaded) == raw_bytes_by_name(model)
    assert files == ((tmp_path / "m.onnx").resolve(), (tmp_path / "m.onnx.data").resolve())
    assert _onnx_io.find_external_tensors(loaded) == []


def test_load_without_external_data_keeps_references(tmp_path):
    save_model(small_anchor(), tmp_path / "m.onnx", external_data=True)
    loaded = load_model(tmp_path / "m.onnx", load_external_data=False)
    assert [t.name for t in _onnx_io.find_external_tensors(loaded)] == ["fc.mx_codes"]


# ---------------------------------------------------------------------------
# load_model: bad files, each with its own error


def test_load_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(tmp_path / "absent.onnx")


def test_load_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a regular file"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is plain text\n", b"\xff\xfe\xfd\x00garbage", b"PK\x03\x04 zip archive"],
    ids=["empty", "text", "binary", "zip"],
)
def test_load_not_onnx(tmp_path, content):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(NotAnOnnxModelError):
        load_model(path)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_load_truncated(tmp_path, fraction):
    data = small_anchor().SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CorruptModelError, match="truncated or corrupt"):
        load_model(path)


def test_load_truncated_at_field_boundary(tmp_path):
    # Cutting exactly before the functions parses cleanly; the missing bodies give it away.
    model = small_anchor()
    full = model.SerializeToString()
    del model.functions[:]
    cut = model.SerializeToString()
    assert full.startswith(cut)
    path = tmp_path / "m.onnx"
    path.write_bytes(cut)
    with pytest.raises(CorruptModelError, match="no function body"):
        load_model(path)


def test_load_dangling_input_fails_checker(tmp_path):
    model = small_anchor()
    model.graph.node[0].input[0] = "missing.mx_codes"
    path = write_raw(tmp_path / "m.onnx", model)
    with pytest.raises(CorruptModelError, match="checker"):
        load_model(path)


def test_load_opset_too_old(tmp_path):
    model = small_anchor()
    for entry in model.opset_import:
        if entry.domain == "":
            entry.version = 20
    with pytest.raises(OpsetError, match="opset 20, expected 21"):
        load_model(write_raw(tmp_path / "m.onnx", model))


def test_load_mfqat_version_other_than_1(tmp_path):
    model = small_anchor()
    for entry in model.opset_import:
        if entry.domain == "mfqat":
            entry.version = 2
    with pytest.raises(OpsetError, match="version 2"):
        load_model(write_raw(tmp_path / "m.onnx", model))


def test_load_without_mfqat_import(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = write_raw(tmp_path / "m.onnx", model)
    with pytest.raises(OpsetError, match="no 'mfqat' opset import"):
        load_model(path)
    assert load_model(path, require_mfqat=False).graph.node[0].op_type == "Relu"


def test_load_no_standard_opset(tmp_path):
    model = small_anchor()
    kept = [e for e in model.opset_import if e.domain != ""]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    with pytest.raises(OpsetError, match="no opset import for the standard"):
        load_model(write_raw(tmp_path / "m.onnx", model))


# ---------------------------------------------------------------------------
# External data locations are checked before any byte is read


@pytest.fixture
def no_external_reads(monkeypatch):
    """Record every external tensor read; the tests assert that none happened."""
    reads = []
    original = onnx.external_data_helper.load_external_data_for_tensor

    def recording(tensor, base_dir):
        reads.append(tensor.name)
        return original(tensor, base_dir)

    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_tensor", recording)
    return reads


def test_external_missing_file(tmp_path, no_external_reads):
    path, _ = external_model(tmp_path, "weights.bin")
    with pytest.raises(ExternalDataError, match="not found"):
        load_model(path)
    assert no_external_reads == []


def test_external_absolute_location(tmp_path, no_external_reads):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "weights.bin").write_bytes(b"\0" * 4096)
    folder = tmp_path / "model"
    folder.mkdir()
    path, _ = external_model(folder, str(outside / "weights.bin"))
    with pytest.raises(UnsafeExternalDataError, match="absolute"):
        load_model(path)
    assert no_external_reads == []


@pytest.mark.parametrize("location", ["../weights.bin", "sub/../../weights.bin", "..\\weights.bin"])
def test_external_parent_traversal(tmp_path, location, no_external_reads):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 4096)
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    path, _ = external_model(folder, location)
    with pytest.raises(UnsafeExternalDataError, match=r"'\.\.'"):
        load_model(path)
    assert no_external_reads == []


def test_external_symlink_escape(tmp_path, no_external_reads):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").symlink_to(secret)
    path, _ = external_model(folder, "weights.bin")
    with pytest.raises(UnsafeExternalDataError, match="symbolic link"):
        load_model(path)
    assert no_external_reads == []


def test_external_unsafe_second_tensor_blocks_all_reads(tmp_path, no_external_reads):
    # The first tensor is fine; the check must still run on all before reading any.
    model = small_anchor()
    for tensor, location in zip(model.graph.initializer, ["good.bin", "../bad.bin"], strict=True):
        raw = tensor.raw_data
        (tmp_path / "good.bin").write_bytes(raw) if location == "good.bin" else None
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    path = write_raw(tmp_path / "m.onnx", model)
    with pytest.raises(UnsafeExternalDataError):
        load_model(path)
    assert no_external_reads == []


def test_external_file_too_short(tmp_path, no_external_reads):
    path, raw = external_model(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ExternalDataError, match="truncated"):
        load_model(path)
    assert no_external_reads == []


def test_external_file_too_short_without_length(tmp_path, no_external_reads):
    # Without a "length" entry the tensor's dims give the bytes it needs.
    path, raw = external_model(tmp_path, "weights.bin")
    model = onnx.load(path, load_external_data=False)
    entries = [e for e in model.graph.initializer[0].external_data if e.key != "length"]
    del model.graph.initializer[0].external_data[:]
    model.graph.initializer[0].external_data.extend(entries)
    write_raw(path, model)
    (tmp_path / "weights.bin").write_bytes(raw[:-1])
    with pytest.raises(ExternalDataError, match="truncated"):
        load_model(path)
    assert no_external_reads == []
    (tmp_path / "weights.bin").write_bytes(raw)
    assert load_model(path).graph.initializer[0].raw_data == raw


def test_external_symlink_inside_folder(tmp_path, no_external_reads):
    # onnx.load refuses any link, so the loader does too, even one that stays inside.
    path, raw = external_model(tmp_path, "link.bin")
    (tmp_path / "real.bin").write_bytes(raw)
    (tmp_path / "link.bin").symlink_to(tmp_path / "real.bin")
    with pytest.raises(UnsafeExternalDataError, match="symbolic link"):
        load_model(path)
    assert no_external_reads == []


def test_external_symlinked_folder_escape(tmp_path, no_external_reads):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "weights.bin").write_bytes(b"\0" * 4096)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "data").symlink_to(outside, target_is_directory=True)
    path, _ = external_model(folder, "data/weights.bin")
    with pytest.raises(UnsafeExternalDataError, match="outside the model's folder"):
        load_model(path)
    assert no_external_reads == []


# ---------------------------------------------------------------------------
# save_model


def test_save_writes_checked_model(tmp_path):
    model = small_anchor()
    written = save_model(model, tmp_path / "out.onnx")
    assert written == (tmp_path / "out.onnx",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert raw_bytes_by_name(onnx.load(tmp_path / "out.onnx")) == raw_bytes_by_name(model)


def test_save_refuses_existing_file(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"keep me")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="--force"):
        save_model(small_anchor(), target)
    assert snapshot(tmp_path) == before


def test_save_force_replaces(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")
    save_model(small_anchor(), target, force=True)
    assert onnx.load(target).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_never_overwrites_protected(tmp_path):
    source = write_raw(tmp_path / "in.onnx", small_anchor())
    alias = tmp_path / "alias.onnx"
    alias.symlink_to(source)
    before = snapshot(tmp_path)
    for target in (source, alias, tmp_path / "." / "in.onnx"):
        with pytest.raises(OutputExistsError, match="input file"):
            save_model(small_anchor(seed=1), target, force=True, protected=[source])
    assert snapshot(tmp_path) == before


def test_save_protects_external_data_of_input(tmp_path):
    save_model(small_anchor(), tmp_path / "in.onnx", external_data=True)
    _, files = load_model_with_files(tmp_path / "in.onnx")
    # The output's data file name is a link to the input's data file.
    (tmp_path / "x").mkdir()
    os.symlink(tmp_path / "in.onnx.data", tmp_path / "x" / "out.onnx.data")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="input file"):
        save_model(
            small_anchor(seed=1), tmp_path / "x" / "out.onnx", force=True, external_data=True, protected=files
        )
    assert snapshot(tmp_path) == before


def test_save_checker_failure_leaves_nothing(tmp_path):
    model = small_anchor()
    model.graph.node[0].input[0] = "undefined"
    with pytest.raises(ModelCheckError, match="checker"):
        save_model(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_save_missing_folder(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        save_model(small_anchor(), tmp_path / "absent" / "out.onnx")


def test_save_external_data_atomic_and_model_unchanged(tmp_path):
    model = small_anchor(shape=(64, 256))
    before = model.SerializeToString()
    written = save_model(model, tmp_path / "out.onnx", external_data=True)
    assert written == (tmp_path / "out.onnx", tmp_path / "out.onnx.data")
    assert model.SerializeToString() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    reloaded = load_model(tmp_path / "out.onnx")
    assert raw_bytes_by_name(reloaded) == raw_bytes_by_name(model)


def test_save_refuses_existing_data_file(tmp_path):
    (tmp_path / "out.onnx.data").write_bytes(b"someone else's data")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="out.onnx.data"):
        save_model(small_anchor(), tmp_path / "out.onnx", external_data=True)
    assert snapshot(tmp_path) == before


def test_save_switches_to_external_data_past_limit(tmp_path, monkeypatch):
    # Shrink the protobuf limit so a small model takes the > 2 GiB path.
    monkeypatch.setattr(_onnx_io, "_MAX_PROTOBUF_BYTES", 60_000)
    model = small_anchor(shape=(256, 256))
    assert model.ByteSize() > 60_000
    written = save_model(model, tmp_path / "out.onnx")
    assert [p.name for p in written] == ["out.onnx", "out.onnx.data"]
    assert raw_bytes_by_name(load_model(tmp_path / "out.onnx")) == raw_bytes_by_name(model)


def test_save_refuses_oversize_without_external(tmp_path, monkeypatch):
    monkeypatch.setattr(_onnx_io, "_MAX_PROTOBUF_BYTES", 60_000)
    with pytest.raises(ModelFileError, match="2 GiB"):
        save_model(small_anchor(shape=(256, 256)), tmp_path / "out.onnx", external_data=False)
    assert list(tmp_path.iterdir()) == []
