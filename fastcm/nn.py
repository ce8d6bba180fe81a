"""Small shared layers for the U-Net: seeded dropout whose mask is a pure function of (seed, layer, element).

iCT (Song & Dhariwal 2023, Sec. 3) trains with dropout 0.3 and needs the *same* mask in the student pass at
sigma_{i+1} and the stop-gradient pass at sigma_i. Saving and restoring ``torch.get_rng_state()`` (openai/cm,
diffusers) syncs only the CPU generator, so CUDA masks differ between the passes. Here the mask is a counter-based
hash of (seed, layer id, flat element index) in plain int64 torch ops: identical on CPU and CUDA, independent of
the global RNG, and traceable by ``torch.compile`` (which fuses the hash into the dropout kernel).
"""
from typing import Optional, Union

import torch
from torch import Tensor, nn

_MASK32 = 0xFFFFFFFF
# Multiplier of a well-mixing 32-bit integer hash (3 xor-shift-multiply rounds). It is < 2**31, so each product of
# a 32-bit value with it stays below 2**63 and int64 arithmetic never overflows on any backend.
_MUL = 0x45D9F3B
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive layer ids apart before hashing


def hash32(x: Tensor) -> Tensor:
    """Hash int64 values in [0, 2**32) to [0, 2**32) (xor-shift-multiply; products fit in int64)."""
    x = ((x ^ (x >> 16)) * _MUL) & _MASK32
    x = ((x ^ (x >> 16)) * _MUL) & _MASK32
    return x ^ (x >> 16)


def dropout_keep_mask(shape, p: float, seed: Tensor, layer_id: int, device=None) -> Tensor:
    """Boolean keep-mask of ``shape`` with P(keep) = 1 - p, a pure function of (seed, layer_id, element index).

    ``seed`` is an int64 tensor so that a new seed each step does not recompile a compiled model: 0-d (or one
    element) for one mask over the whole tensor (element index = flat index), or (B,) with B = shape[0] for one
    seed per sample (element index = flat index within the sample), so a sample's mask does not depend on where it
    sits in its batch (the FD stage's DDP ranks hold different slices of one global batch). For B = 1 the two
    agree. The keep test uses 24 bits of the hash, so p is resolved to 2**-24.
    """
    per_sample = seed.dim() == 1 and seed.numel() > 1
    if per_sample and seed.shape[0] != shape[0]:
        raise ValueError(f"dropout seed must be 0-d or one per sample ({shape[0]},), got {tuple(seed.shape)}")
    seed = (seed if per_sample else seed.reshape(())).to(device=device, dtype=torch.int64) & _MASK32
    key = hash32((hash32(seed) + (layer_id + 1) * _GOLDEN) & _MASK32)
    inner = tuple(shape[1:]) if per_sample else tuple(shape)
    n = 1
    for s in inner:
        n *= int(s)
    if n > 2**32:
        raise ValueError(f"seeded dropout supports tensors of up to 2**32 elements, got shape {tuple(shape)}")
    index = torch.arange(n, device=device, dtype=torch.int64).view(inner)
    if per_sample:
        key = key.view(-1, *([1] * len(inner)))
    bits = hash32(hash32(index ^ key) ^ (key >> 7))
    uniform = (bits >> 8).to(torch.float32) * (1.0 / 2**24)  # exact in fp32: 24-bit integers
    return uniform >= p


def seeded_dropout(x: Tensor, p: float, seed: Tensor, layer_id: int) -> Tensor:
    """Inverted dropout of ``x`` with the mask of :func:`dropout_keep_mask` (scaled by 1 / (1 - p))."""
    if p <= 0.0:
        return x
    keep = dropout_keep_mask(x.shape, p, seed, layer_id, device=x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


class SeededDropout(nn.Module):
    """Dropout layer whose mask comes from an explicit per-step seed (see module docstring).

    ``forward(x, seed)``: in eval mode or with p == 0 it is the identity. In training mode ``seed`` is an int64
    tensor, 0-d or one per sample (see :func:`dropout_keep_mask`), or a Python int; ``None`` draws a fresh seed from
    torch's global CPU generator, which is correct for plain training but gives different masks on each call.
    """

    def __init__(self, p: float, layer_id: int):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.layer_id = int(layer_id)

    def forward(self, x: Tensor, seed: Optional[Union[int, Tensor]] = None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if seed is None:
            seed = torch.randint(0, 2**31 - 1, ())
        elif not isinstance(seed, Tensor):
            seed = torch.tensor(int(seed), dtype=torch.int64)
        return seeded_dropout(x, self.p, seed, self.layer_id)

    def extra_repr(self) -> str:
        return f"p={self.p}, layer_id={self.layer_id}"
