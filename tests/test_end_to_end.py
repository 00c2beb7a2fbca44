"""End-to-end runs: the command-line pipeline, retargeted workloads against torch, and the demo.

Whole-model tolerance: ``max|ORT - torch| / max|torch| <= 1e-5``. The fp32 floor
(the same weights exported without quantization, torch against ONNX Runtime) is
measured in each test and must stay below that bound; on torch 2.13 and
onnxruntime 1.32 it is about 3e-7 for both models here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mfqat_onnx.export import dynamic_shapes_from_axes, export_workload
from mfqat_onnx.formats import family_formats, get_format
from mfqat_onnx.qat import QuantConfig, load_checkpoint, prepare, set_format
from mfqat_onnx.retarget import retarget_model
from models import get_workload

TOLERANCE = 1e-5


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _fp32_floor(model: torch.nn.Module, workload, inputs: tuple[torch.Tensor, ...], tmp_path: Path) -> float:
    set_format(model, None)
    path = tmp_path / "fp32.onnx"
    program = torch.onnx.export(
        model,
        workload.example_inputs(2, 8),
        dynamo=True,
        input_names=list(workload.input_names),
        output_names=list(workload.output_names),
        dynamic_shapes=dynamic_shapes_from_axes(workload.input_names, workload.dynamic_axes),
        opset_version=21,
    )
    program.save(str(path))
    with torch.no_grad():
        expected = model(*inputs).numpy()
    feeds = {name: tensor.numpy() for name, tensor in zip(workload.input_names, inputs, strict=True)}
    (actual,) = _session(path).run(None, feeds)
    return _relative(actual, expected)


@pytest.mark.slow
def test_cli_pipeline_digits(tmp_path):
    runs = tmp_path / "runs" / "digits"
    _python("-m", "mfqat_onnx.train", "--model", "digits-cnn", "--formats", "mxint2,mxint4,mxint6,mxint8",
            "--anchor", "mxint8", "--steps", "60", "--no-progress", "-o", str(runs), cwd=tmp_path)
    evaluation = _python("-m", "mfqat_onnx.evaluate", str(runs), "--json", str(tmp_path / "eval.json"), cwd=tmp_path)
    assert "mxint4" in evaluation.stdout
    anchor = tmp_path / "digits.mxint8.onnx"
    _python("-m", "mfqat_onnx.export", "--checkpoint", str(runs), "--anchor", "mxint8", "-o", str(anchor), cwd=tmp_path)
    _python("-m", "mfqat_onnx.retarget", str(anchor), "--all", cwd=tmp_path)
    run = _python("-m", "mfqat_onnx.runtime", str(tmp_path / "digits.mxint4.onnx"), "--batch", "3", cwd=tmp_path)
    assert "native" in run.stdout or "functions" in run.stdout

    # Every retargeted file must compute what the checkpoint computes in torch in that format.
    model, _, _ = load_checkpoint(runs)
    model.eval()
    images, _ = get_workload("digits-cnn").load_data().eval.tensors
    for fmt in family_formats("int"):
        path = anchor if fmt.name == "mxint8" else tmp_path / f"digits.{fmt.name}.onnx"
        assert path.is_file(), f"retarget --all did not write {path.name}"
        set_format(model, fmt.name)
        with torch.no_grad():
            expected = model(images).numpy()
        (actual,) = _session(path).run(None, {"images": images.numpy()})
        assert _relative(actual, expected) <= TOLERANCE, fmt.name
        assert np.array_equal(actual.argmax(-1), expected.argmax(-1)), fmt.name


@pytest.mark.slow
@pytest.mark.parametrize(("family", "anchor"), [("int", "mxint8"), ("fp", "mxfp8_e4m3")])
def test_retargeted_tiny_lm_matches_torch(family, anchor, tmp_path):
    workload = get_workload("tiny-lm")
    torch.manual_seed(0)
    model = workload.build_model(d_model=64, n_layers=2, n_heads=2, ffn_hidden=96).eval()
    formats = [f.name for f in family_formats(family)]
    prepare(model, QuantConfig(formats=formats, anchor=anchor, mode="via_anchor", **workload.quant_defaults))
    tokens = (torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1)),)
    floor = _fp32_floor(model, workload, tokens, tmp_path)
    assert floor <= TOLERANCE

    path = tmp_path / f"tiny.{anchor}.onnx"
    export_workload(model, workload, path, anchor=anchor, example_seq=8)
    anchor_model = onnx.load(path)
    errors = {}
    for fmt in formats:
        retargeted, report = retarget_model(anchor_model, fmt)
        assert all(layer.method == "slice_and_scale" for layer in report.converted), fmt
        set_format(model, fmt)
        with torch.no_grad():
            expected = model(*tokens).numpy()
        (actual,) = _session(retargeted).run(None, {workload.input_names[0]: tokens[0].numpy()})
        errors[fmt] = _relative(actual, expected)
    bad = {fmt: err for fmt, err in errors.items() if err > TOLERANCE}
    assert not bad, f"fp32 floor {floor:.2e}; formats above {TOLERANCE:g}: {bad}"


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    _python("-m", "mfqat_onnx.demo", "-o", str(out), "--steps", "40", "--repeats", "3", "--threads", "1", cwd=tmp_path)
    rows = json.loads((out / "results.json").read_text())
    deployed = {row["format"] for row in rows}
    assert {"fp32", "mxint8", "mxint2", "mxfp8_e4m3", "mxfp4_e2m1"} <= deployed
    for row in rows:
        assert row["same_prediction"] >= 99.9, row
        if row["format"] != "fp32":
            expected_bits = get_format(row["format"]).bits + 0.25
            assert row["bits_per_weight"] == expected_bits
    assert (out / "accuracy_vs_bits.png").stat().st_size > 10_000
    assert "| mxint4 |" in (out / "results.md").read_text()
