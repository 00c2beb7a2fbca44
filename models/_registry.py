"""Workload description and the name → module registry."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from mfqat_onnx.qat import TrainRecipe

# Modules are imported on first use, so listing workloads never loads transformers.
_MODULES = {
    "digits-cnn": "models.digits_cnn",
    "tiny-lm": "models.tiny_lm",
    "minilm": "models.minilm",
}


@dataclasses.dataclass(frozen=True)
class WorkloadData:
    """Fixed train / held-out split of a workload."""

    train: TensorDataset
    eval: TensorDataset


@dataclasses.dataclass(frozen=True)
class Workload:
    """A reference model with its data, recipe and metric.

    Attributes:
        name: Registry name, for example ``digits-cnn``.
        description: One line for listings.
        build_model: ``build_model(**model_kwargs)`` returns a fresh fp32 model
            (pretrained when the workload starts from published weights).
        load_data: ``load_data()`` returns the fixed train / held-out split.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar training loss.
        evaluate: ``evaluate(model, eval_data)`` returns metrics by name.
        metric: Name of the headline metric in ``evaluate``'s result.
        higher_is_better: Direction of ``metric``.
        recipe: Optimizer settings of training from a fresh ``build_model``.
        finetune_recipe: Optimizer settings of (quantization-aware)
            fine-tuning from trained weights; ``None`` means ``recipe``.
        quant_defaults: ``QuantConfig`` fields this workload sets by default.
        example_inputs: ``example_inputs(batch, seq)`` returns model inputs of
            that batch size (and sequence length, where the model has one),
            for tracing and export.
        input_names: Names of the model inputs, in call order.
        output_names: Names of the model outputs.
        dynamic_axes: For each input and output, axis index → symbolic name
            of the axes that may change size after export.
        model_kwargs: Builder arguments of the default model.
        pretrained: Whether ``build_model`` loads published weights, so
            training fine-tunes rather than starts from scratch.
    """

    name: str
    description: str
    build_model: Callable[..., nn.Module]
    load_data: Callable[[], WorkloadData]
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    evaluate: Callable[[nn.Module, TensorDataset], dict[str, float]]
    metric: str
    higher_is_better: bool
    recipe: TrainRecipe
    quant_defaults: Mapping[str, Any]
    example_inputs: Callable[[int, int], tuple[torch.Tensor, ...]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pretrained: bool = False
    finetune_recipe: TrainRecipe | None = None

    def recipe_for(self, from_trained_weights: bool) -> TrainRecipe:
        """Return the fine-tuning recipe for trained (or pretrained) weights, else the training recipe."""
        if (from_trained_weights or self.pretrained) and self.finetune_recipe is not None:
            return self.finetune_recipe
        return self.recipe

    def better(self, a: float, b: float) -> bool:
        """Return whether metric value ``a`` is better than ``b``."""
        return a > b if self.higher_is_better else a < b


def list_workloads() -> list[str]:
    """Return the registered workload names."""
    return list(_MODULES)


def get_workload(name: str) -> Workload:
    """Return the workload registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists valid names.
    """
    if name not in _MODULES:
        raise ValueError(f"unknown model {name!r}; valid names are: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).WORKLOAD
