"""Tests of mfqat_onnx.qat and the train / evaluate command lines.

Oracles: the torch fake-quant op applied by hand, the numpy reference
(quantize, slice_and_scale, dequantize), and hand-computed blocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mfqat_onnx import numerics
from mfqat_onnx.evaluate import main as evaluate_main
from mfqat_onnx.qat import (
    FormatSchedule,
    LayerQuant,
    MXConv2d,
    MXLinear,
    QuantConfig,
    TrainRecipe,
    fit,
    load_checkpoint,
    prepare,
    ptq,
    quantized_modules,
    save_checkpoint,
    set_format,
    train_step,
)
from mfqat_onnx.qat._files import write_atomic
from mfqat_onnx.torch_quant import fake_quantize
from mfqat_onnx.train import main as train_main

torch.set_num_threads(1)

INT_FORMATS = ["mxint2", "mxint4", "mxint6", "mxint8"]
FP_FORMATS = ["mxfp4_e2m1", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3"]


def bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """Return the float32 bit patterns, so NaN and -0 compare exactly."""
    array = t.detach().numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def layer_quant(
    fmt: str | None, *, anchor: str = "mxint8", mode: str = "direct", act: str | None = None
) -> LayerQuant:
    return LayerQuant(
        weight_format=fmt, act_format=act, anchor=anchor, mode=mode, block_size=32, scale_rule="floor"
    )


def mlp(width: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.Linear(width, 4),
    )


def make_linear(in_features: int, out_features: int, seed: int = 0) -> MXLinear:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(in_features, out_features), nn.Linear(4, 4))
    prepare(model, QuantConfig(formats=["mxint4"], mode="direct"))
    return model[1]


def test_public_api() -> None:
    import mfqat_onnx.qat as qat

    assert sorted(qat.__all__) == [
        "FitResult", "FormatSchedule", "LayerQuant", "MXConv2d", "MXLinear", "QuantConfig", "TrainRecipe",
        "fit", "load_checkpoint", "prepare", "ptq", "quantized_modules", "read_checkpoint_info",
        "save_checkpoint", "set_format", "train_step",
    ]
    for name in qat.__all__:
        assert getattr(qat, name).__doc__, name


# --- swapped layers against the op applied by hand -------------------------------------------


@pytest.mark.parametrize("fmt", ["mxint4", "mxfp4_e2m1"])
@pytest.mark.parametrize("act", [None, "mxint8"])
def test_linear_forward_matches_op(fmt: str, act: str | None) -> None:
    layer = make_linear(72, 24)
    layer.quant = layer_quant(fmt, anchor="mxint8" if "int" in fmt else "mxfp8_e4m3", act=act)
    x = torch.randn(5, 3, 72, generator=torch.Generator().manual_seed(1))

    w = fake_quantize(layer.weight, fmt, axis=1)
    xq = x if act is None else fake_quantize(x, act, axis=-1)
    expected = F.linear(xq, w, layer.bias)

    np.testing.assert_array_equal(bits(layer(x)), bits(expected))


@pytest.mark.parametrize("act", [None, "mxint6"])
def test_conv_forward_matches_op(act: str | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.Conv2d(40, 8, 3, padding=1), nn.Conv2d(8, 2, 1))
    prepare(model, QuantConfig(formats=["mxint4"], mode="direct", act_format=act))
    conv = model[1]
    assert isinstance(conv, MXConv2d)
    x = torch.randn(2, 40, 6, 6, generator=torch.Generator().manual_seed(2))

    w = fake_quantize(conv.weight, "mxint4", axis=1)
    xq = x if act is None else fake_quantize(x, act, axis=1)
    expected = F.conv2d(xq, w, conv.bias, padding=1)

    np.testing.assert_array_equal(bits(conv(x)), bits(expected))


def test_conv_weight_blocks_along_input_channels() -> None:
    # w[0, :, 0, 0] = 1 and w[0, :, 0, 1] = 64: blocked along I each block is
    # uniform and exact in MXFP4 (scale bytes 125 and 131); blocked along kW
    # every 1.0 would share a block with 64.0 and flush to 0.
    conv = nn.Conv2d(32, 1, (1, 2), bias=False)
    with torch.no_grad():
        conv.weight[0, :, 0, 0] = 1.0
        conv.weight[0, :, 0, 1] = 64.0
    model = nn.Sequential(nn.Identity(), conv)
    prepare(model, QuantConfig(formats=["mxfp4"], mode="direct", quantize_first_last=True))
    quantized = model[1].quantized_weight()
    np.testing.assert_array_equal(bits(quantized), bits(conv.weight))


def test_fp32_format_is_plain_layer() -> None:
    layer = make_linear(64, 8)
    layer.quant = layer_quant(None, act="mxint2")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(bits(layer(x)), bits(F.linear(x, layer.weight, layer.bias)))


def test_gradient_reaches_latent_weight() -> None:
    layer = make_linear(64, 8)
    layer.quant = layer_quant("mxint4")
    layer(torch.randn(4, 64)).sum().backward()
    assert layer.weight.grad is not None
    assert torch.count_nonzero(layer.weight.grad) > 0


# --- numerics against the numpy reference ----------------------------------------------------


def weight_with_hard_rows(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """Random weight with a zero row (pruned unit) and a row of tiny values near the -127 clamp."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.05
    w[1] = 0.0
    w[2] *= np.float32(2.0**-120)
    return torch.from_numpy(w)


@pytest.mark.parametrize(
    ("anchor", "target"),
    [
        ("mxint8", "mxint2"),
        ("mxint8", "mxint4"),
        ("mxint8", "mxint6"),
        ("mxint8", "mxint3"),
        ("mxfp8_e4m3", "mxfp4_e2m1"),
        ("mxfp8_e4m3", "mxfp6_e2m3"),
        ("mxfp8_e4m3", "mxfp6_e3m2"),
    ],
)
@pytest.mark.parametrize("scale_rule", ["floor", "rceil"])
def test_via_anchor_matches_numpy_slice_and_scale(anchor: str, target: str, scale_rule: str) -> None:
    layer = make_linear(80, 6)  # 80 = two full blocks and a partial one
    with torch.no_grad():
        layer.weight.copy_(weight_with_hard_rows(6, 80, seed=4))
    layer.quant = LayerQuant(target, None, anchor, "via_anchor", 32, scale_rule)

    w = layer.weight.detach().numpy()
    codes, scales = numerics.quantize(w, anchor, axis=1, scale_rule=scale_rule)
    codes, scales = numerics.slice_and_scale(codes, scales, anchor, target, axis=1)
    expected = numerics.dequantize(codes, scales, target, axis=1)

    np.testing.assert_array_equal(bits(layer.quantized_weight()), bits(expected))


@pytest.mark.parametrize("fmt", ["mxint2", "mxint4", "mxint8", "mxfp4_e2m1", "mxfp8_e4m3"])
def test_direct_matches_numpy_quantize(fmt: str) -> None:
    layer = make_linear(80, 6)
    with torch.no_grad():
        layer.weight.copy_(weight_with_hard_rows(6, 80, seed=5))
    layer.quant = layer_quant(fmt)
    expected = numerics.quantize_dequantize(layer.weight.detach().numpy(), fmt, axis=1)
    np.testing.assert_array_equal(bits(layer.quantized_weight()), bits(expected))


def test_via_anchor_of_anchor_is_anchor() -> None:
    layer = make_linear(64, 4)
    layer.quant = layer_quant("mxint8", mode="via_anchor")
    expected = numerics.quantize_dequantize(layer.weight.detach().numpy(), "mxint8", axis=1)
    np.testing.assert_array_equal(bits(layer.quantized_weight()), bits(expected))


def test_mxint8_weight_edge_block() -> None:
    # Expected: byte 127, ties 32.5/33.5 go to 32/34, -127.94 clamps to -127 (never -128).
    values = [1.999, 1.0, 0.5078125, 0.5234375, -1.999, -0.00390625] + [0.0] * 26
    layer = make_linear(32, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))
    layer.quant = layer_quant("mxint8")
    got = layer.quantized_weight()[0, :6].tolist()
    assert got == [1.984375, 1.0, 0.5, 0.53125, -1.984375, 0.0]


# --- prepare, set_format, ptq -----------------------------------------------------------------


def test_prepare_keeps_first_and_last_fp32() -> None:
    model = prepare(mlp(), QuantConfig(formats=["mxint4"]))
    assert [name for name, _ in quantized_modules(model)] == ["2", "4"]
    assert type(model[0]) is nn.Linear
    assert type(model[5]) is nn.Linear


def test_prepare_first_last_opt_in() -> None:
    model = prepare(mlp(), QuantConfig(formats=["mxint4"], quantize_first_last=True))
    assert [name for name, _ in quantized_modules(model)] == ["0", "2", "4", "5"]


def test_prepare_include_exclude() -> None:
    model = prepare(mlp(), QuantConfig(formats=["mxint4"], quantize_first_last=True, exclude=["4"]))
    assert [name for name, _ in quantized_modules(model)] == ["0", "2", "5"]
    model = prepare(mlp(), QuantConfig(formats=["mxint4"], quantize_first_last=True, include=["[02]"]))
    assert [name for name, _ in quantized_modules(model)] == ["0", "2"]


def test_prepare_shares_parameters_and_returns_model() -> None:
    model = mlp()
    weight = model[2].weight
    assert prepare(model, QuantConfig(formats=["mxint4"])) is model
    assert model[2].weight is weight


def test_prepare_rejects_bad_calls() -> None:
    model = prepare(mlp(), QuantConfig(formats=["mxint4"]))
    with pytest.raises(ValueError, match="already contains MX layers"):
        prepare(model, QuantConfig(formats=["mxint4"]))
    with pytest.raises(ValueError, match="selects no layer"):
        prepare(mlp(), QuantConfig(formats=["mxint4"], include=["nothing*"]))
    with pytest.raises(ValueError, match="wrap a bare layer"):
        prepare(nn.Linear(4, 4), QuantConfig(formats=["mxint4"]))
    with pytest.raises(TypeError, match="QuantConfig"):
        prepare(mlp(), {"formats": ["mxint4"]})  # type: ignore[arg-type]


def test_prepare_starts_at_widest_format() -> None:
    model = prepare(mlp(), QuantConfig(formats=["mxint2", "mxint6", "mxint4"]))
    assert {m.quant.weight_format for _, m in quantized_modules(model)} == {"mxint6"}


def test_set_format() -> None:
    model = prepare(mlp(), QuantConfig(formats=["mxint2", "mxint8"]))
    set_format(model, "mxint4")
    assert {m.quant.weight_format for _, m in quantized_modules(model)} == {"mxint4"}
    set_format(model, None)
    assert {m.quant.weight_format for _, m in quantized_modules(model)} == {None}
    with pytest.raises(ValueError, match="family of the anchor"):
        set_format(model, "mxfp4")
    with pytest.raises(ValueError, match="unknown MX format"):
        set_format(model, "mxint9")
    with pytest.raises(ValueError, match="call prepare first"):
        set_format(mlp(), "mxint4")


def test_export_spec() -> None:
    model = prepare(
        nn.Sequential(nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 1), nn.Linear(32, 32), nn.Linear(32, 2)),
        QuantConfig(formats=["mxfp4"], act_format="mxfp8", scale_rule="rceil"),
    )
    conv_spec = model[1].export_spec()
    linear_spec = model[2].export_spec()
    assert conv_spec == {
        "weight_axis": 1,
        "block_size": 32,
        "scale_rule": "rceil",
        "anchor": "mxfp8_e4m3",
        "act_format": "mxfp8_e4m3",
        "act_axis": 1,
        "weight_format": "mxfp4_e2m1",
        "mode": "via_anchor",
    }
    assert linear_spec["act_axis"] == -1
    assert linear_spec["weight_axis"] == 1


def test_ptq_copies_and_quantizes() -> None:
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(3, 16)
    before = model(x)
    quantized = ptq(model, "mxint2")
    assert next(quantized_modules(model), None) is None
    np.testing.assert_array_equal(bits(model(x)), bits(before))

    w = fake_quantize(model[2].weight, "mxint2", axis=1)
    assert torch.equal(quantized[2].quantized_weight(), w)
    assert not torch.equal(quantized(x), before)


# --- config -------------------------------------------------------------------------------------


def test_config_defaults_and_names() -> None:
    config = QuantConfig(formats=["mxfp4", "MXFP8"])
    assert config.formats == ("mxfp4_e2m1", "mxfp8_e4m3")
    assert config.anchor == "mxfp8_e4m3"
    assert config.scale_rule == "floor"
    assert config.mode == "via_anchor"
    assert config.quantize_first_last is False
    assert QuantConfig(formats=["mxint4"]).anchor == "mxint8"


def test_config_round_trip() -> None:
    config = QuantConfig(
        formats=INT_FORMATS,
        anchor="mxint8",
        schedule="cycle",
        mode="direct",
        scale_rule="even",
        block_size=16,
        act_format="mxint8",
        include=["layers.*"],
        exclude=["*.head"],
        quantize_first_last=True,
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert QuantConfig.from_dict(data) == config


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"formats": []}, ValueError, "formats is empty"),
        ({"formats": "mxint4"}, TypeError, "list of format names"),
        ({"formats": ["mxint4", "MXINT4"]}, ValueError, "more than once"),
        ({"formats": ["mxint9"]}, ValueError, "formats: unknown MX format 'mxint9'"),
        ({"formats": ["mxint4"], "anchor": "mxint6"}, ValueError, "anchor must be an 8-bit format"),
        ({"formats": ["mxint4"], "anchor": "mxfp8"}, ValueError, "'mxint4' is in the int family"),
        ({"formats": ["mxfp4", "mxint4"]}, ValueError, "'mxint4' is in the int family"),
        (
            {"formats": ["mxint4"], "schedule": "random"},
            ValueError,
            "schedule must be one of all, sample, cycle",
        ),
        ({"formats": ["mxint4"], "mode": "anchor"}, ValueError, "mode must be one of via_anchor, direct"),
        ({"formats": ["mxint4"], "scale_rule": "ceil"}, ValueError, "scale_rule must be one of"),
        ({"formats": ["mxint4"], "block_size": 0}, ValueError, "block_size must be a positive integer"),
        ({"formats": ["mxint4"], "act_format": "int8"}, ValueError, "act_format: unknown MX format"),
        ({"formats": ["mxint4"], "include": [3]}, TypeError, "include must be a list"),
        ({"formats": ["mxint4"], "quantize_first_last": "yes"}, TypeError, "quantize_first_last must be"),
    ],
)
def test_config_errors(fields: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        QuantConfig(**fields)


def test_config_from_dict_errors() -> None:
    with pytest.raises(ValueError, match="unknown quantization config keys \\['format'\\]"):
        QuantConfig.from_dict({"format": ["mxint4"]})
    with pytest.raises(ValueError, match="no 'formats' entry"):
        QuantConfig.from_dict({"anchor": "mxint8"})


# --- schedules and training ---------------------------------------------------------------------


def test_schedule_all_and_cycle() -> None:
    assert FormatSchedule(INT_FORMATS, "all").formats_at(7) == INT_FORMATS
    cycle = FormatSchedule(INT_FORMATS, "cycle")
    assert [cycle.formats_at(step)[0] for step in range(6)] == INT_FORMATS + INT_FORMATS[:2]


def test_schedule_sample_is_seeded_per_step() -> None:
    first = FormatSchedule(INT_FORMATS, "sample", seed=3)
    again = FormatSchedule(INT_FORMATS, "sample", seed=3)
    draws = [first.formats_at(step)[0] for step in range(400)]
    # A pure function of (seed, step): the order of calls does not matter.
    assert [again.formats_at(step)[0] for step in reversed(range(400))][::-1] == draws
    counts = {f: draws.count(f) for f in INT_FORMATS}
    assert all(60 <= c <= 140 for c in counts.values()), counts
    other = [FormatSchedule(INT_FORMATS, "sample", seed=4).formats_at(step)[0] for step in range(400)]
    assert other != draws


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="schedule must be one of"):
        FormatSchedule(INT_FORMATS, "round_robin")
    with pytest.raises(ValueError, match="at least one format"):
        FormatSchedule([], "all")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        FormatSchedule(INT_FORMATS, "sample", seed=-1)


def blobs(n: int = 256, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Four Gaussian classes in 16 dimensions."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    centers = torch.randn(4, 16, generator=g) * 2
    return torch.utils.data.TensorDataset(centers[labels] + torch.randn(n, 16, generator=g), labels)


def classify(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def full_loss(model: nn.Module, fmt: str, data: torch.utils.data.TensorDataset) -> float:
    set_format(model, fmt)
    return float(classify(model, data.tensors))


@pytest.mark.parametrize("schedule", ["all", "sample", "cycle"])
def test_fit_runs_every_schedule(schedule: str) -> None:
    torch.manual_seed(0)
    config = QuantConfig(formats=["mxint2", "mxint4", "mxint8"], schedule=schedule)
    model = prepare(mlp(), config)
    result = fit(
        model, classify, blobs(), TrainRecipe(steps=6, batch_size=32, lr=1e-3), config, progress=False
    )

    assert len(result.history) == 6
    assert sum(result.format_counts.values()) == (18 if schedule == "all" else 6)
    if schedule == "cycle":
        assert result.format_counts == {"mxint2": 2, "mxint4": 2, "mxint8": 2}
    for row in result.history:
        trained = [f for f in config.formats if f in row]
        assert len(trained) == (3 if schedule == "all" else 1)
    assert {m.quant.weight_format for _, m in quantized_modules(model)} == {"mxint8"}


def test_fit_lowers_loss() -> None:
    torch.manual_seed(0)
    data = blobs()
    config = QuantConfig(formats=["mxint2", "mxint4"], schedule="all")
    model = prepare(mlp(), config)
    before = {f: full_loss(model, f, data) for f in config.formats}
    fit(model, classify, data, TrainRecipe(steps=40, batch_size=32, lr=3e-3), config, progress=False)
    after = {f: full_loss(model, f, data) for f in config.formats}
    for fmt in config.formats:
        assert after[fmt] < 0.5 * before[fmt], (fmt, before[fmt], after[fmt])


def test_train_step_sums_format_gradients() -> None:
    torch.manual_seed(0)
    model = prepare(mlp(), QuantConfig(formats=["mxint2", "mxint4"]))
    batch = blobs(32).tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    losses = train_step(model, batch, classify, optimizer, ["mxint2", "mxint4"])
    grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    total = torch.zeros(())
    for fmt in ("mxint2", "mxint4"):
        set_format(model, fmt)
        total = total + classify(model, batch)
    total.backward()
    assert set(losses) == {"mxint2", "mxint4"}
    for got, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=1e-7)


def test_train_step_rejects_nan_loss() -> None:
    model = prepare(mlp(), QuantConfig(formats=["mxint4"]))
    x = torch.full((4, 16), float("nan"))
    with pytest.raises(FloatingPointError, match="mxint4 loss is nan"):
        train_step(
            model,
            (x, torch.zeros(4, dtype=torch.long)),
            classify,
            torch.optim.SGD(model.parameters()),
            ["mxint4"],
        )


def test_recipe_lr_schedule() -> None:
    recipe = TrainRecipe(steps=110, batch_size=8, lr=1.0, warmup_steps=10, final_lr_ratio=0.1)
    assert recipe.lr_factor(0) == pytest.approx(0.1)
    assert recipe.lr_factor(9) == pytest.approx(1.0)
    assert recipe.lr_factor(60) == pytest.approx(0.55)
    assert recipe.lr_factor(110) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainRecipe(steps=0, batch_size=8, lr=1.0)


# --- checkpoints --------------------------------------------------------------------------------


def digits_model(config: QuantConfig | None) -> nn.Module:
    from models import get_workload

    torch.manual_seed(0)
    model = get_workload("digits-cnn").build_model()
    return model if config is None else prepare(model, config)


@pytest.mark.parametrize("config", [QuantConfig(formats=INT_FORMATS, act_format="mxint8"), None])
def test_checkpoint_round_trip(tmp_path: Path, config: QuantConfig | None) -> None:
    model = digits_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # differ from a fresh build
    save_checkpoint(tmp_path / "ckpt", model, config, "digits-cnn", {}, {"note": "test"})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint.pt", "config.json"]

    loaded, loaded_config, info = load_checkpoint(tmp_path / "ckpt")
    assert loaded_config == config
    assert info["model"] == "digits-cnn"
    assert info["extra"] == {"note": "test"}
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for fmt in [None, *(config.formats if config else [])]:
        set_format(model, fmt)
        set_format(loaded, fmt)
        np.testing.assert_array_equal(bits(loaded(x)), bits(model(x)))


def test_checkpoint_files_use_umask(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        folder = save_checkpoint(tmp_path / "ckpt", digits_model(None), None, "digits-cnn")
    finally:
        os.umask(umask)
    for name in ("checkpoint.pt", "config.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")

    def fail(f: object) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, fail, binary=False)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_checkpoint_detects_damage(tmp_path: Path) -> None:
    model = digits_model(QuantConfig(formats=["mxint4"]))
    folder = save_checkpoint(tmp_path / "ckpt", model, QuantConfig(formats=["mxint4"]), "digits-cnn")
    with (folder / "checkpoint.pt").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="does not match the checksum"):
        load_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_checkpoint(tmp_path / "missing")


# --- command lines ------------------------------------------------------------------------------


def run_train(argv: list[str]) -> None:
    train_main([*argv, "--no-progress"])


def test_train_cli_writes_checkpoint_and_evaluate_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "digits"
    run_train(
        [
            "--model",
            "digits-cnn",
            "--formats",
            "mxint2,mxint8",
            "--steps",
            "3",
            "--schedule",
            "cycle",
            "-o",
            str(out),
        ]
    )
    info = json.loads((out / "config.json").read_text())
    assert info["quant_config"]["formats"] == ["mxint2", "mxint8"]
    assert info["extra"]["format_counts"] == {"mxint2": 2, "mxint8": 1}
    assert info["extra"]["recipe"]["steps"] == 3

    capsys.readouterr()
    assert evaluate_main([str(out), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [row["format"] for row in result["results"]] == ["fp32", "mxint8", "mxint6", "mxint4", "mxint2"]
    assert result["results"][3]["method"] == "untrained (via_anchor)"
    assert 0 <= result["results"][0]["accuracy"] <= 100


def test_train_cli_rejects_non_empty_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--model", "digits-cnn", "--formats", "mxint4", "--steps", "1", "-o", str(out)])
    assert exit_info.value.code == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    run_train(
        [
            "--model",
            "digits-cnn",
            "--formats",
            "mxint4",
            "--steps",
            "1",
            "-o",
            str(out),
            "--force",
            "--no-eval",
        ]
    )
    assert (out / "notes.txt").read_text() == "keep"
    assert (out / "config.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet", "--formats", "mxint4"], "unknown model 'resnet'; valid names are: digits-cnn"),
        (["--model", "digits-cnn", "--formats", "mxint4,int3"], "formats: unknown MX format 'int3'"),
        (
            ["--model", "digits-cnn", "--formats", "mxint4", "--anchor", "mxint4"],
            "anchor must be an 8-bit format",
        ),
        (
            ["--model", "digits-cnn", "--formats", "mxint4,mxfp4", "--anchor", "mxint8"],
            "'mxfp4_e2m1' is in the fp family",
        ),
        (["--model", "digits-cnn", "--formats", "none,mxint4"], "cannot be combined"),
        (
            ["--model", "digits-cnn", "--formats", "mxint4", "--steps", "0"],
            "steps must be a positive integer",
        ),
        (
            ["--model", "digits-cnn", "--formats", "mxint4", "--schedule", "random"],
            "invalid choice: 'random'",
        ),
    ],
)
def test_train_cli_argument_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_train([*args, "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_cli_fp32_then_ptq_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fp32"
    run_train(["--model", "digits-cnn", "--formats", "none", "--steps", "2", "-o", str(out), "--no-eval"])
    _, config, _ = load_checkpoint(out)
    assert config is None
    capsys.readouterr()
    evaluate_main([str(out), "--formats", "mxfp4,mxint4", "--no-progress"])
    printed = capsys.readouterr().out
    assert "ptq (direct)" in printed
    assert "mxfp4_e2m1" in printed


# --- data parallel ------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    from torch.nn import functional as F
    from mfqat_onnx.qat import QuantConfig, TrainRecipe, fit, prepare

    torch.set_num_threads(1)
    out = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=g)
    y = (x[:, :4].argmax(1))
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(int(os.environ["RANK"]))  # different initial weights: DDP must sync them
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    config = QuantConfig(formats=["mxint2", "mxint4", "mxint8"], schedule="sample")
    prepare(model, config)
    result = fit(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), data,
                 TrainRecipe(steps=5, batch_size=32, lr=1e-2), config, seed=1, progress=False)
    rank = int(os.environ["RANK"])
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    drawn = [[k for k in row if k.startswith("mx")] for row in result.history]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"drawn": drawn, "world": torch.distributed.get_world_size()}, f)
    """
)


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_weights(tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        # A second launch rules out a transient rendezvous failure (a free port
        # taken by another process between torchrun's probe and its bind).
        first_error = done.stderr[-3000:]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"first launch:\n{first_error}\nsecond launch:\n{done.stderr[-3000:]}"

    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in states[0]:
        np.testing.assert_array_equal(bits(states[0][key]), bits(states[1][key]), err_msg=key)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert logs[0]["world"] == 2
    assert logs[0]["drawn"] == logs[1]["drawn"]
    assert len(logs[0]["drawn"]) == 5
