"""What :func:`fastcm.patch` did to a model: the report it returns and the undo record it keeps on the model."""
from dataclasses import dataclass, field
from typing import List, Tuple

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
    """The report plus the undo records, run in reverse order by :func:`fastcm.unpatch`.

    Records are data, not closures, so ``copy.deepcopy`` of a patched model (an EMA copy) maps them onto the copy:
    ("module", parent, name, original), ("class", module, original class), ("processor", attention, processor),
    ("processors", model, {name: processor}).
    """

    report: PatchReport
    undo: List[tuple] = field(default_factory=list)

    def restore(self) -> None:
        while self.undo:
            kind, target, *rest = self.undo.pop()
            if kind == "module":
                setattr(target, rest[0], rest[1])
            elif kind == "class":
                target.__class__ = rest[0]
                target.__dict__.pop("_fastcm_impl", None)
            elif kind == "processor":
                target.set_processor(rest[0])
            elif kind == "processors":
                target.set_attn_processor(dict(rest[0]))
            else:  # pragma: no cover
                raise AssertionError(f"unknown undo record {kind!r}")
