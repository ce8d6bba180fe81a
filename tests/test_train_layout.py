"""The module layout of fastcm.train, fastcm.cm and the demo: names that moved still import from their old places
(user code and pickled references keep working), and they are the very same objects as at their new homes."""
import importlib

import pytest

MOVED = [
    # (old module, new module, names)
    ("fastcm.train.loop", "fastcm.train.guards",
     ("NonFiniteError", "DivergenceError", "TrainingInterrupted", "NonFiniteGuard", "grad_norm", "weight_rms",
      "all_finite")),
    ("fastcm.train.loop", "fastcm.train.build", ("as_consistency_model", "sampling_method")),
    ("fastcm.train.checkpoint", "fastcm.train.checkpoint_file",
     ("CheckpointError", "CheckpointManager", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta",
      "set_aside_run", "FORMAT", "VERSION")),
]


@pytest.mark.parametrize("old, new, names", MOVED, ids=[f"{o}->{n}" for o, n, _ in MOVED])
def test_moved_names_import_from_old_paths(old, new, names):
    old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_mod, name) is getattr(new_mod, name), f"{old}.{name} is not {new}.{name}"


def test_first_names_are_aliases_of_the_method_neutral_ones():
    """ICTConfig / train_ict (every method trains through them) are MethodConfig / train_method, and a config.json
    written under the first name loads into the new one."""
    from fastcm import train
    from fastcm.train.loop import sampling_method

    assert train.ICTConfig is train.MethodConfig and train.train_ict is train.train_method
    cfg = train.MethodConfig(method="sct", total_steps=3)
    assert train.ICTConfig.from_dict(cfg.to_dict()) == cfg
    assert type(sampling_method("ict")).__name__ == "ICTMethod"


def test_get_method_without_loss_settings_samples_and_refuses_to_train():
    import torch

    from fastcm.cm import ICT_TWO_STEP_SIGMA, get_method, sample
    from fastcm.models import build_unet

    method = get_method("ict")
    model = method.make_model(build_unet("tiny", impl="torch"))
    two = method.sample(model, 5, 2, seeds=7)
    torch.testing.assert_close(two, sample(model, 5, sigmas=(80.0, ICT_TWO_STEP_SIGMA), seeds=7))
    torch.testing.assert_close(method.sample(model, 5, 2, seeds=7, batch_size=2), two)  # chunking keeps samples
    with pytest.raises(ValueError, match="built for sampling"):
        method.loss(model, torch.zeros(2, 1, 8, 8), None, 0)
    with pytest.raises(ValueError, match="need total_steps"):
        get_method("ict", s0=10)
