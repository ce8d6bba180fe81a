"""GroupNorm + scale/shift + SiLU: Triton (interpreted on CPU) and reference vs an fp64 F.group_norm/F.silu oracle."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcm.ops import REGISTRY, GroupNorm, group_norm, group_norm_ref
from helpers import assert_close


def _oracle(x, G, weight, bias, eps, scale, shift, act):
    """fp64 ground truth written from the definition with F.group_norm and F.silu."""
    d = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    y = F.group_norm(d(x), G, d(weight), d(bias), eps)
    per_nc = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + d(scale).view(per_nc))
    if shift is not None:
        y = y + d(shift).view(per_nc)
    return F.silu(y) if act == "silu" else y


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    r = lambda *s, std=1.0, off=0.0: (torch.randn(s, generator=g, dtype=torch.float64) * std + off).to(  # noqa
        device=device, dtype=dtype)
    return dict(x=r(*shape, off=0.5), weight=r(C, std=0.5, off=1.0), bias=r(C, std=0.5),
                scale=r(N, C, std=0.5), shift=r(N, C, std=0.5))


@pytest.mark.parametrize("act", [None, "silu"])
def test_reference_matches_oracle(act):
    t = _inputs((3, 8, 5, 5))
    out = group_norm_ref(t["x"], 4, t["weight"], t["bias"], 1e-5, t["scale"], t["shift"], act)
    assert_close(out, _oracle(t["x"], 4, t["weight"], t["bias"], 1e-5, t["scale"], t["shift"], act),
                 torch.float32, reduce_len=50)


def test_module_loads_nn_group_norm_state_dict():
    ref = nn.GroupNorm(4, 8)
    nn.init.normal_(ref.weight), nn.init.normal_(ref.bias)
    mod = GroupNorm(4, 8)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 3, 3)
    assert mod.impl == "auto"
    assert_close(mod(x), ref(x).detach().double(), torch.float32, reduce_len=18)
    assert set(GroupNorm(4, 8, affine=False).state_dict()) == set(nn.GroupNorm(4, 8, affine=False).state_dict())


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(num_groups=3), ValueError, "must divide the number of channels"),
        (dict(num_groups=0), ValueError, "num_groups must be a positive integer"),
        (dict(num_groups=2.0), ValueError, "num_groups must be a positive integer"),
        (dict(weight=torch.ones(7)), ValueError, "weight must have shape"),
        (dict(bias=torch.ones(4, 2)), ValueError, "bias must have shape"),
        (dict(scale=torch.ones(2, 7)), ValueError, "scale must have shape"),
        (dict(shift=torch.ones(8)), ValueError, "shift must have shape"),
        (dict(scale=torch.ones(3, 8)), ValueError, "scale must have shape"),
        (dict(x=torch.zeros(8)), ValueError, "x must have at least 2 dims"),
        (dict(x=torch.zeros(0, 8, 2)), ValueError, "x must not be empty"),
        (dict(x=torch.zeros(2, 8, 2, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        (dict(x="x"), TypeError, "x must be a torch.Tensor"),
        (dict(eps=0.0), ValueError, "eps must be a positive"),
        (dict(eps=float("nan")), ValueError, "eps must be a positive"),
        (dict(act="relu"), ValueError, "act must be one of"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(weight=torch.ones(8, device="meta")), ValueError, "all tensors must be on one device"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(x=torch.zeros(2, 8, 3), num_groups=4, weight=None, bias=None, scale=None, shift=None)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        group_norm(**args)


def test_module_bad_input():
    with pytest.raises(ValueError, match="must divide num_channels"):
        GroupNorm(3, 8)
    with pytest.raises(ValueError, match="act must be one of"):
        GroupNorm(4, 8, act="gelu")
    with pytest.raises(ValueError, match=r"x must have shape \(N, 8, ...\)"):
        GroupNorm(4, 8)(torch.zeros(2, 16, 3))


def test_registry_cases():
    spec = REGISTRY["group_norm"]
    assert spec.make_inputs.cases[0] == "tiny"
    kwargs = spec.make_inputs("tiny", requires_grad=False)
    assert_close(spec.ref(**kwargs), _oracle(**{k: v for k, v in kwargs.items() if k != "num_groups"},
                                              G=kwargs["num_groups"]), torch.float32, reduce_len=32)
