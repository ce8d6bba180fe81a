"""What the Triton routes cost and whether they compile, without a GPU: the op calls of the U-Net presets
(``calls``), the work counts against each op's declared minimum (``work``, for ``make kernel-report`` and the ratio
budgets of tests/test_kernel_work.py) and the compile gate (``gate``, ``make gpu-compile``)."""
