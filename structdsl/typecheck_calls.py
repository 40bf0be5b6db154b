"""Call typing for the type-and-shape pass: a call resolves to its primitive
(:mod:`structdsl.primitives`), whose rule types it."""
from __future__ import annotations

from . import primitives


class CallTyping:
    """Mixed into :class:`structdsl.typecheck._Checker`: the type of a call to a DSL function
    (its arguments are typed by ``expr``; shapes come from ``dims``)."""

    def call(self, node, defined):
        name, nargs = node.func.id, len(node.args)
        prim = primitives.resolve(name, nargs)
        if prim is None:
            self.fail(node, f"{name}() is not a DSL function")
        lo, hi = prim.arity
        if not lo <= nargs <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            self.fail(node, f"{name}() takes {want} argument(s), got {nargs}")
        self.typing.primitives[id(node)] = prim
        return prim.rule(self, node, defined)
