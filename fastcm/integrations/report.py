"""What :func:`fastcm.patch` did to a model: the report it returns and the undo record it keeps on the model."""
from dataclasses import dataclass, field
from typing import List, Tuple

STATE_ATTR = "_fastcm_patch"  # plain attribute on the patched root module (not a buffer: state_dict is unchanged)


@dataclass
class PatchReport:
    """``replaced``: (module name, what it became); ``left_alone``: (module name, why it was not patched);
    ``notes``: (module name, how a replaced module behaves differently, e.g. masked attention calls).

    ``counts`` sums ``replaced`` per kind. A report of a model with nothing to patch is empty and falsy.
    """

    impl: str
    ops: Tuple[str, ...]
    replaced: List[Tuple[str, str]] = field(default_factory=list)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def counts(self) -> dict:
        out = {}
        for _, kind in self.replaced:
            out[kind] = out.get(kind, 0) + 1
        return out

    def __bool__(self) -> bool:
        return bool(self.replaced)

    def __str__(self) -> str:
        lines = [f"fastcm.patch(impl={self.impl!r}, ops={self.ops}): {len(self.replaced)} replaced, "
                 f"{len(self.left_alone)} left alone"]
        lines += [f"  {n:>4} x {kind}" for kind, n in self.counts.items()]
        lines += [f"  left alone: {name or '<root>'}: {why}" for name, why in self.left_alone]
        lines += [f"  note: {name or '<root>'}: {why}" for name, why in self.notes]
        return "\n".join(lines)


@dataclass
class PatchState:
    """The report plus the undo records, run in reverse order by :func:`fastcm.unpatch`.

    Records are data, not closures, so ``copy.deepcopy`` / pickle of a patched model map them onto the copy:
    ("module", parent, name, original, replacement), ("class", module, original class), ("processors", model or
    attention layer), ("attr", module, attribute name). Undo reads the model's state at unpatch time: a
    replacement's current Parameters and buffers (after ``load_state_dict(assign=True)``, ``.to()``, ``to_empty``)
    go back into the original module, and only processors that are still fastcm's are swapped back.
    """

    report: PatchReport
    undo: List[tuple] = field(default_factory=list)

    def restore(self) -> None:
        while self.undo:
            kind, target, *rest = self.undo.pop()
            if kind == "module":
                _restore_module(target, *rest)
            elif kind == "class":
                target.__class__ = rest[0]
                target.__dict__.pop("_fastcm_impl", None)
            elif kind == "processors":
                from .diffusers_unet import restore_processors

                restore_processors(target)
            elif kind == "attr":
                target.__dict__.pop(rest[0], None)
            else:  # pragma: no cover
                raise AssertionError(f"unknown undo record {kind!r}")


def _restore_module(parent, name: str, original, replacement) -> None:
    """Put ``original`` back under ``parent.name`` holding the replacement's current tensors and mode.

    A module the user set there since patching (not ``replacement``) is theirs and stays."""
    if parent._modules.get(name) is not replacement:
        return
    for attr in ("_parameters", "_buffers"):
        mine, theirs = getattr(original, attr), getattr(replacement, attr)
        for key in mine:
            if key in theirs:
                mine[key] = theirs[key]
    original.train(replacement.training)
    setattr(parent, name, original)
