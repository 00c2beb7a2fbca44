"""Tests of the reference workloads: registry, data splits, model shapes, metrics."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mfqat_onnx.qat import QuantConfig, prepare, quantized_modules
from models import Workload, get_workload, list_workloads

torch.set_num_threads(1)


def test_registry_lists_and_rejects() -> None:
    assert list_workloads() == ["digits-cnn", "tiny-lm", "minilm"]
    for name in ("digits-cnn", "tiny-lm"):
        workload = get_workload(name)
        assert isinstance(workload, Workload)
        assert workload.name == name
    with pytest.raises(
        ValueError, match="unknown model 'mnist'; valid names are: digits-cnn, tiny-lm, minilm"
    ):
        get_workload("mnist")


# --- digits-cnn -------------------------------------------------------------------------------


def test_digits_split_is_fixed() -> None:
    workload = get_workload("digits-cnn")
    first, second = workload.load_data(), workload.load_data()
    images, labels = first.train.tensors
    assert images.shape == (1437, 1, 8, 8)
    assert first.eval.tensors[0].shape == (360, 1, 8, 8)
    assert float(images.min()) == -1.0
    assert float(images.max()) == 1.0
    assert set(labels.tolist()) == set(range(10))
    for a, b in zip(
        first.train.tensors + first.eval.tensors, second.train.tensors + second.eval.tensors, strict=True
    ):
        assert torch.equal(a, b)


def test_digits_quantized_layers_have_full_blocks() -> None:
    workload = get_workload("digits-cnn")
    model = workload.build_model()
    prepare(model, QuantConfig(formats=["mxint4"], **workload.quant_defaults))
    layers = dict(quantized_modules(model))
    assert list(layers) == ["conv2", "fc1"]
    for layer in layers.values():
        assert layer.weight.shape[1] % 32 == 0
    (images,) = workload.example_inputs(3, 0)
    assert model(images).shape == (3, 10)


def test_digits_evaluate_counts_correct() -> None:
    workload = get_workload("digits-cnn")
    data = workload.load_data()
    labels = data.eval.tensors[1]

    class Oracle(nn.Module):
        """Predicts the true label for the first half of the test set and class (label+1)%10 after."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            target = labels[self.calls : self.calls + len(images)].clone()
            half = len(labels) // 2
            wrong = torch.arange(self.calls, self.calls + len(images)) >= half
            target[wrong] = (target[wrong] + 1) % 10
            self.calls += len(images)
            return nn.functional.one_hot(target, 10).float() * 20

    assert workload.evaluate(Oracle(), data.eval)["accuracy"] == pytest.approx(50.0)


# --- tiny-lm ----------------------------------------------------------------------------------


def test_tiny_lm_split_and_windows() -> None:
    from models.tiny_lm import CONTEXT, corpus_bytes

    workload = get_workload("tiny-lm")
    data = workload.load_data()
    corpus = corpus_bytes()
    (train,) = data.train.tensors
    (held_out,) = data.eval.tensors
    assert train.shape[1] == held_out.shape[1] == CONTEXT + 1
    cut = int(len(corpus) * 0.9)
    assert bytes(train[0].tolist()) == corpus[: CONTEXT + 1]
    assert bytes(held_out[0].tolist()) == corpus[cut : cut + CONTEXT + 1]
    assert bytes(held_out[1].tolist()) == corpus[cut + CONTEXT + 1 : cut + 2 * (CONTEXT + 1)]
    assert len(held_out) == (len(corpus) - cut) // (CONTEXT + 1)


def test_tiny_lm_quantizes_every_linear() -> None:
    workload = get_workload("tiny-lm")
    model = workload.build_model()
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    prepare(model, QuantConfig(formats=["mxint4"], **workload.quant_defaults))
    assert [name for name, _ in quantized_modules(model)] == linears
    assert "lm_head" in linears
    for _, layer in quantized_modules(model):
        assert layer.weight.shape[1] % 32 == 0


def test_tiny_lm_is_causal_for_any_length() -> None:
    torch.manual_seed(0)
    model = get_workload("tiny-lm").build_model(n_layers=1).eval()
    tokens = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        full = model(tokens)
        changed = tokens.clone()
        changed[:, 15:] = (changed[:, 15:] + 7) % 256
        edited = model(changed)
        prefix = model(tokens[:, :15])
    assert full.shape == (2, 21, 256)
    torch.testing.assert_close(edited[:, :15], full[:, :15], rtol=0, atol=1e-5)
    torch.testing.assert_close(prefix, full[:, :15], rtol=0, atol=1e-5)
    assert not torch.allclose(edited[:, 15:], full[:, 15:])


def test_tiny_lm_untrained_perplexity_near_uniform() -> None:
    workload = get_workload("tiny-lm")
    data = workload.load_data()
    torch.manual_seed(0)
    model = workload.build_model(n_layers=1)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform prediction: perplexity exactly 256
    small = torch.utils.data.TensorDataset(data.eval.tensors[0][:4])
    metrics = workload.evaluate(model, small)
    assert metrics["perplexity"] == pytest.approx(256.0, rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(8.0, rel=1e-5)
    assert metrics["loss"] == pytest.approx(math.log(256), rel=1e-5)


# --- minilm -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Workload:
    os.environ["HF_HUB_OFFLINE"] = "1"
    return get_workload("minilm")


def test_minilm_files_are_local(minilm: Workload) -> None:
    import site

    from models.minilm import model_dir

    folder = model_dir()
    assert (folder / "model.safetensors").is_file()
    assert any(str(folder).startswith(p) for p in site.getsitepackages())


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm: Workload) -> None:
    from sentence_transformers import SentenceTransformer

    from models.minilm import load_tokenizer, model_dir

    sentences = ["The import statement binds names in the local namespace.", "A short one."]
    reference = SentenceTransformer(str(model_dir()), device="cpu").encode(sentences, convert_to_tensor=True)
    model = minilm.build_model().eval()
    tokens = load_tokenizer()(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_minilm_data_and_fp32_metrics(minilm: Workload) -> None:
    from models.minilm import load_data

    data = load_data(n_train=6, n_eval=12, max_length=32)
    ids, mask, teacher = data.eval.tensors
    assert ids.shape == mask.shape == (12, 32)
    assert teacher.shape == (12, 384)
    torch.testing.assert_close(teacher.norm(dim=-1), torch.ones(12))
    assert len(data.train) == 6

    model = minilm.build_model()
    metrics = minilm.evaluate(model, data.eval)
    assert metrics["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["retrieval_agreement"] == 100.0

    prepare(model, QuantConfig(formats=["mxint2"], **minilm.quant_defaults))
    quantized = minilm.evaluate(model, data.eval)
    assert quantized["cosine"] < 0.99


# --- study ------------------------------------------------------------------------------------


def test_study_runs_every_arm(tmp_path: Path) -> None:
    from models.study import StudySettings, main, run_study

    settings = StudySettings("digits-cnn", ("mxint2", "mxint8"), (0,), 3, 2, False)
    result = run_study(settings)
    assert set(result["mean"]) == {"fp32", "ptq", "ptq_via_anchor", "qat", "mfqat"}
    assert [row["format"] for row in result["table"]] == ["mxint2", "mxint8"]
    row = result["table"][0]
    assert row["mfqat_vs_qat"] == pytest.approx(row["qat"] - row["mfqat"])
    assert row["mfqat_beats_ptq"] == (row["mfqat"] > row["ptq"])
    assert result["table"][1]["mfqat_beats_ptq"] is None

    out = tmp_path / "study.json"
    argv = ["--workload", "digits-cnn", "--formats", "mxint4", "--pretrain-steps", "2", "--finetune-steps", "1",
            "-o", str(out), "--no-progress"]
    assert main(argv) == 0
    assert out.is_file()
