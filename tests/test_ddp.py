"""torchrun DDP on the CPU: 2 gloo processes train the iCT stage; every rank must end with identical weights.

The test launches the real launcher (``python -m torch.distributed.run --standalone --nproc_per_node=2``), so the
environment-variable path of fastcm.train.init_distributed is exercised, as users run it.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file
    from fastcm.cm import ConsistencyModel
    from fastcm.data import ArrayDataset
    from fastcm.models import build_unet
    from fastcm.train import ICTConfig, train_ict

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = ConsistencyModel(build_unet("tiny", num_classes=10, impl="torch"))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)  # the same data on every rank; each rank reads its own shard
    data = ArrayDataset(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.arange(64) % 10)
    cfg = ICTConfig(total_steps=4, batch_size=16, lr=1e-3, ema_beta=0.5, s0=2, s1=8, log_every=2, sample_every=0,
                    num_samples=10, save_every=0, hflip=True)
    seen = []
    res = train_ict(cfg, data, model, out_dir=os.path.join(out, "run"), progress=False, callbacks=[seen.append])
    state = {f"model/{k}": v for k, v in res.model.state_dict().items()}
    state.update({f"ema/{k}": v for k, v in res.ema.state_dict().items()})
    state.update({f"init/{k}": v for k, v in init.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, f"rank{rank}.safetensors"),
              metadata={"records": str(len(seen)), "world": os.environ["WORLD_SIZE"],
                        "initialized": str(dist.is_initialized())})
''')


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_hold_identical_weights(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    (tmp_path / "log.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    keys = [k for k in a if k.startswith(("model/", "ema/"))]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys), "ranks diverged"
    assert any(not torch.equal(a[f"init/{k[6:]}"], b[f"init/{k[6:]}"]) for k in keys if k.startswith("model/"))
    assert any(not torch.equal(a[k], a[f"init/{k[6:]}"]) for k in keys if k.startswith("model/")), "no training"
    metas = []
    for r in range(2):
        with safe_open(str(tmp_path / f"rank{r}.safetensors"), "pt") as f:
            metas.append(f.metadata())
    assert [m["world"] for m in metas] == ["2", "2"] and metas[0]["initialized"] == "False"  # group torn down
    assert [m["records"] for m in metas] == ["2", "0"]  # rank 0 logs, the others stay silent
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "samples"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_00000004.safetensors"]
