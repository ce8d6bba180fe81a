"""Seeded dropout: a mask that is a pure function of (seed, layer, element), shared by both iCT passes."""
import pytest
import torch

from fastcm.cm import ConsistencyModel, ICTLoss
from fastcm.models import build_unet
from fastcm.nn import SeededDropout, dropout_keep_mask, hash32, seeded_dropout

M32 = 0xFFFFFFFF


def _hash32_py(x: int) -> int:
    """The hash in plain Python integers (no tensors): what any device must reproduce bit for bit."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & M32
    return x ^ (x >> 16)


def _keep_py(seed: int, layer: int, index: int, p: float) -> bool:
    key = _hash32_py((_hash32_py(seed & M32) + (layer + 1) * 0x9E3779B9) & M32)
    bits = _hash32_py(_hash32_py(index ^ key) ^ (key >> 7))
    return (bits >> 8) / 2**24 >= p


def test_hash_matches_pure_python_integers():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    got = hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_hash32_py(x) for x in xs]
    assert all(0 <= g < 2**32 for g in got)


def test_mask_matches_pure_python_reference():
    # Integer-exact: the same mask on any device; here checked element by element against Python ints.
    shape, p, seed, layer = (2, 3, 4, 5), 0.3, 987654321, 7
    mask = dropout_keep_mask(shape, p, torch.tensor(seed), layer)
    expected = torch.tensor([_keep_py(seed, layer, i, p) for i in range(mask.numel())]).view(shape)
    assert torch.equal(mask, expected)


@pytest.mark.gpu
def test_mask_identical_on_cpu_and_cuda():
    cpu = dropout_keep_mask((64, 32, 8, 8), 0.3, torch.tensor(11), 3)
    cuda = dropout_keep_mask((64, 32, 8, 8), 0.3, torch.tensor(11, device="cuda"), 3, device="cuda")
    assert torch.equal(cpu, cuda.cpu())


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keep_rate_and_independence(p):
    n = 65_536
    a = dropout_keep_mask((n,), p, torch.tensor(1), 0).float()
    b = dropout_keep_mask((n,), p, torch.tensor(2), 0).float()
    c = dropout_keep_mask((n,), p, torch.tensor(1), 1).float()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(a.mean().item() - (1 - p)) < 5 * sd  # Binomial(n, 1-p): 5 standard deviations
    for other in (b, c):  # another seed or another layer: an independent mask (correlation ~ 0)
        corr = torch.corrcoef(torch.stack([a, other]))[0, 1].item()
        assert abs(corr) < 5 / n**0.5
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < 5 / n**0.5  # neighbours


def test_seeded_dropout_values_and_module_modes():
    x = torch.randn(4, 8, 5, 5)
    seed = torch.tensor(42)
    y = seeded_dropout(x, 0.25, seed, 2)
    keep = dropout_keep_mask(x.shape, 0.25, seed, 2)
    torch.testing.assert_close(y, torch.where(keep, x / 0.75, torch.zeros_like(x)), rtol=1e-6, atol=0)
    layer = SeededDropout(0.25, layer_id=2)
    assert torch.equal(layer(x, seed), y) and torch.equal(layer(x, 42), y)
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    layer(x, seed)
    assert torch.equal(torch.get_rng_state(), global_state)  # an explicit seed never touches the global RNG
    assert not torch.equal(layer(x), layer(x))  # no seed: a fresh mask each call
    assert torch.equal(layer.eval()(x, seed), x)
    assert torch.equal(SeededDropout(0.0, 0)(x, seed), x)
    with pytest.raises(ValueError):
        SeededDropout(1.0, 0)


def _dropout_masks(model):
    """Forward hooks that record every SeededDropout keep-mask (output != 0 where input != 0)."""
    records = []

    def hook(module, inputs, output):
        records.append((module.layer_id, output != 0))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SeededDropout)]
    return records, handles


def test_ict_loss_shares_dropout_masks_between_passes(device):
    # On CUDA this is the case that ports saving torch.get_rng_state() (the CPU generator) get wrong.
    net = build_unet("tiny", impl="torch", dropout=0.3)
    model = ConsistencyModel(net).train().to(device)
    records, handles = _dropout_masks(model)
    loss_fn = ICTLoss(1000)
    x = torch.rand(4, 1, 8, 8, device=device) * 2 - 1
    loss_fn(model, x, step=0, generator=torch.Generator().manual_seed(0))
    n_layers = sum(isinstance(m, SeededDropout) for m in model.modules())
    assert len(records) == 2 * n_layers
    student, target = records[:n_layers], records[n_layers:]
    for (la, ma), (lb, mb) in zip(student, target):
        assert la == lb and torch.equal(ma, mb)  # same layer, same mask in the stop-gradient pass
        assert 0.5 < ma.float().mean().item() < 0.9  # and it is a real dropout mask (keep rate ~0.7)
    assert len({m.sum().item() for _, m in student}) > 1  # layers differ from each other
    records.clear()
    loss_fn(model, x, step=0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(records[0][1], student[0][1])  # a new step draws a new seed
    for h in handles:
        h.remove()


def test_dropout_seed_makes_model_deterministic_in_train_mode():
    model = ConsistencyModel(build_unet("tiny", impl="torch", dropout=0.5)).train()
    torch.nn.init.normal_(model.unet.conv_out.weight)
    for blk in model.unet.enc:  # give the dropped branches non-zero weights so the mask shows in the output
        torch.nn.init.normal_(blk.conv1.weight, std=0.2)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 5.0])
    a = model(x, sigma, dropout_seed=torch.tensor(3))
    torch.manual_seed(123)  # a different global RNG state changes nothing
    b = model(x, sigma, dropout_seed=torch.tensor(3))
    c = model(x, sigma, dropout_seed=torch.tensor(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
