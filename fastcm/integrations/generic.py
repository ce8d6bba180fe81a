"""Generic route: every ``torch.nn.GroupNorm`` of a model becomes a :class:`fastcm.ops.GroupNorm` that shares its
``weight`` and ``bias`` Parameters (same names, same tensors: the state_dict and any optimizer stay valid)."""
from typing import Iterable, Tuple

from torch import nn

from fastcm.ops import GroupNorm

from .report import PatchState


def has_hooks(module: nn.Module) -> bool:
    """True when the module carries forward/backward hooks, which a replacement module would silently drop."""
    return any(getattr(module, name, None) for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                          "_backward_pre_hooks"))


def fast_group_norm(gn: nn.GroupNorm, impl: str) -> GroupNorm:
    """A fastcm GroupNorm computing exactly what ``gn`` computes, holding ``gn``'s own Parameters."""
    new = GroupNorm(gn.num_groups, gn.num_channels, gn.eps, affine=False)
    if gn.affine:
        new.affine, new.weight, new.bias = True, gn.weight, gn.bias
    new.impl = impl
    new.train(gn.training)
    return new


def patch_group_norms(model: nn.Module, impl: str, state: PatchState, skip: Iterable[int] = ()) -> None:
    """Swap every exact ``nn.GroupNorm`` below ``model`` (not ``model`` itself) except the ids in ``skip``.

    A GroupNorm reachable under several names (shared) gets one replacement, set under each name."""
    skip, done = set(skip), {}
    if type(model) is nn.GroupNorm:
        state.report.left_alone.append(("", "the model itself is an nn.GroupNorm: patch the module holding it"))
    for name, parent, child_name, child in _children(model):
        if not isinstance(child, nn.GroupNorm) or id(child) in skip:
            continue
        if id(child) not in done:
            why = _unsupported(child)
            if why:
                state.report.left_alone.append((name, why))
                skip.add(id(child))
                continue
            done[id(child)] = fast_group_norm(child, impl)
            state.report.replaced.append((name, "nn.GroupNorm -> fastcm.ops.GroupNorm"))
        setattr(parent, child_name, done[id(child)])
        state.undo.append(("module", parent, child_name, child, done[id(child)]))


def _unsupported(gn: nn.GroupNorm) -> str:
    if type(gn) is not nn.GroupNorm:
        return f"{type(gn).__name__} subclasses nn.GroupNorm (its forward may differ)"
    if has_hooks(gn):
        return "nn.GroupNorm with hooks (a replacement would drop them)"
    return ""


def _children(model: nn.Module) -> Iterable[Tuple[str, nn.Module, str, nn.Module]]:
    """(qualified name, parent, attribute name, child) for every parent-child edge below ``model``."""
    for parent_name, parent in list(model.named_modules()):
        # _modules, not named_children(): that one hides a module's second name (a GroupNorm shared by two names)
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            yield (f"{parent_name}.{child_name}" if parent_name else child_name), parent, child_name, child
