"""The CPU fast path's log-probability as a PyTorch custom operator (``torch.library``).

``structdsl::log_prob_and_score(str program, Tensor trace, Tensor logits) -> (Tensor, Tensor)``

* ``program``: the handle of a numba program (:func:`handle`), a string, because an
  operator's arguments are tensors and plain values; the handle names the program in a
  process-wide weak table, so it lives exactly as long as the program.
* ``trace``: int64 ``[B, R]`` (``R = max_races``; ``-1`` padding); ``logits``: floating
  ``[B, *atom_shape]`` (entries at invalid atoms must be finite: the distribution replaces
  them by 0 first).
* returns ``log p(trace)`` ``[B]`` and its gradient in the logits ``[B, *atom_shape]``
  (``0`` where ``log p = -inf``), both in the logits' dtype, computed in float64 by the
  fused replay kernels (``score_flat``).  Differentiable in ``logits``: the backward is
  ``grad_logp[:, None] * score`` (the score itself has no gradient).

It has a fake (meta) implementation, so ``torch.compile`` puts it in its graph instead of
breaking there, and it passes ``torch.library.opcheck`` (``tests/test_ops.py``).
:meth:`RaceDistribution.log_prob <structdsl.torch.RaceDistribution.log_prob>` calls
:func:`log_prob`: the operator while Dynamo traces, and its very kernels and backward
through an ``autograd.Function`` in eager mode (the operator's eager dispatch costs more
than the kernel).  The samplers and the estimators'
native steps stay graph breaks (``structdsl.eager``): they draw from torch's generator
and hand NumPy arrays between kernels, which an operator's eager dispatch would wrap at
10-120 us per call on this 2-core machine (a T-REINFORCE+ step at n = 10 costs ~230 us).
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from .program import naming_lanes

_PROGRAMS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


def handle(program):
    """The operator argument that names ``program`` (a numba backend program): its spec's
    name and its id, registered in a weak table (the entry dies with the program) and kept
    on the program (``torch.compile`` then reads it as a constant)."""
    key = getattr(program, "_op_handle", None)
    if key is None:
        key = f"{program.ir.name}@{id(program):x}"
        _PROGRAMS[key] = program
        program._op_handle = key
    return key


def _program(key):
    program = _PROGRAMS.get(key)
    if program is None:
        raise RuntimeError(f"structdsl: no live program {key!r} (a handle is valid while its program lives)")
    return program


def _log_prob_and_score(prog, trace, logits):
    """The kernels behind the operator: ``(log p [B], score [B, *atom])`` in the logits'
    dtype, computed in float64 by ``prog.score_flat``."""
    x = logits.detach()
    A = math.prod(x.shape[1:])
    t = np.ascontiguousarray(trace.numpy(), dtype=np.int64)
    if t.size and not (t.min() >= -1 and t.max() < A):
        raise ValueError(f"trace entries must be flat atom indices in [0, {A}) or -1 padding")
    inst = prog.instance(tuple(x.shape[1:]))
    with naming_lanes((t.shape[0],)):
        scores = prog.score_flat(inst, t, np.ascontiguousarray(x.numpy(), dtype=np.float64).reshape(-1, A),
                                 want_grad=True)
    logp = torch.from_numpy(scores.logp)
    grad = torch.from_numpy(scores.grad.reshape(x.shape))
    return (logp if logp.dtype == x.dtype else logp.to(x.dtype)), (grad if grad.dtype == x.dtype else grad.to(x.dtype))


@torch.library.custom_op("structdsl::log_prob_and_score", mutates_args=())
def log_prob_and_score(program: str, trace: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _log_prob_and_score(_program(program), trace, logits)


@log_prob_and_score.register_fake
def _(program, trace, logits):
    return logits.new_empty(logits.shape[:1]), torch.empty_like(logits)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_logp, grad_score):
    (score,) = ctx.saved_tensors
    return None, None, _times(grad_logp, score)


def _times(grad_logp, score):
    return grad_logp.reshape(grad_logp.shape + (1,) * (score.dim() - 1)) * score


log_prob_and_score.register_autograd(_backward, setup_context=_setup)


class _EagerLogProb(torch.autograd.Function):
    """The operator's kernels and backward as an ``autograd.Function``, for eager mode."""

    @staticmethod
    def forward(ctx, logits, trace, prog):
        logp, score = _log_prob_and_score(prog, trace, logits)
        ctx.save_for_backward(score)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        (score,) = ctx.saved_tensors
        return _times(grad_logp, score), None, None


def log_prob(prog, trace, logits):
    """``log p(trace)`` ``[B]`` under ``logits`` ``[B, *atom]``, differentiable in them, on
    numba program ``prog``: the operator while ``torch.compile`` traces; eagerly, the same
    kernels and backward through an ``autograd.Function``, because the operator's eager
    dispatch costs 70-120 us per call on this 2-core machine (measured: 92 us without
    gradients, 140 us with, for a kernel of about 20 us), against a few us."""
    if torch.compiler.is_compiling():
        return log_prob_and_score(handle(prog), trace, logits)[0]
    return _EagerLogProb.apply(logits, trace, prog)
