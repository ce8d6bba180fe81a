"""diffusers attention on ``fastcm.ops.attention``: :class:`FastcmAttnProcessor` and how :func:`fastcm.patch` sets it.

Every ``Attention`` layer whose processor is diffusers' default ``AttnProcessor2_0`` gets a FastcmAttnProcessor,
set through the model's ``set_attn_processor`` (diffusers' AttentionMixin) or ``Attention.set_processor``. The
model's own ``set_default_attn_processor`` and ``fuse_qkv_projections`` keep working on a patched model: the patch
shadows them on the instance (undone by :func:`fastcm.unpatch`), see :class:`ModelMethod`.
"""
from typing import Optional

import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0
from torch import Tensor, nn

from fastcm._checks import IMPLS, check_choice
from fastcm.ops import attention
from fastcm.ops._utils import resolve_impl
from fastcm.ops.attention import MAX_HEAD_DIM

REPLACED = "AttnProcessor2_0 -> FastcmAttnProcessor"


class FastcmAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` (and, after ``fuse_qkv_projections``, ``FusedAttnProcessor2_0``) with
    ``fastcm.ops.attention`` in place of SDPA.

    Self-attention (4-D feature maps or (B, L, C) tokens) and cross-attention (``encoder_hidden_states`` with
    Lk != Lq); wrapping a ``FusedAttnProcessor2_0``, the fused ``to_qkv`` / ``to_kv`` projections. The softmax scale is SDPA's default
    1/sqrt(head_dim), as in AttnProcessor2_0. Calls with an ``attention_mask`` (or diffusers' deprecated positional
    ``scale``) run on ``original``, the layer's previous processor (default: a new ``AttnProcessor2_0``, which is
    what diffusers' ``proc.__class__()`` re-creation, e.g. in IP-Adapter loading, gets). ``impl`` is passed to the
    fastcm ops; where it resolves to "torch" (CPU with "auto") the attention itself runs on torch's SDPA, as
    ``AttnProcessor2_0`` does, so that a patched model costs a CPU user nothing (the eager reference
    ``attention_ref`` materialises the Lq x Lk scores).
    """

    def __init__(self, original=None, impl: str = "auto"):
        check_choice("impl", impl, IMPLS)
        self.original, self.impl = (AttnProcessor2_0() if original is None else original), impl

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        if attention_mask is not None or len(args) > 0 or kwargs.get("scale", None) is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            if attn.group_norm is not None:  # GN over (B, C, H, W) = GN over the (B, C, H*W) view, without a copy
                hidden_states = attn.group_norm(hidden_states)
            hidden_states = hidden_states.reshape(batch_size, channel, height * width).transpose(1, 2)
        elif attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        fused = type(self.original) is FusedAttnProcessor2_0  # set by fuse_qkv_projections (see ModelMethod)
        query, key, value = _project(attn, hidden_states, encoder_hidden_states, fused)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                             for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if resolve_impl(self.impl, query) == "torch":
            hidden_states = F.scaled_dot_product_attention(query, key, value)
        else:
            hidden_states = attention(query, key, value, impl=self.impl)  # (B, heads, Lq, head_dim)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))  # linear proj, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _project(attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor], fused: bool):
    """q, k, v; with ``fused``, through ``Attention.fuse_projections``' ``to_qkv`` / ``to_kv`` where the layer has
    them, as FusedAttnProcessor2_0 does (they are copies made at fusing time)."""
    if encoder_hidden_states is None:
        if fused and hasattr(attn, "to_qkv"):
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query = attn.to_q(hidden_states)
    if fused and hasattr(attn, "to_kv"):
        return (query, *attn.to_kv(encoder_hidden_states).chunk(2, dim=-1))
    return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)


# ----------------------------------------------------------------------------------------------------------------
# Patching and undoing it.

def patch_attention(model: nn.Module, impl: str, state) -> None:
    """Give every ``Attention`` layer running ``AttnProcessor2_0`` a :class:`FastcmAttnProcessor`."""
    new = {}
    for name, attn in model.named_modules():
        if not isinstance(attn, Attention):
            continue
        proc = attn.get_processor()
        if isinstance(proc, FastcmAttnProcessor):
            continue
        if type(proc) is not AttnProcessor2_0:
            state.report.left_alone.append((name, f"Attention with processor {type(proc).__name__} "
                                                  "(only AttnProcessor2_0 is replaced)"))
            continue
        new[name] = FastcmAttnProcessor(proc, impl)
        state.report.replaced.append((name, REPLACED))
        state.report.notes.append((name, "calls with an attention_mask run on AttnProcessor2_0 "
                                         "(fastcm attention takes no mask)"))
        head_dim = attn.inner_kv_dim // attn.heads
        if head_dim > MAX_HEAD_DIM:
            state.report.notes.append((name, f"head dim {head_dim} > {MAX_HEAD_DIM}: fastcm.ops.attention "
                                             "runs torch SDPA here (its documented fallback)"))
    if not new:
        return
    modules = dict(model.named_modules())
    if _has_mixin(model):
        every = dict(model.attn_processors)  # keys "<layer>.processor"
        every.update({f"{name}.processor": proc for name, proc in new.items()})
        model.set_attn_processor(every)
    else:
        for name, proc in new.items():
            modules[name].set_processor(proc)
    state.undo.append(("processors", model))
    for method in ("set_default_attn_processor", "fuse_qkv_projections"):
        if callable(getattr(type(model), method, None)):
            model.__dict__[method] = ModelMethod(model, method, impl)
            state.undo.append(("attr", model, method))


def _has_mixin(model: nn.Module) -> bool:
    return hasattr(model, "set_attn_processor") and hasattr(model, "attn_processors")


def restore_processors(model: nn.Module) -> None:
    """Every FastcmAttnProcessor below ``model`` back to the processor it wraps; other processors stay."""
    if _has_mixin(model):
        every = dict(model.attn_processors)
        if any(isinstance(p, FastcmAttnProcessor) for p in every.values()):
            model.set_attn_processor({k: p.original if isinstance(p, FastcmAttnProcessor) else p
                                      for k, p in every.items()})
        return
    for layer in model.modules():
        if isinstance(layer, Attention) and isinstance(layer.get_processor(), FastcmAttnProcessor):
            layer.set_processor(layer.get_processor().original)


class ModelMethod:
    """A patched model's ``set_default_attn_processor`` / ``fuse_qkv_projections`` (shadowing the class's).

    * ``set_default_attn_processor()``: the FastcmAttnProcessors go back to what they wrap, then diffusers' method
      runs (it refuses processors it does not know): the model gets diffusers' default processor, as asked.
    * ``fuse_qkv_projections()``: diffusers' method fuses the projections and sets ``FusedAttnProcessor2_0``; each
      of those is then wrapped in a FastcmAttnProcessor (which reads the fused projections), so fastcm attention
      stays; ``unfuse_qkv_projections()`` restores the processors saved before fusing, fastcm's.
    A plain object holding the model (not a closure), so pickle and ``copy.deepcopy`` carry it onto the copy.
    """

    def __init__(self, model: nn.Module, name: str, impl: str):
        self.model, self.name, self.impl = model, name, impl

    def __call__(self, *args, **kwargs):
        if self.name == "set_default_attn_processor":
            restore_processors(self.model)
        out = getattr(type(self.model), self.name)(self.model, *args, **kwargs)
        if self.name == "fuse_qkv_projections":
            every = dict(self.model.attn_processors)
            self.model.set_attn_processor({
                k: FastcmAttnProcessor(p, self.impl) if type(p) is FusedAttnProcessor2_0 else p
                for k, p in every.items()})
        return out
