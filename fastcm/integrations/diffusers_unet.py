"""diffusers route: fused GroupNorm -> SiLU in ``ResnetBlock2D`` and fastcm attention as an attention processor.

* ``ResnetBlock2D`` (UNet2DModel, UNet2DConditionModel and their down/mid/up blocks): the instance's class becomes
  :class:`FusedResnetBlock2D`, a subclass whose forward is diffusers' own with each GroupNorm -> SiLU pair run as
  one ``fastcm.ops.group_norm(..., act="silu")``, and with ``time_embedding_norm="scale_shift"`` the
  ``SiLU(GN(h) * (1 + scale) + shift)`` of ADM's scale-shift norm (Dhariwal & Nichol 2021, Sec. 3) as one call with
  per-sample (N, C) scale and shift. Parameters, buffers and submodules are untouched.
* ``Attention`` layers whose processor is diffusers' default ``AttnProcessor2_0`` get a
  :class:`FastcmAttnProcessor` (:mod:`fastcm.integrations.diffusers_attn`): self- and cross-attention. A call with
  an ``attention_mask`` runs on the layer's original processor (fastcm's attention takes no mask).

Both re-implement diffusers code, so they are tied to it: the sources of ``ResnetBlock2D.forward`` and
``AttnProcessor2_0.__call__`` must match the versions this was tested with, else :func:`check_diffusers` raises.
"""
import hashlib
import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from diffusers.models.resnet import ResnetBlock2D

from fastcm.ops import group_norm

from .diffusers_attn import FastcmAttnProcessor, patch_attention, restore_processors  # noqa: F401 (public here)

MIN_VERSION = (0, 42, 1)  # the oldest diffusers the tests ran with
# sha256 of the whitespace-stripped, comment-line-free source of each re-implemented diffusers function -> the
# diffusers versions it was read and tested in.
TESTED_SOURCES = {
    "ResnetBlock2D.forward": {"40d2e36e0db55322bd131241fa041f7e68a2bef092fd1b8e41158558950c81d0": "0.42.1"},
    "AttnProcessor2_0.__call__": {"bdc4598ae6863e3c368eaa785d4e0637a2e7609f34e2724a4e97e3806ba68978": "0.42.1"},
}


def source_digest(fn) -> str:
    """sha256 of ``fn``'s source with blank and comment-only lines dropped and each line stripped."""
    lines = (line.strip() for line in inspect.getsource(fn).splitlines())
    text = "\n".join(line for line in lines if line and not line.startswith("#"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_diffusers():
    """The diffusers module, after checking its version and the sources fastcm re-implements (one-line errors)."""
    import diffusers
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    version = diffusers.__version__
    numbers = tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:3])
    if numbers < MIN_VERSION:
        raise RuntimeError(f"fastcm.patch: diffusers {version} is not supported (needs >= "
                           f"{'.'.join(map(str, MIN_VERSION))}); upgrade diffusers or pass ops=()")
    for name, fn in (("ResnetBlock2D.forward", ResnetBlock2D.forward),
                     ("AttnProcessor2_0.__call__", AttnProcessor2_0.__call__)):
        if source_digest(fn) not in TESTED_SOURCES[name]:
            tested = ", ".join(sorted(set(TESTED_SOURCES[name].values())))
            raise RuntimeError(f"fastcm.patch: diffusers {version} changed {name} (fastcm re-implements the one of "
                               f"diffusers {tested}); unsupported diffusers version")
    return diffusers


def _gn_silu(norm: nn.Module, x: Tensor, impl: str, scale: Optional[Tensor] = None,
             shift: Optional[Tensor] = None) -> Tensor:
    """SiLU((GN(x) * weight + bias) * (1 + scale) + shift) in one call, with ``norm``'s parameters."""
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, scale, shift, act="silu", impl=impl)


class FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D.forward (0.42) with fused GroupNorm -> SiLU (see the module docstring).

    :func:`fastcm.patch` sets it as the ``__class__`` of an existing ResnetBlock2D (no new module, no copied
    tensor) with ``_fastcm_impl``; a module-level class, so a patched model pickles (``torch.save(model)``)."""

    def forward(self, input_tensor: Tensor, temb: Tensor, *args, **kwargs) -> Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:  # deprecated argument: diffusers warns
            return ResnetBlock2D.forward(self, input_tensor, temb, *args, **kwargs)
        impl = self._fastcm_impl
        hidden_states = _gn_silu(self.norm1, input_tensor, impl)  # norm1 -> nonlinearity
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        hidden_states = self._fastcm_norm2_act(hidden_states, temb, impl)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor

    def _fastcm_norm2_act(self, h: Tensor, temb: Optional[Tensor], impl: str) -> Tensor:
        """norm2 (+ time embedding) -> nonlinearity, the three branches of diffusers' forward: "default" adds temb
        (if any), "scale_shift" modulates, any other time_embedding_norm (e.g. the VAE decoder's "group", built with
        temb_channels=None) is a plain norm2 whatever temb is."""
        if self.time_embedding_norm == "default":
            if temb is not None:
                h = h + temb
            return _gn_silu(self.norm2, h, impl)
        if self.time_embedding_norm != "scale_shift":
            return _gn_silu(self.norm2, h, impl)
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        N, C = h.shape[:2]
        if time_scale.shape == (N, C, 1, 1):  # ADM scale-shift norm: per-sample (N, C) modulation, one call
            return _gn_silu(self.norm2, h, impl, time_scale.flatten(1), time_shift.flatten(1))
        # a spatial / other-shaped temb (time_emb_proj=None): broadcast as diffusers does, then SiLU
        h = group_norm(h, self.norm2.num_groups, self.norm2.weight, self.norm2.bias, self.norm2.eps, impl=impl)
        return self.nonlinearity(h * (1 + time_scale) + time_shift)


# ----------------------------------------------------------------------------------------------------------------
# Patching: walk the model, record an undo action for every change, report what was left alone and why.

def _norm_ok(norm) -> bool:
    from fastcm.ops import GroupNorm

    return type(norm) is nn.GroupNorm or (type(norm) is GroupNorm and norm.act is None)


def patch_resnets(model: nn.Module, impl: str, state) -> set:
    """Fuse every exact ``ResnetBlock2D`` below (or at) ``model``; returns the ids of the GroupNorms it fused."""
    from .generic import has_hooks

    fused, Fused = set(), FusedResnetBlock2D
    for name, block in model.named_modules():
        if not isinstance(block, ResnetBlock2D) or type(block) is Fused:
            continue
        why = ""
        if type(block) is not ResnetBlock2D:
            why = f"{type(block).__name__} subclasses ResnetBlock2D (its forward may differ)"
        elif type(block.nonlinearity) is not nn.SiLU:
            why = f"ResnetBlock2D with non_linearity {type(block.nonlinearity).__name__} (only SiLU is fused)"
        elif not (_norm_ok(block.norm1) and _norm_ok(block.norm2)):
            why = "ResnetBlock2D whose norm1/norm2 are not plain GroupNorms"
        elif has_hooks(block) or has_hooks(block.norm1) or has_hooks(block.norm2) or has_hooks(block.nonlinearity):
            why = "ResnetBlock2D with hooks on it, its norms or its activation (fusing would skip them)"
        if why:
            state.report.left_alone.append((name, why))
            continue
        block.__class__, block._fastcm_impl = Fused, impl
        state.undo.append(("class", block, ResnetBlock2D))
        kind = block.time_embedding_norm
        state.report.replaced.append((name, f"ResnetBlock2D -> FusedResnetBlock2D (2 GroupNorm+SiLU, {kind})"))
        fused.update((id(block.norm1), id(block.norm2)))
    return fused
