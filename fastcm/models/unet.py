"""Compact U-Net for consistency models: NCSN++/DDPM++-style layout (CIFAR-10, iCT) and ADM-style (ImageNet 64).

The network computes F(x_in, noise_labels, class_labels); it never sees sigma (fastcm.cm.ConsistencyModel owns
c_in, c_noise, c_skip, c_out). Residual blocks: GroupNorm + SiLU, conv, GroupNorm * (1 + scale) + shift + SiLU from
the noise/class embedding (ADM's scale-shift norm), seeded dropout, conv; the sum with the skip path is scaled by
1/sqrt(2) (NCSN++ skip_rescale), and so is the sum with self-attention. Every GroupNorm and attention goes through
fastcm.ops with the config's ``impl``.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcm.nn import SeededDropout
from fastcm.ops import GroupNorm, qkv_attention
from fastcm._checks import IMPLS, check_bool, check_choice, check_int, check_real, check_tensor, is_int, is_real

EMBEDDINGS = ("fourier", "positional")


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines a U-Net; JSON-serializable (``dataclasses.asdict``; rebuild with ``UNetConfig(**d)``)."""

    img_resolution: int = 32                   # H = W of the images
    in_channels: int = 3                       # image channels (the output has as many)
    model_channels: int = 128                  # base width; level l has model_channels * channel_mult[l]
    channel_mult: tuple = (2, 2, 2)            # one entry per level; level l runs at img_resolution / 2**l
    num_blocks: int = 4                        # residual blocks per encoder level (the decoder has one more)
    attn_resolutions: tuple = (16,)            # resolutions with self-attention after every residual block
    mid_attention: bool = True                 # self-attention in the middle block (NCSN++ and ADM have it)
    channels_per_head: Optional[int] = None    # attention head width; None = a single head
    dropout: float = 0.0                       # dropout probability inside residual blocks (iCT CIFAR-10: 0.3)
    dropout_max_resolution: Optional[int] = None  # dropout only at resolutions <= this; None = everywhere
    num_classes: int = 0                       # 0 = unconditional; else a label embedding is added to the noise one
    embedding: str = "fourier"                 # noise embedding: "fourier" (NCSN++) or "positional" (ADM)
    fourier_scale: float = 16.0                # std of the Fourier frequencies (CM: 16, iCT: 0.02)
    time_inputs: int = 1                       # 1: noise_labels (B,); 2: (B, 2), e.g. MeanFlow's (t, t - r)
    time_scale: Optional[float] = None         # labels multiplier before the embedding; None = 1000 for
    #                                            "positional" (ADM timesteps), 1 for "fourier"; sCT (TrigFlow) uses 1
    num_groups: int = 32                       # GroupNorm groups (must divide every width)
    impl: str = "auto"                         # backend of every fastcm op: "auto", "triton" or "torch"

    def __post_init__(self):
        for name in ("channel_mult", "attn_resolutions"):  # JSON gives lists; keep the dataclass hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _validate_config(self)

    def widths(self) -> tuple:
        return tuple(self.model_channels * m for m in self.channel_mult)


def _validate_config(c: UNetConfig) -> None:
    for name in ("img_resolution", "in_channels", "model_channels", "num_blocks", "num_groups"):
        check_int(name, getattr(c, name))
    if not c.channel_mult or not all(is_int(m, 1) for m in c.channel_mult):
        raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {c.channel_mult!r}")
    if c.img_resolution % 2 ** (len(c.channel_mult) - 1):
        raise ValueError(f"img_resolution={c.img_resolution} must be divisible by 2**(levels-1) = "
                         f"{2 ** (len(c.channel_mult) - 1)}")
    if not all(is_int(r, 1) for r in c.attn_resolutions):
        raise ValueError(f"attn_resolutions must be positive ints, got {c.attn_resolutions!r}")
    for w in (c.model_channels, *c.widths()):
        if w % c.num_groups:
            raise ValueError(f"num_groups={c.num_groups} must divide every width, not {w}")
        if c.channels_per_head is not None and (not is_int(c.channels_per_head, 1) or w % c.channels_per_head):
            raise ValueError(f"channels_per_head={c.channels_per_head!r} must be a positive int dividing {w}")
    if c.model_channels % 2:
        raise ValueError(f"model_channels must be even (cos/sin embedding halves), got {c.model_channels}")
    if not (is_real(c.dropout) and 0 <= c.dropout < 1):
        raise ValueError(f"dropout must be in [0, 1), got {c.dropout!r}")
    if c.dropout_max_resolution is not None:
        check_int("dropout_max_resolution", c.dropout_max_resolution)
    check_int("num_classes", c.num_classes, minimum=0)
    if c.embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {c.embedding!r}")
    check_real("fourier_scale", c.fourier_scale, positive=True)
    if c.impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {c.impl!r}")
    check_bool("mid_attention", c.mid_attention)
    _validate_time_input(c)


def _validate_time_input(c: UNetConfig) -> None:
    if not is_int(c.time_inputs) or c.time_inputs not in (1, 2):
        raise ValueError(f"time_inputs must be 1 or 2, got {c.time_inputs!r}")
    if c.time_scale is not None and not (is_real(c.time_scale) and c.time_scale > 0):
        raise ValueError(f"time_scale must be None or a positive finite number, got {c.time_scale!r}")


PRESETS = {
    # Unit tests: every feature (attention, dropout, Fourier embedding, two levels) at 1x8x8.
    "tiny": UNetConfig(img_resolution=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                       attn_resolutions=(4,), dropout=0.1, fourier_scale=0.02, num_groups=4),
    # The digits network (measured on this project's 2-core CPU): 8x8 -> 4x4, 32 base channels, GroupNorm(8), positional embedding.
    "digits": UNetConfig(img_resolution=8, in_channels=1, model_channels=32, channel_mult=(1, 1), num_blocks=2,
                         attn_resolutions=(), mid_attention=False, num_classes=10, embedding="positional",
                         num_groups=8),
    # CPU-benchmark-sized CIFAR-10 network with iCT's choices (Fourier 0.02, dropout 0.3, attention at 16).
    "cifar10-small": UNetConfig(img_resolution=32, in_channels=3, model_channels=64, channel_mult=(1, 2, 2),
                                num_blocks=2, attn_resolutions=(16,), dropout=0.3, fourier_scale=0.02),
    # iCT CIFAR-10 (NCSN++ widths): 128 channels, mult (2,2,2), 4 blocks, attention at 16, dropout 0.3, Fourier 0.02.
    "cifar10": UNetConfig(img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                          attn_resolutions=(16,), dropout=0.3, fourier_scale=0.02),
    # ADM ImageNet 64 (iCT keeps it): 192 channels, mult (1,2,3,4), 3 blocks, attention at 32/16/8 with 64 channels
    # per head, positional embedding, 1000 classes; dropout 0.2 only at resolutions <= 16 (unverified, see sCM App. G).
    "imagenet64": UNetConfig(img_resolution=64, in_channels=3, model_channels=192, channel_mult=(1, 2, 3, 4),
                             num_blocks=3, attn_resolutions=(32, 16, 8), channels_per_head=64, dropout=0.2,
                             dropout_max_resolution=16, num_classes=1000, embedding="positional"),
}


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialize the last layer of a residual branch, so each block starts as its skip path (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Block(nn.Module):
    """Residual block with optional down/up-sampling (BigGAN/ADM ``resblock_updown``) and self-attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, cfg: UNetConfig, layer_id: int, dropout: float,
                 resample: Optional[str] = None, attention: bool = False):
        super().__init__()
        self.in_ch, self.out_ch, self.resample = in_ch, out_ch, resample
        self.norm0 = GroupNorm(cfg.num_groups, in_ch, act="silu")
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine = nn.Linear(emb_ch, 2 * out_ch)  # -> (scale, shift) of the second GroupNorm
        self.norm1 = GroupNorm(cfg.num_groups, out_ch, act="silu")
        self.dropout = SeededDropout(dropout, layer_id)
        self.conv1 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.num_heads = 0
        if attention:
            self.num_heads = out_ch // cfg.channels_per_head if cfg.channels_per_head else 1
            self.norm2 = GroupNorm(cfg.num_groups, out_ch)
            self.qkv = nn.Conv2d(out_ch, 3 * out_ch, 1)  # channels ordered (3, heads, head_dim): qkv_attention
            self.proj = _zero(nn.Conv2d(out_ch, out_ch, 1))

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor, dropout_seed=None, impl: str = "auto") -> Tensor:
        """``impl``: the ops backend, which the owning UNet passes from its config (the one place it lives)."""
        h = self.conv0(self._resample(self.norm0(x, impl=impl)))
        scale, shift = self.affine(emb).to(h.dtype).chunk(2, dim=1)
        h = self.norm1(h, scale.contiguous(), shift.contiguous(), impl=impl)
        h = self.conv1(self.dropout(h, dropout_seed))
        x = self._resample(x)
        x = (h + (self.skip(x) if self.skip is not None else x)) * (1 / math.sqrt(2))
        if self.num_heads:
            a = qkv_attention(self.qkv(self.norm2(x, impl=impl)), self.num_heads, impl=impl)
            x = (x + self.proj(a)) * (1 / math.sqrt(2))
        return x


class UNet(nn.Module):
    """``forward(x, noise_labels, class_labels=None, dropout_seed=None)`` -> F(x), same shape as x.

    x: (B, C, H, W) = (B, *input_shape); noise_labels: (B,) floating (c_noise = ln(sigma) / 4 from the
    preconditioning; t for TrigFlow), or (B, 2) when ``config.time_inputs == 2`` (MeanFlow: (t, t - r));
    class_labels: (B,) int64 in [0, num_classes) for a conditional net, else None;
    dropout_seed: int64 tensor shared by the passes that must see one dropout mask (see fastcm.nn).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = cfg = config
        C0, emb_ch, R = cfg.model_channels, 4 * cfg.model_channels, cfg.img_resolution
        half = C0 // 2
        if cfg.embedding == "fourier":  # Gaussian Fourier features (NCSN++): fixed random frequencies ~ N(0, s^2)
            freqs = torch.randn(half) * cfg.fourier_scale * (2 * math.pi)
        else:  # ADM sinusoidal timestep embedding with max period 10000
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs)
        # time_inputs = 2: each label gets the same cos/sin features, concatenated (MeanFlow's (t, t - r) embedding)
        self.map0, self.map1 = nn.Linear(C0 * cfg.time_inputs, emb_ch), nn.Linear(emb_ch, emb_ch)
        self.label = nn.Embedding(cfg.num_classes, emb_ch) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, C0, 3, padding=1)
        blocks = []

        def block(cin, cout, res, **kw):
            p = cfg.dropout if cfg.dropout_max_resolution is None or res <= cfg.dropout_max_resolution else 0.0
            blocks.append(Block(cin, cout, emb_ch, cfg, len(blocks), p, **kw))
            return blocks[-1]

        self.enc, skips, ch = nn.ModuleList(), [C0], C0
        for level, width in enumerate(cfg.widths()):
            res = R >> level
            if level > 0:
                self.enc.append(block(ch, ch, res, resample="down"))
                skips.append(ch)
            for _ in range(cfg.num_blocks):
                self.enc.append(block(ch, width, res, attention=res in cfg.attn_resolutions))
                ch = width
                skips.append(ch)
        self.dec = nn.ModuleList()
        for level, width in reversed(list(enumerate(cfg.widths()))):
            res = R >> level
            if level == len(cfg.channel_mult) - 1:  # middle: two blocks at the lowest resolution
                self.dec.append(block(ch, ch, res, attention=cfg.mid_attention))
                self.dec.append(block(ch, ch, res))
            else:
                self.dec.append(block(ch, ch, res, resample="up"))
            for _ in range(cfg.num_blocks + 1):  # each consumes one encoder skip (concatenated)
                self.dec.append(block(ch + skips.pop(), width, res, attention=res in cfg.attn_resolutions))
                ch = width
        self.norm_out = GroupNorm(cfg.num_groups, ch, act="silu")
        self.conv_out = _zero(nn.Conv2d(ch, cfg.in_channels, 3, padding=1))

    @property
    def input_shape(self) -> tuple:
        return (self.config.in_channels, self.config.img_resolution, self.config.img_resolution)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def set_impl(self, impl: str) -> "UNet":
        """Switch the backend of every op in place: ``config.impl`` is the one place the net reads it from (each
        forward passes it to its blocks). ``fastcm.ops.use_impl`` overrides it for a block of code."""
        check_choice("impl", impl, IMPLS)
        self.config = dataclasses.replace(self.config, impl=impl)
        return self

    @property
    def time_scale(self) -> float:
        """Multiplier of the noise labels before the embedding (ADM's 0..1000 timestep scale for "positional")."""
        if self.config.time_scale is not None:
            return float(self.config.time_scale)
        return 1000.0 if self.config.embedding == "positional" else 1.0

    def embed(self, noise_labels: Tensor, class_labels: Optional[Tensor]) -> Tensor:
        # fp32 at least, fp64 kept (so fp64 finite differences in t resolve); (B,) or (B, 2) -> (B, k, 1)
        t = noise_labels.to(torch.promote_types(noise_labels.dtype, torch.float32)) * self.time_scale
        args = t.reshape(t.shape[0], -1, 1) * self.freqs
        feats = torch.cat([args.cos(), args.sin()], dim=2).flatten(1)  # [cos t, sin t(, cos h, sin h)]
        emb = self.map1(F.silu(self.map0(feats.to(self.map0.weight.dtype))))
        if self.label is not None:
            emb = emb + self.label(class_labels)
        return F.silu(emb)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor] = None,
                dropout_seed: Optional[Union[int, Tensor]] = None) -> Tensor:
        check_tensor("x", x, shape=(None, *self.input_shape))
        k = self.config.time_inputs
        check_tensor("noise_labels", noise_labels, shape=(x.shape[0],) if k == 1 else (x.shape[0], k))
        if self.label is not None:
            if class_labels is None:
                raise ValueError(f"class_labels are required: the model has num_classes={self.num_classes}")
            check_tensor("class_labels", class_labels, dtypes=(torch.int64, torch.int32), shape=(x.shape[0],))
        elif class_labels is not None:
            raise ValueError("class_labels given but the model is unconditional (num_classes == 0)")
        emb = self.embed(noise_labels, class_labels)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        skips = [h]
        impl = self.config.impl
        for blk in self.enc:
            h = blk(h, emb, dropout_seed, impl)
            skips.append(h)
        for blk in self.dec:
            if blk.in_ch != h.shape[1]:
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb, dropout_seed, impl)
        return self.conv_out(self.norm_out(h, impl=impl))


def build_unet(preset_or_config: Union[str, UNetConfig, Mapping] = "cifar10", **overrides) -> UNet:
    """Build a U-Net from a preset name (see ``PRESETS``), a UNetConfig or a config dict, with field overrides,
    e.g. ``build_unet("cifar10", dropout=0.2, impl="torch")``."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown preset {preset_or_config!r}; choose one of {tuple(PRESETS)}")
        cfg = PRESETS[preset_or_config]
    elif isinstance(preset_or_config, UNetConfig):
        cfg = preset_or_config
    elif isinstance(preset_or_config, Mapping):
        cfg = _from_dict(dict(preset_or_config))
    else:
        raise TypeError(f"preset_or_config must be a preset name, a UNetConfig or a dict, "
                        f"got {type(preset_or_config).__name__}")
    if overrides:
        cfg = _from_dict({**dataclasses.asdict(cfg), **overrides})
    return UNet(cfg)


def _from_dict(d: dict) -> UNetConfig:
    unknown = set(d) - {f.name for f in dataclasses.fields(UNetConfig)}
    if unknown:
        raise ValueError(f"unknown UNetConfig field(s) {sorted(unknown)}")
    return UNetConfig(**d)
