"""Multi-format quantization-aware training (MF-QAT) in PyTorch.

One set of latent fp32 weights is trained so that it stays accurate in every
MX format of a family. ``prepare`` swaps ``nn.Linear`` / ``nn.Conv2d`` layers
for ``MXLinear`` / ``MXConv2d``, which fake-quantize their weight (blocks along
the input-feature axis) and optionally their input. ``set_format`` picks the
active format. ``fit`` trains with a format schedule, also under ``torchrun``.

In via-anchor mode (the default) a lower format is Slice-and-Scale of the
8-bit anchor quantization, so the model trains on exactly the weights that an
exported anchor file retargeted to that format holds.

Example::

    config = QuantConfig(formats=["mxint2", "mxint4", "mxint6", "mxint8"], anchor="mxint8")
    prepare(model, config)
    fit(model, loss_fn, train_data, TrainRecipe(steps=500, batch_size=64, lr=1e-3), config)
    set_format(model, "mxint4")
"""

from mfqat_onnx.qat._checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from mfqat_onnx.qat._config import LayerQuant, QuantConfig
from mfqat_onnx.qat._modules import MXConv2d, MXLinear
from mfqat_onnx.qat._prepare import prepare, ptq, quantized_modules, set_format
from mfqat_onnx.qat._train import FitResult, FormatSchedule, TrainRecipe, fit, train_step

__all__ = [
    "FitResult",
    "FormatSchedule",
    "LayerQuant",
    "MXConv2d",
    "MXLinear",
    "QuantConfig",
    "TrainRecipe",
    "fit",
    "load_checkpoint",
    "prepare",
    "ptq",
    "quantized_modules",
    "read_checkpoint_info",
    "save_checkpoint",
    "set_format",
    "train_step",
]
