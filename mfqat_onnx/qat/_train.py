"""Training loop of multi-format QAT: format schedules, one optimizer step, and ``fit``.

One latent fp32 weight is trained for several formats at once. Each step picks
formats with a schedule:

- ``all``: every format; the loss is the sum of the per-format losses.
- ``sample``: one format drawn uniformly, a pure function of ``(seed, step)``,
  so every process of a data-parallel job draws the same one.
- ``cycle``: format ``step % len(formats)``.

Per-format losses are back-propagated one after another into the same
gradients. That equals back-propagating their sum, but keeps only one graph
alive at a time. Under DDP only the last backward pass synchronizes gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, TensorDataset, default_collate
from tqdm.auto import tqdm

from mfqat_onnx.qat._config import SCHEDULES, QuantConfig, canonical_format
from mfqat_onnx.qat._distributed import DistributedEnv, init_distributed
from mfqat_onnx.qat._prepare import set_format

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
FP32 = "fp32"


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """Optimizer settings of a training run (AdamW, linear warm-up, cosine decay to ``final_lr_ratio``).

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per step over all processes. A data-parallel job
            gives each of its processes ``batch_size / world_size``.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay of matrices and kernels. Vectors
            (biases, norm gains) never decay.
        warmup_steps: Steps of linear warm-up from 0 to ``lr``.
        final_lr_ratio: Learning rate at the last step, as a fraction of ``lr``.
        grad_clip: Maximum global gradient norm, or ``None`` for no clipping.
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    final_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be a non-negative integer; got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr!r}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"final_lr_ratio must be in [0, 1]; got {self.final_lr_ratio!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None; got {self.grad_clip!r}")

    def replace(self, **changes: Any) -> TrainRecipe:
        """Return a copy with ``changes`` applied (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def lr_factor(self, step: int) -> float:
        """Return the learning-rate multiplier at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_lr_ratio + (1.0 - self.final_lr_ratio) * cosine


class FormatSchedule:
    """Choice of the formats trained at each step.

    Args:
        formats: Format names; ``None`` stands for fp32 training.
        kind: ``"all"``, ``"sample"`` or ``"cycle"``.
        seed: Seed of the ``sample`` draws (non-negative).
    """

    def __init__(self, formats: Sequence[str | None], kind: str = "sample", seed: int = 0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {kind!r}")
        if not formats:
            raise ValueError("a format schedule needs at least one format")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
        self.formats = [None if f is None else canonical_format(f) for f in formats]
        self.kind = kind
        self.seed = seed

    def formats_at(self, step: int) -> list[str | None]:
        """Return the formats trained at ``step``."""
        if self.kind == "all":
            return list(self.formats)
        if self.kind == "cycle":
            return [self.formats[step % len(self.formats)]]
        draw = np.random.default_rng([self.seed, step]).integers(len(self.formats))
        return [self.formats[int(draw)]]

    def __repr__(self) -> str:
        return f"FormatSchedule({self.formats!r}, kind={self.kind!r}, seed={self.seed})"


def train_step(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    formats: Sequence[str | None],
    *,
    grad_clip: float | None = None,
) -> dict[str, float]:
    """Run one optimizer step on the summed loss of ``formats``.

    Args:
        model: The model, possibly wrapped in ``DistributedDataParallel``.
        batch: Tensors passed to ``loss_fn``.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss. It must call
            ``model`` itself, because a DDP wrapper synchronizes gradients
            only for forward passes through it.
        optimizer: Optimizer over the model's parameters.
        formats: Formats of this step; ``None`` runs the MX layers in fp32.
        grad_clip: Maximum global gradient norm, or ``None``.

    Returns:
        The loss of each format, keyed by format name (``"fp32"`` for ``None``).

    Raises:
        FloatingPointError: A loss is NaN or infinite.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    losses: dict[str, float] = {}
    for i, fmt in enumerate(formats):
        set_format(model, fmt)
        # Only the last backward of the step all-reduces the accumulated gradients.
        sync = not is_ddp or i == len(formats) - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the {fmt or FP32} loss is {loss.item()}; lower the learning rate or check the data"
                )
            loss.backward()
        losses[fmt or FP32] = loss.item()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return losses


def make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.AdamW:
    """Return AdamW over the trainable parameters; only matrices and kernels (2 or more dims) decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.lr)


def iterate_batches(
    dataset: Dataset, batch_size: int, seed: int, env: DistributedEnv | None = None
) -> Iterator[Batch]:
    """Yield shuffled batches forever, reshuffling each epoch; the last partial batch is dropped.

    In a data-parallel job each process gets its ``DistributedSampler`` shard
    and ``batch_size / world_size`` examples per batch.

    Raises:
        ValueError: ``batch_size`` does not split evenly over the processes.
    """
    per_process = batch_size
    sampler = None
    if env is not None:
        if batch_size % env.world_size:
            raise ValueError(
                f"batch_size {batch_size} does not split over {env.world_size} processes; "
                f"use a multiple of {env.world_size}"
            )
        per_process = batch_size // env.world_size
        sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)

    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), dtype=torch.long)
        else:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        # A shard smaller than one batch still yields it whole, so the loop always advances.
        size = min(per_process, len(order))
        for start in range(0, len(order) - size + 1, size):
            index = order[start : start + size]
            if isinstance(dataset, TensorDataset):
                yield tuple(t[index] for t in dataset.tensors)
            else:
                yield tuple(default_collate([dataset[int(i)] for i in index]))
        epoch += 1


@dataclasses.dataclass
class FitResult:
    """Record of a ``fit`` run.

    Attributes:
        history: One dict per step: ``step``, ``lr`` and the loss of each trained format.
        format_counts: Steps that trained each format.
        seconds: Wall time of the loop.
    """

    history: list[dict[str, float]]
    format_counts: dict[str, int]
    seconds: float

    def final_losses(self, window: int = 20) -> dict[str, float]:
        """Return each format's mean loss over the last ``window`` steps that trained it."""
        means: dict[str, float] = {}
        for name in self.format_counts:
            values = [h[name] for h in self.history if name in h][-window:]
            means[name] = float(np.mean(values)) if values else math.nan
        return means


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    recipe: TrainRecipe,
    config: QuantConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
    desc: str | None = None,
) -> FitResult:
    """Train ``model`` in place with the format schedule of ``config``.

    ``model`` must already be prepared with ``config``. With ``config=None`` it
    trains in fp32. Under ``torchrun`` (``WORLD_SIZE`` > 1) the process joins
    a gloo process group, wraps the model in ``DistributedDataParallel`` and
    reads its shard of ``dataset``, so every process ends with the same
    weights. The MX layers finish at the widest format of ``config``.

    Args:
        model: Model to train (not a DDP wrapper).
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        dataset: Training examples; a ``TensorDataset`` is batched by indexing.
        recipe: Optimizer settings.
        config: Quantization config the model was prepared with, or ``None``.
        seed: Seed of the data order, the ``sample`` schedule and torch's RNG.
        progress: Show a tqdm bar (on rank 0 only).
        desc: Label of the progress bar.

    Returns:
        Per-step losses, format counts and wall time.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("fit wraps the model in DistributedDataParallel itself; pass the bare model")
    env = init_distributed()
    torch.manual_seed(seed)
    formats: list[str | None] = list(config.formats) if config is not None else [None]
    schedule = FormatSchedule(formats, config.schedule if config is not None else "cycle", seed)

    train_model: nn.Module = model
    if env is not None:
        train_model = nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)
    batches = iterate_batches(dataset, recipe.batch_size, seed, env)
    logger.info("training %d steps with %r", recipe.steps, schedule)

    history: list[dict[str, float]] = []
    counts = {f or FP32: 0 for f in formats}
    start = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc=desc, disable=not progress or (env is not None and env.rank != 0))
    for step in bar:
        lr = scheduler.get_last_lr()[0]
        step_formats = schedule.formats_at(step)
        losses = train_step(train_model, next(batches), loss_fn, optimizer, step_formats, grad_clip=recipe.grad_clip)
        scheduler.step()
        for name in losses:
            counts[name] += 1
        history.append({"step": step, "lr": lr, **losses})
        if step % 10 == 0 or step == recipe.steps - 1:
            bar.set_postfix({name: f"{value:.3f}" for name, value in losses.items()}, refresh=False)
    seconds = time.perf_counter() - start

    set_format(model, None if config is None else config.widest_format())
    return FitResult(history=history, format_counts=counts, seconds=seconds)
