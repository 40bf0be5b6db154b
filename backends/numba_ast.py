"""The vocabulary of the numba code generator: small constructors of the Python AST nodes
it emits, and the names of the lane's state.

The generator builds the ``lane`` function as a Python AST and unparses it; all its parts
(:mod:`numba_lowering`, :mod:`numba_fusion`, :mod:`numba_races`, :mod:`numba_module`) write
their nodes with these helpers, so the helpers live apart from all of them.
Every name the generated code uses starts with ``__``: spec names never do.
"""
from __future__ import annotations

import ast

#: The lane's state (locals of the generated chunk, one lane's rows; see ``numba_kernels`` for
#: what each holds), in the order a race kernel takes them, all but ``__live0``.
LANE_STATE = ["__alive", "__live0", "__res", "__pend", "__x", "__tr", "__st", "__fs", "__grad", "__lsum", "__u", "__pkey",
              "__log_space", "__flags"]

#: The int64 arithmetic operators: checked for overflow (and zero divisors, shift counts).
ARITH = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.LShift, ast.RShift)


def _name(x, ctx=None):
    return ast.Name(x, ctx or ast.Load())


#: The kernels of ``numba_kernels`` the generated code calls (as ``__ck`` for ``ck``...).
KERNELS = ("arg_extreme", "extreme", "ck", "ck2", "ck3", "fail", "gather1", "mask_set", "put", "put_flat", "sel",
           "race", "race_groups", "total_ck", "add_s", "sub_s", "mul_s", "floordiv_s", "mod_s", "lshift_s", "rshift_s",
           "neg_s", "abs_s", "add_a", "sub_a", "mul_a", "floordiv_a", "mod_a", "lshift_a", "rshift_a", "neg_a", "abs_a",
           "take", "total", "heap_init", "heap_pop", "block_size", "score_nested", "score_snap",
           "call_prepare_seeded", "call_prepare_sample", "call_prepare_solve", "call_prepare_replay",
           "call_finish_nested", "call_finish_score", "smin", "smax", "step_if",
           "copy_into", "fill")
#: The NumPy functions the generated code calls, each through its cached kernel
#: ``numba_kernels.np_<name>`` (as ``__np_<name>``): see :func:`_np`.
NUMPY_KERNELS = ("empty", "zeros", "ones", "full", "arange", "copy", "flatnonzero", "any", "all", "where",
                 "minimum", "maximum", "abs")
KERNELS += tuple("np_" + k for k in NUMPY_KERNELS)
_KERNEL_NAMES = frozenset("__" + k for k in KERNELS)


def _call(fn, *args):
    """``fn(*args)``; a kernel's int constant arguments (error codes, constant indices and
    operands) are passed as ``__np.int64(c)``: Numba compiles a called function once per
    argument type, and a bare constant types as ``Literal[int](c)``, so every error code
    compiled its own copy of ``ck``, ``fail_with``... (83 of ``fail_with`` for one spec, 7 of
    its 30 seconds of compilation).  Bool constants stay literal: a kernel's flags prune its
    branches at compile time, and they have two values."""
    func = _name(fn) if isinstance(fn, str) else fn
    if isinstance(func, ast.Name) and func.id in _KERNEL_NAMES:
        args = [_int64(a) for a in args]
    return ast.Call(func, list(args), [])


def _int64(node):
    """``node``, or ``__np.int64(node)`` for an int constant (a literal type to Numba)."""
    c = node.operand if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) else node
    if isinstance(c, ast.Constant) and type(c.value) is int:
        return ast.Call(_np("int64"), [node], [])
    return node


def _attr(value, attr):
    return ast.Attribute(value, attr, ast.Load())


def _np(attr):
    """``__np.<attr>`` (a dtype, a cast), or for a NumPy function of :data:`NUMPY_KERNELS` its
    cached kernel ``__np_<attr>``: NumPy's own overload would be typed and lowered again in
    every spec's chunk."""
    return _name("__np_" + attr) if attr in NUMPY_KERNELS else _attr(_name("__np"), attr)


def _st(column, ctx=None):
    """``__st[column]``: a column of the lane's status row (``numba_kernels.ST_*``)."""
    return ast.Subscript(_name("__st"), ast.Constant(column), ctx or ast.Load())


def _set_row(buffer, row, value, array):
    """``buffer[row] = value`` as the generated code's own stores write it: an array value
    through the ``put`` kernel (no NumPy slice assignment, see ``numba_kernels.put``)."""
    if array:
        return ast.Expr(_call("__put", ast.Subscript(buffer, row, ast.Load()), value))
    return ast.Assign([ast.Subscript(buffer, row, ast.Store())], value)


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
