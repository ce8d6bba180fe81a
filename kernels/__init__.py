"""Triton kernels and their launchers, installed as ``fastcm.kernels``.

This package imports torch and triton only, never fastcm. Each module holds the ``@triton.jit`` kernels of one op
family and launchers that take and return torch tensors. Importing a module here imports triton; fastcm.ops does
so lazily, on the first Triton call.
"""
