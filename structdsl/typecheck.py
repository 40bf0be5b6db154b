"""The type-and-shape pass: every value of a spec is int64 or bool, a scalar or an array
whose shape is a static expression of the parameters.

The pass runs twice per program.  At ``compile`` time the sizes are unknown: it fixes every
local's dtype and rank, checks definite assignment (a local read on a path where it may be
unbound is refused at that line), the index forms, the operators' operand types and the
predicates, and keeps each shape as the text of its static expression (``n``, ``2 * n``).
When the sizes are known (the first call with logits of a new shape) it runs again with
every dimension's value, and checks that the shapes that meet agree.  Both runs raise
:class:`~structdsl.errors.SpecError` naming the user's line.

Typing rules (the one meaning every backend lowers):

* arithmetic ``+ - * // % << >>`` and unary ``-``: int64 (bool operands count as 0/1);
* ``& | ^``: bool if both operands are bool (logical), else int64 (bitwise); ``~``: logical
  not on bool, bitwise not on int;
* ``not``, ``and``, ``or``, ``if``/``a if c else b`` conditions and ``where``'s first argument
  take bools only;
* broadcasting: a scalar goes with any shape; arrays align on their trailing dims, which must
  be equal (no stretching of size-1 dims);
* a local keeps the type of its first binding (a bool may be stored into an int local);
* indexing: int scalars and ``:`` (basic), int arrays (a gather; not mixed with ``:``), and a
  bool mask only as the whole index of a store target with a scalar value;
* a predicate gives one bool (members) or int (key) per atom.  It is *grid-safe* when every
  value that depends on the atom's indices is a scalar: then evaluating it once on whole
  index grids equals evaluating it atom by atom.

The rules are split by what they type: ``typecheck_exprs`` (expressions),
``typecheck_calls`` (the DSL functions), ``typecheck_stmts`` (statements); the types
themselves are in ``typecheck_types`` and re-exported here.
"""
from __future__ import annotations

import ast
import re

from . import ir
from .errors import SpecError
from .typecheck_calls import CallTyping
from .typecheck_exprs import OPS, ExpressionTyping
from .typecheck_stmts import StatementTyping
from .typecheck_types import BOOL, INT, Dim, Type, Typing

__all__ = ["BOOL", "INT", "Dim", "Type", "Typing", "array_type", "check"]


def check(program: ir.Program, param_types: dict, env: dict) -> Typing:
    """Type ``program``.  ``param_types``: the :class:`Type` of every parameter; ``env``: the
    values of the static names known so far (dimensions whose expression needs a name
    outside ``env`` stay symbolic)."""
    return _Checker(program, param_types, env).run()


def array_type(array, name):
    """The :class:`Type` of a data parameter or tuple constant."""
    dtype = "bool" if array.dtype == bool else "int"
    return Type(dtype, tuple(Dim(str(s), int(s)) for s in array.shape))


class _Checker(ExpressionTyping, CallTyping, StatementTyping):
    """One run of the pass over a program: the shared helpers and the top level.  The
    expression, call and statement rules are the mixins' (they call one another)."""

    def __init__(self, program, param_types, env):
        self.p, self.params, self.env = program, param_types, env
        self.typing = Typing(program.name)
        self.idx = {}              # index parameters of the predicate being typed
        self.grid_ok = True
        self.atom_dims = tuple(self.dim(d) for d in program.atoms.dims)

    # ---- helpers ------------------------------------------------------------------------
    def fail(self, where, message):
        line = where if isinstance(where, int) else getattr(where, "lineno", None)
        # a local of a local function lives in a stack slot: show the user's name
        message = re.sub(r"__S_\w+?__(\w+)\[__sp\]", r"\1", message)
        raise SpecError(message, self.p.file, line)

    def dim(self, node):
        try:
            value = ir.static_eval(node, self.env, self.p.file)
        except NameError:
            value = None
        return Dim(ast.unparse(node), value)

    def dims(self, node):
        """A shape: static dims that must not be negative once their values are known."""
        elts = node.elts if isinstance(node, ast.Tuple) else [node]
        out = tuple(self.dim(e) for e in elts)
        for e, d in zip(elts, out):
            self.nonnegative(e, d, "a shape")
        return out

    def mixed_bits(self, where, op):
        """``&``, ``|``, ``^`` are logical on bools and bitwise on ints; a bool mixed with an
        int has no obvious meaning (``True & 2`` is 0), so the user says which one."""
        o = OPS[type(op)]
        self.fail(where, f"`{o}` mixes a bool and an int64: it is logical on bools and bitwise "
                  f"on ints; write `b {o} (x != 0)` for the logical one, or `int(b) {o} x` for bits")

    def nonnegative(self, node, d, what):
        if d.value is not None and d.value < 0:
            values = ", ".join(f"{k}={v}" for k, v in self.env.items() if k in self.p.params)
            self.fail(node, f"{what} `{d}` is {d.value} < 0 with {values}: choose parameters "
                      f"that keep it non-negative, or add `require({d} >= 0, \"...\")`")

    @staticmethod
    def same(a, b):
        if a.value is not None and b.value is not None:
            return a.value == b.value
        return True      # symbolic: rechecked once the sizes are known

    def fmt(self, shape):
        return "[" + ", ".join(d.text if d.value is None or d.text == str(d.value)
                               else f"{d.text}={d.value}" for d in shape) + "]"

    def broadcast(self, node, *types):
        """Shape of an elementwise result; scalars go anywhere, arrays align on trailing dims."""
        shape = ()
        for t in types:
            a, b = (shape, t.shape) if len(shape) >= len(t.shape) else (t.shape, shape)
            for x, y in zip(a[len(a) - len(b):], b):
                if not self.same(x, y):
                    self.fail(node, f"shapes {self.fmt(shape)} and {self.fmt(t.shape)} do not "
                              f"match in `{ast.unparse(node)}`")
            shape = a
        return shape

    def typed(self, node, t):
        if t.varying and t.ndim:
            self.grid_ok = False        # an atom-dependent array: evaluate atom by atom
        self.typing._exprs[id(node)] = t
        return t

    def need_bool(self, node, t, what):
        if t.dtype != "bool":
            self.fail(node, f"{what} takes a bool, got {t} in `{ast.unparse(node)}` "
                      f"(compare explicitly, e.g. `x != 0`)")

    # ---- the whole program ----------------------------------------------------------------
    def run(self):
        p = self.p
        if p.atoms.valid is not None:
            self.pred(p.atoms.valid, set(), "bool", "valid")
        for cond, _, line in p.requires:
            t = self.expr(cond, set())
            if t.dtype != "bool" or t.ndim:
                self.fail(line, "require() takes a bool condition")
        defined = set()
        self.block(p.body, defined)
        for name in p.outputs:
            if name not in defined:
                self.fail(p.end_line, f"returned field {name!r} may be unbound: it is not "
                          f"assigned on every path")
            self.typing.outputs[name] = self.typing.locals[name]
        return self.typing
