"""Endless, resumable, distributed batches.

The batch of training step k is a pure function of (seed, k, rank): step k reads batch k mod S of epoch
e = k // S (S = batches per epoch), and epoch e's order is torch's DistributedSampler order for (seed, e), split
across ranks. Flips are drawn from a generator seeded by (seed, k, rank). So resuming at step k needs nothing but
k, and any number of data-loader workers gives the same batches.
"""
import hashlib
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler

from fastcm._checks import check_int


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (seed, step, rank, a stream id …); distinct inputs give unrelated seeds."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BatchLoader:
    """Batches of ``batch_size`` images (float32 in [-1, 1]) and labels (int64, or None when unlabelled).

    Args:
        dataset: an ArrayDataset (fast path: indexed in one go) or any map-style dataset yielding (image, label).
        batch_size: images per batch on this rank.
        seed: shuffling/flip seed (the same on every rank).
        rank, world_size: this process's share of each epoch (DistributedSampler, drop_last=True).
        hflip: flip each image horizontally with probability 1/2.
        num_workers: DataLoader worker processes for datasets without ``get_batch``.
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 hflip: bool = False, num_workers: int = 0):
        for name, v, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0),
                            ("num_workers", num_workers, 0)):
            check_int(name, v, lo)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        per_rank = len(dataset) // world_size
        if per_rank < batch_size:
            raise ValueError(f"dataset of {len(dataset)} images is too small for {world_size} rank(s) x batch "
                             f"{batch_size}: each rank needs at least one full batch")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.rank, self.world_size, self.hflip, self.num_workers = rank, world_size, bool(hflip), num_workers
        self.steps_per_epoch = per_rank // batch_size
        self._sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=self.seed, drop_last=True)
        self._epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            self._sampler.set_epoch(epoch)
            self._order, self._epoch = torch.tensor(list(iter(self._sampler)), dtype=torch.long), epoch
        return self._order

    def indices(self, step: int) -> torch.Tensor:
        """Dataset indices of this rank's batch at training step ``step``."""
        epoch, b = divmod(int(step), self.steps_per_epoch)
        return self._epoch_order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]

    def batch(self, step: int):
        """This rank's (images, labels) at training step ``step``."""
        x, y = self._fetch(self.indices(step))
        return self._flip(x, step), y

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start_step: int = 0) -> Iterator:
        """Yield the batches of steps start_step, start_step + 1, … without end."""
        step = int(start_step)
        while True:
            if hasattr(self.dataset, "get_batch") or self.num_workers == 0:
                yield self.batch(step)
                step += 1
                continue
            # Worker processes prefetch the rest of this epoch; flips stay keyed by step.
            epoch, b = divmod(step, self.steps_per_epoch)
            batches = [self.indices(epoch * self.steps_per_epoch + i).tolist()
                       for i in range(b, self.steps_per_epoch)]
            for x, y in DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers):
                yield self._flip(x.float(), step), self._labels(y)
                step += 1

    def _fetch(self, index: torch.Tensor):
        if hasattr(self.dataset, "get_batch"):
            return self.dataset.get_batch(index)
        items = [self.dataset[int(i)] for i in index]
        x = torch.stack([torch.as_tensor(item[0]) for item in items]).float()
        return x, self._labels(torch.as_tensor([int(item[1]) for item in items]))

    def _labels(self, y: torch.Tensor) -> Optional[torch.Tensor]:
        return None if getattr(self.dataset, "num_classes", None) is None else y.long()

    def _flip(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if not self.hflip:
            return x
        g = torch.Generator().manual_seed(derive_seed(self.seed, step, self.rank, 0xF11B))
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
