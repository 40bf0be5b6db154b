"""Expression evaluation for the torch backend's lock-step machine (:class:`torch_machine._Machine`).

:class:`ExprLowering` is a mixin of the machine: it evaluates an expression of the IR on
every lane at once (arithmetic, comparisons, ``and``/``or``/``if``-expressions, indexing and
the DSL's functions) and checks it as the NumPy reference does, flagging each lane's errors
(int64 overflow, division by zero, an index out of range, ...) through the machine's
``flag``.  It is a mixin rather than a separate object because expressions, stores,
statements and races call one another and share the machine's whole lane state (masks,
locals, the predicate's index grid).
"""
from __future__ import annotations

import ast
import math

import torch

from .torch_ops import _I64_MIN, _all, _any, _bools

_CMP = {ast.Eq: torch.eq, ast.NotEq: torch.ne, ast.Lt: torch.lt, ast.LtE: torch.le,
        ast.Gt: torch.gt, ast.GtE: torch.ge}


class ExprLowering:
    """The expression half of :class:`torch_machine._Machine`: values ``[*lead, *own]`` of the
    IR's expressions on every lane, with the reference's run-time checks."""

    # ---- expressions ----------------------------------------------------------------------
    def ev(self, node, g=None):
        """Evaluate ``node``; ``g``: a lead-shaped bool guard (None: everywhere) outside
        which errors do not count (the reference would not evaluate the node there)."""
        line = getattr(node, "lineno", None)
        if isinstance(node, ast.Constant):
            return self.const(node.value)
        if isinstance(node, ast.Name):
            return self.lookup(node.id, line)
        if isinstance(node, ast.Tuple):      # pragma: no cover - tuples only as indices/targets
            raise TypeError("tuple value")
        if isinstance(node, ast.BinOp):
            return self.binop(node, g)
        if isinstance(node, ast.UnaryOp):
            x = self.ev(node.operand, g)
            t = self.types.of(node.operand)
            if isinstance(node.op, ast.USub):
                x = x.long()
                self.overflow(x == _I64_MIN, g, self.own(node.operand), line, "-", "neg", x)
                return -x
            if isinstance(node.op, ast.UAdd):
                return x.long()
            if isinstance(node.op, ast.Invert) and t.dtype == "int":
                return ~x
            return ~x                        # not / ~ on bools
        if isinstance(node, ast.BoolOp):
            return self.boolop(node, g)
        if isinstance(node, ast.Compare):
            a, b = node.left, node.comparators[0]
            k = self.own(node)
            x, y = self.lift(self.ev(a, g), self.own(a), k), self.lift(self.ev(b, g), self.own(b), k)
            if x.dtype != y.dtype:
                x, y = x.long(), y.long()
            return _CMP[type(node.ops[0])](x, y)
        if isinstance(node, ast.IfExp):
            k = self.own(node)
            test = self.ev(node.test, g)
            want_int = self.types.of(node).dtype == "int"
            if self.own(node.test) == 0:       # lazy: each side guarded by its condition
                body = self.ev(node.body, self.both(g, test))
                orelse = self.ev(node.orelse, self.both(g, ~test))
            else:
                body, orelse = self.ev(node.body, g), self.ev(node.orelse, g)
            body, orelse = self.lift(body, self.own(node.body), k), self.lift(orelse, self.own(node.orelse), k)
            if want_int:
                body, orelse = body.long(), orelse.long()
            return torch.where(self.lift(test, self.own(node.test), k), body, orelse)
        if isinstance(node, ast.Subscript):
            return self.getitem(node, g)
        if isinstance(node, ast.Call):
            return self.call(node, g)
        raise TypeError(f"cannot lower {type(node).__name__}")  # pragma: no cover

    @staticmethod
    def both(g, m):
        return m if g is None else g & m

    def in_range(self, i, d):
        """Whether index ``i`` is an atom coordinate of a predicate (its grid tensor, values
        ``0 .. size - 1``) with ``size <= d``: then it cannot be out of range and its check,
        a pass over the grid, is skipped."""
        return self.grid is not None and i.numel() <= d and any(i is c for c in self.grid.values())

    def guarded(self, bad, g, k):
        """Reduce an elementwise ``bad`` (with ``k`` own dims) to lead shape, inside ``g``."""
        if k:
            bad = _any(bad.reshape(bad.shape[:self.L] + (-1,)))
        return bad if g is None else bad & g

    def binop(self, node, g):
        k = self.own(node)
        a = self.lift(self.ev(node.left, g), self.own(node.left), k)
        b = self.lift(self.ev(node.right, g), self.own(node.right), k)
        return self.arith(node.op, a, b, k, node.lineno, g)

    def arith(self, op, a, b, k, line, g):
        """``a op b`` on aligned values with ``k`` own dims, checked as the reference checks."""
        if isinstance(op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
            if a.dtype != b.dtype:
                a, b = a.long(), b.long()
            return _bools({ast.BitAnd: torch.bitwise_and, ast.BitOr: torch.bitwise_or,
                           ast.BitXor: torch.bitwise_xor}[type(op)], a, b)
        a, b = a.long(), b.long()
        if isinstance(op, ast.Add):
            r = a + b
            self.overflow(((a ^ r) & (b ^ r)) < 0, g, k, line, "+", "add", a, b)
            return r
        if isinstance(op, ast.Sub):
            r = a - b
            self.overflow(((a ^ b) & (a ^ r)) < 0, g, k, line, "-", "sub", a, b)
            return r
        if isinstance(op, ast.Mult):
            r = a * b
            # the quotient test r / a != b, except for a in (0, -1): -1 overflows only with MIN
            # (and MIN / -1 itself would trap the CPU's integer division: SIGFPE)
            small = (a == 0) | (a == -1)
            bad = (~small & (torch.div(r, torch.where(small, 1, a), rounding_mode="trunc") != b)) | \
                ((a == -1) & (b == _I64_MIN))
            self.overflow(bad, g, k, line, "*", "mul", a, b)
            return r
        if isinstance(op, (ast.FloorDiv, ast.Mod)):
            zero = b == 0
            what = "division" if isinstance(op, ast.FloorDiv) else "modulo"
            self.flag(self.guarded(zero, g, k), "SpecZeroDivisionError", line, f"integer {what} by zero")
            bs = torch.where(zero | ((a == _I64_MIN) & (b == -1)), 1, b)    # nothing traps: flagged lanes
            if isinstance(op, ast.FloorDiv):
                self.overflow((a == _I64_MIN) & (b == -1), g, k, line, "//", "floordiv", a, b)
                return torch.div(a, bs, rounding_mode="floor")
            return torch.remainder(a, bs)
        if isinstance(op, (ast.LShift, ast.RShift)):
            self.flag(self.guarded(b < 0, g, k), "SpecValueError", line, "negative shift count")
            s = b.clamp(0, 63)
            if isinstance(op, ast.RShift):
                return torch.bitwise_right_shift(a, s)
            r = torch.bitwise_left_shift(a, s)
            bad = (torch.bitwise_right_shift(r, s) != a) | ((r < 0) != (a < 0)) | ((b > 63) & (a != 0))
            self.overflow(bad, g, k, line, "<<", "lshift", a, b)
            return r
        raise TypeError(type(op).__name__)  # pragma: no cover

    def overflow(self, bad, g, k, line, op, exact, *operands):
        """An int64 overflow of ``op`` (``bad`` elementwise, ``k`` own dims): on scalars the
        reference prints the exact result, computed from the ``operands`` (see :data:`torch_machine._EXACT`)."""
        if k:
            self.flag(self.guarded(bad, g, k), "SpecOverflowError", line, f"int64 overflow in {op}")
        else:
            self.flag(self.guarded(bad, g, 0), "SpecOverflowError", line,
                      f"int64 overflow in {op} (the exact result is {{{exact}}})", values=lambda: operands)

    def boolop(self, node, g):
        k = self.own(node)
        is_and = isinstance(node.op, ast.And)
        if k:                                  # arrays: elementwise, every side evaluated
            out = None
            op = torch.bitwise_and if is_and else torch.bitwise_or
            for v in node.values:
                x = self.lift(self.ev(v, g), self.own(v), k)
                out = x if out is None else _bools(op, out, x)
            return out
        out, guard = None, g                   # scalars: short-circuit, as Python
        for v in node.values:
            x = self.ev(v, guard)
            out = x if out is None else (out & x if is_and else out | x)
            guard = self.both(g, out if is_and else ~out)
        return out

    # ---- indexing -------------------------------------------------------------------------
    def index_nodes(self, node):
        s = node.slice
        return s.elts if isinstance(s, ast.Tuple) else [s]

    def getitem(self, node, g):
        x = self.ev(node.value, g)
        L, pos, line = self.L, 0, node.lineno
        # as the reference: every index is evaluated, then they are checked axis by axis
        idx = [None if isinstance(e, ast.Slice) else (self.ev(e, g).long(), self.own(e))
               for e in self.index_nodes(node)]
        for axis, entry in enumerate(idx):
            if entry is None:
                pos += 1
                continue
            i, ki = entry
            d = x.shape[L + pos]
            if not self.in_range(i, d):
                self.index_error(i, ki, d, g, line, "read", axis)
                i = i.clamp(0, max(d - 1, 0))
            x = self.take(x, i, ki, L + pos)
            pos += ki
        return x

    def index_error(self, i, ki, d, g, line, what, axis):
        """Flag index ``i`` (``ki`` own dims) outside ``[0, d)``, naming the first bad value
        (in the index array's own order) as the reference does."""
        bad = (i < 0) | (i >= d)

        def first():
            if not ki:
                return (i,)
            lead = bad.shape[:self.L]
            flat_bad = bad.reshape(lead + (-1,))
            at = flat_bad.view(torch.uint8).argmax(-1, keepdim=True)
            return (i.expand(bad.shape).reshape(lead + (-1,)).gather(-1, at)[..., 0],)
        self.flag(self.guarded(bad, g, ki), "SpecIndexError", line,
                  f"{what} index {{v0}} is out of range for axis {axis} of size {d}", values=first)

    def take(self, x, i, ki, dim):
        """``x`` indexed at own axis ``dim`` by ``i`` (``ki`` own dims): the axis becomes ``i``'s dims."""
        L = self.L
        lead = torch.broadcast_shapes(x.shape[:L], i.shape[:L])
        x = x.expand(lead + x.shape[L:])
        pre, post = x.shape[L:dim], x.shape[dim + 1:]
        s = i.shape[L:]
        S = math.prod(s)
        if x.shape[dim] == 0:                       # nothing to read: every index was flagged
            return x.new_zeros(lead + pre + s + post)
        idx = i.expand(lead + s).reshape(lead + (1,) * len(pre) + (S,) + (1,) * len(post))
        idx = idx.expand(lead + pre + (S,) + post)
        out = torch.gather(x, dim, idx)
        return out.reshape(lead + pre + s + post)

    # ---- DSL functions --------------------------------------------------------------------
    def call(self, node, g):
        return PRIMITIVE_RULES[self.types.primitive(node).name](self, node, g)

    def lifted(self, node, g, values=None):
        """A call's arguments (``values`` of them) evaluated and broadcast to its rank, as
        int64 for an int result."""
        t = self.types.of(node)
        xs = [self.lift(self.ev(x, g), self.own(x), t.ndim) for x in values or node.args]
        return [x.long() for x in xs] if t.dtype == "int" else xs


# ---- one lowering rule per primitive (structdsl.primitives): rule(machine, node, guard) ----
def _live(m, node, g):
    return m.live0.reshape((m.B,) + (1,) * (m.L - 1) + m.inst.atom_shape)


def _filled(m, node, g):
    t = m.types.of(node)
    shape = tuple(d.value for d in t.shape)
    dtype = torch.bool if t.dtype == "bool" else torch.int64
    name = m.types.primitive(node).name
    if name == "arange":
        return torch.arange(shape[0], device=m.device).reshape((1,) * m.L + shape)
    if name in ("zeros", "ones"):
        fill = torch.zeros if name == "zeros" else torch.ones
        return fill((1,) * m.L + shape, dtype=dtype, device=m.device)
    v = m.ev(node.args[1], g).to(dtype)
    return v.reshape(v.shape + (1,) * t.ndim).expand(v.shape + shape)


def _where(m, node, g):
    test = node.args[0]
    c = m.lift(m.ev(test, g), m.own(test), m.types.of(node).ndim)
    a, b = m.lifted(node, g, node.args[1:])
    return torch.where(c, a, b)


def _elementwise(fn):
    def rule(m, node, g):
        xs = m.lifted(node, g)
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return rule


def _reduction(m, node, g):
    """A reduction over the lane's whole array; ``min``, ``max``, ``argmin``, ``argmax`` of an
    empty one flag an error (``any``, ``all``, ``sum`` have a value: False, True, 0)."""
    name, t, line = m.types.primitive(node).name, m.types.of(node), node.lineno
    x = m.ev(node.args[0], g)
    flat = x.reshape(x.shape[:m.L] + (-1,))
    if flat.shape[-1] == 0 and name not in ("any", "all", "sum"):
        m.flag(torch.ones((1,) * m.L, dtype=torch.bool, device=m.device) if g is None else g,
               "SpecValueError", line, f"{name}() of an empty array")
        return torch.zeros(flat.shape[:-1], dtype=torch.bool if t.dtype == "bool" else torch.int64,
                           device=m.device)
    if name == "any":
        return _any(flat)
    if name == "all":
        return _all(flat)
    if name == "sum":
        x = flat.long()     # exact overflow test: sum the high and low 32-bit halves apart
        high = torch.bitwise_right_shift(x, 32).sum(-1)
        low = torch.bitwise_and(x, 0xFFFFFFFF).sum(-1)
        top = high + torch.bitwise_right_shift(low, 32)
        m.overflow((top < -2**31) | (top >= 2**31), g, 0, line, "sum", "sum", high, low)
        return x.sum(-1)
    if name in ("argmin", "argmax"):
        return flat.long().argmin(-1) if name == "argmin" else flat.long().argmax(-1)
    if flat.dtype == torch.bool:
        return _all(flat) if name == "min" else _any(flat)
    return flat.amin(-1) if name == "min" else flat.amax(-1)


def _abs(m, node, g):
    x = m.ev(node.args[0], g).long()
    m.overflow(x == _I64_MIN, g, m.types.of(node).ndim, node.lineno, "abs", "abs", x)
    return x.abs()


#: How each primitive runs on ``[B, ...]`` lane tensors, by name.
PRIMITIVE_RULES = {
    "live": _live, "arange": _filled, "zeros": _filled, "ones": _filled, "full": _filled,
    "where": _where, "minimum": _elementwise(torch.minimum), "maximum": _elementwise(torch.maximum),
    **dict.fromkeys(("min", "max", "argmin", "argmax", "any", "all", "sum"), _reduction),
    "abs": _abs, "int": lambda m, node, g: m.ev(node.args[0], g).long(),
    "bool": lambda m, node, g: m.ev(node.args[0], g) != 0,
}
