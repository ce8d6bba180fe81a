"""FID's Inception-v3: the TF 2015-12-05 graph as ported by pytorch-fid, 2048-d pool3 features.

The layer names and shapes follow torchvision's Inception3 (num_classes=1008, no aux head), so the
``pt_inception-2015-12-05-6726825d.pth`` state dict that pytorch-fid publishes loads unchanged. Three blocks differ
from torchvision's, to match TF (pytorch-fid inception.py):
  * Mixed_5b/c/d (A), Mixed_6b-e (C) and Mixed_7b (E_1): the pool branch averages without the padded zeros
    (``count_include_pad=False``), as TF's average pooling does;
  * Mixed_7c (E_2): the pool branch is a 3x3 *max* pool (a quirk of that graph, kept for comparable FIDs).
Input pipeline: images (N, 3, H, W) in [-1, 1] (the sampler's range; grey (N, 1, H, W) is repeated to RGB, as
pytorch-fid does) -> bilinear resize to 299 x 299 (align_corners=False, no antialiasing). pytorch-fid resizes [0, 1]
images and then maps them by 2x - 1; bilinear interpolation is affine with weights summing to 1, so resizing the
[-1, 1] image is the same map (equal up to rounding). Nothing is downloaded: weights come from a local file.
"""
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcm._io import check_input_file

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "FASTCM_INCEPTION_WEIGHTS"


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf():
    """TF's 3x3 / stride 1 'SAME' average pool: the padded zeros do not count."""
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 -> 64 + 64 + 96 + pool_features channels."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.pool = _avg_pool_tf()
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(self.pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 384 + 96 + cin channels."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (1x7 and 7x1) -> 4 x 192 channels."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.pool = _avg_pool_tf()
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(self.pool(x))], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 320 + 192 + cin channels."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs -> 320 + 768 + 768 + 192 = 2048 channels. ``pool`` is the TF
    average pool in Mixed_7b (FID's E_1) and a 3x3 max pool in Mixed_7c (FID's E_2)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool_tf()
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(self.pool(x)),
        ], 1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3 returning pool3 features (N, 2048) for images (N, 3 or 1, H, W) in [-1, 1].

    Built with random weights; use :func:`inception_v3` to load the published ones. ``logits(images)`` gives the
    1008-way classifier output (used by the Inception Score)."""

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """[-1, 1] images (grey repeated to RGB) -> 299 x 299 bilinear (align_corners=False, no antialias)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 3, H, W) or (N, 1, H, W) in [-1, 1], got "
                             f"{tuple(images.shape)}")
        x = self.preprocess(images.to(self.fc.weight.dtype))
        return self.trunk(x).mean((2, 3))  # pool3: global average of Mixed_7c, (N, 2048)

    def trunk(self, x: Tensor) -> Tensor:
        """Preprocessed (N, 3, 299, 299) -> Mixed_7c maps (N, 2048, 8, 8)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)  # 64 x 73 x 73 (pytorch-fid's 64-d block)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)  # 192 x 35 x 35
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x

    def logits(self, images: Tensor) -> Tensor:
        return self.fc(self.forward(images))


def inception_v3(weights=None, device=None) -> FIDInceptionV3:
    """The FID Inception-v3 with the published weights, in eval mode with frozen parameters.

    ``weights``: path to pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a state dict; ``.safetensors``
    with the same keys also works); None reads the path from the ``FASTCM_INCEPTION_WEIGHTS`` environment
    variable. Nothing is downloaded. Gradients still flow to the input images (for the FD loss)."""
    path = _weights_path(weights)
    state = _read_state(path)
    net = FIDInceptionV3()
    problem = _state_mismatch(net.state_dict(), state)
    if problem:
        raise ValueError(f"Inception weights file {str(path)!r} is not the FID Inception-v3 state dict "
                         f"({WEIGHTS_FILE}): {problem}")
    net.load_state_dict(state)
    net.requires_grad_(False).eval()
    return net.to(device) if device is not None else net


def _weights_path(weights) -> Path:
    where = (f"it is published by pytorch-fid at {WEIGHTS_URL}; download it once and pass its path as "
             f"weights=... or set {WEIGHTS_ENV} (fastcm never downloads at run time)")
    if weights is None:
        env = os.environ.get(WEIGHTS_ENV)
        if not env:
            raise FileNotFoundError(f"the FID Inception-v3 needs the weight file {WEIGHTS_FILE}: {where}")
        weights = env
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a path or None, got {type(weights).__name__}")
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Inception weights {path} not found (expected {WEIGHTS_FILE}; {where})")
    return check_input_file(path, "Inception weights file", WEIGHTS_FILE)


def _read_state(path: Path) -> dict:
    """The state dict of a .pth (torch's zip format or its legacy pickle, loaded with weights_only) or .safetensors
    file; anything else is refused in one line before a loader sees it."""
    with open(path, "rb") as f:
        head = f.read(16)
    kind = "zip" if head[:4] == b"PK\x03\x04" else "pickle" if head[:1] == b"\x80" else \
        "safetensors" if len(head) > 9 and head[8:9] == b"{" else None
    if kind is None:
        raise ValueError(f"Inception weights file {str(path)!r} is neither a PyTorch .pth file nor .safetensors "
                         f"(expected {WEIGHTS_FILE})")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own messages run to several lines: keep the first
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"could not read Inception weights file {str(path)!r} ({type(e).__name__}: {first})") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"Inception weights file {str(path)!r} holds a {type(state).__name__}, expected a state "
                         f"dict of tensors ({WEIGHTS_FILE})")
    return state


def _state_mismatch(want: dict, got: dict) -> str:
    """'' when ``got`` has exactly ``want``'s keys and shapes, else one line saying what differs."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [k for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of its {len(want)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of the wrong shape (e.g. {k}: {tuple(got[k].shape)} instead of "
                     f"{tuple(want[k].shape)})")
    return "; ".join(parts)
