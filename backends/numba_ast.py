"""The vocabulary of the numba code generator: small constructors of the Python AST nodes
it emits, and the names of the lane's state.

The generator builds the ``lane`` function as a Python AST and unparses it; all its parts
(:mod:`numba_lowering`, :mod:`numba_fusion`, :mod:`numba_races`, :mod:`numba_module`) write
their nodes with these helpers, so the helpers live apart from all of them.
Every name the generated code uses starts with ``__``: spec names never do.
"""
from __future__ import annotations

import ast

#: The lane's state arguments, in the order the drivers pass them (see ``numba_kernels``
#: for what each holds); a race kernel takes them all but ``__live0``.
LANE_STATE = ["__alive", "__live0", "__res", "__x", "__tr", "__st", "__fs", "__grad", "__lsum", "__u", "__pkey",
              "__log_space", "__flags"]

#: The int64 arithmetic operators: checked for overflow (and zero divisors, shift counts).
ARITH = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.LShift, ast.RShift)


def _name(x, ctx=None):
    return ast.Name(x, ctx or ast.Load())


def _call(fn, *args):
    func = _name(fn) if isinstance(fn, str) else fn
    return ast.Call(func, list(args), [])


def _attr(value, attr):
    return ast.Attribute(value, attr, ast.Load())


def _np(attr):
    return _attr(_name("__np"), attr)


def _st(column, ctx=None):
    """``__st[column]``: a column of the lane's status row (``numba_kernels.ST_*``)."""
    return ast.Subscript(_name("__st"), ast.Constant(column), ctx or ast.Load())


def _const(value):
    """A constant as the generated source spells it: ``-9223372036854775808`` would read back
    as the negation of a number past int64 (Numba types it uint64), so INT64_MIN is written
    ``-9223372036854775807 - 1``."""
    if type(value) is int and value == -2**63:
        return ast.BinOp(ast.Constant(-2**63 + 1), ast.Sub(), ast.Constant(1))
    return ast.Constant(value)


def _mode(op, mode):
    """``__mode <op> mode``: a test of the lane's mode (``numba_kernels.MODE_*``)."""
    return ast.Compare(_name("__mode"), [op], [ast.Constant(mode)])
