"""FID Inception-v3 without the real weights: shapes, the parameter layout of pytorch-fid's weight file, a
state-dict round trip through files, the FID-specific pooling blocks and the input pipeline."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcm.fid import WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL, FIDInceptionV3, inception_v3



@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    # Random running statistics, so a round trip that dropped the batch-norm buffers would be caught.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_pool3_features_shape(net):
    x = torch.rand(1, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, 2048) and torch.isfinite(out).all()
    assert (out >= 0).all()  # pool3 averages ReLU outputs
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) or \(N, 1, H, W\)"):
        net(torch.rand(1, 2, 8, 8))


def test_parameter_layout_matches_the_published_state_dict(net):
    # pytorch-fid builds torchvision's inception_v3(num_classes=1008, aux_logits=False) and loads the file into
    # it: torchvision's Inception-v3 has 27,161,264 parameters, of which the aux head holds 3,326,696
    # (conv0 98,560 + conv1 2,459,136 + fc 769,000); 1008 classes add 8 * 2048 + 8 to fc.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2048 + 8
    state = net.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["fc.weight"] == (1008, 2048)
    assert "Mixed_7c.branch_pool.bn.num_batches_tracked" in shapes
    assert not any(k.startswith("AuxLogits") for k in state)
    assert len([k for k in state if k.endswith("conv.weight")]) == 94  # every BasicConv2d of Inception-v3


def test_fid_pooling_blocks(net):
    # TF's average pool ignores padded zeros (pytorch-fid's FIDInceptionA/C/E_1); Mixed_7c max-pools (E_2).
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"):
        pool = getattr(net, name).pool
        assert isinstance(pool, torch.nn.AvgPool2d) and pool.count_include_pad is False, name
        assert (pool.kernel_size, pool.stride, pool.padding) == (3, 1, 1)
    assert isinstance(net.Mixed_7c.pool, torch.nn.MaxPool2d)
    ones = torch.ones(1, 1, 5, 5)
    assert torch.equal(net.Mixed_5b.pool(ones), ones)  # torchvision's pool would give 4/9 in the corners
    assert F.avg_pool2d(ones, 3, 1, 1)[0, 0, 0, 0].item() == pytest.approx(4 / 9)
    x = torch.randn(1, 1, 5, 5)
    assert torch.equal(net.Mixed_7c.pool(x), F.max_pool2d(x, 3, 1, 1))


def test_preprocessing_is_pytorch_fid_bilinear_and_2x_minus_1():
    # pytorch-fid: [0, 1] image -> half-pixel bilinear (align_corners=False, no antialias) -> 2x - 1, written out in
    # numpy for one row, 32 -> 299. fastcm takes the [-1, 1] image (2 img - 1) and must give the same values.
    img = (np.indices((32, 32)).sum(0) % 2).astype(np.float32)  # checkerboard in [0, 1]
    signed = torch.from_numpy(2 * img - 1)[None, None]
    out = FIDInceptionV3.preprocess(signed.expand(1, 3, 32, 32))
    assert out.shape == (1, 3, 299, 299)
    src = np.clip((np.arange(299) + 0.5) * 32 / 299 - 0.5, 0, None)
    lo = np.floor(src).astype(int)
    hi, w = np.minimum(lo + 1, 31), src - np.floor(src)
    row_src = np.clip((7 + 0.5) * 32 / 299 - 0.5, 0, None)  # output row 7
    r0, rw = int(np.floor(row_src)), row_src - np.floor(row_src)
    rows = (1 - rw) * img[r0] + rw * img[min(r0 + 1, 31)]
    expected = (1 - w) * rows[lo] + w * rows[hi]
    np.testing.assert_allclose(out[0, 0, 7].numpy(), 2 * expected - 1, atol=1e-6)
    # grey images are repeated over the three channels (as pytorch-fid does)
    torch.testing.assert_close(FIDInceptionV3.preprocess(signed), out, rtol=0, atol=0)
    x = torch.tensor([-1.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 299, 299)
    assert FIDInceptionV3.preprocess(x)[0, :, 0, 0].tolist() == [-1.0, 1.0, 0.0]  # the range is left as it is


def test_weights_round_trip_through_files(net, tmp_path, monkeypatch):
    path = tmp_path / WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = net(x)
    loaded = inception_v3(weights=path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    xg = x.clone().requires_grad_()
    out = loaded(xg)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    out.sum().backward()  # frozen weights, but gradients reach the images (FD loss through Inception)
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    assert torch.equal(inception_v3().fc.weight, net.fc.weight)
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "inception.safetensors"))
    assert torch.equal(inception_v3(tmp_path / "inception.safetensors").Mixed_7c.branch_pool.bn.running_var,
                       net.Mixed_7c.branch_pool.bn.running_var)


def test_missing_or_wrong_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        inception_v3()
    assert WEIGHTS_FILE in str(err.value) and WEIGHTS_URL in str(err.value) and WEIGHTS_ENV in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        inception_v3(tmp_path / "nowhere.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception-v3 state dict"):
        inception_v3(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="neither a PyTorch .pth file nor .safetensors"):
        inception_v3(tmp_path / "junk.pth")
    (tmp_path / "torn.pth").write_bytes((tmp_path / "other.pth").read_bytes()[:200])
    with pytest.raises(ValueError, match="could not read") as err:
        inception_v3(tmp_path / "torn.pth")
    assert "\n" not in str(err.value)
