"""Forward-mode AD (JVP) for ops whose fast route is a ``torch.library.custom_op``.

A custom_op has no forward-AD hook in torch 2.13: ``torch.func.jvp`` through one silently returns a zero tangent,
and ``torch.autograd.forward_ad`` leaves the tangent None. And Dynamo refuses a
``torch.autograd.Function`` that defines ``jvp`` ("Unsupported custom jvp"), so the custom op must stay what
``torch.compile`` sees. The mechanism here keeps both:

  * no tangent on any input (training, sampling, ``torch.compile`` of a forward/backward): the op calls its
    custom op as before; nothing changes;
  * a tangent on some input (``torch.func.jvp``, ``forward_ad.make_dual``), in eager mode: the op calls
    ``JvpRule.apply`` instead, a ``torch.autograd.Function`` in split form (``forward(*args)``, ``setup_context``,
    ``backward``, ``jvp``) whose forward is the same custom op, whose backward is the custom op's registered
    backward (so the primal output of ``torch.func.jvp`` can still be back-propagated), and whose ``jvp`` is the
    op's tangent rule;
  * a tangent under ``torch.compile``: compiled ``torch.func.jvp`` drops custom ``jvp`` rules (pytorch#192985),
    which would be a silently wrong tangent, so it raises (``fullgraph=True`` reports this error; without
    fullgraph Dynamo falls back to eager for the frame, which computes the right tangent).

``has_tangent`` is the test: ``forward_ad.unpack_dual(t).tangent`` sees the tangents of ``torch.func.jvp`` and of
``forward_ad`` alike, eagerly and while Dynamo traces. A JvpRule is generic (attention can use it): it holds the
custom op call, its setup_context/backward pair and a tangent function of (inputs, outputs, tangents).
"""
import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

ISSUE = "https://github.com/pytorch/pytorch/issues/192985"
_SAVED = object()  # marks the positions of tensors kept with ctx.save_for_forward


def has_tangent(*values) -> bool:
    """True when any tensor among ``values`` carries a forward-mode tangent (torch.func.jvp or forward_ad)."""
    return any(isinstance(v, Tensor) and fwAD.unpack_dual(v).tangent is not None for v in values)


_SPLITTING = [False]  # set by split_duals(): forward-AD duals of fastcm.cm.jvp.dual_pass, never torch.func


@contextlib.contextmanager
def split_duals():
    """While active, a reference route called on ``torch.autograd.forward_ad`` duals (under autograd) computes its
    trainable output from the primals alone and its tangent by forward AD without a graph (:func:`split_dual`).
    Only for forward_ad dual levels (``torch.func.jvp`` wraps tensors its own way): ``fastcm.cm.jvp.dual_pass``
    enters it."""
    before, _SPLITTING[0] = _SPLITTING[0], True
    try:
        yield
    finally:
        _SPLITTING[0] = before


def split_dual(ref: Callable, *args, closed_form: Optional[Callable] = None, **kwargs):
    """``ref(*args, **kwargs)``, the same value and tangent, computed in two parts when :func:`split_duals` is
    active and some tensor argument carries a tangent (else one plain call):

    * the output, with its autograd graph, from the primals: autograd saves plain tensors for the backward (not
      their tangents, which forward AD keeps alive with every saved dual until the level closes) and the op's
      native backward runs (e.g. torch.group_norm's fused one instead of a dozen elementwise backward ops);
    * the tangent without a graph (the continuous-time methods stop its gradient). With ``closed_form``, the op's
      own tangent rule ``closed_form(primals, tangents, **kwargs) -> (output, tangent)`` makes both parts: it
      reuses the primal pass's intermediates (softmax weights, group statistics) instead of recomputing the
      primal inside forward AD; ``tangents`` has one entry per argument (None: none). Without it, forward AD of
      ``ref`` under ``torch.no_grad()``, whose intermediates are freed at once."""
    if not (_SPLITTING[0] and torch.is_grad_enabled() and has_tangent(*args, *kwargs.values())):
        return ref(*args, **kwargs)
    primal = lambda v: fwAD.unpack_dual(v).primal if isinstance(v, Tensor) else v  # noqa: E731
    if closed_form is not None:
        out, tangent = closed_form(tuple(map(primal, args)), tuple(map(tangent_of, args)),
                                   **{k: primal(v) for k, v in kwargs.items()})
        return fwAD.make_dual(out, tangent)
    out = ref(*map(primal, args), **{k: primal(v) for k, v in kwargs.items()})
    with torch.no_grad():
        tangent = fwAD.unpack_dual(ref(*args, **kwargs)).tangent
    return out if tangent is None else fwAD.make_dual(out, tangent)


def _refuse_compiled(name: str) -> None:
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"{name}: a forward-mode tangent (torch.func.jvp / forward_ad) cannot pass the Triton route under "
            f"torch.compile: compiled torch.func.jvp drops custom jvp rules ({ISSUE}) and would return a wrong "
            f"tangent. Run the JVP eagerly, or use impl='torch' inside the compiled function.")


class JvpRule:
    """Forward-mode AD for one custom op.

    Args:
        name: the op's public name (error messages).
        primal: ``primal(*args) -> output(s)``, the custom op call (runs with autograd off, as in any Function).
        setup_context, backward: the pair registered with the custom op's ``register_autograd``; they see the same
            ``ctx`` API (``save_for_backward``, ``saved_tensors``, ``needs_input_grad``).
        tangent: ``tangent(inputs, output, tangents) -> output tangent(s)``; ``tangents`` has one entry per input
            (None for inputs without a tangent, and for non-tensor inputs). Returns one tangent per output (None
            is read as zeros by autograd only for outputs the caller marks non-differentiable: return tensors).
        differentiable: indices of the outputs that carry a tangent / gradient (others are marked
            non-differentiable, e.g. saved statistics).
    """

    def __init__(self, name: str, primal: Callable, setup_context: Callable, backward: Callable,
                 tangent: Callable, differentiable: Sequence[int] = (0,)):
        self.name = name
        rule = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(*args):
                return primal(*args)

            @staticmethod
            def setup_context(ctx, inputs, output):
                setup_context(ctx, inputs, output)
                outs = output if isinstance(output, tuple) else (output,)
                # The tangent rule gets the inputs and outputs through save_for_forward (under torch.func.jvp the
                # raw objects are functorch wrappers, which a Triton launch cannot read).
                values = (*inputs, *outs)
                ctx.jvp_layout = (len(inputs), isinstance(output, tuple),
                                  [_SAVED if isinstance(v, Tensor) else v for v in values])
                ctx.save_for_forward(*(v for v in values if isinstance(v, Tensor)))
                fixed = [o for i, o in enumerate(outs) if i not in rule.differentiable and isinstance(o, Tensor)]
                if fixed:
                    ctx.mark_non_differentiable(*fixed)

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

            @staticmethod
            def jvp(ctx, *tangents):
                n_inputs, tuple_out, values = ctx.jvp_layout
                saved = iter(ctx.saved_tensors)
                values = [next(saved) if v is _SAVED else v for v in values]
                output = tuple(values[n_inputs:]) if tuple_out else values[n_inputs]
                with torch.no_grad():  # tangents need no graph: the methods stop their gradient (sCM Eq. 8)
                    return tangent(tuple(values[:n_inputs]), output, tangents)

        Function.__name__ = Function.__qualname__ = f"{name}_jvp"
        self.differentiable = tuple(differentiable)
        self.function = Function

    def apply(self, *args):
        """Run the op through the Function (call only when ``has_tangent(*args)``)."""
        _refuse_compiled(self.name)
        return self.function.apply(*args)


def tangent_of(value):
    """The forward-mode tangent of ``value`` (None for a non-tensor or a tensor without one), detached: the op
    rules compute tangents with no graph of their own: the methods stop their gradient (sCM Eq. 8)."""
    tangent = fwAD.unpack_dual(value).tangent if isinstance(value, Tensor) else None
    return None if tangent is None else tangent.detach()


class FusedJvpRule:
    """Forward-mode AD for an op whose output-and-tangent kernel also writes what the op's backward needs, so a
    call with tangents is ONE launch, with or without autograd (sCT / MeanFlow's one-pass training step).

    The Function takes the input tangents as ordinary inputs (as rCM packages its fused attention JVP):
    ``forward(*args, *tangents)`` runs ``fused(args, tangents) -> (outputs, tangent of outputs[0])`` once; the
    primal outputs are the op's outputs (outputs[0] differentiable, the rest saved statistics), backward is the
    custom op's registered backward on them, and the ``jvp`` staticmethod returns the tangent the launch already
    wrote (autograd hands it the tangents of ``args`` again, which are exactly ``tangents``). The tangent is kept
    on ctx only until ``jvp`` takes it, so it never lives as long as the graph.

    Args:
        name: the op's public name (error messages).
        fused: as above; ``tangents`` has one entry per argument (None: no tangent, or not a tensor).
        setup_context, backward: the pair registered with the custom op's ``register_autograd``.
    """

    def __init__(self, name: str, fused: Callable, setup_context: Callable, backward: Callable):
        self.name = name

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(*args):
                k = len(args) // 2
                outputs, tangent = fused(args[:k], args[k:])
                return (*outputs, tangent)

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.n_args, ctx.n_out = len(inputs) // 2, len(output) - 1
                setup_context(ctx, inputs[:ctx.n_args], output[:-1])
                ctx.tangent_out = output[-1]
                ctx.mark_non_differentiable(*output[1:])

            @staticmethod
            def backward(ctx, *grads):
                return (*backward(ctx, *grads[:-1]), *([None] * ctx.n_args))

            @staticmethod
            def jvp(ctx, *_tangents):
                tangent = ctx.tangent_out
                del ctx.tangent_out
                return (tangent, *([None] * ctx.n_out))

        Function.__name__ = Function.__qualname__ = f"{name}_fused_jvp"
        self.function = Function

    def apply(self, *args):
        """The op's output 0 (with its tangent) through the one launch (call only when ``has_tangent(*args)``)."""
        _refuse_compiled(self.name)
        return self.function.apply(*args, *(tangent_of(a) for a in args))[0]
