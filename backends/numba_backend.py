"""Numba backend: every spec compiled to native code, parallel over the batch.

The IR and its types are lowered to the source of one ``lane`` function (the spec's own
statements, per batch element) and two drivers, ``solve_all`` and ``score_all``, that run
``lane`` over the batch with ``prange``.  The source is written once to a per-user cache
directory under a name keyed by the hash of the source itself, so Numba's on-disk cache
(``cache=True``) serves every later process.  Nothing here knows any structure: predicates
become loops over the atoms, races calls to the kernels of :mod:`numba_kernels`.

Meaning (the reference's, see docs/design.md section 3): indices are always checked, and so
is int64 arithmetic (an out-of-range index, a division by zero, an overflow, an empty race,
a broken nesting promise or more races than the static bound records an error code and the
values its message names; Python raises it with the reference's class, message, spec line
and batch element).  ``enumerate`` delegates to the reference backend.
"""
from __future__ import annotations

import ast
import collections
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from structdsl import errors, ir, races
from structdsl.program import Draw, Program as _BaseProgram, Replay, Scores
from structdsl.typecheck import Type

_CACHE_ENV = "STRUCTDSL_CACHE_DIR"


def cache_dir():
    """Where generated sources (and Numba's cache next to them) live: ``$STRUCTDSL_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/structdsl`` or ``~/.cache/structdsl``; a temporary directory when
    none of those can be written."""
    root = os.environ.get(_CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "structdsl")
    path = Path(root) / "numba"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(path)
    except OSError:
        import tempfile
        path = Path(tempfile.gettempdir()) / f"structdsl-{os.getuid() if hasattr(os, 'getuid') else 0}" / "numba"
        path.mkdir(parents=True, exist_ok=True)
    return path


class LoweringError(errors.SpecError):
    """A construct the numba backend does not lower (yet)."""


def _name(x, ctx=None):
    return ast.Name(x, ctx or ast.Load())


def _call(fn, *args):
    func = _name(fn) if isinstance(fn, str) else fn
    return ast.Call(func, list(args), [])


def _attr(value, attr):
    return ast.Attribute(value, attr, ast.Load())


def _np(attr):
    return _attr(_name("__np"), attr)


def _const(value):
    """A constant as the generated source spells it: ``-9223372036854775808`` would read back
    as the negation of a number past int64 (Numba types it uint64), so INT64_MIN is written
    ``-9223372036854775807 - 1``."""
    if type(value) is int and value == -2**63:
        return ast.BinOp(ast.Constant(-2**63 + 1), ast.Sub(), ast.Constant(1))
    return ast.Constant(value)


#: Emit checked int64 arithmetic (the DSL's meaning).  Only ``benchmarks/run.py`` turns it
#: off, to measure what the checks cost; such a program wraps on overflow.
_CHECK_OVERFLOW = True

#: One error code: the structdsl error class, the spec line, the message (a template when
#: ``fmt`` is set: the values the lane recorded fill it in, see :func:`_message`) and
#: whether it is raised inside a predicate (the reference then names the atom).
_Code = collections.namedtuple("_Code", "cls line message fmt pred")

#: The reference's scalar overflow messages give the exact result, from the operands.
_EXACT = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "//": lambda a, b: a // b, "neg": lambda a, b: -a, "abs": lambda a, b: abs(a),
          # past 256 bits the exact result is written a * 2**s, as the reference does
          "<<": lambda a, b: a << b if b <= 256 else f"{a} * 2**{b}", "sum": lambda a, b: a + b * 2**64}
_OP = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%",
       ast.LShift: "<<", ast.RShift: ">>"}
_HELPER = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.FloorDiv: "floordiv", ast.Mod: "mod",
           ast.LShift: "lshift", ast.RShift: "rshift"}

ST_ATOM = 7                       # numba_kernels.ST_ATOM: the atom (+1) a predicate failed for

_STATE = ["__alive", "__live0", "__res", "__x", "__tr", "__st", "__fs", "__grad", "__lsum", "__u", "__pkey",
          "__log_space", "__flags"]
_ARITH = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.LShift, ast.RShift)


class _NotFusable(Exception):
    """An expression the loop fusion leaves to the NumPy lowering."""


class _Codegen:
    """IR -> the source of a Numba module (one ``lane`` function and two drivers)."""

    def __init__(self, program: ir.Program, typing, constants=None):
        self.p, self.types = program, typing
        self.constants = constants or {}  # tuple constants the spec reads: read-only arrays
        self.codes = []                  # error code - 1 -> (error class name, line, message)
        self.rename = {}                 # predicate parameters -> their loop names
        self.count = 0
        # the nested fast path: every race inside the previous one, so in solve mode one
        # sort of the lane's noise serves every race (grouped races keep the generic path)
        self.fast = program.nested and not any(isinstance(s, ir.GroupRace)
                                               for s in ir.walk_statements(program.body))
        # ... and its score replays through snapshots when every race has a predicate (or
        # no condition): each race keeps the lane locals its predicate reads, and each
        # atom's exit race is then found by binary search over the races (see race())
        self.snap = self.fast and all(isinstance(s.members, (ir.Pred, type(None)))
                                      for s in ir.walk_statements(program.body) if isinstance(s, ir.Race))
        self.sites = []                  # snapshot races: (members, the lane locals it reads)
        self.site_of = {}                # id(race statement) -> its site
        self.line = program.atoms.line   # the statement being lowered
        self.in_pred = False             # lowering a predicate's body
        self.check_overflow = _CHECK_OVERFLOW

    # ---- helpers ----------------------------------------------------------------------------
    def code(self, cls, line, message, fmt=None):
        """A new error code (an AST constant); ``fmt``: the message is a template (see
        :func:`_message`)."""
        self.codes.append(_Code(cls, line, message, fmt, self.in_pred))
        return ast.Constant(len(self.codes))

    def overflow(self, symbol, line, array, fmt=None):
        """The code of an int64 overflow in ``symbol``: the reference's scalar message gives
        the exact result (``fmt``: how to compute it from the operands the lane records, see
        ``_EXACT``); its array message does not.  Code 0 when the checks are off."""
        if not self.check_overflow:
            return ast.Constant(0)
        if array:
            return self.code("SpecOverflowError", line, f"int64 overflow in {symbol}")
        return self.code("SpecOverflowError", line, f"int64 overflow in {symbol} (the exact result is {{exact}})",
                         fmt or symbol)

    def temp(self, kind="t"):
        self.count += 1
        return f"__{kind}{self.count}"

    def fail(self, node, message):
        raise LoweringError(f"the numba backend cannot lower this: {message}", self.p.file,
                            getattr(node, "lineno", None))

    def t(self, node):
        return self.types.of(node)

    def as_int(self, x, t):
        if t.dtype == "bool":
            return _call(_attr(x, "astype"), _np("int64")) if t.ndim else _call(_np("int64"), x)
        return x

    def convert(self, x, t, dtype):
        return self.as_int(x, t) if dtype == "int" else x

    # ---- expressions -------------------------------------------------------------------------
    def expr(self, node):
        out = self._expr(node)
        return ast.copy_location(out, node) if hasattr(node, "lineno") else out

    def _expr(self, node):
        if isinstance(node, ast.Constant):
            return _const(node.value)
        if isinstance(node, ast.Name):
            return _name(self.rename.get(node.id, node.id))
        if isinstance(node, ast.Tuple):
            return ast.Tuple([self.expr(e) for e in node.elts], ast.Load())
        if isinstance(node, ast.BinOp):
            return self.binop(node.op, self.operand(node.left), self.t(node.left),
                              self.operand(node.right), self.t(node.right), node)
        if isinstance(node, ast.UnaryOp):
            x, t = self.operand(node.operand), self.t(node.operand)
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                return self.unary(node.op, x, t, node.operand, node.lineno)
            if isinstance(node.op, ast.Not) or (isinstance(node.op, ast.Invert) and t.dtype == "bool" and not t.ndim):
                return ast.UnaryOp(ast.Not(), x)
            return ast.UnaryOp(ast.Invert(), x)           # bool arrays: logical; ints: bitwise
        if isinstance(node, ast.BoolOp):
            if any(self.t(v).ndim for v in node.values):
                values = [self.operand(v) for v in node.values]
                fn = _np("logical_and" if isinstance(node.op, ast.And) else "logical_or")
                out = values[0]
                for v in values[1:]:
                    out = _call(fn, out, v)
                return out
            return ast.BoolOp(node.op, [self.expr(v) for v in node.values])   # scalars: short-circuit
        if isinstance(node, ast.Compare):
            return ast.Compare(self.operand(node.left), node.ops, [self.operand(node.comparators[0])])
        if isinstance(node, ast.IfExp):
            dtype = self.t(node).dtype
            body = self.convert(self.expr(node.body), self.t(node.body), dtype)
            orelse = self.convert(self.expr(node.orelse), self.t(node.orelse), dtype)
            if self.t(node.test).ndim:
                return _call(_np("where"), self.expr(node.test), body, orelse)
            if self.t(node).ndim:            # an array chosen by a scalar test: a copy, never an alias
                body, orelse = (_call(_attr(x, "copy")) if isinstance(n, ast.Name) else x
                                for x, n in ((body, node.body), (orelse, node.orelse)))
            return ast.IfExp(self.expr(node.test), body, orelse)
        if isinstance(node, ast.Subscript):
            out = self.subscript(node, "read")
            return _call(_attr(out, "copy")) if self.t(node).ndim else out
        if isinstance(node, ast.Call):
            return self.call(node)
        self.fail(node, type(node).__name__)

    def operand(self, node):
        """``node`` as the operand of an operation that builds a new array or a scalar: a
        subscript may stay a view (no copy: nothing keeps it)."""
        if isinstance(node, ast.Subscript) and self.t(node).ndim:
            return ast.copy_location(self.subscript(node, "read"), node)
        return self.expr(node)

    def binop(self, op, left, lt, right, rt, where):
        if isinstance(op, _ARITH):
            left, right = self.as_int(left, lt), self.as_int(right, rt)
            return self.arith(op, left, right, bool(lt.ndim or rt.ndim), getattr(where, "lineno", None) or self.line)
        if not (lt.dtype == rt.dtype == "bool"):         # & | ^ mixing bool and int: bitwise
            left, right = self.as_int(left, lt), self.as_int(right, rt)
        return ast.BinOp(left, op, right)

    def arith(self, op, left, right, array, line, element=False):
        """``left op right`` on int64 values with the reference's checks, in its order: a
        zero divisor or a negative shift count (over the whole operand), then overflow.
        ``array``: an operand is an array (the reference's messages then name no value);
        ``element``: one element of such an operation (a fused loop's body)."""
        kind = type(op)
        checks = []
        if kind in (ast.FloorDiv, ast.Mod):
            checks.append(self.code("SpecZeroDivisionError", line,
                                    f"integer {'division' if kind is ast.FloorDiv else 'modulo'} by zero"))
        if kind in (ast.LShift, ast.RShift):
            checks.append(self.code("SpecValueError", line, "negative shift count"))
        if kind not in (ast.Mod, ast.RShift):
            checks.append(self.overflow(_OP[kind], line, array))
        if not self.check_overflow and kind in (ast.Add, ast.Sub, ast.Mult):
            return ast.BinOp(left, op, right)          # benchmarks only: wraps on overflow
        return _call(f"__{_HELPER[kind]}_{'a' if array and not element else 's'}", left, right, _name("__st"), *checks)

    def unary(self, op, x, t, operand, line):
        """``-x`` / ``+x`` on an int64 (or bool) value: ``-INT64_MIN`` overflows; a literal
        ``-1`` stays a literal, as in the reference."""
        x = self.as_int(x, t)
        if isinstance(op, ast.UAdd):
            return x
        if isinstance(operand, ast.Constant) and type(operand.value) is int and -2**63 <= -operand.value < 2**63:
            return _const(-operand.value)
        if not self.check_overflow:
            return ast.UnaryOp(op, x)
        return _call("__neg_a" if t.ndim else "__neg_s", x, _name("__st"), self.overflow("-", line, t.ndim, "neg"))

    def subscript(self, node, what, lowered=None):
        """``x[...]`` with every integer index checked (an AST usable as load or store);
        ``lowered``: the index expressions already lowered (one per index, None for ``:``)."""
        base = node.value
        x = self.expr(base)
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        arrays = [e for e in elts if not isinstance(e, ast.Slice) and self.t(e).ndim]
        if arrays:
            if len(elts) != 1 or self.t(base).ndim != 1:
                self.fail(node, "a gather x[idx] other than a 1-d array indexed by one int array")
            index = lowered[0] if lowered else self.expr(elts[0])
            return _call("__gather1", x, index, _name("__st"), self.index_code(node, what, 0))
        out, indices, later_sites = [], [], False
        for axis, e in enumerate(elts):
            if isinstance(e, ast.Slice):
                out.append(ast.Slice(None, None, None))
                continue
            codes = len(self.codes)
            index = lowered[axis] if lowered else self.expr(e)
            later_sites |= bool(indices) and len(self.codes) > codes
            code = self.index_code(node, what, axis)
            indices.append((index, code))
            dim = ast.Subscript(_attr(x, "shape"), ast.Constant(axis), ast.Load())
            out.append(_call("__ck", index, dim, _name("__st"), code))
        if later_sites and len(out) == len(indices) in (2, 3) and what == "read":
            # a later index has checked sites: the reference evaluates the whole index
            # before checking any axis, so the checks wait for every index's value
            dims = [ast.Subscript(_attr(x, "shape"), ast.Constant(a), ast.Load()) for a in range(len(indices))]
            return ast.Subscript(x, _call(f"__ck{len(indices)}", *[i for i, _ in indices], *dims, _name("__st"),
                                          *[c for _, c in indices]), ast.Load())
        index = out[0] if len(out) == 1 else ast.Tuple(out, ast.Load())
        return ast.Subscript(x, index, ast.Load())

    def index_code(self, node, what, axis):
        """The code of an index out of range, with the reference's message (the lane
        records the index and the dimension)."""
        return self.code("SpecIndexError", node.lineno,
                         f"{what} index {{a}} is out of range for axis {axis} of size {{b}}", "index")

    def shape(self, node):
        elts = node.elts if isinstance(node, ast.Tuple) else [node]
        return ast.Tuple([self.static(e) for e in elts], ast.Load())

    def static(self, node, checked=True):
        """A static expression (parameters, ints, arithmetic, min/max/abs): not typed by the
        pass, always an int; its arithmetic checked as the reference's (``checked=False``
        for a value the instance has already computed exactly, such as the atoms' dims)."""
        line = getattr(node, "lineno", None) or self.line
        if isinstance(node, ast.Call):
            args = [self.static(a, checked) for a in node.args]
            if node.func.id == "abs" and checked and self.check_overflow:
                return _call("__abs_s", *args, _name("__st"), self.overflow("abs", line, False))
            return _call(f"__{node.func.id}", *args)
        if isinstance(node, ast.BinOp):
            left, right = self.static(node.left, checked), self.static(node.right, checked)
            return self.arith(node.op, left, right, False, line) if checked else ast.BinOp(left, node.op, right)
        if isinstance(node, ast.UnaryOp):
            x = self.static(node.operand, checked)
            if checked:
                return self.unary(node.op, x, Type("int", ()), node.operand, line)
            return ast.UnaryOp(node.op, x)
        if isinstance(node, ast.Name):
            return _name(node.id)
        return _const(node.value)

    @staticmethod
    def dtype(node, default):
        name = node.id if isinstance(node, ast.Name) else default
        return _np("bool_" if name == "bool" else "int64")

    def call(self, node):
        name, args = node.func.id, node.args
        kws = {k.arg: k.value for k in node.keywords}
        t = self.t(node)
        if name == "live":
            dims = [_name(f"__d{i}") for i in range(len(self.p.atoms.dims))]
            return _call(_attr(_call(_attr(_name("__live0"), "reshape"), ast.Tuple(dims, ast.Load())), "copy"))
        if name == "arange":
            return _call(_np("arange"), self.static(args[0]))
        if name in ("zeros", "ones"):
            dt = args[1] if len(args) > 1 else kws.get("dtype")
            return _call(_np(name), self.shape(args[0]), self.dtype(dt, "int"))
        if name == "full":
            dtype = _np("bool_" if t.dtype == "bool" else "int64")
            return _call(_np("full"), self.shape(args[0]), self.convert(self.expr(args[1]), self.t(args[1]), t.dtype), dtype)
        ts = [self.t(a) for a in args]
        # every call below builds a new array or a scalar, except where() on a scalar test
        view = not (name == "where" and not t.ndim) and name not in ("int", "bool")
        xs = [self.operand(a) if view else self.expr(a) for a in args]
        if name == "where":
            a, b = self.convert(xs[1], ts[1], t.dtype), self.convert(xs[2], ts[2], t.dtype)
            if not t.ndim:
                return _call("__sel", xs[0], a, b)        # a call: both values evaluated
            return _call(_np("where"), xs[0], a, b)
        if name in ("minimum", "maximum") or (name in ("min", "max") and len(args) >= 2):
            fn = "minimum" if name in ("minimum", "min") else "maximum"
            xs = [self.convert(x, tt, t.dtype) for x, tt in zip(xs, ts)]
            out = xs[0]
            for x in xs[1:]:
                out = _call(_np(fn), out, x) if t.ndim else _call("__" + fn[:3], out, x)
            return out
        if name in ("min", "max", "argmin", "argmax"):
            helper = "__extreme" if name in ("min", "max") else "__arg_extreme"
            code = self.code("SpecValueError", node.lineno, f"{name}() of an empty array")
            return _call(helper, xs[0], ast.Constant(name.endswith("max")), _name("__st"), code)
        if name in ("any", "all"):
            return _call(_np(name), xs[0])
        if name == "sum":
            if ts[0].dtype == "bool" or not self.check_overflow:
                return _call("__total", xs[0])            # a count cannot overflow
            return _call("__total_ck", xs[0], _name("__st"), self.overflow("sum", node.lineno, False))
        if name == "abs":
            x = self.as_int(xs[0], ts[0])
            if not self.check_overflow:
                return _call(_np("abs"), x) if t.ndim else _call("__abs", x)
            return _call("__abs_a" if t.ndim else "__abs_s", x, _name("__st"),
                         self.overflow("abs", node.lineno, t.ndim))
        if name == "int":
            return _call(_np("int64"), xs[0])
        if name == "bool":
            return xs[0] if ts[0].dtype == "bool" else ast.Compare(xs[0], [ast.NotEq()], [ast.Constant(0)])
        self.fail(node, f"{name}()")

    # ---- statements ----------------------------------------------------------------------------
    def block(self, stmts):
        out = []
        for s in stmts:
            self.line = s.line
            for node in self.statement(s):
                ast.copy_location(node, ast.Pass(lineno=s.line, col_offset=0))
                out.append(node)
        return out

    def check(self):
        return ast.If(ast.Compare(ast.Subscript(_name("__st"), ast.Constant(0), ast.Load()), [ast.NotEq()],
                                  [ast.Constant(0)]), [ast.Return(None)], [])

    def value_for(self, name, node):
        x, t = self.expr(node), self.t(node)
        if t.ndim and isinstance(node, ast.Name):
            x = _call(_attr(x, "copy"))
        return self.convert(x, t, self.types.locals[name].dtype)

    def store(self, target, value, vtype, lowered=None, pre=()):
        """``target[...] = value`` (``value`` lowered; ``pre``: the statements before it,
        which :meth:`store_value` places after the indices when they must run first)."""
        elts = target.slice.elts if isinstance(target.slice, ast.Tuple) else [target.slice]
        sel = self.t(target)
        if sel.shape == ("mask",):
            return [*pre, ast.Expr(_call("__mask_set", self.expr(target.value), self.expr(elts[0]), value))]
        value = self.convert(value, vtype, self.types.locals[target.value.id].dtype)
        return [*pre, ast.Assign([self.subscript(target, "write", lowered)], value)]

    def store_value(self, target, node):
        """``target[...] = node``, in the reference's order: the indices, the value, then
        the checks.  A Python assignment evaluates its value first, so indices with checked
        sites of their own are evaluated into temporaries before it."""
        elts = target.slice.elts if isinstance(target.slice, ast.Tuple) else [target.slice]
        codes = len(self.codes)
        trial = [None if isinstance(e, ast.Slice) else self.expr(e) for e in elts]
        if len(self.codes) == codes or self.t(target).shape == ("mask",):
            del self.codes[codes:]
            return self.store(target, self.expr(node), self.t(node))
        pre, lowered = [], []
        for e in trial:
            if e is None:
                lowered.append(None)
                continue
            temp = self.temp("i")
            pre.append(ast.Assign([_name(temp, ast.Store())], e))
            lowered.append(_name(temp))
        return self.store(target, self.expr(node), self.t(node), lowered, pre)

    def statement(self, s):
        if isinstance(s, ir.Assign):
            out = []
            for target in s.targets:
                if isinstance(target, ast.Tuple):
                    temps = [self.temp() for _ in target.elts]
                    out.append(ast.Assign([ast.Tuple([_name(t, ast.Store()) for t in temps], ast.Store())],
                                          ast.Tuple([self.value_for(t.id, v) if isinstance(t, ast.Name) else self.expr(v)
                                                     for t, v in zip(target.elts, s.value.elts)], ast.Load())))
                    for t, temp, v in zip(target.elts, temps, s.value.elts):
                        if isinstance(t, ast.Name):
                            out.append(ast.Assign([_name(t.id, ast.Store())], _name(temp)))
                        else:
                            out += self.store(t, _name(temp), self.t(v))
                elif isinstance(target, ast.Name):
                    reduced = self.reduction(s.value)
                    if reduced is not None:
                        stmts, value = reduced
                        value = self.convert(value, Type("bool", ()), self.types.locals[target.id].dtype)
                        out += stmts + [ast.Assign([_name(target.id, ast.Store())], value)]
                        continue
                    out += (self.fused(target.id, s.value)
                            or [ast.Assign([_name(target.id, ast.Store())], self.value_for(target.id, s.value))])
                else:
                    out += self.store_value(target, s.value)
            return out
        if isinstance(s, ir.AugAssign):
            target = s.target
            if isinstance(target, ast.Name):
                new = self.binop(s.op, _name(target.id), self.t(target), self.expr(s.value), self.t(s.value), s.target)
                return [ast.Assign([_name(target.id, ast.Store())],
                                   self.convert(new, self.t(target), self.types.locals[target.id].dtype))]
            elts = target.slice.elts if isinstance(target.slice, ast.Tuple) else [target.slice]
            out, lowered = [], []
            for e in elts:                          # evaluate each index once, for read and write
                if isinstance(e, ast.Slice):
                    lowered.append(None)
                    continue
                temp = self.temp("i")
                out.append(ast.Assign([_name(temp, ast.Store())], self.expr(e)))
                lowered.append(_name(temp))
            current = self.subscript(target, "read", lowered)
            new = self.binop(s.op, current, self.t(target), self.expr(s.value), self.t(s.value), target)
            both_bool = self.t(target).dtype == self.t(s.value).dtype == "bool"
            result = Type("bool" if both_bool and not isinstance(s.op, _ARITH) else "int", self.t(target).shape)
            return out + self.store(target, new, result, lowered)
        if isinstance(s, ir.If):
            return self.if_statement(s.test, self.block(s.body) or [ast.Pass()], self.block(s.orelse))
        if isinstance(s, ir.Loop):
            return [ast.For(_name(s.var, ast.Store()), _call("__range", self.expr(s.count)),
                            [self.check()] + (self.block(s.body) or [ast.Pass()]), [])]
        if isinstance(s, ir.Break):
            return [ast.Break()]
        if isinstance(s, ir.Fail):        # a compiler-inserted check: the lane stops at once
            code = self.code(s.error, s.line, s.message)
            return [ast.If(self.expr(s.test), [ast.Expr(_call("__fail", _name("__st"), code)), ast.Return(None)], [])]
        if isinstance(s, ir.Race):
            return self.race(s)
        if isinstance(s, ir.GroupRace):
            return self.race_groups(s)
        raise TypeError(type(s).__name__)  # pragma: no cover

    # ---- loop fusion: a 1-d elementwise assignment as one loop, no temporary arrays ----------
    def if_statement(self, test, body, orelse):
        """``if test: body else: orelse``, with ``any``/``all`` of an elementwise expression
        in the test reduced by a fused loop run just before it.  ``a and b`` without an else
        is ``if a: if b:`` (``b`` only runs when ``a`` holds, as in Python)."""
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) and not orelse and \
                not any(self.t(v).ndim for v in test.values):
            for v in reversed(test.values[1:]):
                body = self.if_statement(v, body, [])
            return self.if_statement(test.values[0], body, [])
        negate = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
        reduced = self.reduction(test.operand if negate else test)
        if reduced is None:
            return [ast.If(self.expr(test), body, orelse)]
        stmts, value = reduced
        return stmts + [ast.If(ast.UnaryOp(ast.Not(), value) if negate else value, body, orelse)]

    def reduction(self, node):
        """``any(e)`` / ``all(e)`` of a 1-d elementwise expression ``e`` as one loop with no
        temporary array: ``(statements, result name)``, or None.  The loop evaluates every
        element (and its checks, in the NumPy lowering's order) unless ``e`` has no checked
        site in the loop, when it stops at the first decisive element."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("any", "all")
                and len(node.args) == 1 and not node.keywords):
            return None
        attempt = self.fuse(node.args[0])
        if attempt is None:
            return None
        i, value, fusion = attempt
        found = node.func.id == "any"             # the value an element decides
        out = self.temp("r")
        test = value if found else ast.UnaryOp(ast.Not(), value)
        decide = [ast.Assign([_name(out, ast.Store())], ast.Constant(found))]
        if not fusion["sites"]:
            decide.append(ast.Break())
        loop = ast.For(_name(i, ast.Store()), _call("__range", fusion["length"]),
                       fusion["body"] + [ast.If(test, decide, [])], [])
        stmts = fusion["pre"] + [ast.Assign([_name(out, ast.Store())], ast.Constant(not found)), loop]
        return self.first_error(fusion, stmts, lambda: self.expr(node)), _name(out)

    def first_error(self, fusion, stmts, unfused):
        """A fused loop whose first error may not be the NumPy lowering's (:meth:`exact`):
        when it meets one, the statement runs again unfused (``unfused()``: its NumPy-style
        lowering, on the same values), which records the reference's first error instead."""
        if self.exact(fusion):
            return stmts
        z, st0 = _name("__z"), ast.Subscript(_name("__st"), ast.Constant(0), ast.Load())
        met = ast.BoolOp(ast.And(), [ast.Compare(z, [ast.Eq()], [ast.Constant(0)]),
                                     ast.Compare(st0, [ast.NotEq()], [ast.Constant(0)])])
        again = [ast.Assign([ast.Subscript(_name("__st"), ast.Constant(0), ast.Store())], ast.Constant(0)),
                 ast.Assign([_name(self.temp("u"), ast.Store())], unfused())]
        return [ast.Assign([_name("__z", ast.Store())], st0)] + stmts + [ast.If(met, again, [])]

    def fused(self, name, node):
        """``name = <1-d elementwise expression>`` as one loop writing a fresh array (NumPy
        would allocate an array per operation: most of a vectorised spec's time).  Scalar
        subexpressions are hoisted before the loop, gathers become per-element reads; the
        result equals the NumPy lowering's, errors included (:meth:`first_error`).  Returns
        the statements, or None when the expression does not fuse."""
        attempt = self.fuse(node)
        if attempt is None:
            return None
        i, value, fusion = attempt
        t = self.t(node)
        dtype = self.types.locals[name].dtype
        if dtype == "int" and t.dtype == "bool":
            value = _call(_np("int64"), value)
        out = self.temp("f")
        n = _name(f"{out}n")
        fresh = _call(_np("empty"), n, _np("bool_" if dtype == "bool" else "int64"))
        if name in fusion["leaves"] and name not in fusion["gathered"] and self.exact(fusion):
            # the target is read only at the element being written: overwrite its buffer
            # (every array local owns its buffer; the size test guards a rebinding; not when
            # an error may run the statement again on the original values)
            x = _name(name)
            size = ast.Subscript(_attr(x, "shape"), ast.Constant(0), ast.Load())
            fresh = ast.IfExp(ast.Compare(size, [ast.Eq()], [n]), x, fresh)
        loop = ast.For(_name(i, ast.Store()), _call("__range", _name(f"{out}n")),
                       fusion["body"] + [ast.Assign([ast.Subscript(_name(out), _name(i), ast.Store())], value)], [])
        stmts = fusion["pre"] + [
            ast.Assign([_name(f"{out}n", ast.Store())], fusion["length"]),
            ast.Assign([_name(out, ast.Store())], fresh),
            loop]
        return self.first_error(fusion, stmts, lambda: self.value_for(name, node)) + [
            ast.Assign([_name(name, ast.Store())], _name(out))]

    def fuse(self, node):
        """Element ``i`` of the 1-d elementwise expression ``node``: ``(i, value, fusion)``
        (``fusion``: the statements before the loop and in its body, its length, its checked
        sites), or None when it does not fuse (then as if never tried: the NumPy lowering
        follows, with the same error codes)."""
        if self.t(node).ndim != 1 or isinstance(node, (ast.Name, ast.Constant)):
            return None
        i = self.temp("e")
        fusion = {"pre": [], "body": [], "length": None, "sites": [], "hoisted_checks": 0,
                  "leaves": set(), "gathered": set()}
        codes, count = len(self.codes), self.count
        try:
            value = self.element(node, i, fusion)
        except _NotFusable:
            value = None
        if value is None or fusion["length"] is None:
            del self.codes[codes:]
            self.count = count
            return None
        return i, value, fusion

    @staticmethod
    def exact(fusion):
        """Whether a fused loop surely reports the NumPy lowering's first error.  NumPy runs
        one operation over the whole array after another, the loop one element through every
        operation after another: their first errors agree when the checked sites are all
        hoisted (they run before the loop, in order), or the loop's sites all raise the same
        error for the same element (one site, or gathers of equal length through the same
        index, or one array operation's overflow at one line)."""
        return len(set(fusion["sites"])) <= 1 and not (fusion["sites"] and fusion["hoisted_checks"])

    def checked(self, value, codes, fusion, signature=()):
        """An element's checked operation ``value``, which registered the codes from
        ``codes`` on: evaluated in the loop's body, in the NumPy lowering's order of
        operations (also where a ``where`` would not choose it: NumPy computes both sides)."""
        new = self.codes[codes:]
        if not new:
            return value
        fusion["sites"] += [(code, *signature) for code in new]
        temp = self.temp("a")
        fusion["body"].append(ast.Assign([_name(temp, ast.Store())], value))
        return _name(temp)

    def element(self, node, i, fusion):
        """Element ``i`` of a fusable expression (raises :class:`_NotFusable`)."""
        t = self.t(node)
        line = getattr(node, "lineno", None) or self.line
        if not t.ndim:
            if isinstance(node, (ast.Constant, ast.Name)):
                return self.expr(node)
            codes = len(self.codes)
            temp = self.temp("h")                           # loop-invariant: evaluated once
            fusion["pre"].append(ast.Assign([_name(temp, ast.Store())], self.expr(node)))
            fusion["hoisted_checks"] += len(self.codes) - codes
            return _name(temp)
        if t.ndim != 1:
            raise _NotFusable
        if isinstance(node, ast.Name):
            fusion["leaves"].add(node.id)
            x = _name(self.rename.get(node.id, node.id))
            if fusion["length"] is None:
                fusion["length"] = ast.Subscript(_attr(x, "shape"), ast.Constant(0), ast.Load())
            return ast.Subscript(x, _name(i), ast.Load())
        if isinstance(node, ast.BinOp):
            left, right = self.element(node.left, i, fusion), self.element(node.right, i, fusion)
            lt, rt = self.t(node.left), self.t(node.right)
            if isinstance(node.op, _ARITH) or not (lt.dtype == rt.dtype == "bool"):
                left, right = self.scalar_int(left, lt), self.scalar_int(right, rt)
            if isinstance(node.op, _ARITH):
                codes = len(self.codes)
                return self.checked(self.arith(node.op, left, right, True, line, element=True), codes, fusion)
            return ast.BinOp(left, node.op, right)
        if isinstance(node, ast.Compare):
            return ast.Compare(self.element(node.left, i, fusion), node.ops,
                               [self.element(node.comparators[0], i, fusion)])
        if isinstance(node, ast.UnaryOp):
            x, xt = self.element(node.operand, i, fusion), self.t(node.operand)
            if isinstance(node.op, ast.UAdd):
                return self.scalar_int(x, xt)
            if isinstance(node.op, ast.USub):
                if not self.check_overflow:
                    return ast.UnaryOp(node.op, self.scalar_int(x, xt))
                codes = len(self.codes)
                return self.checked(_call("__neg_s", self.scalar_int(x, xt), _name("__st"),
                                          self.overflow("-", line, True)), codes, fusion)
            if isinstance(node.op, ast.Not) or xt.dtype == "bool":
                return ast.UnaryOp(ast.Not(), x)
            return ast.UnaryOp(ast.Invert(), x)
        if isinstance(node, ast.BoolOp):                     # arrays: elementwise, no short cut
            values = [self.element(v, i, fusion) for v in node.values]
            op = ast.BitAnd() if isinstance(node.op, ast.And) else ast.BitOr()
            out = values[0]
            for v in values[1:]:
                out = ast.BinOp(out, op, v)
            return out
        if isinstance(node, ast.IfExp):
            return self.select(t, node.test, node.body, node.orelse, i, fusion, lazy=True)
        if isinstance(node, ast.Subscript):
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            base = node.value
            if (len(elts) == 1 and not isinstance(elts[0], ast.Slice) and isinstance(base, ast.Name)
                    and self.t(base).ndim == 2 and not self.t(elts[0]).ndim):
                # a row x[k] of a 2-d local: its index checked once, before the loop
                x = _name(self.rename.get(base.id, base.id))
                codes = len(self.codes)
                index = self.expr(elts[0])
                code = self.index_code(node, "read", 0)
                row = self.temp("h")
                fusion["pre"].append(ast.Assign([_name(row, ast.Store())], _call(
                    "__ck", index, ast.Subscript(_attr(x, "shape"), ast.Constant(0), ast.Load()),
                    _name("__st"), code)))
                fusion["hoisted_checks"] += len(self.codes) - codes
                fusion["leaves"].add(base.id)
                fusion["gathered"].add(base.id)          # never overwritten in place: a row is not the target
                if fusion["length"] is None:
                    fusion["length"] = ast.Subscript(_attr(x, "shape"), ast.Constant(1), ast.Load())
                return ast.Subscript(x, ast.Tuple([_name(row), _name(i)], ast.Load()), ast.Load())
            if (len(elts) != 1 or isinstance(elts[0], ast.Slice) or not isinstance(base, ast.Name)
                    or self.t(base).ndim != 1 or self.t(elts[0]).ndim != 1):
                raise _NotFusable
            idx = self.element(elts[0], i, fusion)
            fusion["gathered"].add(base.id)
            x = _name(self.rename.get(base.id, base.id))
            codes = len(self.codes)
            code = self.index_code(node, "read", 0)
            # equal messages for equal elements: the same index into arrays of the same length
            signature = (ast.dump(elts[0]), self.t(base).shape[0].text)
            return self.checked(ast.Subscript(x, _call(
                "__ck", idx, ast.Subscript(_attr(x, "shape"), ast.Constant(0), ast.Load()), _name("__st"), code),
                ast.Load()), codes, fusion, signature)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name, args = node.func.id, node.args
            if name == "arange" and len(args) == 1:
                if fusion["length"] is None:
                    codes = len(self.codes)
                    fusion["length"] = self.static(args[0])        # evaluated before the loop
                    fusion["hoisted_checks"] += len(self.codes) - codes
                return _name(i)
            if name == "where" and len(args) == 3:
                return self.select(t, *args, i, fusion)
            if name in ("minimum", "maximum") or (name in ("min", "max") and len(args) >= 2):
                fn = "__min" if name in ("minimum", "min") else "__max"
                xs = [self.element(a, i, fusion) for a in args]
                xs = [self.scalar_int(x, self.t(a)) if t.dtype == "int" else x for x, a in zip(xs, args)]
                out = xs[0]
                for x in xs[1:]:
                    out = _call(fn, out, x)
                return out
            if name == "abs" and len(args) == 1:
                x = self.scalar_int(self.element(args[0], i, fusion), self.t(args[0]))
                if not self.check_overflow:
                    return _call("__abs", x)
                codes = len(self.codes)
                return self.checked(_call("__abs_s", x, _name("__st"), self.overflow("abs", line, True)), codes, fusion)
        raise _NotFusable

    def select(self, t, test, body, orelse, i, fusion, lazy=False):
        """``where(test, body, orelse)`` per element (both sides computed, as NumPy does);
        ``lazy``: ``body if test else orelse`` with a scalar test, of which NumPy computes
        one side only: it fuses only when neither side has a checked site."""
        c = self.element(test, i, fusion)
        codes = len(self.codes)
        a, b = self.element(body, i, fusion), self.element(orelse, i, fusion)
        if lazy and not self.t(test).ndim and len(self.codes) > codes:
            raise _NotFusable
        if t.dtype == "int":
            a, b = self.scalar_int(a, self.t(body)), self.scalar_int(b, self.t(orelse))
        return ast.IfExp(c, a, b)

    @staticmethod
    def scalar_int(x, t):
        return _call(_np("int64"), x) if t.dtype == "bool" else x

    def member_test(self, members, atom, rename=None):
        """``(pre, stmts, value)``: ``pre`` runs once per race, ``stmts`` then ``value`` say
        whether the flat atom ``atom`` is a member (a predicate, a mask expression or all).
        ``rename``: lane locals the predicate reads under other names (snapshots)."""
        if members is None:
            return [], [], ast.Constant(True)
        if not isinstance(members, ir.Pred):
            flat = _call(_attr(self.expr(members), "reshape"), ast.UnaryOp(ast.USub(), ast.Constant(1)))
            pre = [ast.Assign([_name("__flat", ast.Store())], flat)]
            return pre, [], ast.Subscript(_name("__flat"), _name(atom), ast.Load())
        names = [f"__x{i}" for i in range(len(members.params))]
        self.rename = {**(rename or {}), **dict(zip(members.params, names))}
        self.in_pred = True
        try:
            value = self.expr(members.body)
        finally:
            self.rename = {}
            self.in_pred = False
        return [], self.unravel(_name(atom), names), value

    def fill(self, members, buffer):
        """Statements writing a predicate's (or mask's) value for every atom into ``buffer``,
        atom by atom in flat order (the reference's per-atom meaning, and its first error).
        The reference names the atom whose evaluation failed: when the loop met an error,
        a second loop finds that atom (nothing is spent on it otherwise)."""
        codes = len(self.codes)
        pre, stmts, value = self.member_test(members, "__a")
        body = stmts + [ast.Assign([ast.Subscript(_name(buffer), _name("__a"), ast.Store())], value)]
        loop = ast.For(_name("__a", ast.Store()), _call("__range", _name("__A")), body, [])
        if not isinstance(members, ir.Pred) or len(self.codes) == codes:
            return pre + [loop]
        _, stmts, value = self.member_test(members, "__a")
        st0 = ast.Subscript(_name("__st"), ast.Constant(0), ast.Load())
        found = ast.If(ast.Compare(st0, [ast.NotEq()], [ast.Constant(0)]), [
            ast.Assign([ast.Subscript(_name("__st"), ast.Constant(ST_ATOM), ast.Store())],
                       ast.BinOp(_name("__a"), ast.Add(), ast.Constant(1))), ast.Break()], [])
        locate = ast.For(_name("__a", ast.Store()), _call("__range", _name("__A")),
                         stmts + [ast.Assign([_name(self.temp("v"), ast.Store())], value), found], [])
        met = ast.BoolOp(ast.And(), [ast.Compare(_name("__z"), [ast.Eq()], [ast.Constant(0)]),
                                     ast.Compare(st0, [ast.NotEq()], [ast.Constant(0)])])
        again = [ast.Assign([ast.Subscript(_name("__st"), ast.Constant(0), ast.Store())], ast.Constant(0)), locate]
        return pre + [ast.Assign([_name("__z", ast.Store())], st0), loop, ast.If(met, again, [])]

    def nested_members(self, members):
        """Replaying a nested spec: only the live atoms of the previous race's member list
        ``__cand[:__st[3]]`` can be members (nesting), so only they are tested; the members
        are compacted in place into ``__cand[:__m]`` and get ``__ex[a] = this race``."""
        pre, stmts, value = self.member_test(members, "__a")
        keep = [ast.Assign([ast.Subscript(_name("__cand"), _name("__m"), ast.Store())], _name("__a")),
                ast.AugAssign(_name("__m", ast.Store()), ast.Add(), ast.Constant(1)),
                ast.Assign([ast.Subscript(_name("__ex"), _name("__a"), ast.Store())],
                           ast.Subscript(_name("__st"), ast.Constant(1), ast.Load()))]
        body = [ast.Assign([_name("__a", ast.Store())], ast.Subscript(_name("__cand"), _name("__k"), ast.Load())),
                ast.If(ast.Subscript(_name("__alive"), _name("__a"), ast.Load()),
                       stmts + [ast.If(value, keep, [])], [])]
        count = ast.Subscript(_name("__st"), ast.Constant(3), ast.Load())
        return pre + [ast.Assign([_name("__m", ast.Store())], ast.Constant(0)),
                      ast.For(_name("__k", ast.Store()), _call("__range", count), body, [])]

    def unravel(self, flat, names):
        """``names`` = the multi-index of the flat atom index ``flat`` (C order)."""
        if len(names) == 1:
            return [ast.Assign([_name(names[0], ast.Store())], flat)]
        # a table made once per call ([A, ndim]): no integer division in the atom loops
        return [ast.Assign([_name(x, ast.Store())],
                           ast.Subscript(_name("__unr"), ast.Tuple([flat, ast.Constant(axis)], ast.Load()), ast.Load()))
                for axis, x in enumerate(names)]

    def race_args(self, s):
        """``(state, allow_empty, code_empty, code_nest, code_bound)`` of race ``s``, with the
        reference's messages."""
        line = s.line
        if isinstance(s, ir.GroupRace):
            empty = self.code("EmptyRaceError", line, "race_groups has no live member in any group")
        else:
            empty = self.code("EmptyRaceError", line, "race has no live member (every candidate is retired, "
                              "invalid or at logit -inf; race(..., allow_empty=True) returns -1 instead)")
        nest = self.code("NestingError", line, f"spec {self.p.name!r} declares nested=True, but this race's "
                         f"members are not inside one member set of the previous race (line {{prev}})", "nest")
        bound = self.code("RaceError", line, f"{self.p.name}: more races than the static bound {{a}}", "bound")
        return [_name(x) for x in _STATE[:1] + _STATE[2:]], ast.Constant(s.allow_empty), empty, nest, bound

    def read_locals(self, members):
        """The lane locals a race predicate reads (sorted): what its snapshot keeps."""
        if members is None:
            return []
        found = {n.id for n in ast.walk(members.body) if isinstance(n, ast.Name)}
        return sorted(found.intersection(self.types.locals) - set(members.params))

    def snapshot_keep(self, s):
        """Keep the lane locals race ``s``'s predicate reads in the snapshot of the current
        slot (once per race statement: the replay and the sampler share the site)."""
        if id(s) not in self.site_of:
            self.site_of[id(s)] = len(self.sites)
            self.sites.append((s.members, self.read_locals(s.members)))
        site = self.site_of[id(s)]
        free = self.sites[site][1]
        slot = ast.Subscript(_name("__st"), ast.Constant(1), ast.Load())
        keep = [ast.Assign([ast.Subscript(_name(f"__sn{site}_{v}"), slot, ast.Store())], _name(v)) for v in free]
        keep.append(ast.Assign([ast.Subscript(_name("__site"), slot, ast.Store())], ast.Constant(site)))
        return [ast.If(ast.Compare(slot, [ast.Lt()], [_attr(_name("__tr"), "size")]), keep, [])]

    def snapshot_race(self, s, allow, empty, bound):
        """Replaying a race of the nested fast path (mode != 0): keep the locals its predicate
        reads in this race's slot, check that the trace's winner is a member (scanning every
        live atom only when it is not, to tell an empty race from an impossible trace) and
        retire it.  The other atoms' exit races come after the body (:meth:`exit_search`)."""
        slot = ast.Subscript(_name("__st"), ast.Constant(1), ast.Load())
        fits = ast.Compare(slot, [ast.Lt()], [_attr(_name("__tr"), "size")])
        out = self.snapshot_keep(s) + [
            ast.If(fits, [ast.Assign([_name("__w", ast.Store())], ast.Subscript(_name("__tr"), slot, ast.Load()))],
                   [ast.Assign([_name("__w", ast.Store())], ast.Constant(-1))]),
            ast.Assign([_name("__in", ast.Store())], ast.Constant(False))]
        _, stmts, value = self.member_test(s.members, "__w")
        valid = ast.BoolOp(ast.And(), [ast.Compare(_name("__w"), [ast.GtE()], [ast.Constant(0)]),
                                        ast.Compare(_name("__w"), [ast.Lt()], [_name("__A")])])
        out.append(ast.If(valid, [ast.If(ast.Subscript(_name("__alive"), _name("__w"), ast.Load()),
                                         stmts + [ast.Assign([_name("__in", ast.Store())], value)], [])], []))
        _, stmts, value = self.member_test(s.members, "__a")
        found = ast.If(value, [ast.Assign([_name("__any", ast.Store())], ast.Constant(True)), ast.Break()], [])
        scan = ast.For(_name("__a", ast.Store()), _call("__range", _name("__A")),
                       [ast.If(ast.Subscript(_name("__alive"), _name("__a"), ast.Load()), stmts + [found], [])], [])
        out += [ast.Assign([_name("__any", ast.Store())], _name("__in")),
                ast.If(ast.UnaryOp(ast.Not(), _name("__in")), [scan], [])]
        return out, _call("__score_snap", _name("__w"), _name("__in"), _name("__any"), _name("__alive"),
                          _name("__tr"), _name("__st"), _name("__ex"), allow, empty, bound)

    def exit_search(self):
        """After a snapshot replay: every live atom that never won left after the last race
        whose predicate (on that race's snapshot) holds for it.  Nesting makes membership
        monotone in the race, so a binary search finds it: O(atoms x log races) predicate
        tests instead of one per member per race."""
        if not self.sites:
            return []
        branches = []
        for site, (members, free) in enumerate(self.sites):
            rename = {v: f"__sv{site}_{v}" for v in free}
            _, stmts, value = self.member_test(members, "__a", rename)
            stmts = [stmt for stmt in stmts if not (isinstance(stmt, ast.Assign) and
                                                    stmt.targets[0].id.startswith("__x"))]   # unravelled once
            bind = [ast.Assign([_name(rename[v], ast.Store())],
                               ast.Subscript(_name(f"__sn{site}_{v}"), _name("__mid"), ast.Load())) for v in free]
            branches.append((site, bind + stmts + [ast.Assign([_name("__in", ast.Store())], value)]))
        dispatch = []
        for site, body in reversed(branches):
            test = ast.Compare(ast.Subscript(_name("__site"), _name("__mid"), ast.Load()), [ast.Eq()],
                               [ast.Constant(site)])
            dispatch = [ast.If(test, body, dispatch)]
        arity = {len(m.params) for m, _ in self.sites if m is not None}
        if len(arity) > 1:           # pragma: no cover - one atom declaration: one arity
            self.fail(self.p.body[0], "races with predicates of different arities")
        # the atom's coordinates, once per atom (a race without a predicate needs none)
        unravel = self.unravel(_name("__a"), [f"__x{i}" for i in range(arity.pop())]) if arity else []
        search = ast.While(ast.Compare(_name("__lo"), [ast.LtE()], [_name("__hi")]), [
            ast.Assign([_name("__mid", ast.Store())],
                       ast.BinOp(ast.BinOp(_name("__lo"), ast.Add(), _name("__hi")), ast.FloorDiv(), ast.Constant(2))),
            ast.Assign([_name("__in", ast.Store())], ast.Constant(False)),
            *dispatch,
            ast.If(_name("__in"), [ast.Assign([_name("__last", ast.Store())], _name("__mid")),
                                   ast.Assign([_name("__lo", ast.Store())],
                                              ast.BinOp(_name("__mid"), ast.Add(), ast.Constant(1)))],
                   [ast.Assign([_name("__hi", ast.Store())],
                               ast.BinOp(_name("__mid"), ast.Sub(), ast.Constant(1)))])], [])
        per_atom = [ast.Assign([_name("__a", ast.Store())], ast.Subscript(_name("__cand"), _name("__k"), ast.Load())),
                    ast.If(ast.Compare(ast.Subscript(_name("__ex"), _name("__a"), ast.Load()), [ast.Lt()],
                                       [ast.Constant(0)]),
                           unravel + [ast.Assign([_name("__lo", ast.Store())], ast.Constant(0)),
                                      ast.Assign([_name("__hi", ast.Store())],
                                                 ast.BinOp(ast.Subscript(_name("__st"), ast.Constant(1), ast.Load()),
                                                           ast.Sub(), ast.Constant(1))),
                                      ast.Assign([_name("__last", ast.Store())], ast.Constant(-1)),
                                      search,
                                      ast.Assign([ast.Subscript(_name("__ex"), _name("__a"), ast.Store())],
                                                 _name("__last"))], [])]
        loop = ast.For(_name("__k", ast.Store()), _call("__range", _attr(_name("__cand"), "size")), per_atom, [])
        return [ast.If(ast.BoolOp(ast.And(), [ast.Compare(_name("__mode"), [ast.NotEq()], [ast.Constant(0)]),
                                               ast.Compare(ast.Subscript(_name("__st"), ast.Constant(0), ast.Load()),
                                                           [ast.Eq()], [ast.Constant(0)])]), [loop], [])]

    def snapshot_buffers(self):
        """The snapshot buffers of the lane (empty when sampling): one slot per trace slot."""
        slots = ast.IfExp(ast.Compare(_name("__mode"), [ast.NotEq()], [ast.Constant(0)]),
                          _attr(_name("__tr"), "size"), ast.Constant(0))
        out = [ast.Assign([_name("__site", ast.Store())], _call(_np("empty"), slots, _np("int64")))]
        for site, (_, free) in enumerate(self.sites):
            for v in free:
                t = self.types.locals[v]
                dims = [self.static(ast.parse(d.text, mode="eval").body, False) for d in t.shape]
                out.append(ast.Assign([_name(f"__sn{site}_{v}", ast.Store())],
                                      _call(_np("empty"), ast.Tuple([slots] + dims, ast.Load()),
                                            _np("bool_" if t.dtype == "bool" else "int64"))))
        return out

    def race(self, s):
        state, allow, empty, nest, bound = self.race_args(s)
        w = self.temp("w")
        if self.snap:        # score through snapshots and exit races found afterwards
            generic, call = self.snapshot_race(s, allow, empty, bound)
        elif self.fast:      # score through exit races: no per-race sums over the members
            generic = self.nested_members(s.members)
            call = _call("__score_nested", _name("__m"), _name("__alive"), _name("__tr"),
                         _name("__st"), _name("__ex"), allow, empty, bound)
        else:
            generic = self.fill(s.members, "__mb")
            call = _call("__race", _name("__mode"), _name("__mb"), *state, allow, empty, nest, bound,
                         ast.Constant(s.line))
        generic.append(ast.Assign([_name(w, ast.Store())], call))
        out = [ast.If(ast.Compare(_name("__mode"), [ast.NotEq()], [ast.Constant(1)]),
                      self.pop(s, w, allow, empty, bound), generic)] if self.fast else generic
        out.append(self.check())
        if len(s.targets) == 1:
            out.append(ast.Assign([_name(s.targets[0], ast.Store())], _name(w)))
            return out
        idx = [self.temp("x") for _ in s.targets]
        out += [ast.If(ast.Compare(_name(w), [ast.GtE()], [ast.Constant(0)]),
                       self.unravel(_name(w), idx),
                       [ast.Assign([_name(i, ast.Store())], ast.Constant(-1)) for i in idx])]
        out += [ast.Assign([_name(t, ast.Store())], _name(i)) for t, i in zip(s.targets, idx)]
        return out

    def pop(self, s, w, allow, empty, bound):
        """The nested fast path: the winner is the first member popped from the lane's heap of
        live atoms (ordered by raw noise); a popped non-member is never a member again, since
        every later race lies inside this one.  The predicate is evaluated only for popped
        atoms, and the nesting promise itself is trusted here (the reference checks it, and
        so does this backend's score semantics)."""
        pre, stmts, value = self.member_test(s.members, "__i")
        test = stmts + [ast.Assign([_name("__in", ast.Store())], value)]
        found = ast.If(_name("__in"), [ast.Assign([_name(w, ast.Store())], _name("__i")), ast.Break()], [])
        scan = ast.While(ast.Constant(True), [
            ast.Assign([_name("__i", ast.Store())], _call("__heap_pop", _name("__hk"), _name("__h"), _name("__hs"))),
            ast.If(ast.Compare(_name("__i"), [ast.Lt()], [ast.Constant(0)]), [ast.Break()], []),
            ast.If(ast.Subscript(_name("__alive"), _name("__i"), ast.Load()), test + [found], [])], [])
        take = _call("__take", _name(w), _name("__alive"), _name("__tr"), _name("__st"), allow, empty, bound)
        out = pre + [ast.Assign([_name(w, ast.Store())], ast.UnaryOp(ast.USub(), ast.Constant(1))), scan,
                     ast.Assign([_name(w, ast.Store())], take)]
        if not self.snap:
            return out
        # mode 3 (sample and score): this race's snapshot, and the winner's exit race
        keep = self.snapshot_keep(s)
        won = ast.If(ast.Compare(_name(w), [ast.GtE()], [ast.Constant(0)]),
                     [ast.Assign([ast.Subscript(_name("__ex"), _name(w), ast.Store())],
                                 ast.BinOp(ast.Subscript(_name("__st"), ast.Constant(1), ast.Load()), ast.Sub(),
                                           ast.Constant(1)))], [])
        three = ast.Compare(_name("__mode"), [ast.Eq()], [ast.Constant(3)])
        return [ast.If(three, keep, [])] + out + [ast.If(three, [won], [])]

    def race_groups(self, s):
        g = self.temp("g")
        # the reference evaluates groups= before the keys
        out = [ast.Assign([_name(f"{g}n", ast.Store())], self.static(s.groups))] + self.fill(s.key, "__kb")
        state, allow, empty, nest, bound = self.race_args(s)
        key = self.code("SpecValueError", s.line, "race_groups key {a} outside [-1, {b}) for atom {atom}", "key")
        call = _call("__race_groups", _name("__mode"), _name("__kb"), _name(f"{g}n"), *state, allow, empty, nest,
                     bound, ast.Constant(s.line), key)
        out += [ast.Assign([_name(g, ast.Store())], call), self.check()]
        if len(s.targets) == 1:
            out.append(ast.Assign([_name(s.targets[0], ast.Store())], _name(g)))
            return out
        # the winners' multi-indices (-1 for an empty group), one loop for every target
        dims, e, v = len(s.targets), self.temp("e"), self.temp("v")
        size = ast.Subscript(_attr(_name(g), "shape"), ast.Constant(0), ast.Load())
        fresh = {t: self.temp("f") for t in s.targets}
        out += [ast.Assign([_name(fresh[t], ast.Store())], _call(_np("empty"), size, _np("int64"))) for t in s.targets]
        unravel = [ast.Assign([_name(v, ast.Store())], ast.Subscript(_name(g), _name(e), ast.Load()))]
        empty = []
        for axis in range(dims - 1, -1, -1):
            cell = ast.Subscript(_name(fresh[s.targets[axis]]), _name(e), ast.Store())
            empty.append(ast.Assign([cell], ast.UnaryOp(ast.USub(), ast.Constant(1))))
            if axis == 0:
                unravel.append(ast.Assign([cell], _name(v)))
            else:
                unravel += [ast.Assign([cell], ast.BinOp(_name(v), ast.Mod(), _name(f"__d{axis}"))),
                            ast.Assign([_name(v, ast.Store())], ast.BinOp(_name(v), ast.FloorDiv(), _name(f"__d{axis}")))]
        test = ast.Compare(ast.Subscript(_name(g), _name(e), ast.Load()), [ast.Lt()], [ast.Constant(0)])
        out.append(ast.For(_name(e, ast.Store()), _call("__range", size), [ast.If(test, empty, unravel)], []))
        out += [ast.Assign([_name(t, ast.Store())], _name(fresh[t])) for t in s.targets]
        return out

    # ---- the module ------------------------------------------------------------------------------
    def constant_arrays(self):
        """The spec's tuple constants as module globals (Numba freezes a global array into
        the compiled code), built from their values, element by element."""
        out = []
        for name, value in sorted(self.constants.items()):
            flat = ast.List([_const(v) for v in value.reshape(-1).tolist()], ast.Load())
            array = _call(_np("array"), flat, _np("bool_" if value.dtype == bool else "int64"))
            shape = ast.Tuple([ast.Constant(d) for d in value.shape], ast.Load())
            out.append(ast.unparse(ast.Assign([_name(name, ast.Store())], _call(_attr(array, "reshape"), shape),
                                              lineno=1)))
        return out

    def module(self):
        p = self.p
        params = list(p.params)
        outs = [f"__out_{o}" for o in p.outputs]
        lane_args = ["__mode", "__b"] + params + _STATE + ["__ex", "__cand", "__unr"] + outs
        body = [ast.Assign([_name(f"__d{i}", ast.Store())], self.static(d, False)) for i, d in enumerate(p.atoms.dims)]
        body += [ast.Assign([_name("__A", ast.Store())], _attr(_name("__alive"), "size")),
                 ast.Assign([_name("__hs", ast.Store())], _call(_np("zeros"), ast.Constant(1), _np("int64"))),
                 ast.Assign([_name("__h", ast.Store())], _call(_np("empty"), _name("__A") if self.fast
                                                                else ast.Constant(0), _np("int64"))),
                 ast.Assign([_name("__hk", ast.Store())], _call(_np("empty"), _name("__A") if self.fast
                                                                 else ast.Constant(0))),
                 ast.Assign([_name("__mb", ast.Store())], _call(_np("empty"), _name("__A"), _np("bool_"))),
                 ast.Assign([_name("__kb", ast.Store())], _call(_np("empty"), _name("__A"), _np("int64")))]
        if self.fast:
            body.append(ast.If(ast.Compare(_name("__mode"), [ast.NotEq()], [ast.Constant(1)]),
                               [ast.Expr(_call("__heap_init", _name("__alive"), _name("__res"), _name("__hk"),
                                               _name("__h"), _name("__hs")))], []))
        stmts = self.block(p.body)
        body += self.snapshot_buffers() + stmts       # the races tell which buffers there are
        body.append(self.check())
        body += self.exit_search()
        writes = [ast.Assign([ast.Subscript(_name(o), _name("__b"), ast.Store())], _name(f))
                  for o, f in zip(outs, p.outputs)]
        body.append(ast.If(ast.Compare(_name("__mode"), [ast.NotEq()], [ast.Constant(1)]), writes, []))   # solve, sample
        lane = _function("lane", lane_args, body, "@njit(cache=True, error_model='numpy')")
        fmt = dict(params="".join(f"{x}, " for x in params), outs=", ".join(outs) or "",
                   outs_comma="".join(f", {o}" for o in outs),
                   finish=_FINISH_NESTED if self.fast else _FINISH_GENERIC,
                   sample_finish=_SAMPLE_FINISH_NESTED if self.snap else "")
        drivers = _DRIVERS.format(**fmt)
        src = [
            f"# generated by structdsl from spec {p.name!r} ({p.file}); do not edit",
            # Numba's cache does not see changes in the modules a cached function calls: the
            # kernels' hash is part of this source, hence of its file name (a new cache entry)
            f"# kernels {_kernels_hash()}",
            "# every name the generated code uses starts with '__': spec names never do",
            "import numpy as __np",
            "from numba import njit, prange",
            "from structdsl.backends.numba_kernels import arg_extreme as __arg_extreme, extreme as __extreme, \\",
            "    ck as __ck, ck2 as __ck2, ck3 as __ck3, fail as __fail, finish_score as __finish_score, \\",
            "    gather1 as __gather1, mask_set as __mask_set, sel as __sel, race as __race, \\",
            "    race_groups as __race_groups, total_ck as __total_ck, \\",
            "    add_s as __add_s, sub_s as __sub_s, mul_s as __mul_s, floordiv_s as __floordiv_s, \\",
            "    mod_s as __mod_s, lshift_s as __lshift_s, rshift_s as __rshift_s, neg_s as __neg_s, abs_s as __abs_s, \\",
            "    add_a as __add_a, sub_a as __sub_a, mul_a as __mul_a, floordiv_a as __floordiv_a, \\",
            "    mod_a as __mod_a, lshift_a as __lshift_a, rshift_a as __rshift_a, neg_a as __neg_a, abs_a as __abs_a, \\",
            "    take as __take, total as __total, heap_init as __heap_init, heap_pop as __heap_pop, \\",
            "    prepare_sample as __prepare_sample, prepare_solve as __prepare_solve, \\",
            "    score_nested as __score_nested, score_snap as __score_snap, \\",
            "    finish_nested as __finish_nested",
            "__range, __min, __max, __abs = range, min, max, abs",
            *self.constant_arrays(),
            "", "",
            ast.unparse(_locate(lane)),
            "", "",
            drivers,
        ]
        return "\n".join(src)


def _function(name, args, body, decorator):
    fn = ast.FunctionDef(name, ast.arguments(posonlyargs=[], args=[ast.arg(a) for a in args], kwonlyargs=[],
                                             kw_defaults=[], defaults=[]), body, [], None, None)
    if "type_params" in ast.FunctionDef._fields:
        fn.type_params = []
    text = ast.unparse(_locate(fn))
    return ast.parse(decorator + "\n" + text).body[0]


def _locate(node):
    for n in ast.walk(node):
        if "lineno" in n._attributes:
            n.lineno = getattr(n, "lineno", 1) or 1
            n.col_offset = getattr(n, "col_offset", 0) or 0
            n.end_lineno = getattr(n, "end_lineno", None) or n.lineno
            n.end_col_offset = getattr(n, "end_col_offset", None) or 0
    return node


_DRIVERS = '''@njit(parallel=True, cache=True, error_model='numpy')
def solve_all({params}__valid, __unr, __uni, __logits, __res, __log_noise, __tr, __st, __log_space, __draw, __mode, __fs, __grad, __lsum, __flags{outs_comma}):
    # sample (__draw: the noise is drawn here from uniforms and logits) and solve (__res holds
    # given weights).  __mode 2 (with __draw, off the nested fast path) also scores each race
    # against the logits as it runs: log p, its gradient (__flags) and member sets into
    # __fs, __grad, __lsum, as score_all does; __mode 3 (the nested fast path) keeps the
    # races' snapshots as it samples and scores through exit races after the body.  Flags
    # are arguments, not literals: one compiled lane serves every semantics, and a literal
    # True meets a Numba parfor bug that merges 1 and True.
    __B, __A = __res.shape
    __empty = __np.zeros(0)
    __alive = __np.empty((__B, __A), __np.bool_)
    for __b in prange(__B):
        if __draw:
            __prepare_sample(__valid, __uni[__b], __logits[__b], __alive[__b], __res[__b], __log_noise[__b], __st[__b])
        else:
            __prepare_solve(__valid, __res[__b], __alive[__b])
        __live0 = __alive[__b].copy()
        __pkey = __np.full(__A, -1, __np.int64)
        if __mode == 3:          # the nested fast path's sample and score: exit races
            __ex = __np.full(__A, -1, __np.int64)
            __cand = __np.flatnonzero(__live0)
        else:
            __ex = __pkey
            __cand = __pkey
        lane(__mode, __np.int64(__b), {params}__alive[__b], __live0, __res[__b], __logits[__b], __tr[__b], __st[__b], __fs[__b],
             __grad[__b], __lsum[__b], __empty, __pkey, __log_space, __flags, __ex, __cand, __unr{outs_comma})
{sample_finish}

@njit(parallel=True, cache=True, error_model='numpy')
def score_all({params}__unr, __alive, __logits, __tr, __st, __fs, __grad, __lsum, __u, __noise, __flags, __log_space{outs_comma}):
    __B, __A = __alive.shape
    __R = __tr.shape[1]
    __mode = __np.int64(1)
    for __b in prange(__B):
        __live0 = __alive[__b].copy()
        __pkey = __np.full(__A, -1, __np.int64)
        __ex = __np.full(__A, -1, __np.int64)
        __cand = __np.flatnonzero(__live0)          # the nested score's candidates: every live atom
        __st[__b, 3] = __cand.size
        lane(__mode, __np.int64(0), {params}__alive[__b], __live0, __logits[__b], __logits[__b], __tr[__b], __st[__b], __fs[__b],
             __grad[__b], __lsum[__b], __u[__b], __pkey, __log_space, __flags, __ex, __cand, __unr{outs_comma})
        if __st[__b, 0] == 0:
{finish}
'''


def _message(code, row, atom_shape):
    """The reference's message for error ``code`` from the values its lane recorded (see
    ``numba_kernels.ST_A``)."""
    from .numba_kernels import ST_A, ST_ATOM, ST_B, ST_C, ST_PREV
    text = code.message
    if code.fmt is not None:
        a, b, c = int(row[ST_A]), int(row[ST_B]), int(row[ST_C])
        exact = _EXACT[code.fmt](a, b) if code.fmt in _EXACT else None
        text = text.format(a=a, b=b, exact=exact, prev=int(row[ST_PREV]), atom=_atom(c, atom_shape))
    if code.pred and row[ST_ATOM] > 0:
        text += f" (evaluating the predicate for atom {_atom(int(row[ST_ATOM]) - 1, atom_shape)})"
    return text


def _atom(flat, shape):
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if 0 <= flat < int(np.prod(shape)) else flat


def _kernels_hash():
    path = Path(__file__).with_name("numba_kernels.py")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


_FINISH_GENERIC = """            __finish_score(__tr[__b], __st[__b], __lsum[__b], __logits[__b], __live0, __u[__b, __R:],
                           __noise[__b], __flags)"""
_SAMPLE_FINISH_NESTED = """        if __mode == 3 and __st[__b, 0] == 0:
            __finish_nested(__tr[__b], __st[__b], __ex, __logits[__b], __live0, __empty, __fs[__b],
                            __grad[__b], __empty, __lsum[__b], __flags)"""
_FINISH_NESTED = """            __finish_nested(__tr[__b], __st[__b], __ex, __logits[__b], __live0, __u[__b], __fs[__b],
                            __grad[__b], __noise[__b], __lsum[__b], __flags)"""


def _writable_c64(a):
    """``a`` as a writable C-contiguous float64 array, copied only when it is not one (a
    read-only or strided array types as another Numba signature: a new compilation)."""
    if a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=np.float64, order="C")


def load(source):
    """Import the generated module from the cache directory (written once per hash)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    name = f"structdsl_gen_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = cache_dir() / f"{name}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)                        # atomic: concurrent processes agree
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Program(_BaseProgram):
    """A spec compiled to native code with Numba (see :class:`structdsl.program.Program`).

    ``prog.source`` shows the generated module; the first call of each semantics compiles
    it (or loads Numba's cache); the batch runs in parallel on ``numba.get_num_threads()``
    threads.
    """

    backend = "numba"

    def __init__(self, spec, **static_params):
        super().__init__(spec, **static_params)
        from .numpy_reference import Program as Reference
        self.reference = Reference(spec, **static_params)   # valid masks and enumeration
        gen = _Codegen(self.ir, self.types, self._constant_arrays)
        self.source = gen.module()
        self._codes = gen.codes
        self._fast, self._snap = gen.fast, gen.snap
        # the nested fast paths trust a nested=True promise (docs/design.md 4.4): checking
        # it would cost a pass over the atoms per race, the very work they avoid
        self.checks_nesting = not gen.fast
        self._module = load(self.source)
        self._tables = {}
        self._consts = {}
        from .numba_kernels import WANT_GRAD, WANT_MEMBERS
        self._want_grad, self._want_members = WANT_GRAD, WANT_MEMBERS

    def _unravel_table(self, inst):
        """``[A, ndim]`` int64: the multi-index of every flat atom index (C order)."""
        table = self._tables.get(inst.atom_shape)
        if table is None:
            shape = inst.atom_shape
            table = np.ascontiguousarray(np.indices(shape).reshape(len(shape), -1).T, dtype=np.int64)
            self._tables[inst.atom_shape] = table
        return table

    def _args(self, inst):
        args = []
        for p in self.ir.params:
            v = inst.params[p]
            args.append(v if isinstance(v, np.ndarray) else np.int64(v))
        return args

    def _solve_consts(self, inst):
        """The solve driver's leading arguments for ``inst`` (static parameters, the valid
        mask, the unravel table): made once per atom shape."""
        c = self._consts.get(inst.atom_shape)
        if c is None:
            c = self._consts[inst.atom_shape] = (*self._args(inst), inst.valid.reshape(-1),
                                                 self._unravel_table(inst))
        return c

    def _outputs(self, inst, lead):
        out = []
        for name in self.ir.outputs:
            t = inst.types.outputs[name]
            out.append(np.zeros((lead,) + tuple(d.value for d in t.shape),
                                dtype=bool if t.dtype == "bool" else np.int64))
        return out

    def _run(self, kernel, *args):
        """Call a compiled driver; a Numba typing failure (a construct this backend lowers
        into code Numba rejects) becomes a clear error instead of a raw Numba traceback."""
        try:
            return getattr(self._module, kernel)(*args)
        except Exception as exc:
            if type(exc).__module__.startswith("numba"):
                first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                raise LoweringError(
                    f"the numba backend could not compile spec {self.ir.name!r} ({type(exc).__name__}: "
                    f"{first}); the generated source is in {self._module.__file__} and the "
                    f"reference backend (backend='numpy') runs the spec", self.ir.file, self.ir.atoms.line) from exc
            raise

    def _raise(self, st, inst, check_logits=None):
        """Raise the first lane's spec error; ``check_logits``: after a draw, a callable that
        names a NaN or +inf logit (it raises) if a lane met one."""
        from .numba_kernels import BAD_LOGIT
        if not np.count_nonzero(st[:, 0]):        # the common case: one count
            return
        if check_logits is not None and (st[:, 0] == BAD_LOGIT).any():
            check_logits()
            raise ValueError("logits contain NaN or +inf")      # pragma: no cover - it raised
        bad = np.flatnonzero(st[:, 0] > 0)
        if bad.size:
            lane = int(bad[0])
            code = self._codes[int(st[lane, 0]) - 1]
            raise getattr(errors, code.cls)(_message(code, st[lane], inst.atom_shape), self.ir.file, code.line, lane)

    def _solve_all(self, inst, res, uniforms, logits, log_space, check_logits=None, score=None):
        """Run the solve driver: on given weights ``res``, or drawing ``res = log E`` from
        ``uniforms`` and ``logits`` when they are given.  Returns traces, fields, the log
        noise.  ``score``: ``(fs, grad, lsum, flags)`` buffers, to score the drawn traces in
        the same lanes (mode 3 on the nested fast path, else mode 2)."""
        B, A = res.shape
        draw = uniforms is not None
        none = np.zeros((B, 0))
        tr = np.full((B, inst.max_races), -1, dtype=np.int64)
        from .numba_kernels import ST_WIDTH
        st = np.zeros((B, ST_WIDTH), dtype=np.int64)
        if self.ir.nested:
            st[:, 2] = 1
        outs = self._outputs(inst, B)
        # the nested fast path never writes its residuals: then they are the log noise itself
        log_noise = res if (self._fast or not draw) else np.empty((B, A))
        mode = 0 if score is None else 3 if self._fast else 2
        fs, grad, lsum, flags = score or (np.zeros((B, 1)), none, none, 0)
        # the callers hand over writable C-contiguous float64 arrays: one lane signature
        self._run("solve_all", *self._solve_consts(inst), uniforms if draw else none, logits if draw else none,
                  res, log_noise, tr, st, log_space, draw, mode, fs, grad, lsum, flags, *outs)
        self._raise(st, inst, (check_logits or (lambda: self.check_logits(logits))) if draw else None)
        return tr, outs, log_noise

    # ---- the backend contract (structdsl.program) ---------------------------------------------
    def solve_flat(self, inst, weights, log_space):
        tr, outs, _ = self._solve_all(inst, np.array(weights, dtype=np.float64), None, None, log_space)
        return tr, outs

    def draw_flat(self, inst, uniforms, logits, check_logits=None):
        """As the contract; ``uniforms`` in [0, 1) (a 0 counts as the smallest normal float)."""
        tr, outs, log_noise = self._solve_all(inst, np.empty(uniforms.shape), _writable_c64(uniforms),
                                              _writable_c64(logits), True, check_logits)
        return Draw(tr, outs, log_noise)

    def replay_flat(self, inst, traces, logits):
        """Member sets from the replay kernel (lane flag ``WANT_MEMBERS``)."""
        logp, _, members = self._score(inst, traces, logits, False, None, want_members=True)
        return Replay(logp > -np.inf, races.Members(members))

    def score_flat(self, inst, traces, logits, want_grad=False, uniforms=None):
        """The fused kernels: log p, its gradient and E | T computed as the lanes replay
        (``finish_score`` / ``finish_nested`` in numba_kernels), the formulas of
        :mod:`structdsl.races`, which the conformance suite holds them to."""
        logp, grad, noise = self._score(inst, traces, logits, want_grad, uniforms)
        if grad is not None:
            grad[np.isneginf(logp)] = 0.0
        return Scores(logp, grad, noise, None)

    def draw_and_score_flat(self, inst, uniforms, logits, check_logits=None, members=False):
        """A training step's draw and trace score in one native call: a spec off the nested
        fast path scores each race against the logits as it runs it (lane mode 2); on the
        nested fast path the sampler keeps each race's snapshot and the lane then finds every
        atom's exit race (mode 3; a spec whose races take mask expressions samples, then
        replays).  ``members``: the scores' replay holds the races' member sets."""
        B, A = uniforms.shape
        R = inst.max_races
        u, x = _writable_c64(uniforms), _writable_c64(logits)
        if self._fast and not self._snap:
            d = self.draw_flat(inst, u, x, check_logits)
            logp, grad, mem = self._score(inst, d.trace, x, True, None, want_members=members)
            return d, Scores(logp, grad, None, Replay(logp > -np.inf, races.Members(mem)) if members else None)
        fs, grad = np.zeros((B, 1)), np.zeros((B, A))
        lsum = np.zeros((B, R * A) if members else (B, 0))
        flags = self._want_grad | (self._want_members if members else 0)
        tr, outs, log_noise = self._solve_all(inst, np.empty((B, A)), u, x, True,
                                              check_logits or (lambda: self.check_logits(logits)),
                                              score=(fs, grad, lsum, flags))
        # a drawn trace always has positive probability: fs holds its log p
        replay = Replay(np.ones(B, dtype=bool), races.Members((lsum > 0).reshape(B, R, A))) if members else None
        return Draw(tr, outs, log_noise), Scores(fs[:, 0], grad, None, replay)

    def _score(self, inst, traces, logits, want_grad, uniforms, want_members=False):
        """``(log p, grad or None, E | T noise or None)``; with ``want_members`` the third is
        the races' member sets, bool ``[B, R, A]`` (written where E | T's buffer would be)."""
        from .numba_kernels import IMPOSSIBLE, ST_WIDTH, WANT_GRAD, WANT_MEMBERS, WANT_NOISE
        B, A = logits.shape
        R = inst.max_races
        alive = inst.valid.reshape(-1) & ~np.isneginf(logits)
        tr = np.array(traces, dtype=np.int64)
        st = np.zeros((B, ST_WIDTH), dtype=np.int64)
        st[:, 2] = 1 if self.ir.nested else 0
        fs = np.zeros((B, 1))
        grad = np.zeros((B, A) if want_grad else (B, 0))
        noisy = uniforms is not None
        lsum = np.zeros((B, R * A)) if want_members else np.full((B, A) if noisy else (B, 0), -np.inf)
        noise = np.zeros((B, A) if noisy else (B, 0))
        u = np.array(uniforms, dtype=np.float64) if noisy else np.empty((B, 0))   # read only for E | T
        flags = (WANT_GRAD if want_grad else 0) | (WANT_NOISE if noisy else 0) | (WANT_MEMBERS if want_members else 0)
        outs = [o[:1] for o in self._outputs(inst, 1)]
        self._run("score_all", *self._args(inst), self._unravel_table(inst), alive, np.array(logits, dtype=np.float64),
                               tr, st, fs, grad, lsum, u, noise, np.int64(flags), np.bool_(False), *outs)
        self._raise(st, inst)
        logp = np.where(st[:, 0] == IMPOSSIBLE, -np.inf, fs[:, 0])
        if want_members:
            return logp, (grad if want_grad else None), (lsum > 0).reshape(B, R, A)
        return logp, (grad if want_grad else None), (noise if noisy and not np.isneginf(logp).any() else None)
