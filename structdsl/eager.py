"""The boundary between ``torch.compile`` and the native code (docs/design.md 4.6)."""
import functools

import torch


def eager(fn):
    """Mark an entry point that runs NumPy or Numba: under ``torch.compile`` the graph breaks
    at the call and ``fn`` runs eagerly (``torch.compiler.disable``); in eager mode ``fn`` is
    called directly, without the ~0.5 us that entering and leaving a disabled frame costs on
    every call of a training step."""
    disabled = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if torch.compiler.is_compiling():        # a constant True while Dynamo traces this frame
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)
    return entry
