"""The core of the numba code generator: a spec's expressions and statements as Python AST.

:class:`Codegen` lowers the IR of one spec, statement by statement, into the *lane* (the
statements for one batch element, inlined into the generated ``chunk``), with the reference's meaning: every index
and every int64 operation checked, in the reference's order, each check with an error code
(see :meth:`Codegen.code`) that the lane records in its status row instead of raising.  Two
passes share its state and lower what needs more than one statement's view: the loop fusion
(:mod:`numba_fusion`: elementwise expressions without temporary arrays) and the races
(:mod:`numba_races`: the race kernels, the nested fast path, the snapshot scorer).
:mod:`numba_module` assembles the lane into a module (one function over a range of lanes).

The rewrites that only make code faster are named in :data:`PASSES` and can be turned
off one by one (``Codegen(..., passes=...)``, ``Program.passes``); what remains is the
generic lowering, and ``tests/test_numba_passes.py`` holds each rewrite to it.
"""
from __future__ import annotations

import ast
import collections

from structdsl import errors, ir
from structdsl.typecheck import Type

from .numba_ast import ARITH, _attr, _call, _const, _name, _np, _st
from .numba_fusion import LoopFusion
from .numba_kernels import ST_STATUS
from .numba_module import module_source
from .numba_races import RaceLowering


class LoweringError(errors.SpecError):
    """A construct the numba backend does not lower (yet)."""


#: One error code: the structdsl error class, the spec line, the message (a template when
#: ``fmt`` is set: the values the lane recorded fill it in, see ``numba_backend._message``)
#: and whether it is raised inside a predicate (the reference then names the atom).
_Code = collections.namedtuple("_Code", "cls line message fmt pred")

_OP = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%",
       ast.LShift: "<<", ast.RShift: ">>"}
_HELPER = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.FloorDiv: "floordiv", ast.Mod: "mod",
           ast.LShift: "lshift", ast.RShift: "rshift"}


#: The optional rewrites, each meaning-preserving (tested against the generic lowering):
#: ``loop_fusion``: a 1-d elementwise assignment or ``any``/``all`` test as one loop;
#: ``nested_heap``: a ``nested=True`` spec without grouped races samples by popping one heap
#: of the lane's noise; ``snapshot_scorer``: with it, the score replays through per-race
#: snapshots and finds exit races by binary search (needs ``nested_heap``); ``block_race``:
#: with it, a lane whose heap pops are mostly wasted races through blocks instead
#: (:func:`numba_races._nested_race`; needs ``nested_heap``).
PASSES = ("loop_fusion", "nested_heap", "snapshot_scorer", "block_race")


class Codegen:
    """IR -> the source of a Numba module (one ``lane`` function and its signature).

    ``passes``: the rewrites of :data:`PASSES` to apply.  ``check_overflow=False`` emits
    wrapping int64 arithmetic: only for measuring what the checks cost (``benchmarks/run.py``)."""

    def __init__(self, program: ir.Program, typing, constants=None, check_overflow=True, passes=PASSES,
                 param_types=None):
        unknown = set(passes) - set(PASSES)
        if unknown:
            raise ValueError(f"unknown passes {sorted(unknown)}; the passes are {PASSES}")
        self.passes = frozenset(passes)
        self.p, self.types = program, typing
        self.constants = constants or {}  # tuple constants the spec reads: read-only arrays
        self.param_types = param_types or {}   # parameter -> Type (an int where absent)
        self.codes = []                  # error code - 1 -> (error class name, line, message)
        self.rename = {}                 # predicate parameters -> their loop names
        self.count = 0
        self.line = program.atoms.line   # the statement being lowered
        self.in_pred = False             # lowering a predicate's body
        self.check_overflow = check_overflow
        self.fusion = LoopFusion(self, enabled="loop_fusion" in self.passes)
        self.races = RaceLowering(self)
        # the lane's race path (the module's drivers and the Program's entry points follow it)
        self.fast, self.snap = self.races.fast, self.races.snap

    def module(self):
        """The generated module's source."""
        return module_source(self)

    # ---- helpers ----------------------------------------------------------------------------
    def code(self, cls, line, message, fmt=None):
        """A new error code (an AST constant); ``fmt``: the message is a template (see
        ``numba_backend._message``)."""
        self.codes.append(_Code(cls, line, message, fmt, self.in_pred))
        return ast.Constant(len(self.codes))

    def overflow(self, symbol, line, array, fmt=None):
        """The code of an int64 overflow in ``symbol``: the reference's scalar message gives
        the exact result (``fmt``: how to compute it from the operands the lane records, see
        ``numba_backend._EXACT``); its array message does not.  Code 0 when the checks are off."""
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
                body, orelse = (_call(_np("copy"), x) if isinstance(n, ast.Name) else x
                                for x, n in ((body, node.body), (orelse, node.orelse)))
            return ast.IfExp(self.expr(node.test), body, orelse)
        if isinstance(node, ast.Subscript):
            out = self.subscript(node, "read")
            return _call(_np("copy"), out) if self.t(node).ndim else out
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
        if isinstance(op, ARITH):
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
        return PRIMITIVE_RULES[self.types.primitive(node).name](self, node)

    def operands(self, node):
        """A call's arguments lowered, with their types: as views, since every primitive builds
        a new array or a scalar, except ``where`` on a scalar test."""
        t, ts = self.t(node), [self.t(a) for a in node.args]
        view = not (self.types.primitive(node).name == "where" and not t.ndim)
        return [self.operand(a) if view else self.expr(a) for a in node.args], ts, t

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
        return ast.If(ast.Compare(_st(ST_STATUS), [ast.NotEq()], [ast.Constant(0)]), [ast.Return(None)], [])

    def value_for(self, name, node):
        x, t = self.expr(node), self.t(node)
        if t.ndim and isinstance(node, ast.Name):
            x = _call(_np("copy"), x)
        return self.convert(x, t, self.types.locals[name].dtype)

    def store(self, target, value, vtype, lowered=None, pre=(), node=None):
        """``target[...] = value`` (``value`` lowered from ``node``; ``pre``: the statements
        before it, which :meth:`store_value` places after the indices when they must run first)."""
        elts = target.slice.elts if isinstance(target.slice, ast.Tuple) else [target.slice]
        sel = self.t(target)
        if sel.shape == ("mask",):
            return [*pre, ast.Expr(_call("__mask_set", self.expr(target.value), self.expr(elts[0]), value))]
        value = self.convert(value, vtype, self.types.locals[target.value.id].dtype)
        if vtype.ndim:     # an array into a view: the value first (Python's order), then the kernel
            v = self.temp("v")
            if node is not None and any(isinstance(n, ast.Name) and n.id == target.value.id for n in ast.walk(node)):
                value = _call(_np("copy"), value)       # a view of the target: copied, as NumPy does
            return [*pre, ast.Assign([_name(v, ast.Store())], value),
                    ast.Expr(_call("__put", self.subscript(target, "write", lowered), _name(v)))]
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
            return self.store(target, self.expr(node), self.t(node), node=node)
        pre, lowered = [], []
        for e in trial:
            if e is None:
                lowered.append(None)
                continue
            temp = self.temp("i")
            pre.append(ast.Assign([_name(temp, ast.Store())], e))
            lowered.append(_name(temp))
        return self.store(target, self.expr(node), self.t(node), lowered, pre, node)

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
                            out += self.store(t, _name(temp), self.t(v), node=v)
                elif isinstance(target, ast.Name):
                    reduced = self.fusion.reduction(s.value)
                    if reduced is not None:
                        stmts, value = reduced
                        value = self.convert(value, Type("bool", ()), self.types.locals[target.id].dtype)
                        out += stmts + [ast.Assign([_name(target.id, ast.Store())], value)]
                        continue
                    out += (self.fusion.fused(target.id, s.value)
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
            result = Type("bool" if both_bool and not isinstance(s.op, ARITH) else "int", self.t(target).shape)
            return out + self.store(target, new, result, lowered)
        if isinstance(s, ir.If):
            return self.fusion.if_statement(s.test, self.block(s.body) or [ast.Pass()], self.block(s.orelse))
        if isinstance(s, ir.Loop):
            return [ast.For(_name(s.var, ast.Store()), _call("__range", self.expr(s.count)),
                            [self.check()] + (self.block(s.body) or [ast.Pass()]), [])]
        if isinstance(s, ir.Break):
            return [ast.Break()]
        if isinstance(s, ir.Fail):        # a compiler-inserted check: the lane stops at once
            code = self.code(s.error, s.line, s.message)
            return [ast.If(self.expr(s.test), [ast.Expr(_call("__fail", _name("__st"), code)), ast.Return(None)], [])]
        if isinstance(s, ir.Race):
            return self.races.race(s)
        if isinstance(s, ir.GroupRace):
            return self.races.race_groups(s)
        raise TypeError(type(s).__name__)  # pragma: no cover


# ---- one lowering rule per primitive (structdsl.primitives) -------------------------------
def _live(gen, node):
    dims = [_name(f"__d{i}") for i in range(len(gen.p.atoms.dims))]
    return _call(_np("copy"), _call(_attr(_name("__live0"), "reshape"), ast.Tuple(dims, ast.Load())))


def _filled(gen, node):
    args, kws = node.args, {k.arg: k.value for k in node.keywords}
    dt = args[1] if len(args) > 1 else kws.get("dtype")
    return _call(_np(node.func.id), gen.shape(args[0]), gen.dtype(dt, "int"))


def _full(gen, node):
    t, value = gen.t(node), node.args[1]
    dtype = _np("bool_" if t.dtype == "bool" else "int64")
    return _call(_np("full"), gen.shape(node.args[0]), gen.convert(gen.expr(value), gen.t(value), t.dtype), dtype)


def _where(gen, node):
    xs, ts, t = gen.operands(node)
    a, b = gen.convert(xs[1], ts[1], t.dtype), gen.convert(xs[2], ts[2], t.dtype)
    if not t.ndim:
        return _call("__sel", xs[0], a, b)        # a call: both values evaluated
    return _call(_np("where"), xs[0], a, b)


def _elementwise(fn):
    def rule(gen, node):
        xs, ts, t = gen.operands(node)
        xs = [gen.convert(x, tt, t.dtype) for x, tt in zip(xs, ts)]
        out = xs[0]
        for x in xs[1:]:
            out = _call(_np(fn), out, x) if t.ndim else _call("__" + fn[:3], out, x)
        return out
    return rule


def _extreme(gen, node):
    xs, _, _ = gen.operands(node)
    name = gen.types.primitive(node).name
    helper = "__extreme" if name in ("min", "max") else "__arg_extreme"
    code = gen.code("SpecValueError", node.lineno, f"{name}() of an empty array")
    return _call(helper, xs[0], ast.Constant(name.endswith("max")), _name("__st"), code)


def _any_all(gen, node):
    xs, _, _ = gen.operands(node)
    return _call(_np(node.func.id), xs[0])


def _sum(gen, node):
    xs, ts, _ = gen.operands(node)
    if ts[0].dtype == "bool" or not gen.check_overflow:
        return _call("__total", xs[0])            # a count cannot overflow
    return _call("__total_ck", xs[0], _name("__st"), gen.overflow("sum", node.lineno, False))


def _abs(gen, node):
    xs, ts, t = gen.operands(node)
    x = gen.as_int(xs[0], ts[0])
    if not gen.check_overflow:
        return _call(_np("abs"), x) if t.ndim else _call("__abs", x)
    return _call("__abs_a" if t.ndim else "__abs_s", x, _name("__st"), gen.overflow("abs", node.lineno, t.ndim))


def _int(gen, node):
    return _call(_np("int64"), gen.expr(node.args[0]))


def _bool(gen, node):
    x = gen.expr(node.args[0])
    return x if gen.t(node.args[0]).dtype == "bool" else ast.Compare(x, [ast.NotEq()], [ast.Constant(0)])


#: How each primitive lowers to Numba-compiled Python, by name: ``rule(codegen, call node)``.
PRIMITIVE_RULES = {
    "live": _live, "arange": lambda gen, node: _call(_np("arange"), gen.static(node.args[0])),
    "zeros": _filled, "ones": _filled, "full": _full, "where": _where,
    "minimum": _elementwise("minimum"), "maximum": _elementwise("maximum"),
    "min": _extreme, "max": _extreme, "argmin": _extreme, "argmax": _extreme,
    "any": _any_all, "all": _any_all, "sum": _sum, "abs": _abs, "int": _int, "bool": _bool,
}
