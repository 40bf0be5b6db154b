"""Statement translation for the verifier: each statement of a spec's body, checked and
turned into its :mod:`structdsl.ir` statement (assignments, ``if``, bounded ``for`` loops,
``break``, ``require`` and the checks the recursion pass inserts)."""
from __future__ import annotations

import ast

from . import ir
from .frontend_exprs import OK_BINOPS, ExprChecker
from .frontend_names import RACES, STATIC_FUNCS

# Statements outside the subset, with the reason shown to the user.
_REJECTED_STMTS = {
    ast.While: "unbounded loop: write `for _ in range(bound):` with a static bound and `break`",
    ast.FunctionDef: "define local functions at the top level of the spec",
    ast.AsyncFunctionDef: "async functions are outside the DSL",
    ast.ClassDef: "class definitions are outside the DSL",
    ast.Import: "imports are outside the DSL (no randomness, no I/O inside a spec)",
    ast.ImportFrom: "imports are outside the DSL (no randomness, no I/O inside a spec)",
    ast.With: "`with` blocks are outside the DSL (no I/O inside a spec)",
    ast.Try: "`try` is outside the DSL",
    ast.Raise: "`raise` is outside the DSL",
    ast.Global: "`global` makes the spec depend on mutable state: pass a static parameter",
    ast.Nonlocal: "`nonlocal` makes the spec depend on mutable state",
    ast.Delete: "`del` is outside the DSL",
    ast.Assert: "`assert` is outside the DSL",
    ast.Continue: "`continue` is outside the DSL: guard the rest of the body with `if`",
    ast.AnnAssign: "annotated assignments are outside the DSL: drop the annotation",
}


class StatementRules:
    """Mixed into :class:`structdsl.frontend._Frontend` (whose ``fail``, ``expr``,
    ``static`` and name tables it uses): the statements of a spec's body."""

    def block(self, body, top=False, in_loop=False):
        out = []
        for stmt in body:
            r = self.statement(stmt, top, in_loop)
            if r is not None:
                out.append(r)
        return out

    def statement(self, s, top, in_loop):
        for kind, why in _REJECTED_STMTS.items():
            if isinstance(s, kind):
                self.fail(s, why)
        if isinstance(s, ast.Pass):
            return None
        if isinstance(s, ast.Return):
            self.fail(s, "`return` must be the last statement of the spec, at the top level")
        if isinstance(s, ast.Break):
            if not in_loop:
                self.fail(s, "`break` outside a loop")
            return ir.Break(s.lineno)
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) \
                and isinstance(s.value.func, ast.Name) and s.value.func.id == "__fail":
            # a check the recursion pass inserted (users cannot write '__' names)
            test, error, message = s.value.args
            return ir.Fail(test, error.value, message.value, s.lineno)
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) \
                and isinstance(s.value.func, ast.Name) and s.value.func.id == "require" \
                and self.resolves_to_dsl("require"):
            return self.require(s, top)
        if isinstance(s, ast.Expr):
            if isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Name) \
                    and s.value.func.id in RACES:
                self.fail(s, f"the winner of {s.value.func.id}() must be assigned: `w = "
                          f"{s.value.func.id}(...)`")
            self.expr(s.value, "statement")
            self.fail(s, "an expression statement has no effect in a spec")
        if isinstance(s, ast.Assign):
            return self.assign(s, top)
        if isinstance(s, ast.AugAssign):
            self.target(s.target)
            if isinstance(s.op, ast.Div):
                self.fail(s, "true division makes floats: use //")
            if not isinstance(s.op, OK_BINOPS):
                self.fail(s, f"operator {type(s.op).__name__} is outside the DSL")
            return ir.AugAssign(self.target(s.target), s.op, self.expr(s.value, "arithmetic"),
                                s.lineno)
        if isinstance(s, ast.If):
            return ir.If(self.expr(s.test, "condition"), self.block(s.body, in_loop=in_loop),
                         self.block(s.orelse, in_loop=in_loop), s.lineno)
        if isinstance(s, ast.For):
            return self.loop(s)
        self.fail(s, f"{type(s).__name__} statements are outside the DSL")

    def require(self, s, top):
        """``require(static condition, "message")``: checked when sizes are known."""
        call = s.value
        if not top:
            self.fail(s, "require() must be at the top level of the spec")
        if len(call.args) != 2 or call.keywords or not (isinstance(call.args[1], ast.Constant)
                                                        and isinstance(call.args[1].value, str)):
            self.fail(s, 'write require(condition, "message"), the condition on parameters only')
        cond = call.args[0]
        for n in ast.walk(cond):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in self.params \
                    and n.id not in self.derived and n.id not in STATIC_FUNCS and not self.is_constant(n.id):
                self.fail(n, f"require() conditions may only read the parameters {list(self.params)}, "
                          f"not {n.id!r}")
            if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id in STATIC_FUNCS):
                self.fail(n, "require() conditions may only call min, max or abs")
        self.note_static(cond, s.lineno)
        self.requires.append((self.expr(cond, "condition", static=True), call.args[1].value, s.lineno))
        return None

    def loop(self, s):
        it = s.iter
        if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "range"
                and self.resolves_to_dsl("range") and not it.keywords):
            self.fail(s, "loops must be `for i in range(bound):` with one static bound")
        if len(it.args) != 1:
            self.fail(s, "range() takes exactly one bound in a spec: write `for j in range(b - a):` "
                      "and use `a + j`")
        if not isinstance(s.target, ast.Name):
            self.fail(s, "the loop variable must be a plain name")
        self.target(s.target)
        if s.orelse:
            self.fail(s, "`for ... else` is outside the DSL")
        var = s.target.id
        if var == "_":     # the throwaway name: reusable by nested loops, never read
            pass
        elif var in self.loop_vars:
            self.fail(s, f"loop variable {var!r} is already the variable of an enclosing loop")
        for n in (n for stmt in s.body for n in ast.walk(stmt)):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and n.id == var != "_":
                self.fail(n, f"loop variable {var!r} cannot be assigned inside its loop")
        bound = it.args[0]
        uses = tuple(sorted({n.id for n in ast.walk(bound) if isinstance(n, ast.Name)
                             and n.id in self.loop_vars}))
        if uses and not _linear(bound, set(uses)):
            self.fail(bound, f"a loop bound may use the enclosing loop variable(s) {list(uses)} only "
                      f"linearly (`range(i)`, `range(n - i)`, `range(2 * i + 1)`), so that its "
                      f"largest value is known from the enclosing counts")
        count = self.static(bound, "a loop bound", extra=set(uses))
        self.loop_vars.append(var)
        try:
            body = self.block(s.body, in_loop=True)
        finally:
            self.loop_vars.pop()
        return ir.Loop(var, count, body, s.lineno, bound_vars=uses)

    def assign(self, s, top):
        value = s.value
        call = value.func.id if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) \
            and self.resolves_to_dsl(value.func.id) else None
        if call == "atoms":
            return self.declare_atoms(s, top)
        if call in RACES:
            if self.atoms is None:
                self.fail(s, "declare the noise with atoms() before the first race")
            return self.race(s, call)
        targets = [self.target(t) for t in s.targets]
        if top and len(targets) == 1 and isinstance(targets[0], ast.Name) \
                and self.stores[targets[0].id] == 1 and self.is_static(value):
            value = self.expr(value, "stored", static=True)
            self.derived[targets[0].id] = value     # e.g. `m = 2 * n`: usable in shapes and bounds
            return ir.Assign(targets, value, s.lineno)
        return ir.Assign(targets, self.expr(value, "stored"), s.lineno)

    def target(self, t):
        names = t.elts if isinstance(t, ast.Tuple) else [t]
        if all(isinstance(e, ast.Name) for e in names):
            for e in names:
                if e.id == self.noise:
                    self.fail(e, f"noise {self.noise!r} cannot be reassigned")
            return t
        if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
            if t.value.id == self.noise:
                self.fail(t, f"noise {self.noise!r} cannot be written to")
            if t.value.id not in self.locals:
                what = "a parameter" if t.value.id in self.params else "not a local"
                self.fail(t, f"only local arrays can be written to; {t.value.id!r} is {what} "
                          f"(copy it first: `x = {t.value.id}`)")
            t.slice = ExprChecker(self, "indexed").visit_index(t.slice)
            return t
        self.fail(t, "assignment targets must be names, tuples of names or `array[index]`")


def _linear(node, names):
    """Does ``node`` depend on ``names`` only through ``+``, ``-`` and products with
    expressions free of them (so its maximum over a box is at a corner)?"""
    def free(n):
        return not any(isinstance(x, ast.Name) and x.id in names for x in ast.walk(n))
    if free(node) or isinstance(node, ast.Name):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        return _linear(node.left, names) and _linear(node.right, names)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return (free(node.left) and _linear(node.right, names)) or \
               (free(node.right) and _linear(node.left, names))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _linear(node.operand, names)
    return False
