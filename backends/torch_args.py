"""Argument checks of the torch backend's public API, on tensors.

:class:`TensorArguments` is the ``Program`` mixin that turns the logits, uniforms and traces a
caller passes (tensors on any device, or arrays) into the flat ``[B, ...]`` tensors the
lock-step machine runs on, refusing what the Program API refuses with its words (NaN or
+inf at a valid atom, a non-integer trace, uniforms outside (0, 1), batch shapes that do not
broadcast).  Kept apart from :mod:`torch_backend` so that the Program class holds the calls
themselves.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class TensorArguments:
    """Checks and flattening of the tensor arguments of a :class:`torch_backend.Program`."""

    def _logits(self, logits, what="logits"):
        if torch.is_tensor(logits):
            x = logits
        else:
            try:
                x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
            except (TypeError, ValueError) as exc:       # the Program API's words
                raise TypeError(f"{what} must be a real array: {exc}") from None
        if not torch.is_floating_point(x):
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
        k = self.atom_ndim
        if x.dim() < k:
            raise ValueError(f"{self.ir.name}: {what} must have shape {self.expected_shape()} (at least {k} "
                             f"dims), got shape {tuple(x.shape)}")
        inst = self.instance(tuple(x.shape[x.dim() - k:]))
        if x.numel():
            # as the Program API: entries at invalid atoms are not part of the model, ignored
            # whatever they hold; NaN or +inf at a valid atom is refused, naming its index
            valid = self.atom_mask(inst, x.device).reshape(inst.atom_shape)
            nan, pinf = torch.isnan(x), torch.isposinf(x)
            bad_nan, bad_pinf, ignored = torch.stack([(nan & valid).any(), (pinf & valid).any(),
                                                      ((nan | pinf) & ~valid).any()]).tolist()
            if bad_nan:
                nan = nan & valid
                raise ValueError(f"{what} contain NaN ({int(nan.sum())} entries, first at "
                                 f"index {tuple(torch.nonzero(nan)[0].tolist())})")
            if bad_pinf:
                raise ValueError(f"{what} contain +inf (first at index "
                                 f"{tuple(torch.nonzero(pinf & valid)[0].tolist())}): a rate of +inf "
                                 f"has no race law; use large finite logits")
            if ignored:          # no NaN may reach a kernel (or a gradient: 0 * NaN is NaN)
                x = torch.where(valid, x, -math.inf)
        return x, tuple(x.shape[:x.dim() - k]), inst

    def _uniforms_t(self, uniforms, generator, shape, like, what="uniforms", seed=None, lane_ndim=1):
        if seed is not None:
            # seed= means what it means on every backend: the Philox stream (structdsl.philox),
            # so one seed gives one sample everywhere (generator= is torch's own stream)
            if uniforms is not None or generator is not None:
                raise TypeError("give either uniforms= or seed=, not both" if uniforms is not None
                                else "give either generator= or seed=, not both")
            uniforms = self._uniforms(None, seed, tuple(shape), what, lane_ndim)
        if uniforms is None:
            u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
            return u.clamp_min(torch.finfo(like.dtype).tiny)
        if generator is not None:
            raise TypeError("give either uniforms= or generator=, not both")
        u = uniforms if torch.is_tensor(uniforms) else torch.as_tensor(np.asarray(uniforms, dtype=np.float64))
        u = u.to(device=like.device, dtype=like.dtype)
        if tuple(u.shape) != tuple(shape):
            raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(u.shape)}")
        if u.numel() and not bool(((u > 0) & (u < 1)).all()):
            raise ValueError(f"{what} must lie strictly inside (0, 1)")
        return u

    def _trace(self, trace, logits):
        x, lbatch, inst = self._logits(logits)
        t = trace if torch.is_tensor(trace) else torch.as_tensor(np.asarray(trace))
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            # the Program API's words (structdsl.program), with NumPy's name of the dtype
            raise TypeError(f"trace must be an integer array, got dtype {str(t.dtype).removeprefix('torch.')}")
        R = inst.max_races
        if t.dim() < 1 or t.shape[-1] != R:
            raise ValueError(f"trace must have shape [..., {R}] (max_races of {self.ir.name} for atoms "
                             f"{inst.atom_shape}), got {tuple(t.shape)}")
        t = t.to(device=x.device, dtype=torch.int64)
        if t.numel() and bool(((t < -1) | (t >= inst.num_atoms)).any()):
            raise ValueError(f"trace entries must be flat atom indices in [0, {inst.num_atoms}) or -1 padding")
        try:
            batch = torch.broadcast_shapes(tuple(t.shape[:-1]), lbatch)
        except RuntimeError:
            raise ValueError(f"trace batch shape {tuple(t.shape[:-1])} does not broadcast with logits "
                             f"batch shape {lbatch}") from None
        B = math.prod(batch)
        t = t.expand(tuple(batch) + (R,)).reshape(B, R)
        x = x.expand(tuple(batch) + inst.atom_shape).reshape(B, inst.num_atoms)
        return t, x, tuple(batch), inst
