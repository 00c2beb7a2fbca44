"""mfqat_onnx.runtime: building and finding the library, session paths, retargeting, CLI.

Oracles: the numpy reference for decoded weights and activations, and the
function-body path (plain ONNX Runtime) for whole-model outputs, which the
kernel path must match bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mfqat_onnx import numerics
from mfqat_onnx._retarget_synthetic import build_anchor_model, quantized_weight
from mfqat_onnx.runtime import (
    KernelLibraryError,
    MXSession,
    build_kernels,
    find_kernel_library,
    open_session,
)
from mfqat_onnx.runtime._build import build_library, library_file_name
from mfqat_onnx.runtime._cli import main, make_inputs

RUNTIME_LOGGER = "mfqat_onnx.runtime"


@pytest.fixture(scope="session")
def kernel_library() -> Path:
    return build_kernels()


@pytest.fixture(scope="module")
def anchor() -> onnx.ModelProto:
    """An MXFP8 anchor with a Linear and a Conv weight, MXINT8 activations, decoded weights exposed."""
    rng = np.random.default_rng(21)
    weights = [
        quantized_weight("fc", rng.standard_normal((16, 70)).astype(np.float32), "mxfp8_e4m3"),
        quantized_weight("conv", rng.standard_normal((8, 40, 3, 3)).astype(np.float32), "mxfp8_e4m3"),
    ]
    return build_anchor_model(weights, "mxfp8_e4m3", activations="mxint8", expose_weights=True)


@pytest.fixture
def anchor_file(anchor, tmp_path) -> Path:
    path = tmp_path / "anchor.onnx"
    onnx.save(anchor, str(path))
    return path


def anchor_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc.input": rng.standard_normal((3, 70)).astype(np.float32),
        "conv.input": rng.standard_normal((2, 40, 5, 5)).astype(np.float32),
    }


def single_thread() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return options


def run_all(session: MXSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [meta.name for meta in session.get_outputs()]
    return dict(zip(names, session.run(None, feed), strict=True))


def assert_same_bits(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        mismatch = int((actual[name].view(np.uint32) != expected[name].view(np.uint32)).sum())
        assert mismatch == 0, f"{name}: {mismatch} elements differ"


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def expected_weight(model: onnx.ModelProto, name: str, fmt: str, length: int) -> np.ndarray:
    codes = numerics.unpack_codes(initializer(model, f"{name}.mx_codes"), fmt, axis=1, axis_length=length)
    return numerics.dequantize(codes, initializer(model, f"{name}.mx_scales"), fmt, axis=1)


# ---------------------------------------------------------------------------
# Building and finding the library


def test_build_kernels_reuses_library(kernel_library):
    before = kernel_library.stat().st_mtime_ns
    assert build_kernels() == kernel_library
    assert kernel_library.stat().st_mtime_ns == before
    assert find_kernel_library() == kernel_library
    stamp = json.loads(kernel_library.with_name(kernel_library.name + ".json").read_text())
    assert "amd-quark==0.13" in stamp["headers"]


def test_find_ignores_stale_library(kernel_library, tmp_path, monkeypatch, caplog):
    shutil.copy(kernel_library, tmp_path / library_file_name())
    (tmp_path / (library_file_name() + ".json")).write_text(json.dumps({"sources": "0" * 64}))
    monkeypatch.setenv("MFQAT_KERNEL_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=RUNTIME_LOGGER):
        assert find_kernel_library() is None
    assert "was built from other sources" in caplog.text


def test_find_uses_explicit_library(kernel_library, tmp_path, monkeypatch):
    target = tmp_path / "board" / "libmx.so"
    target.parent.mkdir()
    shutil.copy(kernel_library, target)
    monkeypatch.setenv("MFQAT_KERNEL_LIBRARY", str(target))
    assert find_kernel_library() == target
    monkeypatch.setenv("MFQAT_KERNEL_LIBRARY", str(tmp_path / "missing.so"))
    assert find_kernel_library() is None


# ---------------------------------------------------------------------------
# Session paths


def test_native_matches_function_bodies(kernel_library, anchor):
    feed = anchor_inputs()
    native = open_session(anchor, kernels="native", prefer="memory", session_options=single_thread())
    bodies = open_session(anchor, kernels="functions", session_options=single_thread())
    assert native.execution_path == "native"
    assert native.weight_storage == "packed"
    assert bodies.execution_path == "functions"
    assert bodies.kernel_library is None
    assert_same_bits(run_all(native, feed), run_all(bodies, feed))


def test_native_outputs_match_reference(kernel_library, anchor):
    feed = anchor_inputs(1)
    outputs = run_all(open_session(anchor, kernels="native", session_options=single_thread()), feed)
    np.testing.assert_array_equal(
        outputs["fc"].view(np.uint32), expected_weight(anchor, "fc", "mxfp8_e4m3", 70).view(np.uint32)
    )
    np.testing.assert_array_equal(
        outputs["conv"].view(np.uint32), expected_weight(anchor, "conv", "mxfp8_e4m3", 40).view(np.uint32)
    )
    # The Linear layer receives the MXINT8 fake-quantized input; the tolerance
    # covers float32 summation order in Gemm only.
    x_lp = numerics.quantize_dequantize(feed["fc.input"], "mxint8", axis=-1)
    np.testing.assert_allclose(outputs["fc.output"], x_lp @ outputs["fc"].T, rtol=1e-5, atol=1e-5)


def test_prefer_speed_folds_weights(kernel_library, anchor):
    feed = anchor_inputs(2)
    speed = open_session(anchor, kernels="native", prefer="speed", session_options=single_thread())
    memory = open_session(anchor, kernels="native", prefer="memory", session_options=single_thread())
    assert speed.execution_path == "native"
    assert speed.weight_storage == "fp32"
    assert speed.folded_weights == 2
    assert memory.weight_storage == "packed"
    assert memory.folded_weights == 0
    assert_same_bits(run_all(speed, feed), run_all(memory, feed))


def test_prefer_speed_keeps_activation_kernels(kernel_library, anchor, tmp_path):
    options = single_thread()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    open_session(anchor, kernels="native", prefer="speed", session_options=options)
    optimized = onnx.load(options.optimized_model_filepath)
    ops = [(node.domain, node.op_type) for node in optimized.graph.node]
    # Two activation pairs remain on the kernel; the weight decoders are folded away.
    assert ops.count(("mfqat", "MXQuantize")) == 2
    assert ops.count(("mfqat", "MXDequantize")) == 2


def test_open_session_leaves_model_unchanged(kernel_library, anchor):
    before = anchor.SerializeToString()
    open_session(anchor, kernels="native", prefer="speed", session_options=single_thread())
    open_session(anchor, kernels="functions", session_options=single_thread())
    assert anchor.SerializeToString() == before


def test_auto_falls_back_with_one_log_line(anchor, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MFQAT_KERNEL_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger=RUNTIME_LOGGER):
        session = open_session(anchor, kernels="auto", session_options=single_thread())
    assert session.execution_path == "functions"
    records = [r for r in caplog.records if r.name.startswith(RUNTIME_LOGGER)]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "function bodies because the kernel library is not built" in records[0].getMessage()


def test_native_without_library_raises(anchor, tmp_path, monkeypatch):
    monkeypatch.setenv("MFQAT_KERNEL_DIR", str(tmp_path))
    with pytest.raises(
        KernelLibraryError, match=r'kernels="native" was requested but the kernel library is not built'
    ):
        open_session(anchor, kernels="native")


def test_library_for_newer_api(kernel_library, anchor, monkeypatch, caplog):
    future = build_library(kernel_library.parent / "test-api-1000", ort_api_version=1000)
    monkeypatch.setenv("MFQAT_KERNEL_LIBRARY", str(future))
    with pytest.raises(KernelLibraryError, match=r"needs ONNX Runtime C API version 1000"):
        open_session(anchor, kernels="native")
    with caplog.at_level(logging.WARNING, logger=RUNTIME_LOGGER):
        session = open_session(anchor, kernels="auto", session_options=single_thread())
    assert session.execution_path == "functions"
    assert "needs ONNX Runtime C API version 1000" in caplog.text


def test_session_options_reused(kernel_library, anchor):
    options = single_thread()
    first = open_session(anchor, kernels="native", session_options=options)
    second = open_session(anchor, kernels="native", session_options=options)
    feed = anchor_inputs(3)
    assert_same_bits(run_all(first, feed), run_all(second, feed))


def test_model_path_input(kernel_library, anchor_file):
    session = open_session(anchor_file, kernels="native", prefer="memory")
    assert session.execution_path == "native"
    assert set(run_all(session, anchor_inputs())) == {"fc.output", "conv.output", "fc", "conv"}


# ---------------------------------------------------------------------------
# Retargeting on open


def test_format_retargets_in_memory(kernel_library, anchor):
    retarget = pytest.importorskip("mfqat_onnx.retarget")
    feed = anchor_inputs(4)
    session = open_session(anchor, format="mxfp4", kernels="native", session_options=single_thread())
    assert session.format == "mxfp4"
    outputs = run_all(session, feed)

    # The decoded weights are the Slice-and-Scale of the anchor codes.
    for name, length in (("fc", 70), ("conv", 40)):
        anchor_codes = numerics.unpack_codes(
            initializer(anchor, f"{name}.mx_codes"), "mxfp8_e4m3", axis=1, axis_length=length
        )
        codes, scales = numerics.slice_and_scale(
            anchor_codes, initializer(anchor, f"{name}.mx_scales"), "mxfp8_e4m3", "mxfp4_e2m1", axis=1
        )
        expected = numerics.dequantize(codes, scales, "mxfp4_e2m1", axis=1)
        np.testing.assert_array_equal(outputs[name].view(np.uint32), expected.view(np.uint32))

    # Same numbers as opening the file that retarget writes.
    retargeted, _ = retarget.retarget_model(anchor, "mxfp4")
    reference = open_session(retargeted, kernels="functions", session_options=single_thread())
    assert_same_bits(outputs, run_all(reference, feed))


# ---------------------------------------------------------------------------
# Bad input


def _mx_model(domain_version: int | None) -> onnx.ModelProto:
    node = helper.make_node(
        "MXDequantize", ["codes", "scales"], ["y"], domain="mfqat", format="mxfp4", axis_length=32
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("codes", TensorProto.UINT8, [1, 16]),
            helper.make_tensor_value_info("scales", TensorProto.UINT8, [1, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
    )
    imports = [helper.make_opsetid("", 21)]
    if domain_version is not None:
        imports.append(helper.make_opsetid("mfqat", domain_version))
    return helper.make_model(graph, opset_imports=imports)


def test_unknown_domain_version_rejected(kernel_library):
    with pytest.raises(
        ValueError, match=r"imports operator domain 'mfqat' version 2, but this runtime implements"
    ):
        open_session(_mx_model(2), kernels="native")


def test_missing_domain_import_rejected(kernel_library):
    with pytest.raises(ValueError, match=r"opset_import lacks \('mfqat', 1\)"):
        open_session(_mx_model(None), kernels="native")


def test_bad_arguments():
    model = _mx_model(1)
    with pytest.raises(ValueError, match=r"kernels must be one of auto, native, functions, got 'gpu'"):
        open_session(model, kernels="gpu")
    with pytest.raises(ValueError, match=r"prefer must be one of speed, memory, got 'fast'"):
        open_session(model, prefer="fast")
    with pytest.raises(FileNotFoundError, match=r"model file .*missing.onnx' not found"):
        open_session("missing.onnx")
    with pytest.raises(TypeError, match=r"model must be a path or an onnx.ModelProto, got int"):
        open_session(3)


def test_speed_without_bodies_keeps_weights_packed(kernel_library, caplog):
    # Opset 17 and no functions: the bodies cannot be attached, so the weight
    # stays on the kernel instead of failing.
    model = _mx_model(1)
    model.opset_import[0].version = 17
    model.ir_version = 8
    codes = helper.make_tensor(
        "codes", TensorProto.UINT8, [1, 16], np.full(16, 0x22, np.uint8).tobytes(), raw=True
    )
    scales = helper.make_tensor("scales", TensorProto.UINT8, [1, 1], bytes([128]), raw=True)
    model.graph.initializer.extend([codes, scales])
    del model.graph.input[:]
    with caplog.at_level(logging.INFO, logger=RUNTIME_LOGGER):
        session = open_session(model, kernels="native", prefer="speed")
    assert session.weight_storage == "packed"
    assert "cannot fold them" in caplog.text
    (y,) = session.run(None, {})
    np.testing.assert_array_equal(y, np.full((1, 32), 2.0, np.float32))


def test_model_without_functions_gets_bodies(kernel_library):
    # A file without model-local functions still runs without the library.
    session = open_session(_mx_model(1), kernels="functions")
    codes = np.full((1, 16), 0x22, np.uint8)
    (y,) = session.run(None, {"codes": codes, "scales": np.array([[127]], np.uint8)})
    np.testing.assert_array_equal(y, np.ones((1, 32), np.float32))


# ---------------------------------------------------------------------------
# Command line


def test_cli_random_inputs(kernel_library, anchor_file, tmp_path, capsys):
    assert (
        main(
            [
                str(anchor_file),
                "--kernels",
                "native",
                "--batch",
                "2",
                "--dim",
                "conv.h=6",
                "--dim",
                "conv.w=5",
                "--repeat",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "execution path  native" in out
    assert "conv.input [2, 40, 6, 5] float32" in out
    assert "fc.output" in out
    assert "median of 2" in out


def test_cli_given_input_and_format(kernel_library, anchor_file, tmp_path, capsys):
    x = np.zeros((4, 70), np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = [str(anchor_file), "--format", "mxfp4", "--input", f"fc.input={tmp_path / 'x.npy'}", "--repeat", "0"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    # A 3x3 Conv cannot run on the 1x1 default image; the report prints which dims to set.
    assert "dynamic dimensions set to 1: conv.h, conv.w (set with --dim NAME=N)" in out
    assert "error: " in err
    assert main([*argv, "--dim", "conv.h=4", "--dim", "conv.w=4"]) == 0
    out = capsys.readouterr().out
    assert "(retargeted to mxfp4)" in out
    assert "fc.input [4, 70] float32" in out


def test_cli_reports_bad_input(anchor_file, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 70), np.float64))
    assert main([str(anchor_file), "--input", f"nope={tmp_path / 'x.npy'}"]) == 2
    assert "--input names ['nope'] are not model inputs" in capsys.readouterr().err
    assert main([str(anchor_file), "--input", f"fc.input={tmp_path / 'x.npy'}"]) == 2
    assert "has dtype float64, the model expects float32" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx" in capsys.readouterr().err

    # Files that are not models get the loader's specific messages.
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert main([str(tmp_path / "empty.onnx")]) == 2
    assert "is empty, not an ONNX model" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"extra": 1}')
    assert main([str(tmp_path / "config.json")]) == 2
    assert "is not an ONNX model file" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "is not a regular file" in capsys.readouterr().err

    # Given inputs are checked for rank and fixed sizes, and named once.
    np.save(tmp_path / "rank3.npy", np.zeros((4, 70, 1), np.float32))
    assert main([str(anchor_file), "--input", f"fc.input={tmp_path / 'rank3.npy'}"]) == 2
    assert "has shape [4, 70, 1], the model expects ['any', 70]" in capsys.readouterr().err
    np.save(tmp_path / "wide.npy", np.zeros((4, 71), np.float32))
    assert main([str(anchor_file), "--input", f"fc.input={tmp_path / 'wide.npy'}"]) == 2
    assert "the model expects ['any', 70]" in capsys.readouterr().err
    twice = ["--input", f"fc.input={tmp_path / 'x.npy'}", "--input", f"fc.input={tmp_path / 'wide.npy'}"]
    assert main([str(anchor_file), *twice]) == 2
    assert "gives 'fc.input' twice" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "anchor.onnx", "config.json", "empty.onnx", "rank3.npy", "wide.npy", "x.npy",
    ]


def test_cli_batch_and_repeat_messages(anchor_file, capsys):
    cases = (
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--repeat", "-1"], "--repeat must be at least 0, got -1"),
    )
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main([str(anchor_file), *argv])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_cli_saves_outputs(anchor_file, tmp_path, capsys):
    argv = [str(anchor_file), "--dim", "conv.h=4", "--dim", "conv.w=4", "--repeat", "0", "--seed", "3"]
    out_file = tmp_path / "out.npz"
    assert main([*argv, "--save-outputs", str(out_file)]) == 0
    assert "outputs saved to" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert out_file.stat().st_mode & 0o777 == 0o666 & ~umask

    # The saved arrays are what a session on the same seeded inputs computes.
    session = open_session(anchor_file)
    feed = make_inputs(session, {}, batch=1, named_dims={"conv.h": 4, "conv.w": 4}, seed=3)
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    with np.load(out_file) as saved:
        assert sorted(saved.files) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(saved[name], value)

    # An existing file is kept unless --force; the name must end in .npz; nothing else is left behind.
    before = out_file.read_bytes()
    assert main([*argv, "--seed", "4", "--save-outputs", str(out_file)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out_file.read_bytes() == before
    assert main([*argv, "--save-outputs", str(tmp_path / "out.txt")]) == 2
    assert main([*argv, "--seed", "4", "--save-outputs", str(out_file), "--force"]) == 0
    assert out_file.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anchor.onnx", "out.npz"]


def test_cli_notes_unused_batch_and_memory_fallback(anchor_file, tmp_path, capsys):
    feeds = []
    for name, shape in (("fc.input", (2, 70)), ("conv.input", (2, 40, 4, 4))):
        np.save(tmp_path / f"{name}.npy", np.zeros(shape, np.float32))
        feeds += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
    argv = [str(anchor_file), *feeds, "--repeat", "0", "--kernels", "functions"]
    assert main([*argv, "--batch", "8", "--prefer", "memory"]) == 0
    out = capsys.readouterr().out
    assert "--batch is not used: every input was given with --input" in out
    assert "--prefer memory needs the kernel library" in out
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "--batch is not used" not in out
    assert "--prefer memory" not in out


def test_plain_model_reports_plain_path():
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "plain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    session = open_session(model)
    assert session.execution_path == "plain"
    assert session.weight_storage == "fp32"
