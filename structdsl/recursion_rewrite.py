"""The rewriting of local functions into plain DSL code (:mod:`structdsl.recursion`):
each function body cut into the segments of a dispatch loop, with its locals moved to stack
slots, and the small AST builders the dispatch loop and its bounds are made of."""
from __future__ import annotations

import ast
import copy

from .recursion_analysis import RACES, call_of, fail


class Segmenter:
    """Cuts the bodies of ``functions`` into segments (``segments[pc]``: a list of
    statements); ``function_locals`` gives each function's stack slots, ``counter`` numbers the
    temporaries (``temps``, scalars the spec initialises to 0)."""

    def __init__(self, functions, function_locals, file, counter):
        self.functions, self.locals, self.file, self.counter = functions, function_locals, file, counter
        self.temps = []                 # scalar temporaries, initialised to 0 at the top
        self.segments = []              # pc -> list of statements
        self.entry = {}                 # function -> the pc of its first segment

    def cut(self):
        """Every function's body as segments; the entry segments come first (pc = order)."""
        for name in self.functions:
            self.entry[name] = self.new_segment()
        for name, f in self.functions.items():
            self.segments[self.entry[name]] = self.block(f, f.body, None, f)

    def temp(self, kind):
        name = f"__{kind}{next(self.counter)}"
        self.temps.append(name)
        return name

    def rename(self, f, node):
        """Function locals -> their stack slots (lambda parameters shadow them)."""
        names = set(self.locals[f.name])
        stack = lambda n, ctx: ast.copy_location(  # noqa: E731
            ast.Subscript(ast.Name(f"__S_{f.name}__{n.id}", ast.Load()), ast.Name("__sp", ast.Load()), ctx), n)

        class Rename(ast.NodeTransformer):
            def __init__(self):
                self.hidden = set()

            def visit_Lambda(self, node):
                saved = self.hidden
                self.hidden = saved | {a.arg for a in node.args.args}
                node.body = self.visit(node.body)
                self.hidden = saved
                return node

            def visit_Name(self, node):
                if node.id in names and node.id not in self.hidden:
                    return stack(node, node.ctx)
                return node
        return Rename().visit(copy.deepcopy(node))

    def new_segment(self):
        self.segments.append(None)
        return len(self.segments) - 1

    def block(self, f, stmts, k, near):
        """Statements of the current segment for ``stmts`` followed by continuation ``k``
        (a pc, or None for the end of the function); ``near`` lends its line to the jump."""
        out = []
        for i, s in enumerate(stmts):
            rest = stmts[i + 1:]
            call = call_of(s, self.functions)
            if call is not None:
                resume = self.new_segment()
                after = []
                if isinstance(s, ast.Assign):
                    after.append(located(ast.Assign([self.rename(f, s.targets[0])], ast.Name("__ret", ast.Load())), s))
                self.segments[resume] = after + self.block(f, rest, k, s)
                out += self.push(f, call, resume, s)
                return out
            if isinstance(s, ast.Return):
                if s.value is not None:
                    out.append(located(ast.Assign([ast.Name("__ret", ast.Store())], self.rename(f, s.value)), s))
                out.append(located(ast.AugAssign(ast.Name("__sp", ast.Store()), ast.Sub(), ast.Constant(1)), s))
                return out
            if isinstance(s, ast.If) and _has_flow(s, self.functions):
                cont = k
                if rest:
                    cont = self.new_segment()
                    self.segments[cont] = self.block(f, rest, k, rest[-1])
                node = ast.If(self.rename(f, s.test), self.block(f, s.body, cont, s),
                              self.block(f, s.orelse, cont, s))
                out.append(located(node, s))
                return out
            out += self.plain(f, s)
        out += self.jump(k, stmts[-1] if stmts else near)
        return out

    def jump(self, k, near):
        node = ast.AugAssign(ast.Name("__sp", ast.Store()), ast.Sub(), ast.Constant(1)) if k is None else \
            ast.Assign([pc_slot(ast.Store())], ast.Constant(k))
        return [located(node, near)]

    def push(self, f, call, resume, stmt):
        g = self.functions[call.func.id]
        out = [ast.Assign([pc_slot(ast.Store())], ast.Constant(resume))]
        temps = [self.temp("a") for _ in call.args]
        for t, a in zip(temps, call.args):
            out.append(ast.Assign([ast.Name(t, ast.Store())], self.rename(f, a)))
        out.append(ast.AugAssign(ast.Name("__sp", ast.Store()), ast.Add(), ast.Constant(1)))
        for p, t in zip(g.args.args, temps):
            out.append(ast.Assign([slot(g.name, p.arg, ast.Store())], ast.Name(t, ast.Load())))
        out.append(ast.Assign([pc_slot(ast.Store())], ast.Constant(self.entry[g.name])))
        return [located(n, stmt) for n in out]

    def plain(self, f, s):
        """A statement without calls or returns, with its locals moved to the stack."""
        if _is_race_assign(s) or (isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Tuple)):
            targets = s.targets[0].elts if isinstance(s.targets[0], ast.Tuple) else [s.targets[0]]
            temps = [self.temp("w") for _ in targets]
            if len(s.targets) != 1:
                fail(self.file, s, "chained assignment of a race or a tuple is outside the DSL")
            lhs = ast.Tuple([ast.Name(t, ast.Store()) for t in temps], ast.Store()) if len(temps) > 1 \
                else ast.Name(temps[0], ast.Store())
            out = [ast.Assign([lhs], self.rename(f, s.value))]
            out += [ast.Assign([self.rename(f, t)], ast.Name(tmp, ast.Load())) for t, tmp in zip(targets, temps)]
            return [located(n, s) for n in out]
        if isinstance(s, ast.For) and isinstance(s.target, ast.Name):
            counter = self.temp("i")
            body = [ast.Assign([self.rename(f, s.target)], ast.Name(counter, ast.Load()))]
            for t in s.body:
                body += self.plain(f, t)
            node = ast.For(ast.Name(counter, ast.Store()), self.rename(f, s.iter), body, [])
            return [located(node, s)]
        if isinstance(s, ast.If):
            body = [x for t in s.body for x in self.plain(f, t)] or [ast.Pass()]
            orelse = [x for t in s.orelse for x in self.plain(f, t)]
            return [located(ast.If(self.rename(f, s.test), body, orelse), s)]
        return [self.rename(f, s)]



def located(node, near):
    """``node`` and every node inside it without a position take ``near``'s line."""
    ast.copy_location(node, near)
    for child in ast.walk(node):
        if "lineno" in child._attributes and not hasattr(child, "lineno"):
            ast.copy_location(child, near)
    return node


def _num(x):
    return ast.Constant(x) if isinstance(x, int) else x


def mul(a, b):
    """``a * b`` with the factor 1 left out (the bounds stay readable in ``prog.types``)."""
    if isinstance(a, int) and a == 1:
        return _num(b)
    if isinstance(b, int) and b == 1:
        return _num(a)
    return ast.BinOp(_num(a), ast.Mult(), _num(b))


def add(a, b):
    return ast.BinOp(_num(a), ast.Add(), _num(b))


def zeros_call(n):
    return ast.Call(ast.Name("zeros", ast.Load()), [copy.deepcopy(n), ast.Name("int", ast.Load())], [])


def slot(fn, var, ctx):
    return ast.Subscript(ast.Name(f"__S_{fn}__{var}", ast.Load()), ast.Name("__sp", ast.Load()), ctx)


def pc_slot(ctx):
    return ast.Subscript(ast.Name("__pc", ast.Load()), ast.Name("__sp", ast.Load()), ctx)


def _is_race_assign(s):
    return isinstance(s, ast.Assign) and isinstance(s.value, ast.Call) and \
        isinstance(s.value.func, ast.Name) and s.value.func.id in RACES


def _has_flow(stmt, functions):
    """Does ``stmt`` contain a local-function call or a ``return``?"""
    for s in ast.walk(stmt):
        if isinstance(s, ast.Return) or (isinstance(s, ast.stmt) and call_of(s, functions) is not None):
            return True
    return False

