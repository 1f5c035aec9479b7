"""Joining the process group ``torchrun`` describes, and the few collective helpers training needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UsageError, check_int, shown

__all__ = ["DistInfo", "all_reduce", "init_distributed", "pick_device"]


@dataclass
class DistInfo:
    """This process's place in the job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str | None) -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = _env_int("WORLD_SIZE", 1, 1)
    if world <= 1:
        return DistInfo(), pick_device(device_arg)
    if device_arg:
        _parse_device(device_arg)  # under torchrun only its type matters: each rank takes its local GPU
    if "RANK" not in os.environ:
        raise UsageError(
            f"WORLD_SIZE={world} but RANK is not set: start distributed training with torchrun "
            "(it sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), or unset WORLD_SIZE"
        )
    info = DistInfo(_env_int("RANK", 0, 0, world - 1), world, _env_int("LOCAL_RANK", 0, 0))
    cuda = torch.cuda.is_available() and not (device_arg or "").startswith("cpu")
    device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return info, device


def _env_int(name: str, default: int, minimum: int, maximum: int | None = None) -> int:
    """The integer environment variable ``name`` (``default`` when unset), checked like an option."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip()) if len(raw) <= 18 else None
    except ValueError:
        value = None
    if value is None:
        raise UsageError(f"environment variable {name}={shown(raw)} is not an integer (torchrun sets it)")
    return check_int(value, f"environment variable {name}", minimum, maximum)


#: Device types training runs on (``meta`` has no data; others lack the kernels the engine uses).
TRAINING_DEVICES = ("cpu", "cuda", "mps")


def _parse_device(device_arg: str) -> torch.device:
    """``--device``'s value as a device of a type training supports (:data:`TRAINING_DEVICES`)."""
    try:
        device = torch.device(device_arg)
    except RuntimeError:  # "Expected one of cpu, cuda, ... device type at start of device string"
        device = None
    if device is None or device.type not in TRAINING_DEVICES:
        raise UsageError(
            f"--device {device_arg!r} is not a device training can run on; expected cpu, cuda, "
            "cuda:<index> or mps"
        )
    return device


def pick_device(device_arg: str | None) -> torch.device:
    """The device ``--device`` names (default: CUDA when available), refused unless usable here."""
    if not device_arg:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = _parse_device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device_arg} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device_arg} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device_arg} asked for, but MPS is not available here")
    return device


def all_reduce(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
