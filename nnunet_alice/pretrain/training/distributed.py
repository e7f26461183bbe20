"""torch.distributed glue: start-up from ``torchrun`` variables and rank queries."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device_type: str) -> bool:
    """Initialise the process group when launched by ``torchrun`` (WORLD_SIZE > 1). Returns True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def data_parallel(objective: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the objective.

    An objective with a term switched off (CASA is off by default) holds parameters that get no gradient, e.g. the
    CASA layer and the student's token projections. DDP then has to look for them every step
    (``find_unused_parameters``); otherwise the buckets holding them are never reduced and the ranks' gradients
    silently stop being averaged. Objectives say so through ``uses_every_parameter`` (default True).
    """
    unused = not getattr(objective, "uses_every_parameter", True)
    return torch.nn.parallel.DistributedDataParallel(
        objective, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
