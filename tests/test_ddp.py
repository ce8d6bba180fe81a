"""torchrun DDP on the CPU: 2 gloo processes train the iCT stage; every rank must end with identical weights.

The test launches the real launcher (``python -m torch.distributed.run --standalone --nproc_per_node=2``), so the
environment-variable path of fastcm.train.init_distributed is exercised, as users run it.
"""
import textwrap

import pytest
import torch

from fastcm.train import finetune_fd, reference_stats
from helpers import torchrun

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch import nn
    from safetensors.torch import save_file
    from fastcm.cm import ConsistencyModel
    from fastcm.data import ArrayDataset
    from fastcm.models import build_unet
    from fastcm.train import (FDConfig, ICTConfig, cleanup_distributed, finetune_fd, init_distributed,
                              reference_stats, train_ict)

    # fd_dropout: the tiny preset's dropout 0.1 on, masks seeded by (seed, step, global sample index)
    FD_CFG = FDConfig(total_steps=2, batch_size=16, optimizer="radam", lr=1e-2, ema_beta=0.5, log_every=1,
                      sample_every=0, num_samples=10, save_every=0, queue_size=40, s1=8, fd_dropout=True)


    def data():
        g = torch.Generator().manual_seed(0)  # the same data on every rank; each rank reads its own shard
        return ArrayDataset(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.arange(64) % 10)


    def model(seed):
        torch.manual_seed(seed)
        return ConsistencyModel(build_unet("tiny", num_classes=10, impl="torch"))


    def feature_net():
        torch.manual_seed(11)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(32, 6))


    def flat(prefix, module):
        return {f"{prefix}/{k}": v.detach().clone() for k, v in module.state_dict().items()}


    def main(out):
        rank = int(os.environ["RANK"])
        # Stage 1 creates the process group from the torchrun environment; it stays up for the next stages.
        m = model(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
        init = flat("init", m)
        cfg = ICTConfig(total_steps=4, batch_size=16, lr=1e-3, ema_beta=0.5, s0=2, s1=8, log_every=2,
                        sample_every=0, num_samples=10, save_every=0, hflip=True)
        seen = []
        res = train_ict(cfg, data(), m, out_dir=os.path.join(out, "run"), progress=False, callbacks=[seen.append])
        state = {**flat("model", res.model), **flat("ema", res.ema.module), **init}
        meta = {"records": str(len(seen)), "world": os.environ["WORLD_SIZE"],
                "initialized": str(dist.is_initialized())}
        # Stage 2: reference statistics (sharded, fp64 all-reduce) and the FD stage in the same group.
        info = init_distributed()
        net = feature_net()
        ref = reference_stats(net, data(), batch_size=8)
        state.update({"ref/mu": ref.mu, "ref/sigma": ref.sigma})
        # one image for two ranks: rank 1's shard is empty and still joins the all-reduce
        from fastcm.fid import compute_stats
        one = compute_stats(data().images[:1], net, batch_size=8, distributed=True)
        state["one/mu"], meta["one/n"] = one.mu, str(one.n)
        fd = finetune_fd(FD_CFG, model(7), net, ref, progress=False)
        state.update(flat("fd", fd.model))
        both = finetune_fd(FD_CFG.replace(total_steps=1, ict_weight=0.5), model(7), net, ref, dataset=data(),
                           progress=False)  # two forward passes with gradient through DDP in one step
        state.update(flat("fdict", both.model))
        meta["fd_records"] = str([r["fd"] for r in fd.records])
        cleanup_distributed(info)  # a no-op: the group was created by stage 1 (it is destroyed at exit)
        meta["after_cleanup"] = str(dist.is_initialized())
        save_file(state, os.path.join(out, f"rank{rank}.safetensors"), metadata=meta)


    if __name__ == "__main__":
        main(sys.argv[1])
''')


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_hold_identical_weights(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun(script, tmp_path, timeout=180)
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    keys = [k for k in a if k.startswith(("model/", "ema/"))]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys), "ranks diverged"
    assert any(not torch.equal(a[f"init/{k[6:]}"], b[f"init/{k[6:]}"]) for k in keys if k.startswith("model/"))
    assert any(not torch.equal(a[k], a[f"init/{k[6:]}"]) for k in keys if k.startswith("model/")), "no training"
    metas = []
    for r in range(2):
        with safe_open(str(tmp_path / f"rank{r}.safetensors"), "pt") as f:
            metas.append(f.metadata())
    assert [m["world"] for m in metas] == ["2", "2"] and metas[0]["initialized"] == "True"  # kept for stage 2
    assert [m["records"] for m in metas] == ["2", "0"]  # rank 0 logs, the others stay silent
    assert metas[0]["after_cleanup"] == "True"
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "samples"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_00000004.safetensors"]

    # FD stage: the ranks agree, and match one process training on the same global batch (each sample's noise
    # is seeded by its global index), which checks the feature gather and the world-size factor of the gradient.
    for prefix in ("fd/", "fdict/", "ref/"):
        assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix)), prefix
    ns = {"__name__": "ddp_worker"}
    exec(compile(WORKER, "ddp_worker", "exec"), ns)
    torch.set_num_threads(1)
    try:
        net = ns["feature_net"]()
        ref = reference_stats(net, ns["data"](), batch_size=8)
        single = finetune_fd(ns["FD_CFG"], ns["model"](7), net, ref, progress=False)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(a["ref/mu"], ref.mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(a["ref/sigma"], ref.sigma, rtol=0, atol=1e-12)
    with torch.no_grad():
        first = net.eval()(ns["data"]().images[:1]).double()[0]
    assert [m["one/n"] for m in metas] == ["1", "1"]
    for r in (a, b):
        torch.testing.assert_close(r["one/mu"], first, rtol=0, atol=1e-6)
    fd_ddp = [float(v) for v in metas[0]["fd_records"].strip("[]").split(",")]
    assert fd_ddp == pytest.approx([r["fd"] for r in single.records], rel=1e-6)
    # Compare each tensor's motion from the initial weights, not the weights: the ranks must move every tensor like
    # one process to fp32 round-off (unseeded or locally indexed dropout masks moved them ~7% differently).
    init = ns["model"](7).state_dict()
    moved = {k: single.model.state_dict()[k] - init[k] for k in init}
    assert max(v.abs().max().item() for v in moved.values()) > 1e-4  # far above fp32 round-off of the weights

    def worst(weights):  # the largest gap in motion, relative to the tensor's own motion (+ fp32 round-off)
        return max(((weights[k] - init[k] - v).abs().max() / (v.abs().max() + 1e-7)).item() for k, v in moved.items())

    assert worst({k: a[f"fd/{k}"] for k in init}) < 1e-3
    # and the dropout is really on: without it the same run moves some tensors far from there
    no_drop = finetune_fd(ns["FD_CFG"].replace(fd_dropout=False), ns["model"](7), net, ref, progress=False)
    assert worst(no_drop.model.state_dict()) > 1e-2
