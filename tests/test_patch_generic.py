"""fastcm.patch on plain PyTorch models: every nn.GroupNorm becomes fastcm.ops.GroupNorm, in place, with the same
parameters (state_dict bit for bit), the same outputs and input gradients on every layout a GroupNorm may see, an
undo (unpatch) and a report of what was replaced or left alone."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastcm
from fastcm.ops import GroupNorm
from fastcm.integrations import OPS, patched
from helpers import assert_close

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """Conv -> GroupNorm -> SiLU, a GroupNorm on a (B, C, L) transposed token view, one without affine, and one
    shared under two names."""

    def __init__(self, C=8, G=4):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.norm = nn.GroupNorm(G, C, eps=1e-6)
        self.tokens_norm = nn.GroupNorm(G, C)
        self.plain = nn.GroupNorm(2, C, affine=False)
        self.shared = self.plain2 = nn.GroupNorm(G, C)
        with torch.no_grad():
            for m in (self.norm, self.tokens_norm, self.shared):
                m.weight.normal_(1.0, 0.5), m.bias.normal_(0.0, 0.5)

    def forward(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        B, C, H, W = h.shape
        tokens = h.reshape(B, C, H * W).transpose(1, 2)                    # (B, L, C), as diffusers attention holds it
        h = h + self.tokens_norm(tokens.transpose(1, 2)).reshape(B, C, H, W)  # a non-contiguous (B, C, L) input
        h = self.plain(h.contiguous(memory_format=torch.channels_last))
        return self.plain2(self.shared(h)).mean((2, 3)) + self.shared(h.mean((2, 3)))  # 4-D and 2-D (N, C) inputs


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    assert list(now) == list(state)
    for k in state:
        assert now[k].dtype == state[k].dtype and torch.equal(now[k], state[k]), k


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_generic_parity_fp64(impl):
    model = Net().double()
    x = torch.randn(2, 3, 5, 3, dtype=torch.float64, requires_grad=True)  # odd sizes: L = 15
    ref = model(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    state = _state(model)
    report = fastcm.patch(model, impl=impl)
    assert report.counts == {"nn.GroupNorm -> fastcm.ops.GroupNorm": 4}
    assert not any(type(m) is nn.GroupNorm for m in model.modules())
    assert model.shared is model.plain2 and isinstance(model.shared, GroupNorm)
    out = model(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert_close(out, ref, torch.float64, reduce_len=60)
    assert_close(g, g_ref, torch.float64, reduce_len=60)
    _same_state(model, state)


def test_generic_parity_fp32_and_param_grads():
    model = Net()
    x = torch.randn(3, 3, 4, 4)
    ref = model(x)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fastcm.patch(model, impl="triton")
    out = model(x)
    out.square().sum().backward()
    assert_close(out, ref, torch.float32, reduce_len=64)
    for n, p in model.named_parameters():
        assert_close(p.grad, grads[n], torch.float32, reduce_len=64, msg=n)


def test_parameters_are_shared_and_checkpoints_round_trip(tmp_path):
    model = Net()
    params = dict(model.named_parameters())
    fastcm.patch(model, impl="torch")
    assert all(p is params[n] for n, p in model.named_parameters())  # an optimizer built before patching still works
    torch.save(model.state_dict(), tmp_path / "patched.pt")
    fresh = Net()
    fresh.load_state_dict(torch.load(tmp_path / "patched.pt"))          # a patched model saves the same files...
    _same_state(fresh, model.state_dict())
    other = Net()
    model.load_state_dict(other.state_dict())                         # ...and loads unpatched checkpoints
    _same_state(model, other.state_dict())


def test_idempotent_and_unpatch_restores_originals():
    model = Net()
    originals = {n: m for n, m in model.named_modules()}
    first = fastcm.patch(model, impl="torch")
    structure = [(n, type(m)) for n, m in model.named_modules()]
    second = fastcm.patch(model, impl="torch")
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    assert second.replaced == first.replaced and second.left_alone == first.left_alone
    fastcm.patch(model, impl="triton")  # a second call may change impl
    assert {m.impl for m in model.modules() if isinstance(m, GroupNorm)} == {"triton"}
    assert fastcm.unpatch(model) is True
    assert all(m is originals[n] for n, m in model.named_modules())
    assert fastcm.unpatch(model) is False


def test_context_manager_and_top_level_names():
    model = Net()
    with patched(model, impl="torch") as report:
        assert report and isinstance(model.norm, GroupNorm)
    assert type(model.norm) is nn.GroupNorm
    assert fastcm.patch is fastcm.integrations.patch and fastcm.patched is patched
    assert fastcm.unpatch is fastcm.integrations.unpatch and fastcm.patch(nn.Linear(2, 2), "torch").replaced == []


def test_nothing_to_patch_returns_an_empty_report():
    for model, ops in ((nn.Sequential(nn.Linear(3, 3), nn.SiLU()), OPS), (Net(), ("attention",)), (Net(), ())):
        report = fastcm.patch(model, ops=ops)
        assert not report and report.replaced == [] and report.counts == {}
        assert fastcm.unpatch(model) is False


def test_left_alone_with_reasons():
    class MyNorm(nn.GroupNorm):
        pass

    model = nn.Sequential(MyNorm(2, 4), nn.GroupNorm(2, 4), nn.GroupNorm(2, 4))
    model[2].register_forward_hook(lambda *a: None)
    report = fastcm.patch(model)
    assert [n for n, _ in report.replaced] == ["1"]
    reasons = dict(report.left_alone)
    assert "subclasses nn.GroupNorm" in reasons["0"] and "hooks" in reasons["2"]
    root = nn.GroupNorm(2, 4)
    report = fastcm.patch(root)
    assert not report and "the model itself" in dict(report.left_alone)[""]


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="net"), "model must be a torch.nn.Module"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(ops=("group_norm", "softmax")), "ops must be a sequence drawn from"),
    (dict(ops="group_norm"), "ops must be a sequence drawn from"),
    (dict(ops=None), "ops must be a sequence drawn from"),
])
def test_bad_input(kwargs, match):
    args = dict(model=Net(), impl="auto", ops=OPS) | kwargs
    with pytest.raises((TypeError, ValueError), match=match):
        fastcm.patch(**args)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastcm.unpatch("net")


def test_import_fastcm_does_not_import_diffusers():
    code = ("import sys, fastcm, torch; r = fastcm.patch(torch.nn.GroupNorm(2, 4)); "
            "print('diffusers' in sys.modules, callable(fastcm.patch), fastcm.unpatch.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "unpatch"]


def test_deepcopy_of_a_patched_model_unpatches_itself():
    model = Net()
    fastcm.patch(model, impl="torch")
    twin = copy.deepcopy(model)  # e.g. an EMA copy
    assert fastcm.unpatch(twin) is True
    assert type(twin.norm) is nn.GroupNorm and twin.shared is twin.plain2 and type(twin.shared) is nn.GroupNorm
    assert isinstance(model.norm, GroupNorm) and isinstance(model.shared, GroupNorm)


def _load(model, src, assign):
    model.load_state_dict(src.state_dict(), assign=assign)


# Ways a patched model changes between patch and unpatch (weights loaded, dtype moved), and the dtype it ends in
MOVES = {
    "load_state_dict": (lambda m, src: _load(m, src, False), torch.float32),
    "load_state_dict(assign=True)": (lambda m, src: _load(m, src, True), torch.float32),
    ".to(float64)": (lambda m, src: (_load(m, src, False), m.to(torch.float64)), torch.float64),
    ".half()": (lambda m, src: (_load(m, src, True), m.half()), torch.float16),
    "meta -> to_empty -> load": (lambda m, src: (m.to_empty(device="cpu"), _load(m, src, False)), torch.float32),
}


@pytest.mark.parametrize("move", list(MOVES))
def test_unpatch_hands_back_the_current_parameters(move):
    torch.manual_seed(0)
    src, twin = Net(), Net()  # twin: never patched, the same moves
    if move.startswith("meta"):
        with torch.device("meta"):
            model = Net()
    else:
        model = Net()
    fastcm.patch(model, impl="torch")
    fn, dtype = MOVES[move]
    fn(model, src)
    patched_params = dict(model.named_parameters())
    fastcm.unpatch(model)
    fn(twin, src) if not move.startswith("meta") else _load(twin, src, False)
    assert all(type(m) is not GroupNorm for m in model.modules())
    # the very Parameters the patched model held (an optimizer built after the load keeps working)
    assert all(p is patched_params[name] for name, p in model.named_parameters())
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == dtype, name
        assert torch.equal(p, dict(twin.named_parameters())[name]), name
    x = torch.randn(2, 3, 5, 3)
    if dtype == torch.float16:  # CPU half convs: compare in fp32 on the same fp16 weights
        model, twin = model.float(), twin.float()
    torch.testing.assert_close(model(x.to(next(model.parameters()).dtype)),
                               twin(x.to(next(twin.parameters()).dtype)), rtol=0, atol=0)


def test_unpatch_keeps_a_module_set_after_patching():
    model = Net()
    fastcm.patch(model, impl="torch")
    mine = nn.GroupNorm(2, 8)
    model.norm = mine
    fastcm.unpatch(model)
    assert model.norm is mine and type(model.tokens_norm) is nn.GroupNorm
