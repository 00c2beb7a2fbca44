"""Self-describing checkpoint folders: ``checkpoint.pt`` (state dict) and ``config.json``.

``config.json`` names the workload and its builder arguments, so a checkpoint
rebuilds its model from the ``models`` registry with no training state.
It is written last, so a folder with a ``config.json`` is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mfqat_onnx
from mfqat_onnx.qat._config import QuantConfig
from mfqat_onnx.qat._files import write_atomic
from mfqat_onnx.qat._prepare import prepare, quantized_modules

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_KIND = "mfqat_onnx.checkpoint"
CHECKPOINT_VERSION = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unwrap(model: nn.Module) -> nn.Module:
    """Return the model inside a ``DistributedDataParallel`` wrapper, or ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(
    path_dir: str | os.PathLike[str],
    model: nn.Module,
    config: QuantConfig | None,
    model_name: str,
    model_kwargs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and the description needed to rebuild it.

    Args:
        path_dir: Folder to write into; created if missing. Existing checkpoint
            files in it are replaced atomically, other files are left alone.
        model: The trained model (a ``DistributedDataParallel`` wrapper is unwrapped).
        config: The quantization config the model was prepared with, or
            ``None`` for an fp32 model.
        model_name: Workload name in the ``models`` registry.
        model_kwargs: Keyword arguments of the workload's model builder.
        extra: JSON-serializable details to keep (recipe, metrics, ...).

    Returns:
        The checkpoint folder.
    """
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or None; got {type(config).__name__}")
    model = unwrap(model)
    folder = Path(path_dir)
    folder.mkdir(parents=True, exist_ok=True)

    weights_path = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(weights_path, lambda f: torch.save(state, f), binary=True)

    info = {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "producer_version": mfqat_onnx.__version__,
        "model": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "quant_config": None if config is None else config.to_dict(),
        "quantized_layers": [name for name, _ in quantized_modules(model)],
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": _sha256(weights_path),
        "extra": dict(extra or {}),
    }
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    write_atomic(folder / CONFIG_FILE, lambda f: f.write(text), binary=False)
    logger.info("saved checkpoint of %s to %s", model_name, folder)
    return folder


def read_checkpoint_info(path_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a checkpoint folder's ``config.json``.

    Raises:
        FileNotFoundError: The folder has no ``config.json``.
        ValueError: The file is not an mfqat_onnx checkpoint description.
    """
    config_path = Path(path_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found; a checkpoint folder contains {CONFIG_FILE} and {WEIGHTS_FILE}, "
            "as written by `python -m mfqat_onnx.train`"
        )
    try:
        info = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(info, dict) or info.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{config_path} is not an mfqat_onnx checkpoint description (kind {CHECKPOINT_KIND!r})")
    if info.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{config_path} has checkpoint version {info.get('version')!r}; this mfqat_onnx reads version "
            f"{CHECKPOINT_VERSION}"
        )
    return info


def load_checkpoint(path_dir: str | os.PathLike[str]) -> tuple[nn.Module, QuantConfig | None, dict[str, Any]]:
    """Rebuild a model from a checkpoint folder written by ``save_checkpoint``.

    The model comes from the workload builder named in ``config.json``, is
    prepared with the stored config (so its MX layers start at the widest
    trained format), and receives the stored weights. It is returned in eval mode.

    Returns:
        ``(model, config, info)``: ``config`` is ``None`` for an fp32
        checkpoint, ``info`` is the parsed ``config.json``.

    Raises:
        FileNotFoundError: A checkpoint file is missing.
        ValueError: The files are damaged or do not match the rebuilt model.
    """
    # The registry lives in the top-level ``models`` package, which imports this
    # package, so it is imported here rather than at module level.
    from models import get_workload

    folder = Path(path_dir)
    info = read_checkpoint_info(folder)
    weights_path = folder / info["weights_file"]
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found; the checkpoint folder is incomplete")
    if _sha256(weights_path) != info["weights_sha256"]:
        raise ValueError(f"{weights_path} does not match the checksum in {CONFIG_FILE}; the file is damaged")

    workload = get_workload(info["model"])
    model = workload.build_model(**info["model_kwargs"])
    config = None if info["quant_config"] is None else QuantConfig.from_dict(info["quant_config"])
    if config is not None:
        prepare(model, config)
    layers = [name for name, _ in quantized_modules(model)]
    if layers != info["quantized_layers"]:
        raise ValueError(
            f"the rebuilt model quantizes {layers} but the checkpoint lists {info['quantized_layers']}; "
            "the workload's model definition changed since the checkpoint was written"
        )

    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_path} does not fit the {info['model']} model: {err}") from None
    model.eval()
    return model, config, info
