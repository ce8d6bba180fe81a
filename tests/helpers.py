"""One comparison helper for every kernel test (fast op vs reference)."""
import math
import textwrap

import torch

# (atol, rtol) per dtype of the *inputs*, for a reduction over ~1 element; atol grows with sqrt(reduction length)
# because rounding errors of a sum add like a random walk. Values follow xformers' fmha tables and FlagGems'
# RESOLUTION: fp64 is exact up to reordering, fp32 ~1e-6 relative, fp16 has a 10-bit mantissa (~1e-3), bf16 has
# 7 bits (~8e-3).
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerances(dtype: torch.dtype, reduce_len: int = 1):
    atol, rtol = TOLERANCES[dtype]
    return atol * math.sqrt(max(reduce_len, 1)), rtol


def assert_close(actual, expected, dtype=None, reduce_len: int = 1, msg: str = ""):
    """Compare ``actual`` with ``expected`` (the reference, usually fp64) at the tolerance of ``dtype``."""
    dtype = dtype or actual.dtype
    atol, rtol = tolerances(dtype, reduce_len)
    torch.testing.assert_close(actual.to(torch.float64).cpu(), expected.to(torch.float64).cpu(),
                               atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}" if msg else m)


def torchrun(script, *args, nproc: int = 2, timeout: float = 300):
    """Run ``script`` under the real launcher (``python -m torch.distributed.run --standalone``) with ``nproc``
    CPU ranks of one thread each; fail with the tail of its output unless every rank exits 0."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# Source of run_cli(argv), for the test drivers that run many `fastcm` commands in one subprocess (one interpreter
# start-up for a whole matrix): prepend it to the driver's source.
CLI_IN_PROCESS = textwrap.dedent('''
    def run_cli(argv):
        """`fastcm *argv` in this process: (exit code, stderr); a traceback is exit code 1 with it as stderr."""
        import io, runpy, sys, traceback
        sys.argv = ["fastcm", *argv]
        err = io.StringIO()
        stderr, sys.stderr = sys.stderr, err
        try:
            runpy.run_module("fastcm.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:  # a traceback: what the tests must never see
            code, _ = 1, traceback.print_exc(file=err)
        finally:
            sys.stderr = stderr
        return code, err.getvalue()
''')
