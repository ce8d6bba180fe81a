"""GroupNorm + scale/shift + SiLU: Triton (interpreted on CPU) and reference vs an fp64 F.group_norm/F.silu oracle.

Kernel grids are kept small (the interpreter costs several ms per program): U-Net shapes run at batch 1.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcm.kernels.group_norm as K
from fastcm.ops import REGISTRY, GroupNorm, group_norm, group_norm_ref
from helpers import assert_close, tolerances

PARAMS = ("weight", "bias", "scale", "shift")


def _oracle(x, G, weight=None, bias=None, eps=1e-5, scale=None, shift=None, act=None):
    """fp64 ground truth from the definition, with F.group_norm and F.silu (autograd gives the gradients)."""
    N = x.shape[0]
    per_nc = (N, x.shape[1]) + (1,) * (x.dim() - 2)
    # F.group_norm rejects a batch of one with one-element groups ("more than 1 value per channel"); statistics are
    # per sample, so normalising the batch twice over and keeping the first copy is the same function.
    y = F.group_norm(torch.cat([x, x]) if N == 1 else x, G, weight, bias if weight is not None else None, eps)[:N]
    if weight is None and bias is not None:  # aten's backward fails for a bias without a weight (torch 2.13 CPU)
        y = y + bias.view(1, -1, *per_nc[2:])
    if scale is not None:
        y = y * (1 + scale.view(per_nc))
    if shift is not None:
        y = y + shift.view(per_nc)
    return F.silu(y) if act == "silu" else y


def _inputs(shape, dtype=torch.float32, offset=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    r = lambda *s, std=1.0, off=0.0: (torch.randn(s, generator=g, dtype=torch.float64) * std + off).to(dtype)  # noqa
    return dict(x=r(*shape, off=offset), weight=r(C, std=0.5, off=1.0), bias=r(C, std=0.5),
                scale=r(N, C, std=0.5), shift=r(N, C, std=0.5))


def _check(shape, G, dtype=torch.float32, *, use=PARAMS, act="silu", channels_last=False, chunk=None, offset=0.5,
           param_dtype=None, sum_backward=False, atol_scale=1.0, view=None, y_format=None):
    """Run the Triton path forward + backward and compare output and every gradient with the fp64 oracle.

    ``view`` maps x to the layout under test (a view of a larger tensor, whose strides the leaf keeps); y must have
    x's strides, or those of the memory format ``y_format`` (for x that is not dense)."""
    t = _inputs(shape, dtype, offset)
    x = t.pop("x")
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if view is not None:
        x = view(x).detach()
    args = {k: (v.to(param_dtype or dtype) if k in use else None) for k, v in t.items()}
    leaves = {"x": x, **{k: v for k, v in args.items() if v is not None}}
    for v in leaves.values():
        v.requires_grad_()
    if chunk is None:
        y = group_norm(x, G, eps=1e-5, act=act, impl="triton", **args)
    else:  # the custom op directly, to force the split reduction with `chunk` spatial positions per program
        y = torch.ops.fastcm.group_norm_fwd(x, G, args["weight"], args["bias"], 1e-5, args["scale"], args["shift"],
                                            act == "silu", chunk)[0]
    dy = torch.ones_like(y) if sum_backward else torch.randn(y.shape, dtype=torch.float64).to(dtype)
    if sum_backward:
        y.sum().backward()  # hands backward a stride-0 gradient
        grads = [v.grad for v in leaves.values()]
    else:
        grads = torch.autograd.grad(y, list(leaves.values()), dy)

    y64, *grads64 = _oracle_and_grads(leaves, dy, G, act, torch.float64)
    # PyTorch's own fp32 GroupNorm on the same inputs: 4x its error bounds what fp32 can achieve on ill-conditioned
    # groups (e.g. two nearly equal elements make rstd, and so dx, very sensitive to rounding).
    y32, *grads32 = _oracle_and_grads(leaves, dy, G, act, torch.float32)

    N, C = shape[:2]
    S = x[0, 0].numel()
    assert y.dtype == dtype and y.shape == x.shape
    expected_strides = x.stride() if y_format is None else torch.empty(x.shape, memory_format=y_format).stride()
    assert y.stride() == expected_strides
    reduce = {"y": C // G * S, "x": C // G * S, "weight": N * S, "bias": N * S, "scale": S, "shift": S}
    names = ["y", *leaves]
    for name, a, e, base in zip(names, [y, *grads], [y64, *grads64], [y32, *grads32]):
        leaf_dtype = dtype if name == "y" else leaves[name].dtype
        assert a.dtype == leaf_dtype and a.shape == e.shape, name
        atol, rtol = tolerances(leaf_dtype, atol_scale * reduce[name])
        atol = max(atol, 4 * (base.double() - e).abs().max().item())
        torch.testing.assert_close(a.double(), e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return y


def _oracle_and_grads(leaves, dy, G, act, dtype):
    ref = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
    y = _oracle(ref["x"], G, ref.get("weight"), ref.get("bias"), 1e-5, ref.get("scale"), ref.get("shift"), act)
    grads = torch.autograd.grad(y, list(ref.values()), dy.to(dtype))
    return (y.detach().double(), *(g.double() for g in grads))


EDGE_SHAPES = {
    "minimal": ((1, 1, 1, 1), 1),
    "one_channel_per_group": ((2, 8, 3, 3), 8),
    "odd_7x7": ((2, 6, 7, 7), 3),
    "spatial_1x1": ((2, 64, 1, 1), 32),
    "batch_1": ((1, 32, 5, 6), 4),
    "3d_NCL": ((3, 16, 10), 4),
    "2d_NC": ((5, 8), 2),
    "5d_NCDHW": ((2, 8, 3, 4, 5), 4),
}


@pytest.mark.parametrize("shape, G", EDGE_SHAPES.values(), ids=EDGE_SHAPES.keys())
def test_edge_shapes(shape, G):
    _check(shape, G)


@pytest.mark.parametrize("C, hw", list(itertools.product((64, 128, 256), (8, 16, 32))))
def test_unet_shapes(C, hw):
    _check((1, C, hw, hw), 32)


@pytest.mark.parametrize("use", [c for r in range(5) for c in itertools.combinations(PARAMS, r)],
                         ids=lambda u: "+".join(u) or "plain")
@pytest.mark.parametrize("act", [None, "silu"])
def test_with_and_without_params(use, act):
    _check((2, 4, 3, 3), 2, use=use, act=act)


SPLIT_CASES = {
    "tail_chunk": ((2, 4, 5, 5), 2, 8, False),          # 25 positions in chunks of 8: the last chunk has 1
    "batch_1": ((1, 32, 8, 8), 8, 32, False),           # what a GPU does at batch 1: several programs per group
    "channels_last": ((2, 4, 5, 5), 2, 8, True),
    "3d_NCL": ((2, 8, 10), 2, 4, False),
    "channel_blocks": ((1, 2048, 2, 1), 1, 1, False),   # 2048 channels per group: loops over 1024-channel blocks
}


@pytest.mark.parametrize("shape, G, chunk, cl", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_split_reduction(shape, G, chunk, cl):
    _check(shape, G, chunk=chunk, channels_last=cl)


def test_split_more_chunks_than_the_cap(monkeypatch):
    # chunk=1 asks for 25 chunks per group; with the cap at 4 the plan widens the chunk to 7 (chunks 7, 7, 7, 4).
    assert _plan((1, 256, 1 << 20), 32, 132, chunk=1).split <= K.MAX_SPLIT
    monkeypatch.setattr(K, "MAX_SPLIT", 4)
    plan = _plan((1, 4, 25), 2, 0, chunk=1)
    assert (plan.fused, plan.chunk, plan.split) == (False, 7, 4)
    assert plan.launches[1].meta["BLOCK_SPLIT"] == 4
    _check((1, 4, 5, 5), 2, chunk=1)
    _check((1, 4, 5, 5), 2, chunk=1, channels_last=True)


def _channel_slice(x):
    return torch.cat([x, x], 1)[:, 1:1 + x.shape[1]]


CL = torch.channels_last
LAYOUTS = {  # name: (view of x, memory format of y); every one but the spatial step is read in place
    "channel_slice": (_channel_slice, torch.contiguous_format),
    "batch_step": (lambda x: torch.cat([x, x])[::2], torch.contiguous_format),
    "spatial_step": (lambda x: torch.cat([x, x], -1)[..., ::2], torch.contiguous_format),  # H, W do not merge
    "channels_last": (lambda x: x.to(memory_format=CL), CL),
    "channels_last_channel_slice": (lambda x: _channel_slice(x.to(memory_format=CL)), CL),
    "channels_last_batch_step": (lambda x: torch.cat([x, x]).to(memory_format=CL)[::2], CL),
}


@pytest.mark.parametrize("chunk", [None, 4], ids=["fused", "split"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layouts(layout, chunk):
    view, y_format = layout
    _check((2, 6, 5, 5), 2, chunk=chunk, view=view, y_format=y_format)  # 3 channels per group: masked


@pytest.mark.parametrize("chunk", [None, 4], ids=["fused", "split"])
def test_transposed_3d_view_read_in_place(chunk):
    # diffusers-style (B, C, L) view of a (B, L, C) tensor: channels are the contiguous axis; y keeps the strides.
    _check((2, 8, 10), 4, chunk=chunk, view=lambda x: x.transpose(1, 2).contiguous().transpose(1, 2))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_module_on_3d_views(impl):
    # nn.GroupNorm's contract: (N, C, *) of any rank >= 2, any strides, on every impl.
    t = _inputs((2, 8, 12))
    mod = GroupNorm(4, 8, act="silu")
    with torch.no_grad():
        mod.weight.copy_(t["weight"]), mod.bias.copy_(t["bias"])
    mod.impl = impl
    for x in (t["x"].transpose(1, 2).contiguous().transpose(1, 2), t["x"][:, :, ::2], t["x"][:, :, 0]):
        x = x.detach().requires_grad_()
        y = mod(x)
        x64 = x.detach().double().requires_grad_()
        y64 = _oracle(x64, 4, mod.weight.detach().double(), mod.bias.detach().double(), act="silu")
        dy = torch.randn(y.shape, dtype=torch.float64)
        assert_close(y, y64, torch.float32, reduce_len=24)
        assert_close(torch.autograd.grad(y, x, dy.float())[0], torch.autograd.grad(y64, x64, dy)[0], torch.float32,
                     reduce_len=24)


def test_split_reduction_automatic_for_large_groups():
    # 4 x 5120 elements per group exceed one tile: split path, several tiles merged inside one chunk.
    shape, G = (1, 4, 64, 80), 1
    assert not _plan((1, 4, 64 * 80), G, 0).fused
    _check(shape, G, offset=3.0)


def _plan(shape, G, num_sms, **kw):
    return K.group_norm_plan(shape, torch.empty(shape).stride(), torch.float32, G, num_sms, **kw)


def test_plan_fills_a_gpu_at_batch_1():
    assert _plan((64, 256, 32 * 32), 32, 132).fused   # fused: one program per (n, g)
    plan = _plan((1, 256, 64 * 64), 32, 132)          # 32 groups cannot fill 132 SMs x 2
    assert not plan.fused and plan.split > 1 and plan.chunk * plan.split >= 64 * 64
    assert 8 * plan.chunk >= K.MIN_SPLIT_ELEMS
    assert [launch.grid for launch in plan.launches] == [(32, plan.split)] * 2
    assert _plan((1, 256, 32 * 32), 32, 0).fused and not _plan((1, 256, 32 * 32), 32, 132).fused  # CPU: 1 at a time


@pytest.mark.parametrize("chunk", [None, 8])
def test_statistics_stable_under_large_offset(chunk):
    # mean 1e3, std 1: E[x^2] - E[x]^2 in fp32 loses ~all digits of the variance; two-pass / Chan merge does not.
    _check((2, 8, 6, 6), 2, chunk=chunk, offset=1e3, act=None, atol_scale=1e2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, G", [((2, 6, 7, 7), 3), ((1, 64, 8, 8), 32)], ids=["odd_7x7", "unet_8x8"])
def test_half_precision_storage(dtype, shape, G):
    # fp16/bf16 are only loaded and stored; the kernel computes in fp32 (the interpreter cannot compute bf16).
    _check(shape, G, dtype)


def test_half_input_with_fp32_parameters():
    # GroupNorm32-style: bf16 activations (autocast), fp32 parameters; gradients come back in each leaf's dtype.
    _check((2, 8, 4, 4), 4, torch.bfloat16, param_dtype=torch.float32)


def test_channels_last():
    y = _check((2, 16, 5, 6), 4, channels_last=True)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    _check((2, 8, 3, 4, 5), 4, channels_last=True)


def test_non_dense_input_copied_once():
    t = _inputs((2, 8, 6, 10))
    x = t["x"].permute(0, 1, 3, 2)[..., ::2]  # neither contiguous nor channels_last
    y = group_norm(x, 4, t["weight"], t["bias"], scale=t["scale"], act="silu", impl="triton")
    assert_close(y, _oracle(x.double(), 4, t["weight"].double(), t["bias"].double(), 1e-5, t["scale"].double(),
                            None, "silu"), torch.float32, reduce_len=30)


@pytest.mark.parametrize("chunk", [None, 8])
def test_sum_backward_stride0_grad(chunk):
    _check((2, 4, 5, 5), 2, sum_backward=True, chunk=chunk)


@pytest.mark.parametrize("chunk", [0, 5])  # 0: fused path; 5: split path with a tail chunk (9 = 5 + 4)
def test_gradcheck_fp64(chunk):
    t = _inputs((2, 4, 3, 3), torch.float64)
    leaves = [t[k].requires_grad_() for k in ("x", *PARAMS)]

    def fn(x, w, b, s, sh):
        return torch.ops.fastcm.group_norm_fwd(x, 2, w, b, 1e-5, s, sh, True, chunk)[0]

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("channels_last, use", [(True, PARAMS), (False, ())], ids=["channels_last", "no_params"])
def test_opcheck(channels_last, use):
    t = _inputs((2, 8, 2, 3))
    x = t.pop("x").requires_grad_()
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    args = [t[k].requires_grad_() if k in use else None for k in PARAMS]
    w, b, s, sh = args
    torch.library.opcheck(torch.ops.fastcm.group_norm_fwd.default, (x, 4, w, b, 1e-5, s, sh, True, 0))
    # The backward op has no autograd formula (no double backward): check it on tensors that need no grad.
    w, b, s, sh = (None if a is None else a.detach() for a in args)
    y, mean, rstd = torch.ops.fastcm.group_norm_fwd(x.detach(), 4, w, b, 1e-5, s, sh, True, 4)
    dy = torch.randn_like(y)
    for chunk in (0, 4):  # fused and split backward
        torch.library.opcheck(torch.ops.fastcm.group_norm_bwd.default,
                              (dy, x.detach(), mean, rstd, w, b, s, sh, True, chunk))


def test_torch_compile_fullgraph():
    t = _inputs((2, 16, 6, 6))
    mod = GroupNorm(4, 16, act="silu")
    with torch.no_grad():
        mod.weight.copy_(t["weight"]), mod.bias.copy_(t["bias"])
    mod.impl = "triton"

    def block(x, scale, shift):
        return mod(x, scale, shift)

    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    x1, x2 = t["x"].clone().requires_grad_(), t["x"].clone().requires_grad_()
    out_c, out_e = compiled(x1, t["scale"], t["shift"]), block(x2, t["scale"], t["shift"])
    dy = torch.randn_like(out_e)
    out_c.backward(dy)
    w_grad_c = mod.weight.grad.clone()
    mod.weight.grad = None
    out_e.backward(dy)
    assert_close(out_c, out_e.detach(), torch.float32, reduce_len=144)
    assert_close(x1.grad, x2.grad, torch.float32, reduce_len=144)
    assert_close(w_grad_c, mod.weight.grad, torch.float32, reduce_len=72)


def test_reference_matches_oracle():
    t = _inputs((3, 8, 5, 5))
    out = group_norm_ref(t["x"], 4, t["weight"], t["bias"], 1e-5, t["scale"], t["shift"], "silu")
    expected = _oracle(*(v.double() for v in (t["x"],)), 4, *(t[k].double() for k in ("weight", "bias")), 1e-5,
                       t["scale"].double(), t["shift"].double(), "silu")
    assert_close(out, expected, torch.float32, reduce_len=50)
    half = group_norm_ref(t["x"].half(), 4, t["weight"], t["bias"], 1e-5, t["scale"], t["shift"], "silu")
    assert half.dtype == torch.float16
    assert_close(half, _oracle(t["x"].half().double(), 4, t["weight"].double(), t["bias"].double(), 1e-5,
                               t["scale"].double(), t["shift"].double(), "silu"), torch.float16, reduce_len=50)


def test_auto_on_cpu_runs_the_reference():
    t = _inputs((2, 8, 3, 3))
    assert torch.equal(group_norm(t["x"], 4, t["weight"], act="silu"), group_norm_ref(t["x"], 4, t["weight"],
                                                                                       act="silu"))


def test_module_loads_nn_group_norm_state_dict_and_switches_impl():
    ref = nn.GroupNorm(4, 8)
    nn.init.normal_(ref.weight), nn.init.normal_(ref.bias)
    mod = GroupNorm(4, 8)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 3, 3)
    assert mod.impl == "auto"
    expected = ref(x).detach().double()
    assert_close(mod(x), expected, torch.float32, reduce_len=18)
    mod.impl = "triton"
    assert_close(mod(x), expected, torch.float32, reduce_len=18)
    assert set(GroupNorm(4, 8, affine=False).state_dict()) == set(nn.GroupNorm(4, 8, affine=False).state_dict())
    assert_close(GroupNorm(4, 8, affine=False)(x), F.group_norm(x.double(), 4), torch.float32, reduce_len=18)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(num_groups=3), ValueError, "must divide the number of channels"),
        (dict(num_groups=0), ValueError, "num_groups must be an integer >= 1"),
        (dict(num_groups=2.0), ValueError, "num_groups must be an integer >= 1"),
        (dict(weight=torch.ones(7)), ValueError, "weight must have shape"),
        (dict(bias=torch.ones(4, 2)), ValueError, "bias must have shape"),
        (dict(scale=torch.ones(2, 7)), ValueError, "scale must have shape"),
        (dict(shift=torch.ones(8)), ValueError, "shift must have shape"),
        (dict(scale=torch.ones(3, 8)), ValueError, "scale must have shape"),
        (dict(shift=torch.ones(2, 8, 1)), ValueError, "shift must have shape"),
        (dict(x=torch.zeros(8)), ValueError, "x must have at least 2 dims"),
        (dict(x=torch.zeros(0, 8, 2)), ValueError, "x must not be empty"),
        (dict(x=torch.zeros(2, 8, 2, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        (dict(weight=torch.ones(8, dtype=torch.int32)), TypeError, "weight must have a floating dtype"),
        (dict(x="x"), TypeError, "x must be a torch.Tensor"),
        (dict(eps=0.0), ValueError, "eps must be a positive"),
        (dict(eps=float("nan")), ValueError, "eps must be a positive"),
        (dict(act="relu"), ValueError, "act must be one of"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(weight=torch.ones(8, device="meta")), ValueError, "all tensors must be on one device"),
        (dict(scale=torch.ones(2, 8, device="meta")), ValueError, "all tensors must be on one device"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(x=torch.zeros(2, 8, 3), num_groups=4, weight=None, bias=None, scale=None, shift=None)
    args.update(kwargs)
    for impl in ("torch", "triton"):
        with pytest.raises(err, match=match):
            group_norm(**{"impl": impl, **args})


def test_module_bad_input():
    with pytest.raises(ValueError, match="must divide num_channels"):
        GroupNorm(3, 8)
    with pytest.raises(ValueError, match="num_channels must be an integer >= 1"):
        GroupNorm(1, 0)
    with pytest.raises(ValueError, match="act must be one of"):
        GroupNorm(4, 8, act="gelu")
    with pytest.raises(ValueError, match="eps must be a positive"):
        GroupNorm(4, 8, eps=-1e-5)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 8, ...\)"):
        GroupNorm(4, 8)(torch.zeros(2, 16, 3))


def test_registry_entry():
    spec = REGISTRY["group_norm"]
    assert spec.make_inputs.cases[0] == "tiny"
    kwargs = spec.make_inputs("tiny", requires_grad=False)
    expected = _oracle(kwargs["x"].double(), kwargs["num_groups"], *(kwargs[k].double() for k in ("weight", "bias")),
                       kwargs["eps"], kwargs["scale"].double(), kwargs["shift"].double(), kwargs["act"])
    assert_close(spec.ref(**kwargs), expected, torch.float32, reduce_len=32)
    assert_close(spec.op(**kwargs, impl="triton"), expected, torch.float32, reduce_len=32)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16])
def test_cuda_deterministic_and_matches_reference(batch):
    kwargs = REGISTRY["group_norm"].make_inputs("cifar10", device="cuda", dtype=torch.float16)
    kwargs["x"] = kwargs["x"][:batch].detach().requires_grad_()
    kwargs["scale"] = kwargs["scale"][:batch].detach().requires_grad_()
    kwargs["shift"] = kwargs["shift"][:batch].detach().requires_grad_()
    leaves = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    runs = []
    for _ in range(2):
        y = group_norm(**kwargs)  # impl="auto" runs the kernel on CUDA
        runs.append((y, *torch.autograd.grad(y, leaves, torch.ones_like(y))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    y64 = _oracle(ref["x"], ref["num_groups"], ref["weight"], ref["bias"], ref["eps"], ref["scale"], ref["shift"],
                  "silu")
    assert_close(runs[0][0], y64, torch.float16, reduce_len=4 * 1024)
    grads64 = torch.autograd.grad(y64, [v for v in ref.values() if isinstance(v, torch.Tensor)], torch.ones_like(y64))
    for g, g64 in zip(runs[0][1:], grads64):
        assert_close(g, g64, torch.float16, reduce_len=batch * 1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_route_frozen_channels_last_input_trains_weight_and_bias(dtype):
    """torch 2.13's CPU group-norm backward segfaults on a channels_last input that wants no gradient while weight
    and bias do (fine-tuning a norm after frozen layers); the reference route must give the gradients of the same
    call on a contiguous input, and keep x's layout."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 3, generator=g, dtype=dtype)
    w = torch.randn(6, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=dtype, requires_grad=True)
    y = group_norm(x.to(memory_format=torch.channels_last), 3, w, b, act="silu", impl="torch")
    assert y.is_contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(y.square().sum(), (w, b))
    want = torch.autograd.grad(F.silu(F.group_norm(x, 3, w, b)).square().sum(), (w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("wants_x_grad", [False, True])
def test_reference_route_takes_a_batch_of_one_sliced_from_a_permuted_tensor(wants_x_grad):
    """A (1, C, H, W) tensor whose batch stride is below the span of C, H and W passes
    is_contiguous(memory_format=channels_last) but not aten's suggest_memory_format, which native_group_norm checks
    (a diffusers VAE decoder hands one over). The route must run it, and match F.group_norm on a contiguous copy,
    with and without a gradient on x."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 1, 16, generator=g).permute(2, 3, 0, 1)  # shape (1, 16, 4, 4), strides (16, 1, 64, 16)
    assert x0.is_contiguous(memory_format=torch.channels_last) and x0.stride(0) < x0.numel()
    x = x0.clone().requires_grad_(wants_x_grad) if not wants_x_grad else x0.detach().requires_grad_(True)
    w = torch.randn(16, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True)
    y = group_norm(x, 4, w, b, act="silu", impl="torch")
    inputs = (x, w, b) if wants_x_grad else (w, b)
    got = torch.autograd.grad(y.square().sum(), inputs)
    xc = x0.contiguous().requires_grad_(wants_x_grad)
    want_y = F.silu(F.group_norm(xc, 4, w, b))
    want = torch.autograd.grad(want_y.square().sum(), (xc, w, b) if wants_x_grad else (w, b))
    torch.testing.assert_close(y, want_y)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
