"""Process-group set-up from torchrun or SLURM variables. Nothing else in the package reads them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medclipin.errors import MedclipinError


class RendezvousError(MedclipinError, RuntimeError):
    """Several processes were launched without the address they meet at (MASTER_ADDR, MASTER_PORT)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def cuda_index(self) -> int:
        """This process's GPU: its local rank, or 0 when the launcher shows each task only its own GPU."""
        count = torch.cuda.device_count()
        return self.local_rank % count if count else 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def detect() -> DistInfo:
    """Rank and world size from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM (SLURM_PROCID/NTASKS/LOCALID)."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def init_distributed(device_kind: str) -> DistInfo:
    """Initialise the default process group when launched with several processes (NCCL on GPU, gloo on CPU)."""
    if dist.is_initialized():  # the caller set up the group: trust it over the environment
        rank = dist.get_rank()
        return DistInfo(rank=rank, local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID", default=rank),
                        world_size=dist.get_world_size())
    info = detect()
    if info.enabled:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise RendezvousError(
                f"{info.world_size} processes but {' and '.join(missing)} not set: under srun export MASTER_ADDR "
                "(the first node's host name) and MASTER_PORT (a free port) in the sbatch script "
                "(docs/scaling.md); torchrun sets them itself"
            )
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(info.cuda_index())
        dist.init_process_group(backend=backend)
    return info


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
