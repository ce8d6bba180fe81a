"""fastcm._checks, the one validation module: each helper's accept/reject boundary, the messages naming the argument,
and the thresholds the mutation run left untested: a sigma grid with equal neighbours."""
import numpy as np
import pytest
import torch

from fastcm import _checks
from fastcm._checks import (as_images, as_labels, check_ascending, check_choice, check_int, check_real,
                            check_same_device, check_tensor, is_int)


def test_integers():
    assert is_int(3) and is_int(np.int64(3)) and is_int(0, 0) and not is_int(0, 1)
    assert not is_int(True) and not is_int(np.bool_(True)) and not is_int(2.0) and not is_int("2")
    assert check_int("steps", np.int32(5)) == 5 and type(check_int("steps", np.int32(5))) is int
    assert check_int("k", -3, None) == -3
    for bad in (0, True, 1.5, "1", None):
        with pytest.raises(ValueError, match=r"^steps must be an integer >= 1, got "):
            check_int("steps", bad)


def test_reals():
    assert check_real("lr", 1) == 1.0 and check_real("mean", -2.5) == -2.5 and check_real("x", np.float32(0.5)) == 0.5
    for bad in (float("nan"), float("inf"), True, "1", None):
        with pytest.raises(ValueError, match="^lr must be a finite number"):
            check_real("lr", bad)
    with pytest.raises(ValueError, match="^rho must be a positive finite number, got 0"):
        check_real("rho", 0, positive=True)


def test_real_bounds_are_closed_and_named_in_the_message():
    assert check_real("ratio", 0, minimum=0.0, maximum=1.0) == 0.0
    assert check_real("ratio", 1, minimum=0, maximum=1) == 1.0
    assert check_real("p", 0.0, minimum=0.0) == 0.0 and check_real("x", -5, maximum=-5) == -5.0
    for bad in (-1e-12, 1.0 + 1e-12, float("nan"), True):
        with pytest.raises(ValueError, match=r"^ratio must be a finite number in \[0, 1\], got "):
            check_real("ratio", bad, minimum=0.0, maximum=1.0)
    with pytest.raises(ValueError, match="^p must be a finite number >= 0, got -0.5"):
        check_real("p", -0.5, minimum=0.0)
    with pytest.raises(ValueError, match="^x must be a finite number <= 2, got 3"):
        check_real("x", 3, maximum=2)


@pytest.mark.parametrize("grid", [[1.0, 1.0, 2.0], [1.0, 2.0, 2.0], [2.0, 1.0, 3.0], [1.0]])
def test_ascending_grid_rejects_equal_or_falling_neighbours(grid):
    with pytest.raises(ValueError, match="sigmas must"):
        check_ascending("sigmas", torch.tensor(grid))


def test_sigma_grid_consumers_reject_a_flat_step():
    # iCT's p(i) and lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) on [1, 1, 2]: an empty interval and a division by
    # zero; both must refuse the grid instead of returning inf or NaN.
    from fastcm.cm.schedule import ict_weights, lognormal_pair_probs

    grid = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sigmas must be strictly ascending, got \[1.0, 1.0, 2.0\]"):
        ict_weights(grid)
    with pytest.raises(ValueError, match=r"sigmas must be strictly ascending, got \[1.0, 1.0, 2.0\]"):
        lognormal_pair_probs(grid)
    with pytest.raises(ValueError, match="positive"):
        lognormal_pair_probs(torch.tensor([0.0, 1.0, 2.0]))
    assert torch.isfinite(ict_weights(torch.tensor([1.0, 1.0 + 1e-9, 2.0], dtype=torch.float64))).all()


def test_tensors_choices_devices():
    x = torch.zeros(2, 3)
    assert check_tensor("x", x, ndim=2, shape=(None, 3)) is x
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        check_tensor("x", [0.0])
    with pytest.raises(TypeError, match=r"x must have a floating dtype \(float16, bfloat16, float32, float64\)"):
        check_tensor("x", x.long())
    with pytest.raises(TypeError, match=r"labels must have a dtype \(int64\)"):
        check_tensor("labels", x, dtypes=(torch.int64,))
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 4\), got \(2, 3\)"):
        check_tensor("x", x, shape=(None, 4))
    with pytest.raises(ValueError, match="impl must be one of"):
        check_choice("impl", "cuda", _checks.IMPLS)
    check_same_device(a=x, b=None, c=x)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        check_same_device(a=x, b=x.to("meta"))


def test_images_and_labels():
    x = as_images("x", np.zeros((2, 1, 4, 4), np.float64))
    assert x.dtype == torch.float32 and x.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"x must be scaled to \[-1, 1\]"):
        as_images("x", torch.full((1, 1, 2, 2), 1.01))
    as_images("x", torch.full((1, 1, 2, 2), 1.0009))  # rounding margin
    with pytest.raises(TypeError, match="uint8 pixels"):
        as_images("x", torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="x needs at least 2 images"):
        as_images("x", torch.zeros(1, 1, 2, 2), min_count=2)
    assert as_labels("y", np.array([0, 2]), 2, num_classes=3).tolist() == [0, 2]
    with pytest.raises(ValueError, match="y must be class indices < 3"):
        as_labels("y", torch.tensor([0, 3]), 2, num_classes=3)
    with pytest.raises(TypeError, match="integer class labels"):
        as_labels("y", torch.tensor([0.0, 1.0]), 2)


def test_one_module_no_private_copies():
    # The modules switched to fastcm._checks keep no checker of their own (ops/group_norm.py, train/config.py and
    # cli/generate.py are switched by their owners).
    import inspect

    from fastcm.cm import schedule
    from fastcm.models import unet
    from fastcm.ops import _utils

    assert not hasattr(schedule, "_check_int") and not hasattr(unet, "_is_int")
    assert _utils.check_tensor is check_tensor and "def check_tensor" not in inspect.getsource(_utils)
