"""compile=True: the training step's model call and the one-step sampler run under torch.compile(fullgraph=True).

The "eager" dynamo backend traces the whole graph (fullgraph=True turns any graph break into an error) and then
runs the captured ops unchanged, so the compiled run must reproduce the eager run bit for bit. Kernel codegen
(inductor) is exercised per op by the ops tests and timed in benchmarks/; on this CPU it would cost minutes here.
"""
from fastcm.cm import ConsistencyModel
from fastcm.data import ArrayDataset
from fastcm.models import build_unet
from fastcm.train import ICTConfig, train_ict


def test_compiled_training_matches_eager_without_graph_breaks():
    import torch._dynamo
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.arange(32) % 10)
    cfg = ICTConfig(total_steps=3, batch_size=8, lr=1e-3, ema_beta=0.5, s0=2, s1=8, log_every=1, sample_every=0,
                    num_samples=10, save_every=0)
    results, samples = {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = ConsistencyModel(build_unet("tiny", num_classes=10, impl="torch"))  # dropout 0.1, attention
        got = []
        res = train_ict(cfg.replace(compile=compiled, compile_backend="eager"), data, model, progress=False,
                        callbacks=[_Samples(got)])
        results[compiled], samples[compiled] = res, got[-1]
        if compiled:
            # One graph for the student (grad) pass, one for the no-grad target pass, one for eval-mode sampling:
            # new sigmas, noise and dropout seeds every step must not recompile.
            assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
            assert not counters["graph_break"], dict(counters["graph_break"])
    eager, comp = results[False], results[True]
    assert [r["loss"] for r in eager.records] == [r["loss"] for r in comp.records]
    for a, b in zip(eager.model.state_dict().values(), comp.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(samples[False], samples[True])
    # the compiled wrapper is in place: parameter names (and so checkpoints) are unchanged
    assert list(eager.model.state_dict()) == list(comp.model.state_dict())
    torch._dynamo.reset()


class _Samples:  # a duck-typed callback: only the hook it needs
    def __init__(self, out):
        self.out = out

    def on_sample(self, step, images):
        self.out.append(images)
