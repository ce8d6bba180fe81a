"""The module layout of fastcm.train, fastcm.cm and the demo: names that moved still import from their old places
(user code and pickled references keep working), and they are the very same objects as at their new homes."""
import importlib

import pytest

MOVED = [
    # (old module, new module, names)
    ("fastcm.train.loop", "fastcm.train.guards",
     ("NonFiniteError", "DivergenceError", "TrainingInterrupted", "NonFiniteGuard", "grad_norm", "weight_rms",
      "all_finite")),
    ("fastcm.train.checkpoint", "fastcm.train.checkpoint_file",
     ("CheckpointError", "CheckpointManager", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta",
      "set_aside_run", "FORMAT", "VERSION")),
]


@pytest.mark.parametrize("old, new, names", MOVED, ids=[f"{o}->{n}" for o, n, _ in MOVED])
def test_moved_names_import_from_old_paths(old, new, names):
    old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_mod, name) is getattr(new_mod, name), f"{old}.{name} is not {new}.{name}"
