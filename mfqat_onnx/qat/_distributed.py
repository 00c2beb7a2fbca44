"""Data-parallel training under ``torchrun``, detected from its environment variables."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    """Position of this process in a ``torchrun`` job."""

    rank: int
    world_size: int
    local_rank: int


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"{name} is not set but WORLD_SIZE is; start multi-process runs with torchrun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {raw!r}") from None


def distributed_env() -> DistributedEnv | None:
    """Return this process's place in a multi-process job, or ``None`` for a single process.

    Raises:
        ValueError: ``WORLD_SIZE`` is above 1 but ``RANK`` is missing or invalid.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return None
    rank = _env_int("RANK")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, {world_size}); got {rank}")
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=_env_int("LOCAL_RANK", rank))


def init_distributed() -> DistributedEnv | None:
    """Join the ``torchrun`` process group (gloo backend, CPU) if this is a multi-process job.

    Returns:
        The process's place in the job, or ``None`` when it runs alone.
    """
    env = distributed_env()
    if env is not None and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        logger.info("joined process group as rank %d of %d", env.rank, env.world_size)
    return env


def is_main_process() -> bool:
    """Return whether this process is rank 0 (always true outside a multi-process job)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = distributed_env()
    return env is None or env.rank == 0


def barrier() -> None:
    """Wait for every process of the job; does nothing for a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
