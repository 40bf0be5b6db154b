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
:meth:`RaceDistribution.log_prob <structdsl.torch.RaceDistribution.log_prob>` calls it on
the CPU fast path, eagerly and compiled: one fast path.  The samplers and the estimators'
native steps stay graph breaks (``structdsl.eager``): they draw from torch's generator
and hand NumPy arrays between kernels, which an operator would wrap at ~10 us per call
(``torch.library``'s dispatch on this 2-core machine), a twentieth of a training step.
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


@torch.library.custom_op("structdsl::log_prob_and_score", mutates_args=())
def log_prob_and_score(program: str, trace: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prog = _program(program)
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


@log_prob_and_score.register_fake
def _(program, trace, logits):
    return logits.new_empty(logits.shape[:1]), torch.empty_like(logits)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_logp, grad_score):
    (score,) = ctx.saved_tensors
    return None, None, grad_logp.reshape(grad_logp.shape + (1,) * (score.dim() - 1)) * score


log_prob_and_score.register_autograd(_backward, setup_context=_setup)
