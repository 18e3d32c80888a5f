"""Data parallelism: ``torchrun`` (NCCL on GPUs, gloo on CPUs) or one plain process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return get_rank(), get_world_size()


def cleanup() -> None:
    """End the process group (every rank, before exit: gloo aborts on a dangling one)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


MAX_LOADER_WORKERS = 8


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(configured: int | None) -> int:
    """``data.num_workers`` when set; else what this process's share of the machine's cores
    leaves beside it: cores / training processes on this machine − 1, from 0 to 8 (2 cores and
    one process: 1)."""
    if configured is not None:
        return configured
    cores = available_cores()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(MAX_LOADER_WORKERS, cores // processes - 1))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (one item without a launcher)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def local_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name (what timings must be reported with)."""
    import platform
    from pathlib import Path

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return "CPU " + line.split(":", 1)[1].strip()
    return "CPU " + (platform.processor() or platform.machine())
