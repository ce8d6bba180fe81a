"""A diffusers U-Net as the network F of :class:`fastcm.cm.ConsistencyModel` (iCT training, FD stage, samplers).

fastcm calls its network as ``F(c_in x, c_noise, class_labels, dropout_seed)`` with EDM's c_noise = ln(sigma) / 4
(CM App. C); diffusers' consistency-model port feeds ``UNet2DModel`` the timestep t = 1000 * ln(sigma) / 4
(``CMStochasticIterativeScheduler.sigma_to_t``), so the adapter passes ``timestep_scale * c_noise``.
"""
import numbers

import torch
from torch import Tensor, nn

from fastcm._checks import check_real


class DiffusersUNet(nn.Module):
    """``ConsistencyModel(DiffusersUNet(unet))`` trains and samples a diffusers ``UNet2DModel``.

    Args:
        unet: a diffusers model with ``config.in_channels == config.out_channels``, an int or (H, W)
            ``config.sample_size``, called as ``unet(sample, timestep, class_labels=...)`` returning ``.sample``
            (``UNet2DModel``; class-conditional with ``num_class_embeds``).
        timestep_scale: t = timestep_scale * c_noise (1000: diffusers' CM scheduler and the ADM/CM checkpoints).

    ``dropout_seed`` (fastcm's iCT passes one seed to the student and the teacher pass so their dropout masks agree):
    with active dropout (training, p > 0) the call runs under a forked RNG seeded with it, which reads the seed on
    the host (no ``torch.compile(fullgraph=True)`` then). Without dropout the seed is unused.
    """

    def __init__(self, unet: nn.Module, timestep_scale: float = 1000.0):
        super().__init__()
        config = getattr(unet, "config", None)
        if not isinstance(unet, nn.Module) or config is None or not hasattr(config, "in_channels") \
                or not hasattr(config, "sample_size"):
            raise TypeError(f"unet must be a diffusers UNet2DModel-like model with a config, got {type(unet).__name__}")
        if getattr(config, "out_channels", config.in_channels) != config.in_channels:
            raise ValueError(f"unet must predict as many channels as it reads, got in_channels={config.in_channels}, "
                             f"out_channels={config.out_channels}")
        self.unet, self.timestep_scale = unet, check_real("timestep_scale", timestep_scale, positive=True)

    @property
    def input_shape(self) -> tuple:
        size = self.unet.config.sample_size
        H, W = (size, size) if isinstance(size, numbers.Integral) else tuple(size)
        return (int(self.unet.config.in_channels), int(H), int(W))

    @property
    def num_classes(self) -> int:
        return int(getattr(self.unet.config, "num_class_embeds", None) or 0)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels=None, dropout_seed=None) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        t = self.timestep_scale * noise_labels
        if dropout_seed is None or not self._dropout_active():
            return self.unet(x.to(dtype), t, class_labels=class_labels).sample
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(dropout_seed))
            return self.unet(x.to(dtype), t, class_labels=class_labels).sample

    def _dropout_active(self) -> bool:
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.unet.modules())
