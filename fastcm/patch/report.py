"""What :func:`fastcm.patch` did to a model: the report it returns and the undo record it keeps on the model."""
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

STATE_ATTR = "_fastcm_patch"  # plain attribute on the patched root module (not a buffer: state_dict is unchanged)


@dataclass
class PatchReport:
    """``replaced``: (module name, what it became); ``left_alone``: (module name, why it was not patched).

    ``counts`` sums ``replaced`` per kind. A report of a model with nothing to patch is empty and falsy.
    """

    impl: str
    ops: Tuple[str, ...]
    replaced: List[Tuple[str, str]] = field(default_factory=list)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)

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
        return "\n".join(lines)


@dataclass
class PatchState:
    """The report plus the undo actions, run in reverse order by :func:`fastcm.unpatch`."""

    report: PatchReport
    undo: List[Callable[[], None]] = field(default_factory=list)

    def restore(self) -> None:
        while self.undo:
            self.undo.pop()()
