"""Swap quantizable layers for their MX versions and switch the active format."""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Iterator

from torch import nn

from mfqat_onnx.formats import get_format
from mfqat_onnx.qat._config import LayerQuant, QuantConfig, canonical_format
from mfqat_onnx.qat._modules import SWAPPABLE, MXConv2d, MXLinear, swap_module

logger = logging.getLogger(__name__)

MX_LAYERS = (MXLinear, MXConv2d)


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, MXLinear | MXConv2d]]:
    """Yield ``(name, module)`` for every MX layer of ``model``, in registration order.

    A model wrapped in ``DistributedDataParallel`` yields the same layers under
    names prefixed with ``module.``.
    """
    for name, module in model.named_modules():
        if isinstance(module, MX_LAYERS):
            yield name, module


def select_layers(model: nn.Module, config: QuantConfig) -> tuple[list[str], dict[str, str]]:
    """Pick the layers ``config`` quantizes.

    Returns:
        The names of the layers to swap, in registration order, and for each
        skipped candidate the reason it stays fp32.
    """
    candidates = [name for name, m in model.named_modules() if type(m) in SWAPPABLE and name]
    skipped: dict[str, str] = {}
    chosen: list[str] = []
    edges = {candidates[0], candidates[-1]} if candidates else set()
    for name in candidates:
        if not config.quantize_first_last and name in edges:
            skipped[name] = "first or last quantizable layer (set quantize_first_last to include it)"
        elif not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            skipped[name] = "matches no include pattern"
        elif any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            skipped[name] = "matches an exclude pattern"
        else:
            chosen.append(name)
    return chosen, skipped


def prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap the ``nn.Linear`` and ``nn.Conv2d`` layers chosen by ``config`` for MX layers, in place.

    Candidates are layers whose class is exactly ``nn.Linear`` or ``nn.Conv2d``,
    in registration order. The first and last candidates stay fp32 unless
    ``config.quantize_first_last`` is set, and ``include``/``exclude`` then
    filter by name. Each swapped layer shares the original parameters and
    starts at the widest format of ``config``.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``config`` is not a ``QuantConfig`` or ``model`` is not a module.
        ValueError: ``model`` already holds MX layers, is itself a bare layer,
            or ``config`` selects no layer.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig; got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if type(model) in SWAPPABLE:
        raise ValueError("prepare swaps layers inside a model; wrap a bare layer in nn.Sequential first")
    if next(quantized_modules(model), None) is not None:
        raise ValueError("model already contains MX layers; prepare a fresh fp32 model instead")

    chosen, skipped = select_layers(model, config)
    if not chosen:
        raise ValueError(
            f"the quantization config selects no layer of {type(model).__name__}; "
            f"skipped: {skipped or 'no nn.Linear or nn.Conv2d found'}"
        )
    for name, reason in skipped.items():
        logger.debug("keeping %s in fp32: %s", name, reason)

    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, swap_module(getattr(parent, child), LayerQuant.from_config(config)))
    logger.info("quantized %d layers (%d kept in fp32) with %s", len(chosen), len(skipped), config.formats)
    return model


def set_format(model: nn.Module, fmt: str | None) -> None:
    """Make ``fmt`` the active weight format of every MX layer; ``None`` runs them in fp32.

    Raises:
        ValueError: ``fmt`` is unknown, ``model`` has no MX layers while ``fmt``
            is not ``None``, or a via-anchor layer's anchor is in another family.
    """
    name = None if fmt is None else canonical_format(fmt)
    layers = [m for _, m in quantized_modules(model)]
    if name is None:
        for layer in layers:
            layer.quant.weight_format = None
        return
    if not layers:
        raise ValueError(f"cannot set format {name!r}: the model has no MX layers; call prepare first")
    family = get_format(name).family
    for layer in layers:
        q = layer.quant
        if q.mode == "via_anchor" and get_format(q.anchor).family != family:
            raise ValueError(
                f"format {name!r} is not in the family of the anchor {q.anchor!r}; via-anchor layers "
                "reach only formats of the anchor's family"
            )
    for layer in layers:
        layer.quant.weight_format = name


def ptq(model: nn.Module, fmt: str, config: QuantConfig | None = None) -> nn.Module:
    """Return a copy of ``model`` whose weights are fake-quantized to ``fmt`` without training.

    This is the post-training quantization baseline. An fp32 ``model`` is copied
    and prepared with ``config``, by default direct quantization to ``fmt``
    with the family's 8-bit anchor. A model that already contains MX layers is
    copied as is. ``model`` itself is left unchanged.
    """
    fmt = canonical_format(fmt)
    quantized = copy.deepcopy(model)
    if next(quantized_modules(quantized), None) is None:
        prepare(quantized, config if config is not None else QuantConfig(formats=[fmt], mode="direct"))
    set_format(quantized, fmt)
    return quantized
