"""Attention: reference path (math attention in fp64, SDPA) and validation."""
import pytest
import torch
import torch.nn.functional as F

from fastcm.ops import REGISTRY, attention, attention_ref, qkv_attention, qkv_attention_ref
from helpers import assert_close


def test_reference_matches_sdpa():
    q, k, v = (torch.randn(2, 3, 17, 32, dtype=torch.float64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    assert_close(attention_ref(q, k, v), expected, torch.float64, reduce_len=17)
    assert_close(attention(q, k, v), expected, torch.float64, reduce_len=17)
    assert_close(attention(q, k, v, scale=0.3, impl="torch"), F.scaled_dot_product_attention(q, k, v, scale=0.3),
                 torch.float64, reduce_len=17)


def test_qkv_reference_matches_manual_split():
    N, C, heads, side = 2, 64, 4, 5
    qkv = torch.randn(N, 3 * C, side, side, dtype=torch.float64)
    parts = qkv.view(N, 3, heads, C // heads, side * side)
    q, k, v = (parts[:, i].transpose(-1, -2) for i in range(3))
    expected = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(N, C, side, side)
    assert_close(qkv_attention_ref(qkv, heads), expected, torch.float64, reduce_len=25)
    assert_close(qkv_attention(qkv, heads), expected, torch.float64, reduce_len=25)


def test_registry_entries():
    for name in ("attention", "qkv_attention"):
        spec = REGISTRY[name]
        kwargs = spec.make_inputs(spec.make_inputs.cases[0], requires_grad=False)
        assert_close(spec.op(**kwargs), spec.ref(**kwargs), torch.float32)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(k=torch.zeros(2, 3, 5, 16)), ValueError, "k must have shape"),
        (dict(k=torch.zeros(3, 2, 5, 8)), ValueError, "k must have shape"),
        (dict(v=torch.zeros(2, 2, 4, 8)), ValueError, "v must have shape"),
        (dict(q=torch.zeros(2, 2, 5)), ValueError, "q must be 4-D"),
        (dict(q=torch.zeros(2, 2, 5, 8, dtype=torch.int64)), TypeError, "q must have a floating dtype"),
        (dict(v=torch.zeros(2, 2, 5, 8, dtype=torch.float64)), TypeError, "share one dtype"),
        (dict(scale=-1.0), ValueError, "scale must be a positive"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(q=torch.zeros(2, 2, 5, 8), k=torch.zeros(2, 2, 5, 8), v=torch.zeros(2, 2, 5, 8))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        attention(**args)
