"""NumPy reference backend: readable, obviously right, one lane at a time.

This backend *defines* what a spec means; the fast backends must agree with it.  It is the
reference implementation of the backend contract (:mod:`structdsl.program`): ``solve_flat``,
``replay_flat``, and the enumeration every backend's ``enumerate`` uses.

Lowering: the IR becomes one Python function ``spec(__rt, *params)`` whose statements are the
spec's own (line numbers kept, so tracebacks point at the user's file).  Every operation whose
NumPy meaning differs from the DSL's goes through a checked helper (``__get``/``__set`` for
indexing without wrap-around, ``__add`` & co. for int64 arithmetic that raises on overflow
and division by zero, ``__not`` for ``~`` on bools, ``__invert`` for ``~`` on ints); the type pass (:mod:`structdsl.typecheck`)
picks the helper.  Every race becomes a call ``__rt.race(...)`` / ``__rt.race_groups(...)`` to a
*race handler*, the only thing that differs between the semantics:

* :class:`Solver`     - residual races on given noise: argmin of the members' residuals,
  subtract the minimum from every member, retire the winner;
* :class:`Replayer`   - feeds a trace's winners back and records every race's member set
  (log p, its gradient and ``E | T`` follow from them in :mod:`structdsl.races`);
* :class:`Enumerator` - replays a prefix of winners, then runs on taking the first member of
  every later race and records the choices it did not take, so the caller can branch on
  every possible winner (one run per trace; see :meth:`Program.enumerate_flat`).

Predicates (``lambda *idx``) mean "evaluated for one atom with its scalar indices".  Each is
lowered twice: a grid version run once on read-only broadcasting index grids (used when the
type pass proves it grid-safe) and a per-atom version (used otherwise, and whenever the grid
version raises: short-circuits like ``i > 0 and x[i - 1]`` hold per atom, not on the grid).
"""
from __future__ import annotations

import ast
import heapq
import itertools
import math
from collections import namedtuple

import numpy as np

from structdsl import errors, ir, races
from structdsl.errors import (EmptyRaceError, EnumerationLimitError, NestingError, RaceError,
                              SpecIndexError, SpecOverflowError, SpecValueError,
                              SpecZeroDivisionError)
from structdsl.program import Program as _BaseProgram, Replay

_I64_MIN, _I64_MAX = -2**63, 2**63 - 1

#: A lowered predicate: ``grid`` (or None when not grid-safe) and ``atom`` versions.
Predicate = namedtuple("Predicate", "grid atom")


# ---- checked run-time helpers ------------------------------------------------------------
def _scalar(x):
    """NumPy scalars and 0-d arrays become Python ints/bools; arrays stay arrays."""
    if isinstance(x, np.ndarray):
        return x.item() if x.ndim == 0 else x
    if isinstance(x, np.generic):
        return x.item()
    return x


def _is_scalar(x):
    return not isinstance(x, np.ndarray)


def _as_int(x):
    """Bools count as 0/1 in arithmetic; the result is int64."""
    if isinstance(x, np.ndarray):
        return x.astype(np.int64) if x.dtype == bool else x
    return int(x)


def _check_scalar(r, what):
    if not _I64_MIN <= r <= _I64_MAX:
        raise SpecOverflowError(f"int64 overflow in {what} (the exact result is {r})")
    return r


def _add(a, b):
    a, b = _as_int(a), _as_int(b)
    if _is_scalar(a) and _is_scalar(b):
        return _check_scalar(a + b, "+")
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    r = a + b
    if (((a ^ r) & (b ^ r)) < 0).any():
        raise SpecOverflowError("int64 overflow in +")
    return r


def _sub(a, b):
    a, b = _as_int(a), _as_int(b)
    if _is_scalar(a) and _is_scalar(b):
        return _check_scalar(a - b, "-")
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    r = a - b
    if (((a ^ b) & (a ^ r)) < 0).any():
        raise SpecOverflowError("int64 overflow in -")
    return r


def _mul(a, b):
    a, b = _as_int(a), _as_int(b)
    if _is_scalar(a) and _is_scalar(b):
        return _check_scalar(a * b, "*")
    exact = np.asarray(a, dtype=object) * np.asarray(b, dtype=object)
    if ((exact < _I64_MIN) | (exact > _I64_MAX)).any():
        raise SpecOverflowError("int64 overflow in *")
    return exact.astype(np.int64)


def _nonzero_divisor(b, what):
    if (np.asarray(b) == 0).any():
        raise SpecZeroDivisionError(f"integer {what} by zero")


def _floordiv(a, b):
    a, b = _as_int(a), _as_int(b)
    _nonzero_divisor(b, "division")
    if _is_scalar(a) and _is_scalar(b):
        return _check_scalar(a // b, "//")
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if ((a == _I64_MIN) & (b == -1)).any():
        raise SpecOverflowError("int64 overflow in //")
    return a // b


def _mod(a, b):
    a, b = _as_int(a), _as_int(b)
    _nonzero_divisor(b, "modulo")
    if _is_scalar(a) and _is_scalar(b):
        return a % b
    return np.asarray(a, np.int64) % np.asarray(b, np.int64)


def _shift_count(s):
    if (np.asarray(s) < 0).any():
        raise SpecValueError("negative shift count")


_HUGE_SHIFT = 256          # past this, the exact result is written a * 2**s, not expanded


def _lshift(a, s):
    a, s = _as_int(a), _as_int(s)
    _shift_count(s)
    if _is_scalar(a) and _is_scalar(s):
        if s > _HUGE_SHIFT and a != 0:
            raise SpecOverflowError(f"int64 overflow in << (the exact result is {a} * 2**{s})")
        return _check_scalar(a << s, "<<")
    # a shift by 64 or more overflows unless the value is 0: no need for the exact number
    exact = np.asarray(a, dtype=object) << np.minimum(np.asarray(s, dtype=np.int64), 64).astype(object)
    if ((exact < _I64_MIN) | (exact > _I64_MAX)).any():
        raise SpecOverflowError("int64 overflow in <<")
    return exact.astype(np.int64)


def _rshift(a, s):
    a, s = _as_int(a), _as_int(s)
    _shift_count(s)
    if _is_scalar(a) and _is_scalar(s):
        return a >> s
    return np.asarray(a, np.int64) >> np.minimum(np.asarray(s, np.int64), 63)


def _neg(a):
    return _sub(0, a)


def _pos(a):
    return _as_int(a)


def _abs(a):
    a = _as_int(a)
    if _is_scalar(a):
        return _check_scalar(abs(a), "abs")
    if (a == _I64_MIN).any():
        raise SpecOverflowError("int64 overflow in abs")
    return np.abs(a)


def _not(a):
    """Logical not (``not x`` on a grid, ``~x`` on bools)."""
    return np.logical_not(a) if isinstance(a, np.ndarray) else not a


def _invert(a):
    """``~`` on ints: bitwise not."""
    return ~a if isinstance(a, np.ndarray) else ~int(a)


def _and(*xs):
    return _scalar(np.logical_and.reduce(np.broadcast_arrays(*xs)))


def _or(*xs):
    return _scalar(np.logical_or.reduce(np.broadcast_arrays(*xs)))


def _where(c, a, b):
    out = np.where(c, a, b)
    return _scalar(out if out.dtype == bool else out.astype(np.int64))


def _to_int(x):
    """A bool value stored into an int local becomes an int (``~`` must then be bitwise)."""
    return x.astype(np.int64) if isinstance(x, np.ndarray) else int(x)


def _copy(x):
    """Arrays are values: ``a = b`` copies."""
    return x.copy() if isinstance(x, np.ndarray) else x


def _check_index(x, idx, what):
    """Every integer index must lie in ``[0, dim)``: no wrap-around for negative indices."""
    shape = x.shape
    if len(idx) > len(shape):
        raise SpecIndexError(f"too many indices for an array of shape {x.shape}")
    for axis, i in enumerate(idx):
        if type(i) is int and 0 <= i < shape[axis]:        # the common case, first
            continue
        if isinstance(i, slice):
            continue
        if isinstance(i, np.ndarray) and i.dtype == bool:
            if i.shape != x.shape[:i.ndim]:
                raise SpecIndexError(f"mask of shape {i.shape} does not match shape {x.shape}")
            continue
        dim = x.shape[axis]
        if isinstance(i, np.ndarray):
            # as uint64 a negative index is huge: one reduction checks both ends
            if i.size and (i.view(np.uint64).max() >= dim if i.dtype == np.int64 else (i.min() < 0 or i.max() >= dim)):
                bad = int(i[(i < 0) | (i >= dim)].flat[0])
                raise SpecIndexError(f"{what} index {bad} is out of range for axis {axis} of size {dim}")
        elif not 0 <= i < dim:
            raise SpecIndexError(f"{what} index {int(i)} is out of range for axis {axis} of size {dim}")


def _in_range(x, idx):
    """``idx`` names one element of ``x`` with int indices in range (the common case, which
    needs none of :func:`_check_index`'s other cases)."""
    if len(idx) != x.ndim:
        return False
    for i, d in zip(idx, x.shape):
        if type(i) is not int or not 0 <= i < d:
            return False
    return True


def _get(x, idx):
    if _in_range(x, idx):
        return x.item(idx)                                  # a Python int or bool
    _check_index(x, idx, "read")
    v = x[idx]
    if isinstance(v, np.generic):                           # an element (``_scalar``, inlined)
        return v.item()
    return _copy(_scalar(v))


def _set(x, idx, value):
    if not _in_range(x, idx):
        _check_index(x, idx, "write")
    x[idx] = value


def _int_of(x):
    # an atom's index grid in a grid-safe predicate: the per-atom scalars, elementwise
    return int(x) if np.ndim(x) == 0 else np.asarray(x).astype(np.int64)


def _bool_of(x):
    return bool(x) if np.ndim(x) == 0 else np.asarray(x) != 0


def _dtype(name):
    return bool if name == "bool" else np.int64


def _reduce(fn, what):
    def reduce(a):
        a = np.asarray(a)
        if a.size == 0:
            raise SpecValueError(f"{what}() of an empty array")
        return _scalar(fn(a))
    return reduce


def _sum(a):
    a = np.asarray(a, dtype=np.int64)
    # possible overflow: exact sum (|a| from the extremes: np.abs(INT64_MIN) wraps to itself)
    if a.size and max(int(a.max()), -int(a.min())) * a.size > _I64_MAX:
        return _check_scalar(int(sum(int(v) for v in a.flat)), "sum")
    return int(a.sum())


def _elementwise(fn):
    def apply(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        out = np.asarray(out)
        return _scalar(out if out.dtype == bool else out.astype(np.int64))
    return apply


#: What each primitive (:mod:`structdsl.primitives`) means on NumPy values: the lowering
#: calls ``__dsl_<name>`` with the lowered arguments (``live`` gets the lane's race handler).
PRIMITIVE_RULES = {
    "live": lambda rt: rt.live(),
    "arange": lambda n: np.arange(n, dtype=np.int64),
    "zeros": lambda shape, dtype="int": np.zeros(shape, dtype=_dtype(dtype)),
    "ones": lambda shape, dtype="int": np.ones(shape, dtype=_dtype(dtype)),
    "full": lambda shape, value, dtype=None: np.full(
        shape, value, dtype=_dtype(dtype) if dtype else bool if isinstance(value, bool) else np.int64),
    "where": _where,
    "minimum": _elementwise(np.minimum), "maximum": _elementwise(np.maximum),
    "min": _reduce(np.min, "min"), "max": _reduce(np.max, "max"),
    "argmin": _reduce(np.argmin, "argmin"), "argmax": _reduce(np.argmax, "argmax"),
    # ``a.any()`` skips ``np.any``'s dispatch wrapper (the reference runs lane by lane)
    "any": lambda a: bool(a.any() if isinstance(a, np.ndarray) else a),
    "all": lambda a: bool(a.all() if isinstance(a, np.ndarray) else a),
    "sum": _sum, "abs": _abs, "int": _int_of, "bool": _bool_of,
}

#: The names the lowered code reads (all reserved: user names cannot start with ``__``).
NAMESPACE = {
    "__builtins__": {"range": range},
    "__get": _get, "__set": _set, "__copy": _copy, "__to_int": _to_int,
    "__add": _add, "__sub": _sub, "__mul": _mul, "__floordiv": _floordiv, "__mod": _mod,
    "__lshift": _lshift, "__rshift": _rshift, "__neg": _neg, "__pos": _pos,
    "__not": _not, "__invert": _invert, "__and": _and, "__or": _or, "__where": _where,
    "__ALL": slice(None), "__P": Predicate,
    **{f"__dsl_{k}": v for k, v in PRIMITIVE_RULES.items()},
}

_ARITH = {ast.Add: "__add", ast.Sub: "__sub", ast.Mult: "__mul", ast.FloorDiv: "__floordiv",
          ast.Mod: "__mod", ast.LShift: "__lshift", ast.RShift: "__rshift"}


# ---- lowering ---------------------------------------------------------------------------
def _name(id_):
    return ast.Name(id_, ast.Load())


def _call(fn, *args):
    return ast.Call(_name(fn), list(args), [])


class _Lowering:
    """IR -> Python AST, guided by the types (``grid``: lowering a predicate's grid version,
    where the atom indices are arrays and every atom-dependent choice is elementwise)."""

    def __init__(self, typing):
        self.types = typing
        self.grid = False

    def elementwise(self, *nodes):
        return any(self.types.of(n).ndim or (self.grid and self.types.of(n).varying) for n in nodes)

    def expr(self, node):
        out = self._expr(node)
        return ast.copy_location(out, node) if hasattr(node, "lineno") else out

    def _expr(self, node):
        if isinstance(node, ast.Constant):
            return ast.Constant(node.value)
        if isinstance(node, ast.Name):
            return _name(node.id)
        if isinstance(node, ast.Tuple):
            return ast.Tuple([self.expr(e) for e in node.elts], ast.Load())
        if isinstance(node, ast.BinOp):
            left, right = self.expr(node.left), self.expr(node.right)
            if type(node.op) in _ARITH:
                return _call(_ARITH[type(node.op)], left, right)
            return ast.BinOp(left, node.op, right)                # & | ^: NumPy's meaning is ours
        if isinstance(node, ast.UnaryOp):
            x = self.expr(node.operand)
            if isinstance(node.op, ast.USub) and isinstance(x, ast.Constant) and type(x.value) is int \
                    and x.value != _I64_MIN:                      # -INT64_MIN overflows: checked below
                return ast.Constant(-x.value)                     # -1 stays -1 in the source
            if isinstance(node.op, ast.USub):
                return _call("__neg", x)
            if isinstance(node.op, ast.UAdd):
                return _call("__pos", x)
            if isinstance(node.op, ast.Invert) and self.types.of(node.operand).dtype == "int":
                return _call("__invert", x)
            if isinstance(node.op, ast.Not) and not self.elementwise(node.operand):
                return ast.UnaryOp(ast.Not(), x)
            return _call("__not", x)                               # ~bool, or `not` on a grid
        if isinstance(node, ast.BoolOp):
            values = [self.expr(v) for v in node.values]
            if self.elementwise(*node.values):
                return _call("__and" if isinstance(node.op, ast.And) else "__or", *values)
            return ast.BoolOp(node.op, values)                     # scalars: short-circuit
        if isinstance(node, ast.Compare):
            return ast.Compare(self.expr(node.left), node.ops, [self.expr(node.comparators[0])])
        if isinstance(node, ast.IfExp):
            test, body, orelse = self.expr(node.test), self.as_type(node.body, node), self.as_type(node.orelse, node)
            if self.elementwise(node.test):
                return _call("__where", test, body, orelse)
            if self.types.of(node).ndim:      # an array chosen by a scalar test: a value, not an alias
                body, orelse = (_call("__copy", x) if isinstance(n, ast.Name) else x
                                for x, n in ((body, node.body), (orelse, node.orelse)))
            return ast.IfExp(test, body, orelse)                   # scalar condition: lazy
        if isinstance(node, ast.Subscript):
            return _call("__get", self.expr(node.value), self.index(node.slice))
        if isinstance(node, ast.Call):
            return self.call(node)
        raise TypeError(f"cannot lower {type(node).__name__}")  # pragma: no cover

    def as_type(self, node, like):
        """``node`` lowered, converted to int when ``like``'s type is int and it is bool."""
        out = self.expr(node)
        if self.types.of(like).dtype == "int" and self.types.of(node).dtype == "bool":
            return ast.copy_location(_call("__to_int", out), node)
        return out

    def index(self, node):
        elts = node.elts if isinstance(node, ast.Tuple) else [node]
        return ast.Tuple([_name("__ALL") if isinstance(e, ast.Slice) else self.expr(e) for e in elts],
                         ast.Load())

    def call(self, node):
        name = self.types.primitive(node).name
        if name == "live":
            return _call("__dsl_live", _name("__rt"))
        args = [self.dtype_or_expr(a) for a in node.args]
        keywords = [ast.keyword(k.arg, self.dtype_or_expr(k.value)) for k in node.keywords]
        return ast.Call(_name(f"__dsl_{name}"), args, keywords)

    def dtype_or_expr(self, node):
        if isinstance(node, ast.Name) and node.id in ("int", "bool"):
            return ast.Constant(node.id)
        return self.expr(node)

    # ---- predicates ---------------------------------------------------------------------
    def predicate(self, pred):
        """``__P(grid lambda or None, per-atom lambda)``."""
        args = ast.arguments(posonlyargs=[], args=[ast.arg(p) for p in pred.params],
                             kwonlyargs=[], kw_defaults=[], defaults=[])
        self.grid = False
        atom = ast.Lambda(args, self.expr(pred.body))
        grid = ast.Constant(None)
        if self.types.grid_safe(pred):
            self.grid = True
            try:
                grid = ast.Lambda(args, self.expr(pred.body))
            finally:
                self.grid = False
        node = _call("__P", grid, atom)
        node.lineno = pred.line
        return node

    def members(self, m):
        if m is None:
            return ast.Constant(None)
        return self.predicate(m) if isinstance(m, ir.Pred) else self.expr(m)

    # ---- statements -----------------------------------------------------------------------
    def statements(self, stmts):
        out = []
        for s in stmts:
            for node in self.statement(s):
                node.lineno = getattr(node, "lineno", None) or s.line
                out.append(node)
        return out

    def rt(self, method, *args):
        return ast.Call(ast.Attribute(_name("__rt"), method, ast.Load()), list(args), [])

    def value_for(self, target_name, value_node):
        """A value bound to a local: arrays copied (values, not views), bools widened for
        int locals."""
        out = self.expr(value_node)
        t, local = self.types.of(value_node), self.types.locals[target_name]
        if t.ndim and isinstance(value_node, ast.Name):
            out = _call("__copy", out)
        if local.dtype == "int" and t.dtype == "bool":
            out = _call("__to_int", out)
        return out

    def statement(self, s):
        if isinstance(s, ir.Assign):
            return self.assign(s)
        if isinstance(s, ir.AugAssign):
            target = s.target
            if isinstance(target, ast.Name):
                current = _name(target.id)
            else:
                current = _call("__get", self.expr(target.value), self.index(target.slice))
            value = self.expr(s.value)
            if type(s.op) in _ARITH:
                new = _call(_ARITH[type(s.op)], current, value)
            else:
                new = ast.BinOp(current, s.op, value)
            if isinstance(target, ast.Name):
                return [ast.Assign([ast.Name(target.id, ast.Store())], new)]
            return [ast.Expr(_call("__set", self.expr(target.value), self.index(target.slice), new))]
        if isinstance(s, ir.If):
            return [ast.If(self.expr(s.test), self.statements(s.body) or [ast.Pass()],
                           self.statements(s.orelse))]
        if isinstance(s, ir.Loop):
            return [ast.For(ast.Name(s.var, ast.Store()), _call("range", self.expr(s.count)),
                            self.statements(s.body) or [ast.Pass()], [])]
        if isinstance(s, ir.Break):
            return [ast.Break()]
        if isinstance(s, ir.Fail):
            return [ast.If(self.expr(s.test), [ast.Expr(self.rt("fail", ast.Constant(s.error),
                                                                 ast.Constant(s.message)))], [])]
        if isinstance(s, ir.Race):
            call = self.rt("race", ast.Constant(s.race_id), self.members(s.members),
                           ast.Constant(s.allow_empty))
            return [ast.Assign([_targets(s.targets)], call)]
        if isinstance(s, ir.GroupRace):
            call = self.rt("race_groups", ast.Constant(s.race_id), self.members(s.key),
                           self.expr(s.groups), ast.Constant(s.allow_empty))
            return [ast.Assign([_targets(s.targets)], call)]
        raise TypeError(f"unknown IR statement {type(s).__name__}")  # pragma: no cover

    def assign(self, s):
        out = []
        first = None
        for target in s.targets:
            if isinstance(target, ast.Tuple):
                values = [self.value_for(t.id, v) if isinstance(t, ast.Name) else self.expr(v)
                          for t, v in zip(target.elts, s.value.elts)]
                temps = [f"__t{i}" for i in range(len(values))]
                out.append(ast.Assign([ast.Tuple([ast.Name(t, ast.Store()) for t in temps], ast.Store())],
                                      ast.Tuple(values, ast.Load())))
                for t, temp in zip(target.elts, temps):
                    out.append(self.bind(t, _name(temp)))
                continue
            if first is None:
                value = self.value_for(target.id, s.value) if isinstance(target, ast.Name) \
                    else self.expr(s.value)
                out.append(self.bind(target, value))
                first = target
            else:     # `a = b = value`: each name gets its own copy
                out.append(self.bind(target, _call("__copy", self.expr(first) if isinstance(first, ast.Name)
                                                   else self.expr(s.value))))
        return out

    def bind(self, target, value):
        if isinstance(target, ast.Name):
            return ast.Assign([ast.Name(target.id, ast.Store())], value)
        return ast.Expr(_call("__set", self.expr(target.value), self.index(target.slice), value))


def _targets(names):
    if len(names) == 1:
        return ast.Name(names[0], ast.Store())
    return ast.Tuple([ast.Name(n, ast.Store()) for n in names], ast.Store())


def lower(program: ir.Program, typing, namespace):
    """Compile the IR to ``f(__rt, *params) -> tuple of outputs`` and the atoms' ``valid``
    to ``g(*params) -> Predicate`` (or None)."""
    low = _Lowering(typing)
    body = low.statements(program.body) or [ast.Pass()]
    ret = ast.Return(ast.Tuple([_name(o) for o in program.outputs], ast.Load()))
    ret.lineno = program.end_line
    params = [ast.arg(p) for p in program.params]
    args = ast.arguments(posonlyargs=[], args=[ast.arg("__rt")] + params,
                         kwonlyargs=[], kw_defaults=[], defaults=[])
    fdef = ast.FunctionDef(program.name, args, body + [ret], [], None, None, type_params=[]) \
        if "type_params" in ast.FunctionDef._fields else ast.FunctionDef(program.name, args, body + [ret], [], None, None)
    fdef.lineno = program.atoms.line
    module = _locate(ast.Module([fdef], type_ignores=[]), program.atoms.line)
    exec(compile(module, program.file, "exec"), namespace)
    function = namespace[program.name]
    function.lowered_source = ast.unparse(module)      # what the compiler generated, for reading
    valid = None
    if program.atoms.valid is not None:
        outer = ast.Lambda(ast.arguments(posonlyargs=[], args=params, kwonlyargs=[], kw_defaults=[],
                                         defaults=[]), low.predicate(program.atoms.valid))
        outer.lineno = program.atoms.line
        code = compile(_locate(ast.Expression(outer), program.atoms.line), program.file, "eval")
        valid = eval(code, namespace)
    return function, valid


def _locate(node, line):
    """Give generated nodes the line of their nearest located ancestor (user's lines kept)."""
    if "lineno" in node._attributes:
        line = getattr(node, "lineno", None) or line
        node.lineno = line
        if getattr(node, "end_lineno", None) is None or node.end_lineno < line:
            node.end_lineno = line
        node.col_offset = getattr(node, "col_offset", 0) or 0
        node.end_col_offset = getattr(node, "end_col_offset", 0) or 0
    for child in ast.iter_child_nodes(node):
        _locate(child, line)
    return node


def _user_line(exc, file):
    """The innermost line of the user's spec file in ``exc``'s traceback."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == file:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def evaluate_predicate(pred, grids, shape, dtype):
    """A predicate's value for every atom, flattened: on the index grids when it is
    grid-safe and raises nothing there, else atom by atom (the definition)."""
    if pred.grid is not None:
        try:
            value = np.asarray(pred.grid(*grids))
            return np.broadcast_to(value, shape).reshape(-1).astype(dtype, copy=False)
        except RaceError:
            pass          # a guard such as `i > 0 and x[i - 1]` holds atom by atom only
    out = np.empty(math.prod(shape), dtype=dtype)
    for k, idx in enumerate(np.ndindex(*shape)):
        try:
            out[k] = pred.atom(*idx)
        except RaceError as exc:
            exc.reason += f" (evaluating the predicate for atom {idx})"
            raise
    return out


# ---- race handlers ---------------------------------------------------------------------
class _Impossible(Exception):
    """A replayed winner was not a live member: the trace has probability zero."""


class _Lane:
    """State shared by every race handler of one lane: live atoms, retirements, checks."""

    def __init__(self, prog, inst, live):
        self.prog, self.inst = prog, inst
        self.alive = live.copy()              # bool [A]: valid, rate > 0, not yet a winner
        self.initially_live = live.reshape(inst.atom_shape).copy()
        self.initially_live.setflags(write=False)
        self.slot = 0                         # next trace position
        self.previous = None                  # member masks of the previous race (nesting)

    def error(self, cls, rid, message):
        p = self.prog.ir
        return cls(message, p.file, p.races[rid])

    def fail(self, error, message):
        """A compiler-inserted check failed (:class:`structdsl.ir.Fail`); the lowering
        locates the error at the check's line."""
        raise getattr(errors, error)(message)

    def live(self):
        """``live(noise)``: valid atoms whose logit is above -inf (a fresh array: a local
        holding it may be written)."""
        return self.initially_live.copy()

    def _values(self, rid, members, dtype):
        if members is None:
            return np.ones(self.inst.num_atoms, dtype=bool)
        if isinstance(members, Predicate):
            return evaluate_predicate(members, self.prog.grids(self.inst.atom_shape),
                                      self.inst.atom_shape, dtype)
        return np.asarray(members).reshape(-1)       # an array of the atoms' shape (typed)

    def race(self, rid, members, allow_empty):
        mask = self._values(rid, members, bool) & self.alive
        if not mask.any():
            if allow_empty:
                return -1 if len(self.inst.atom_shape) == 1 else (-1,) * len(self.inst.atom_shape)
            raise self.error(EmptyRaceError, rid, "race has no live member (every candidate is "
                             "retired, invalid or at logit -inf; race(..., allow_empty=True) "
                             "returns -1 instead)")
        (w,) = self._run(rid, [mask])
        return self._unravel(w)

    def race_groups(self, rid, key, groups, allow_empty):
        keys = self._values(rid, key, np.int64)
        bad = (keys < -1) | (keys >= groups)
        if bad.any():
            raise self.error(SpecValueError, rid, f"race_groups key {int(keys[bad][0])} outside "
                             f"[-1, {groups}) for atom "
                             f"{tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), self.inst.atom_shape))}")
        keys = np.where(self.alive, keys, -1)
        present = np.unique(keys[keys >= 0])
        out = np.full(groups, -1, dtype=np.int64)
        if present.size == 0:
            if not allow_empty:
                raise self.error(EmptyRaceError, rid, "race_groups has no live member in any group")
        else:
            out[present] = self._run(rid, [keys == g for g in present])
        if len(self.inst.atom_shape) == 1:
            return out
        idx = np.unravel_index(np.maximum(out, 0), self.inst.atom_shape)
        return tuple(np.where(out >= 0, i, -1).astype(np.int64) for i in idx)

    def _run(self, rid, masks):
        if self.prog.ir.nested:
            self._check_nested(rid, masks)
        winners = self.pick(masks)
        self.alive[winners] = False
        self.previous = (rid, masks)
        return winners

    def _check_nested(self, rid, masks):
        if self.previous is None:
            return
        prid, before = self.previous
        for m in masks:
            first = int(np.argmax(m))
            outer = next((b for b in before if b[first]), None)
            if outer is None or (m & ~outer).any():
                raise self.error(
                    NestingError, rid, f"spec {self.prog.ir.name!r} declares nested=True, but this "
                    f"race's members are not inside one member set of the previous race "
                    f"(line {self.prog.ir.races[prid]})")

    def _unravel(self, w):
        if len(self.inst.atom_shape) == 1:
            return int(w)
        return tuple(int(i) for i in np.unravel_index(w, self.inst.atom_shape))

    def _take_slot(self):
        if self.slot >= self.inst.max_races:  # pragma: no cover - bound is proven statically
            raise RaceError(f"{self.prog.ir.name}: more races than the static bound {self.inst.max_races}")
        self.slot += 1
        return self.slot - 1


class Solver(_Lane):
    """Residual races on given noise: the sample/solve semantics.

    ``log_space``: the weights are ``log E`` and residuals stay logs,
    ``log(r - m) = log r + log(1 - exp(log m - log r))``, exact at any scale.
    """

    def __init__(self, prog, inst, weights, log_space=False):
        super().__init__(prog, inst, weights < np.inf)
        self.residual = weights.copy()
        self.log_space = log_space
        self.trace = np.full(inst.max_races, -1, dtype=np.int64)

    def pick(self, masks):
        winners = []
        for m in masks:
            w = int(np.argmin(np.where(m, self.residual, np.inf)))
            if self.log_space:
                r, lo = self.residual[m], self.residual[w]
                with np.errstate(divide="ignore", invalid="ignore"):
                    # a tie leaves a zero residual (log -inf), as the linear solver does
                    self.residual[m] = np.where(r == lo, -np.inf, r + np.log(-np.expm1(lo - r)))
            else:
                self.residual[m] -= self.residual[w]
            self.trace[self._take_slot()] = w
            winners.append(w)
        return winners


class Replayer(_Lane):
    """Feeds a trace's winners back and records each race's member set (the log-probability
    and everything else follow from them in :mod:`structdsl.races`)."""

    def __init__(self, prog, inst, trace, logits):
        super().__init__(prog, inst, inst.valid.reshape(-1) & ~np.isneginf(logits))
        self.trace = trace
        self.members = np.zeros((inst.max_races, inst.num_atoms), dtype=bool)

    def pick(self, masks):
        winners = []
        for m in masks:
            slot = self._take_slot()
            w = int(self.trace[slot])
            if w < 0 or not m[w]:
                raise _Impossible
            self.members[slot] = m
            winners.append(w)
        return winners

    def finish(self):
        if (self.trace[self.slot:] >= 0).any():
            raise _Impossible      # the trace has winners the program never asked for


class Enumerator(_Lane):
    """Replays a prefix, recording member sets, then runs on to the end of the program taking
    the first member of every race past the prefix; ``branches`` records, for each of those
    races, its trace position and each member set's atoms (the choices not taken)."""

    def __init__(self, prog, inst, prefix, weights, exact, live=None):
        if live is None:
            live = inst.valid.reshape(-1) & (weights > 0 if exact else ~np.isneginf(weights))
        super().__init__(prog, inst, live)
        self.prefix = prefix
        self.taken = list(prefix)
        self.branches = []
        self.members = np.zeros((inst.max_races, inst.num_atoms), dtype=bool)

    def pick(self, masks):
        if self.slot >= len(self.prefix):
            choices = [np.flatnonzero(m).tolist() for m in masks]
            self.branches.append((self.slot, choices))
            self.taken.extend(c[0] for c in choices)
        winners = []
        for m in masks:
            slot = self._take_slot()
            self.members[slot] = m
            winners.append(self.taken[slot])
        return winners


class Probe(_Lane):
    """One random root-to-leaf walk of the trace tree (Knuth, 1975): every race takes a
    uniformly random member; ``estimate`` is the product of the member counts along the
    walk, an unbiased estimate of the number of traces (:meth:`Program.enumerate_flat`)."""

    def __init__(self, prog, inst, live, rng):
        super().__init__(prog, inst, live)
        self.rng = rng
        self.estimate = 1

    def pick(self, masks):
        winners = []
        for m in masks:
            choices = np.flatnonzero(m)
            self.estimate *= len(choices)
            self._take_slot()
            winners.append(int(choices[self.rng.integers(len(choices))]))
        return winners


# ---- the program -------------------------------------------------------------------------
class Program(_BaseProgram):
    """A spec compiled for the NumPy reference backend (see :class:`structdsl.program.Program`)."""

    backend = "numpy"

    def __init__(self, spec, **static_params):
        super().__init__(spec, **static_params)
        namespace = {**NAMESPACE, **self._constant_arrays}
        self.function, self._valid_fn = lower(self.ir, self.types, namespace)
        self._grids = {}

    @property
    def reference(self):
        return self

    @property
    def source(self):
        """The Python the IR was lowered to (races are calls to the race handler ``__rt``)."""
        return self.function.lowered_source

    def grids(self, shape):
        """Read-only broadcasting index grids of the atoms (shared by every lane and call)."""
        g = self._grids.get(shape)
        if g is None:
            g = tuple(np.ogrid[tuple(slice(0, s) for s in shape)]) if len(shape) > 1 \
                else (np.arange(shape[0]),)
            g = tuple(a.astype(np.int64) for a in g)
            for a in g:
                a.setflags(write=False)
            self._grids[shape] = g
        return g

    def _valid_mask(self, params, dims):
        if self._valid_fn is None:
            return np.ones(dims, dtype=bool)
        pred = self._valid_fn(*(params[p] for p in self.ir.params))
        try:
            return evaluate_predicate(pred, self.grids(dims), dims, bool).reshape(dims)
        except RaceError as exc:
            raise exc.locate(self.ir.file, _user_line(exc, self.ir.file))

    def _call(self, handler, inst, lane):
        try:
            return self.function(handler, *(inst.params[p] for p in self.ir.params))
        except RaceError as exc:
            raise exc.locate(self.ir.file, _user_line(exc, self.ir.file), lane)

    def solve_flat(self, inst, weights, log_space):
        traces = np.full((len(weights), inst.max_races), -1, dtype=np.int64)
        fields = []
        for b, w in enumerate(weights):
            lane = Solver(self, inst, w, log_space)
            fields.append(self._call(lane, inst, b))
            traces[b] = lane.trace
        return traces, _stack(fields, len(self.ir.outputs), weights.shape[0])

    def replay_flat(self, inst, traces, logits):
        possible = np.ones(len(traces), dtype=bool)
        members = np.zeros((len(traces), inst.max_races, inst.num_atoms), dtype=bool)
        for b in range(len(traces)):
            lane = Replayer(self, inst, traces[b], logits[b])
            try:
                self._call(lane, inst, b)
                lane.finish()
                members[b] = lane.members
            except _Impossible:
                possible[b] = False
        return Replay(possible, races.Members(members))

    def enumerate_flat(self, inst, weights, exact, max_traces):
        """Every trace of ``inst`` under ``weights`` ``[A]`` (exact rates or logits): traces,
        fields, probabilities, log-probabilities (:meth:`Program.enumerate`), in the
        lexicographic order of the traces.

        Each run of the program replays a waiting prefix and goes on to the end taking the
        first member of every later race (:class:`Enumerator`): one run per trace.  The
        choices it did not take become waiting prefixes, each of which ends in at least one
        trace (a race has a live member, or the run raises), so ``finished + waiting`` is a
        lower bound on the number of traces, raised by ``b - 1`` at every race past the
        prefix that branches ``b`` ways.  Waiting prefixes run shallowest first, where they
        branch the most, and the walk stops with :class:`EnumerationLimitError` as soon as the
        bound passes ``max_traces``: after about ``max_traces / (sum of b - 1 along a
        trace)`` runs, where walking depth first and counting only finished traces needed
        about ``max_traces``."""
        live = inst.valid.reshape(-1) & (weights > 0 if exact else ~np.isneginf(weights))
        self._refuse_if_clearly_too_many(inst, live, max_traces)
        done, queue = [], [(0, ())]            # a heap of waiting prefixes, shortest first
        while queue:
            _, prefix = heapq.heappop(queue)
            lane = Enumerator(self, inst, prefix, weights, exact, live)
            outs = self._call(lane, inst, None)
            done.append((tuple(lane.taken), outs, lane.members))
            more = sum(math.prod(map(len, choices)) - 1 for _, choices in lane.branches)
            if len(done) + len(queue) + more > max_traces:
                self._too_many(inst, max_traces)      # before building the other choices
            for slot, choices in lane.branches:
                head = tuple(lane.taken[:slot])
                combos = itertools.product(*choices)
                next(combos)                          # the one this run took
                for c in combos:
                    heapq.heappush(queue, (slot, head + c))
        done.sort(key=lambda d: d[0])                 # no trace is a prefix of another
        traces = np.full((len(done), inst.max_races), -1, dtype=np.int64)
        for i, (prefix, _, _) in enumerate(done):
            traces[i, :len(prefix)] = prefix
        members = np.array([m for _, _, m in done], dtype=bool).reshape(len(done), inst.max_races, inst.num_atoms)
        if exact:
            probs = np.array([races.exact_probability(weights, t, m) for t, m in zip(traces, members)] + [None],
                             dtype=object)[:-1]
            with np.errstate(divide="ignore"):
                logps = np.log(np.array([float(p) for p in probs], dtype=np.float64))
        else:
            x = np.broadcast_to(weights, (len(done), inst.num_atoms))
            logps = races.log_prob(x, traces, races.Members(members))
            probs = np.exp(logps)
        return traces, _stack([o for _, o, _ in done], len(self.ir.outputs), len(done)), probs, logps

    def _refuse_if_clearly_too_many(self, inst, live, max_traces, probes=16, low=4, factor=4):
        """Refuse before the walk when the ``low``-th smallest of ``probes`` random walks'
        estimates (:class:`Probe`, a fixed seed) exceeds ``factor * max_traces``.  Each
        estimate is unbiased and non-negative, so by Markov's inequality it exceeds
        ``factor`` times the true count with probability below ``1 / factor``; a law with at
        most ``max_traces`` traces is refused only if ``probes - low + 1`` walks all do so,
        a binomial tail below 4e-6 at the defaults.  Laws near the limit go on to the walk,
        which counts."""
        rng = np.random.default_rng(0)
        estimates = []
        for _ in range(probes):
            walk = Probe(self, inst, live, rng)
            self._call(walk, inst, None)
            estimates.append(walk.estimate)
            if sum(e <= factor * max_traces for e in estimates) >= low:
                return
        bound = sorted(estimates)[low - 1]
        self._too_many(inst, max_traces, f" (random walks of the trace tree estimate {bound} "
                                          f"or more: {low - 1} of {probes} estimated fewer)")

    def _too_many(self, inst, max_traces, why=""):
        raise EnumerationLimitError(
            f"{self.ir.name} with atoms {inst.atom_shape} has more than {max_traces} traces{why}; "
            f"enumerate(..., max_traces=N) raises the guard")


def _stack(rows, nfields, n):
    if n == 0:
        return [np.zeros((0,)) for _ in range(nfields)]
    return [np.stack([np.asarray(r[i]) for r in rows]) for i in range(nfields)]
