"""Call typing for the type-and-shape pass: the rule of every DSL function (``arange``,
``zeros``, ``where``, the reductions, ``int``/``bool`` ...) and of ``live``."""
from __future__ import annotations

import ast

from .typecheck_types import Type


class CallTyping:
    """Mixed into :class:`structdsl.typecheck._Checker`: the type of a call to a DSL function
    (its arguments are typed by ``expr``; shapes come from ``dims``)."""

    def call(self, node, defined):
        name = node.func.id
        args = node.args
        kws = {k.arg: k.value for k in node.keywords}

        def arity(lo, hi=None):
            hi = lo if hi is None else hi
            if not lo <= len(args) <= hi:
                want = str(lo) if lo == hi else f"{lo} to {hi}"
                self.fail(node, f"{name}() takes {want} argument(s), got {len(args)}")

        def dtype_of(node_or_none, default):
            if node_or_none is None:
                return default
            if not (isinstance(node_or_none, ast.Name) and node_or_none.id in ("int", "bool")):
                self.fail(node, f"the dtype of {name}() must be int or bool")
            return node_or_none.id

        if name == "live":
            return Type("bool", self.atom_dims)
        if name == "arange":
            arity(1)
            return Type("int", self.dims(args[0]))
        if name in ("zeros", "ones"):
            arity(1, 2)
            if len(args) == 2 and "dtype" in kws:
                self.fail(node, f"{name}() got dtype twice")
            return Type(dtype_of(args[1] if len(args) == 2 else kws.get("dtype"), "int"), self.dims(args[0]))
        if name == "full":
            arity(2)
            v = self.expr(args[1], defined)
            if v.ndim:
                self.fail(node, f"full()'s value must be a scalar, got {v}")
            dtype = dtype_of(kws.get("dtype"), v.dtype)
            if dtype == "bool" and v.dtype == "int":
                self.fail(node, "full(..., int value, dtype=bool): write the value as True/False")
            return Type(dtype, self.dims(args[0]), v.varying)
        ts = [self.expr(a, defined) for a in args]
        varying = any(t.varying for t in ts)
        if name == "where":
            arity(3)
            self.need_bool(args[0], ts[0], "where()'s condition")
            dtype = "bool" if ts[1].dtype == ts[2].dtype == "bool" else "int"
            return Type(dtype, self.broadcast(node, *ts), varying)
        if name in ("minimum", "maximum") or (name in ("min", "max") and len(args) >= 2):
            arity(2, 8)
            dtype = "bool" if all(t.dtype == "bool" for t in ts) else "int"
            return Type(dtype, self.broadcast(node, *ts), varying)
        if name in ("min", "max", "any", "all", "sum", "argmin", "argmax"):
            arity(1)
            t = ts[0]
            if t.ndim == 0:
                self.fail(node, f"{name}() reduces an array; `{ast.unparse(args[0])}` is a scalar")
            if name in ("any", "all"):
                self.need_bool(args[0], t, f"{name}()")
                return Type("bool", (), varying)
            if name in ("argmin", "argmax") and t.ndim != 1:
                self.fail(node, f"{name}() takes a 1-d array, got {t}")
            if name in ("min", "max"):
                return Type(t.dtype, (), varying)
            return Type("int", (), varying)
        if name == "abs":
            arity(1)
            return Type("int", ts[0].shape, varying)
        if name in ("int", "bool"):
            arity(1)
            if ts[0].ndim:
                self.fail(node, f"{name}() converts a scalar; for an array use where(...) or `x != 0`")
            return Type(name, (), varying)
        self.fail(node, f"{name}() is not a DSL function")
