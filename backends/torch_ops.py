"""Small tensor operations shared by the modules of the torch backend's lock-step machine
(:mod:`torch_machine`, :mod:`torch_exprs`, :mod:`torch_races`).

They live apart so that those modules can share them without importing each other: bool
reductions and bitwise ops done on the tensors' bytes, which torch runs several times faster
on CPU than its bool kernels, and the int64 bounds the overflow checks test against.
"""
from __future__ import annotations

import torch

_I64_MIN, _I64_MAX = -2**63, 2**63 - 1


def _any(x):
    """``x.any(-1)`` of a bool tensor, as the largest of its bytes: torch's bool reductions
    take several times longer on CPU (about 600 us against 20 us for 1024 x 1024)."""
    if x.dtype != torch.bool or x.shape[-1] == 0:
        return x.any(-1)
    return x.view(torch.uint8).amax(-1).bool()


def _all(x):
    """``x.all(-1)`` of a bool tensor (see :func:`_any`)."""
    if x.dtype != torch.bool or x.shape[-1] == 0:
        return x.all(-1)
    return x.view(torch.uint8).amin(-1).bool()


def _any_lead(x, B):
    """``[B]``: whether any entry of a lead-shaped bool (``[B or 1, *grid]``) is set."""
    x = _any(x.reshape(x.shape[0], -1)) if x.dim() > 1 else x
    return x.expand(B) if x.shape[0] == 1 else x


def _bools(fn, a, b):
    """``fn`` (``torch.bitwise_and``, ``_or`` or ``_xor``) of two bool tensors, computed on
    their bytes (0 or 1, so the result is a bool again): torch's bool kernels take about 3x
    longer when they broadcast on CPU (860 us against 270 for ``[1024, 32, 1] & [1024, 1, 32]``)."""
    if a.dtype == b.dtype == torch.bool:
        return fn(a.view(torch.uint8), b.view(torch.uint8)).view(torch.bool)
    return fn(a, b)
