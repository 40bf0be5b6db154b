"""Expression typing for the type-and-shape pass: constants, names, the operators and
subscripts (the typing rules are listed in :mod:`structdsl.typecheck`).  Calls to DSL
functions are typed by :mod:`structdsl.typecheck_calls`."""
from __future__ import annotations

import ast

from .typecheck_types import BOOL, INT, Type

BITS = (ast.BitAnd, ast.BitOr, ast.BitXor)
OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%",
       ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>"}


class ExpressionTyping:
    """Mixed into :class:`structdsl.typecheck._Checker` (its helpers ``fail``, ``broadcast``,
    ``need_bool``, ``mixed_bits``, ``same`` and ``typed``): an expression's type, with
    ``defined`` the locals surely bound at that point."""

    def expr(self, node, defined):
        return self.typed(node, self._expr(node, defined))

    def _expr(self, node, defined):
        if isinstance(node, ast.Constant):
            return BOOL if type(node.value) is bool else INT
        if isinstance(node, ast.Name):
            return self.name(node, defined)
        if isinstance(node, ast.BinOp):
            a, b = self.expr(node.left, defined), self.expr(node.right, defined)
            shape = self.broadcast(node, a, b)
            if isinstance(node.op, BITS) and a.dtype != b.dtype:
                self.mixed_bits(node, node.op)
            dtype = "bool" if isinstance(node.op, BITS) and a.dtype == b.dtype == "bool" else "int"
            return Type(dtype, shape, a.varying or b.varying)
        if isinstance(node, ast.UnaryOp):
            t = self.expr(node.operand, defined)
            if isinstance(node.op, ast.Not):
                self.need_bool(node, t, "`not`")
                if t.ndim:
                    self.fail(node, "`not` takes one bool; for an array write `~mask`")
                return t
            if isinstance(node.op, ast.Invert):
                return t
            return Type("int", t.shape, t.varying)
        if isinstance(node, ast.BoolOp):
            ts = [self.expr(v, defined) for v in node.values]
            for v, t in zip(node.values, ts):
                self.need_bool(v, t, "`and`/`or`")
            return Type("bool", self.broadcast(node, *ts), any(t.varying for t in ts))
        if isinstance(node, ast.Compare):
            a, b = self.expr(node.left, defined), self.expr(node.comparators[0], defined)
            return Type("bool", self.broadcast(node, a, b), a.varying or b.varying)
        if isinstance(node, ast.IfExp):
            c = self.expr(node.test, defined)
            self.need_bool(node.test, c, "a conditional expression")
            a, b = self.expr(node.body, defined), self.expr(node.orelse, defined)
            if c.ndim == 0 and (a.ndim != b.ndim):
                self.fail(node, f"both branches of `a if c else b` must have the same shape, "
                          f"got {a} and {b}")
            dtype = "bool" if a.dtype == b.dtype == "bool" else "int"
            return Type(dtype, self.broadcast(node, c, a, b), c.varying or a.varying or b.varying)
        if isinstance(node, ast.Subscript):
            return self.subscript(node, defined)
        if isinstance(node, ast.Call):
            return self.call(node, defined)
        if isinstance(node, ast.Tuple):
            self.fail(node, "a tuple is only allowed as a shape or in `a, b = x, y`")
        self.fail(node, f"{type(node).__name__} is outside the DSL")

    def name(self, node, defined):
        n = node.id
        if n in self.idx:
            return self.idx[n]
        if n in self.params:             # parameters, data parameters, tuple constants
            return self.params[n]
        if n in ("int", "bool"):
            self.fail(node, f"{n} can only be called or given as a dtype")
        if n not in defined:
            where = self.typing.lines.get(n)
            also = f" (it is assigned at line {where})" if where else ""
            self.fail(node, f"local {n!r} may be unbound here: it is not assigned on every path "
                      f"before this line{also}")
        return self.typing.locals[n]

    def subscript(self, node, defined, store=False):
        base = self.expr(node.value, defined)
        if base.ndim == 0:
            self.fail(node, f"`{ast.unparse(node.value)}` is a scalar ({base}) and cannot be indexed")
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(elts) > base.ndim:
            self.fail(node, f"too many indices: `{ast.unparse(node.value)}` is {base}")
        kinds = []
        for e in elts:
            if isinstance(e, ast.Slice):
                kinds.append(("slice", None))
                continue
            t = self.expr(e, defined)
            if t.dtype == "bool":
                if t.ndim == 0:
                    self.fail(e, "a bool cannot be an index: write int(b), or index with a mask array")
                kinds.append(("mask", t))
            else:
                kinds.append(("scalar" if t.ndim == 0 else "array", t))
        varying = base.varying or any(t.varying for _, t in kinds if t is not None)
        rest = base.shape[len(elts):]
        if any(k == "mask" for k, _ in kinds):
            if not store:
                self.fail(node, "a boolean-mask read `x[mask]` has a length that depends on the "
                          "state: use where(mask, x, 0), or any/all/sum of where(...)")
            if len(kinds) != 1:
                self.fail(node, "a mask must be the whole index: `x[mask] = value`")
            mask = kinds[0][1]
            lead = base.shape[:mask.ndim]
            if mask.ndim > base.ndim or any(not self.same(a, b) for a, b in zip(lead, mask.shape)):
                self.fail(node, f"mask {mask} does not match the leading dims of {base}")
            return Type(base.dtype, ("mask",), varying)
        arrays = [t for k, t in kinds if k == "array"]
        if arrays:
            if any(k == "slice" for k, _ in kinds):
                self.fail(node, "an index array mixed with `:` is outside the DSL (NumPy would "
                          "move the dimensions): index one axis at a time")
            if store:
                self.fail(node, "writing through an index array (a scatter) is outside the DSL: "
                          "duplicate indices have no single meaning on parallel backends; "
                          "write a loop")
            shape = self.broadcast(node, *[t for _, t in kinds]) + rest
        else:
            shape = tuple(base.shape[i] for i, (k, _) in enumerate(kinds) if k == "slice") + rest
        return Type(base.dtype, shape, varying)
