"""The op calls a U-Net preset makes, found by running its forward on ``meta`` tensors (no data, no kernels).

A call is the op's keyword arguments, tensors on ``meta`` with the real shapes, strides, dtype and
``requires_grad``: what ``OpSpec.aot_jobs`` (the compile gate) and ``OpSpec.min_work`` (the kernel-work report)
take. Calls beyond a forward (the loss on the image batch, an FID's covariance) come from each op's ``aot_calls``.
"""
import collections
from typing import Dict, List, Tuple

import torch

from fastcm.models import PRESETS, build_unet


def _key(call: dict) -> tuple:
    return tuple((k, (tuple(v.shape), v.stride(), v.dtype) if isinstance(v, torch.Tensor) else v)
                 for k, v in sorted(call.items()))


def forward_calls(preset: str, batch: int) -> Dict[str, List[Tuple[dict, int]]]:
    """``{op name: [(call, times per forward), ...]}`` of one forward of the preset's U-Net at ``batch``, for the
    registry's ``group_norm`` and ``qkv_attention``: forward pre-hooks on the GroupNorm modules, forward hooks on
    the ``qkv`` projections of the attention blocks (whose output is ``qkv_attention``'s input)."""
    with torch.device("meta"):
        net = build_unet(preset, impl="torch").train()
    counts: Dict[str, collections.OrderedDict] = {"group_norm": collections.OrderedDict(),
                                                   "qkv_attention": collections.OrderedDict()}

    def add(op, call):
        entry = counts[op].setdefault(_key(call), [call, 0])
        entry[1] += 1

    def gn_hook(mod, args, kwargs):
        scale = args[1] if len(args) > 1 else kwargs.get("scale")
        shift = args[2] if len(args) > 2 else kwargs.get("shift")
        add("group_norm", dict(x=args[0], num_groups=mod.num_groups, weight=mod.weight, bias=mod.bias, eps=mod.eps,
                               scale=scale, shift=shift, act=mod.act))

    def qkv_hook(heads):
        return lambda mod, args, out: add("qkv_attention", dict(qkv=out, num_heads=heads))

    hooks = []
    for m in net.modules():
        if type(m).__name__ == "GroupNorm":
            hooks.append(m.register_forward_pre_hook(gn_hook, with_kwargs=True))
        if getattr(m, "num_heads", 0) and hasattr(m, "qkv"):
            hooks.append(m.qkv.register_forward_hook(qkv_hook(m.num_heads)))
    try:
        c, r = net.input_shape[0], net.input_shape[1]
        labels = torch.zeros(batch, dtype=torch.int64, device="meta") if net.num_classes else None
        x = torch.empty(batch, c, r, r, device="meta", requires_grad=True)
        net(x, torch.empty(batch, device="meta"), labels)
    finally:
        for h in hooks:
            h.remove()
    return {op: [tuple(v) for v in calls.values()] for op, calls in counts.items()}


def image_shape(preset: str, batch: int) -> tuple:
    cfg = PRESETS[preset]
    return batch, cfg.in_channels, cfg.img_resolution, cfg.img_resolution


def preset_calls(preset: str, batch: int, registry=None) -> Dict[str, List[Tuple[dict, int]]]:
    """Every registry op's calls at a preset: those of a U-Net forward, then each op's ``aot_calls`` on the image
    batch (once each)."""
    if registry is None:
        from fastcm.ops import REGISTRY as registry
    calls = forward_calls(preset, batch)
    for name, spec in registry.items():
        if spec.aot_calls is not None:
            calls.setdefault(name, []).extend((c, 1) for c in spec.aot_calls(image_shape(preset, batch)))
    return {name: calls[name] for name in registry if calls.get(name)}
