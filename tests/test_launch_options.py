"""Every Triton kernel launches with the pinned FP-contraction option (kernels/_utils.LAUNCH_OPTIONS), so triton
3.10's changed default cannot change what the kernels compute or how fast; the compile gate compiles the same."""
import importlib

import torch

from fastcm.kernels import _utils
from fastcm.ops import pseudo_huber_loss

MODULES = ("attention", "group_norm", "pseudo_huber", "sqrtm")


def _innermost(kernel):
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def test_every_kernel_of_every_module_is_pinned():
    assert _utils.LAUNCH_OPTIONS == {"enable_fp_fusion": True}
    names = []
    for m in MODULES:
        module = importlib.import_module(f"fastcm.kernels.{m}")
        for name, kernel in vars(module).items():
            fn = _innermost(kernel)
            if name.endswith("_kernel") and hasattr(fn, "run"):  # a @triton.jit kernel (not a host function)
                names.append(f"{m}.{name}")
                assert getattr(fn.run, "pinned_options", None) is _utils.LAUNCH_OPTIONS, name
    assert len(names) == 16, names  # the compile gate's 16 kernels


def test_a_launch_carries_the_option_and_a_call_can_override_it(monkeypatch):
    from fastcm.kernels import pseudo_huber as ph

    fn = _innermost(ph._pseudo_huber_fwd_sample_kernel)
    seen, real = [], type(fn).run

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("enable_fp_fusion"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(fn), "run", spy)
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    pseudo_huber_loss(x, y, 0.03, reduction="none", per="sample", impl="triton")
    assert seen and all(v is True for v in seen)
    seen.clear()
    fn.run(x, y, torch.empty(2), 0.03, 48, grid=(0,), warmup=True, enable_fp_fusion=False)
    assert seen == [False]
