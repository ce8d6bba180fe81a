"""Differentiable all-gather for distribution losses under torch.distributed (DDP).

A Frechet loss is a function of the whole global batch, so every rank gathers all ranks' features, computes the
same loss, and back-propagates only into its own rows: the backward returns the gradient slice of the local
features and communicates nothing (FD-loss's ``diff_all_gather``). The gradient reaching rank r's parameters is then
d loss / d (rank r's features) chained through rank r's network, and the sum over ranks of these is the full
gradient. DDP *averages* parameter gradients over ranks, so with DDP each step applies (1 / world_size) of the full
gradient of the loss; multiply the loss by the world size to get the exact full-batch gradient.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_world(group=None) -> int:
    """World size of ``group`` when torch.distributed is initialized, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Concatenate ``x`` (B_r, ...) from all ranks along dim 0 (rank order); ranks may have different B_r.

    Backward returns the rows of the incoming gradient that belong to this rank (no communication). Without an
    initialized process group (or with one rank) this is the identity."""
    if distributed_world(group) == 1:
        return x
    return _AllGather.apply(x, group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[object]):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        x = x.contiguous()
        sizes = _gather_sizes(x.shape[0], x.device, world, group)
        pad = max(sizes) - x.shape[0]
        padded = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))]) if pad else x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        ctx.offset, ctx.rows = sum(sizes[:rank]), x.shape[0]
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.offset: ctx.offset + ctx.rows].contiguous(), None


def _gather_sizes(rows: int, device: torch.device, world: int, group) -> list:
    size = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]
