"""The expression verifier: checks an expression of a spec against the DSL's subset (no
noise outside a race, no I/O, randomness, mutable globals or helpers) and inlines the
plain constants it reads."""
from __future__ import annotations

import ast
import types

from .frontend_names import (INT64, IO_NAMES, KEYWORDS, RACES, constant_node, is_plain_constant,
                             is_random_module)

SHAPED = ("arange", "zeros", "ones", "full")          # their shape argument must be static
OK_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.BitAnd, ast.BitOr,
             ast.BitXor, ast.LShift, ast.RShift)

_NOISE_USE = {
    ast.Compare: "compared", ast.BinOp: "used in arithmetic", ast.UnaryOp: "used in arithmetic",
    ast.BoolOp: "used in a condition", ast.Subscript: "indexed", ast.IfExp: "used in a condition",
    ast.Tuple: "packed into a tuple",
}
_REJECTED_CMPOPS = {
    ast.Is: "`is` compares object identity, which has no meaning on values: use ==",
    ast.IsNot: "`is not` compares object identity, which has no meaning on values: use !=",
    ast.In: "`in` is outside the DSL: use any(x == v)",
    ast.NotIn: "`not in` is outside the DSL: use all(x != v)",
}


class ExprChecker(ast.NodeTransformer):
    """Checks one expression for the frontend ``fe``; ``context`` says how its value is used
    (it names the use of the noise in messages), ``static`` that it is a shape or bound,
    where tuple constants are inlined rather than read as arrays."""

    def __init__(self, fe, context, static=False):
        self.fe, self.context, self.static, self.parents = fe, context, static, []

    def visit(self, node):
        self.parents.append(node)
        try:
            return super().visit(node)
        finally:
            self.parents.pop()

    def fail(self, node, msg):
        self.fe.fail(node, msg)

    def generic_visit(self, node):
        if isinstance(node, (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
                             ast.keyword)):
            return super().generic_visit(node)
        allowed = (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.IfExp, ast.Tuple)
        if not isinstance(node, allowed):
            what = {ast.ListComp: "list comprehensions", ast.List: "lists", ast.Dict: "dicts",
                    ast.Set: "sets", ast.GeneratorExp: "generators", ast.Lambda: "lambdas outside "
                    "a race's members/key or atoms' valid", ast.DictComp: "dict comprehensions",
                    ast.SetComp: "set comprehensions", ast.JoinedStr: "f-strings",
                    ast.NamedExpr: "`:=`", ast.Starred: "`*` unpacking", ast.Await: "await",
                    ast.Yield: "yield", ast.YieldFrom: "yield"}.get(type(node), type(node).__name__)
            self.fail(node, f"{what} are outside the DSL (state is fixed-shape int/bool arrays)")
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Div):
                self.fail(node, "true division makes floats: use //")
            if not isinstance(node.op, OK_BINOPS):
                self.fail(node, f"operator {type(node.op).__name__} is outside the DSL")
        return super().generic_visit(node)

    def visit_Compare(self, node):
        for op in node.ops:
            if type(op) in _REJECTED_CMPOPS:
                self.fail(node, _REJECTED_CMPOPS[type(op)])
        node.left = self.visit(node.left)
        node.comparators = [self.visit(c) for c in node.comparators]
        if len(node.ops) == 1:
            return node
        # a < b < c means (a < b) and (b < c): one meaning, elementwise on arrays
        parts, left = [], node.left
        for op, right in zip(node.ops, node.comparators):
            parts.append(ast.copy_location(ast.Compare(left, [op], [right]), node))
            left = right
        return ast.copy_location(ast.BoolOp(ast.And(), parts), node)

    def visit_Constant(self, node):
        if type(node.value) is bool:
            return node
        if type(node.value) is int:
            if not INT64[0] <= node.value <= INT64[1]:
                self.fail(node, f"constant {node.value} does not fit in int64")
            return node
        self.fail(node, f"constant {node.value!r}: only int and bool constants are allowed")

    def visit_Name(self, node):
        fe = self.fe
        if node.id == fe.noise and fe.noise is not None:
            parent = self.parents[-2] if len(self.parents) > 1 else None
            how = _NOISE_USE.get(type(parent)) if parent is not None else None
            if isinstance(parent, ast.Call):
                fname = parent.func.id if isinstance(parent.func, ast.Name) else "a function"
                how = f"passed to {fname}() (helpers cannot see the noise)"
            if how is None:
                how = {"stored": "stored or aliased", "condition": "used in a condition",
                       "a loop bound": "used in a loop bound"}.get(self.context, f"used as {self.context}")
            self.fail(node, f"noise {fe.noise!r} {how}: noise may only be the first argument "
                      f"of race() or race_groups(), or the argument of live()")
        if node.id == "_" and "_" in fe.locals and isinstance(node.ctx, ast.Load):
            self.fail(node, "`_` is the throwaway loop variable and cannot be read: name the loop "
                      "variable to use it")
        if node.id in fe.params or node.id in fe.locals:
            return node
        if fe.resolves_to_dsl(node.id):
            parent = self.parents[-2] if len(self.parents) > 1 else None
            if not (isinstance(parent, ast.Call) and parent.func is node) and node.id not in ("int", "bool"):
                self.fail(node, f"DSL function {node.id!r} can only be called")
            return node
        if node.id in IO_NAMES:
            self.fail(node, f"{node.id}() is I/O or introspection: a spec has no side effects")
        value = fe.lookup(node.id)
        if value is fe._MISSING:
            self.fail(node, f"name {node.id!r} is not defined")
        if isinstance(value, types.ModuleType):
            if is_random_module(value.__name__):
                self.fail(node, f"module {value.__name__!r}: randomness inside a spec breaks "
                          f"the stochastic invariant; the noise comes only from atoms()")
            self.fail(node, f"module {value.__name__!r} cannot be used inside a spec; use DSL functions")
        if is_plain_constant(value):
            fe.constants[node.id] = value
            if type(value) is tuple and not self.static:
                return node        # an array constant: the program supplies a read-only array
            return constant_node(value, node)
        if isinstance(value, (int, tuple)):
            if type(value) is int:
                why = "does not fit in int64"
            elif type(value) is tuple:
                why = "is ragged or holds something other than ints and bools"
            else:
                base = "int" if isinstance(value, int) else "tuple"
                why = f"is a {type(value).__name__} (a subclass of {base})"
            self.fail(node, f"constant {node.id!r} {why}: a spec reads only plain int/bool "
                      f"constants and rectangular tuples of them (convert it with int(...) or "
                      f"tuple(...) outside the spec, or pass a parameter)")
        if callable(value):
            self.fail(node, f"call to {node.id!r}: helper functions cannot be inlined; "
                      f"only DSL functions can be called inside a spec")
        if type(value).__module__ == "numpy":
            self.fail(node, f"global {node.id!r} is a numpy {type(value).__name__}: pass arrays as "
                      f"data parameters, structdsl.compile(spec, {node.id.lower()}=array)")
        self.fail(node, f"global {node.id!r} is a mutable {type(value).__name__}: a spec may "
                  f"only read constants (ints, bools, tuples of them); pass a static parameter")

    def visit_Attribute(self, node):
        base = node.value
        while isinstance(base, ast.Attribute):
            base = base.value
        if isinstance(base, ast.Name) and base.id == self.fe.noise:
            self.fail(node, f"noise {self.fe.noise!r} used through an attribute: noise may only be "
                      f"the first argument of race() or race_groups()")
        if isinstance(base, ast.Name) and isinstance(self.fe.lookup(base.id), types.ModuleType):
            full = ast.unparse(node)
            if is_random_module(self.fe.lookup(base.id).__name__) or "random" in full:
                self.fail(node, f"{full}: randomness inside a spec breaks the stochastic "
                          f"invariant; the noise comes only from atoms()")
            self.fail(node, f"{full}: module attributes are outside the DSL; use DSL functions")
        self.fail(node, f"attribute access `{ast.unparse(node)}` is outside the DSL; use DSL "
                  f"functions (e.g. any(x), not x.any())")

    def visit_Subscript(self, node):
        if not isinstance(node.value, ast.Name):
            self.fail(node, "only named arrays can be indexed")
        node.value = self.visit(node.value)
        node.slice = self.visit_index(node.slice)
        return node

    def visit_index(self, node):
        elts = node.elts if isinstance(node, ast.Tuple) else [node]
        for e in elts:
            if isinstance(e, ast.Slice):
                if e.lower or e.upper or e.step:
                    self.fail(e, "slices with bounds or steps make shapes depend on state: index "
                              "with masks, `where` or `:` instead")
        if isinstance(node, ast.Tuple):
            node.elts = [e if isinstance(e, ast.Slice) else self.visit(e) for e in node.elts]
            return node
        return node if isinstance(node, ast.Slice) else self.visit(node)

    def visit_Call(self, node):
        if not isinstance(node.func, ast.Name):
            if isinstance(node.func, ast.Attribute):
                return self.visit_Attribute(node.func)
            self.fail(node, "only DSL functions can be called")
        name = node.func.id
        fe = self.fe
        if name in RACES and fe.resolves_to_dsl(name):
            self.fail(node, f"a race must be its own statement: `w = {name}(noise, ...)`")
        if name == "atoms" and fe.resolves_to_dsl(name):
            self.fail(node, "atoms() must be its own top-level statement: `noise = atoms(...)`")
        if name == "range" and fe.resolves_to_dsl(name):
            self.fail(node, "range() is only allowed as a loop's iterable")
        if name == "require" and fe.resolves_to_dsl(name):
            self.fail(node, "require() is a statement of its own, at the top level")
        if name in fe.locals or name in fe.params:
            self.fail(node, f"{name!r} is not a function")
        if not fe.resolves_to_dsl(name):
            self.visit(node.func)          # raises the precise error
        if name == "live":
            if len(node.args) != 1 or node.keywords or not (
                    isinstance(node.args[0], ast.Name) and node.args[0].id == fe.noise):
                self.fail(node, f"write live({fe.noise or 'noise'}): the mask of atoms that can race")
            return node
        allowed = KEYWORDS.get(name, set())
        for kw in node.keywords:
            if kw.arg is None:
                self.fail(node, "`**` arguments are outside the DSL")
            if kw.arg not in allowed:
                self.fail(node, f"{name}() takes no keyword {kw.arg!r}" +
                          (f"; its keywords are {sorted(allowed)}" if allowed else ""))
            if kw.arg == "dtype" and not (isinstance(kw.value, ast.Name) and kw.value.id in ("int", "bool")
                                          and fe.resolves_to_dsl(kw.value.id)):
                self.fail(node, "dtype= must be int or bool")
        shape = node.args[0] if node.args else None
        if name in SHAPED:
            if shape is None:
                self.fail(node, f"{name}() needs a shape")
            node.args[0] = fe.static(shape, f"the shape of {name}()", shape=True)
            node.args[1:] = [self.visit(a) for a in node.args[1:]]
        else:
            node.args = [self.visit(a) for a in node.args]
        for kw in node.keywords:
            if kw.arg != "dtype":
                kw.value = self.visit(kw.value)
        return node
