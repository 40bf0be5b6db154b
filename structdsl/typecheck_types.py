"""The values of the type-and-shape pass (:mod:`structdsl.typecheck`): a dimension
(:class:`Dim`), a value's type (:class:`Type`) and the pass's result (:class:`Typing`),
which the backends read when they lower a program."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Dim:
    """One dimension: the text of its static expression and, when known, its value."""
    text: str
    value: int | None = None

    def __str__(self):
        return self.text


@dataclass(frozen=True)
class Type:
    """dtype ``"int"`` (int64) or ``"bool"``; ``shape`` a tuple of :class:`Dim` (``()`` for a
    scalar); ``varying``: inside a predicate, the value depends on the atom's indices."""
    dtype: str
    shape: tuple = ()
    varying: bool = False

    @property
    def ndim(self):
        return len(self.shape)

    def __str__(self):
        name = "int64" if self.dtype == "int" else "bool"
        return name if not self.shape else f"{name}[{', '.join(map(str, self.shape))}]"


INT, BOOL = Type("int"), Type("bool")


class Typing:
    """The pass's result: the type of every local, output and expression node, and which
    predicates are grid-safe."""

    def __init__(self, name):
        self.name = name
        self.locals = {}          # name -> Type (first binding)
        self.lines = {}           # name -> line of that binding
        self.outputs = {}         # field -> Type
        self._exprs = {}          # id(ast node) -> Type
        self._grid = {}           # id(ir.Pred) -> bool
        self.primitives = {}      # id(ast.Call) -> primitives.Primitive

    def of(self, node):
        """The :class:`Type` of an expression node of the IR."""
        return self._exprs[id(node)]

    def primitive(self, node):
        """The :class:`~structdsl.primitives.Primitive` a call node of the IR resolved to (a
        call in a static expression, ``zeros(max(n, 2))``, is not typed: it resolves here)."""
        found = self.primitives.get(id(node))
        if found is None:
            from .primitives import resolve
            found = resolve(node.func.id, len(node.args))
        return found

    def grid_safe(self, pred):
        return self._grid[id(pred)]

    def __str__(self):
        rows = []
        for n, t in self.locals.items():
            stack = re.fullmatch(r"__S_(\w+?)__(\w+)", n)
            if stack:       # a local function's local: one slot per activation on a stack
                rows.append((f"{stack[1]}.{stack[2]}", f"int64 per call (stack of {t.shape[0]})", self.lines[n]))
            elif not n.startswith("__"):                       # the compiler's own temporaries
                rows.append((n, str(t), self.lines[n]))
        width = max((len(r[0]) for r in rows), default=4)
        out = [f"types of {self.name}:"] + [f"  {n:<{width}}  {t}   (line {line})" for n, t, line in rows]
        out.append("structure: " + ", ".join(f"{n} {t}" for n, t in self.outputs.items()))
        return "\n".join(out)

    __repr__ = __str__
