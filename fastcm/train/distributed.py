"""torchrun / DDP plumbing: NCCL on CUDA, gloo on CPU; rank 0 logs and saves.

Launch with ``torchrun --nproc_per_node=G script.py``: the trainers read RANK / WORLD_SIZE / LOCAL_RANK from the
environment and initialise the process group themselves (or use one the caller already initialised). The group
then lives until the process exits (an atexit hook destroys it), so several stages and reference_stats share it:
re-initialising the default group after destroying it reuses the rendezvous keys and can deadlock under torchrun.
Rank 0 writes the run directory; resuming reads the checkpoint on every rank, so multi-node runs need out_dir on a
file system all nodes share.
"""
import atexit
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    created_group: bool = False  # True when init_distributed created the process group (and should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[Union[str, torch.device]] = None) -> DistInfo:
    """Join (or create, under torchrun) the default process group and pick this rank's device.

    ``device`` None means cuda:LOCAL_RANK when CUDA is available, else the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_at_exit)
        created = True
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, created)
    return DistInfo(device=device)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it (all ranks together, after a barrier).
    Optional: it is destroyed at exit anyway. Do not initialise a new default group afterwards under torchrun."""
    if info.created_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _destroy_at_exit() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around ``model``: parameters *and buffers* (e.g. random Fourier frequencies) are
    broadcast from rank 0 here; identity when alone. Buffers are constants in fastcm's U-Nets, so they are not
    re-broadcast before every forward where this torch allows it (``forward_sync_buffers``)."""
    if not info.distributed:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {}
    return DistributedDataParallel(model, device_ids=ids, **kw)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flags, info: DistInfo) -> list:
    """Each flag True when it is True on any rank (one all-reduce for all, so every rank takes the same branch)."""
    if not info.distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([1 if f else 0 for f in flags], device=info.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_str(text: str, info: DistInfo) -> str:
    """Rank 0's string on every rank (e.g. the checkpoint path rank 0 chose); sent as bytes, not pickled."""
    if not info.distributed:
        return text
    dev = info.device if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.tensor(list(text.encode()) if info.is_main else [], dtype=torch.uint8, device=dev)
    n = torch.tensor([data.numel()], device=dev)
    dist.broadcast(n, src=0)
    buf = data if info.is_main else torch.empty(int(n.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
