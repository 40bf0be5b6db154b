"""The analysis of a spec's local functions before :mod:`structdsl.recursion` rewrites
them: where they may be defined and called, what they may read and bind (never the noise),
and the proof that the number of calls is bounded (the ``c`` and ``L`` of that module's
docstring)."""
from __future__ import annotations

import ast

from .errors import SpecError

RACES = ("race", "race_groups")


def fail(file, node, message):
    raise SpecError(message, file, getattr(node, "lineno", None))


def check_placement(fdef, functions, file):
    """Local functions sit at the top level of the spec, and no predicate calls one."""
    for stmt in fdef.body:
        for node in ast.walk(stmt):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node is not stmt:
                fail(file, node, "define local functions at the top level of the spec, not "
                     "inside another function, a loop or an `if`")
            if isinstance(node, ast.Lambda) and any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                                                    and n.func.id in functions for n in ast.walk(node)):
                fail(file, node, "a predicate cannot call a local function")


def free_names(node):
    """The Names of ``node`` that are not parameters of an enclosing lambda inside it."""
    def walk(n, hidden):
        if isinstance(n, ast.Lambda):
            hidden = hidden | {a.arg for a in n.args.args}
            yield from walk(n.body, hidden)
            return
        if isinstance(n, ast.Name) and n.id not in hidden:
            yield n
        for child in ast.iter_child_nodes(n):
            yield from walk(child, hidden)
    return list(walk(node, frozenset()))


def is_race(stmt):
    """A race that cannot come back empty (so it retires an atom)."""
    if not (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id in RACES):
        return False
    for kw in stmt.value.keywords:
        if kw.arg == "allow_empty" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
            return False
    return True


def call_of(stmt, functions):
    """The local-function call of a statement ``f(...)`` or ``x = f(...)``, else None."""
    value = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in functions:
        return value
    return None


def always_returns(stmts):
    """Does every path through ``stmts`` end in ``return``?"""
    if not stmts:
        return False
    last = stmts[-1]
    if isinstance(last, ast.Return):
        return True
    if isinstance(last, ast.If):
        return always_returns(last.body) and always_returns(last.orelse)
    return False


class LocalFunctionChecker:
    """The rules every local function of ``fdef`` must follow, checked one function at a
    time; ``locals`` collects each function's parameters and locals (its stack slots).
    ``counter`` numbers the names generated here and by the rewriting."""

    def __init__(self, fdef, functions, file, counter):
        self.functions, self.file, self.counter = functions, file, counter
        self.noise = next((s.targets[0].id for s in fdef.body if isinstance(s, ast.Assign)
                           and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Name)
                           and s.value.func.id == "atoms" and len(s.targets) == 1
                           and isinstance(s.targets[0], ast.Name)), None)
        decl = next((s.value for s in fdef.body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Call)
                     and isinstance(s.value.func, ast.Name) and s.value.func.id == "atoms"), None)
        self.atom_ndim = len(decl.args) if decl is not None else 1
        self.locals = {}            # function -> its parameters, then its other locals

    def fail(self, node, message):
        fail(self.file, node, message)

    def check_function(self, f):
        a = f.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults or f.decorator_list:
            self.fail(f, f"local function {f.name!r} takes plain parameters only (no defaults, "
                      f"*args or decorators)")
        params = [x.arg for x in a.args]
        for n in (n for s in f.body for n in ast.walk(s)):
            if isinstance(n, (ast.Nonlocal, ast.Global)):
                word = "nonlocal" if isinstance(n, ast.Nonlocal) else "global"
                self.fail(n, f"`{word}` is outside the DSL: a local function's names are its own "
                          f"int scalars. Share state through an array of the spec (`t = zeros(1, "
                          f"int)` before the function, `t[0] = ...` inside it), or return the value")
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "race_groups":
                self.fail(n, f"race_groups() inside the local function {f.name}(): its winners are "
                          f"an array, and a local function's values are int scalars; call "
                          f"race_groups() in the spec's body, or race() per group here")
        f.body = self.return_races(f, f.body)
        stored = {n.id for s in f.body for n in ast.walk(s) if isinstance(n, ast.Name)
                  and isinstance(n.ctx, ast.Store)}
        if self.noise in stored or self.noise in params:
            self.fail(f, f"local function {f.name!r} cannot rebind the noise {self.noise!r}")
        for s in f.body:
            self.check_statement(f, s, in_loop=False)
        returns_value = any(isinstance(n, ast.Return) and n.value is not None
                            for s in f.body for n in ast.walk(s))
        if returns_value:
            bare = next((n for s in f.body for n in ast.walk(s)
                         if isinstance(n, ast.Return) and n.value is None), None)
            if bare is not None:
                self.fail(bare, f"a bare `return` in {f.name}(), which returns a value on another "
                          f"path: return a value on every path (e.g. `return 0`)")
        if returns_value and not always_returns(f.body):
            self.fail(f, f"local function {f.name!r} returns a value on some paths but may end "
                      f"without `return value` on others")
        self.locals[f.name] = params + sorted(stored - set(params))
        self.check_defined(f, set(self.locals[f.name]), set(params), f.body)

    def return_races(self, f, stmts):
        """``return race(noise, ...)`` returns a winner, not noise: it becomes
        ``__rw = race(...)`` then ``return __rw`` (a one-dimensional race returns one int)."""
        out = []
        for s in stmts:
            if isinstance(s, ast.If):
                s.body, s.orelse = self.return_races(f, s.body), self.return_races(f, s.orelse)
            elif isinstance(s, ast.For):
                s.body = self.return_races(f, s.body)
            if not (isinstance(s, ast.Return) and isinstance(s.value, ast.Call)
                    and isinstance(s.value.func, ast.Name) and s.value.func.id == "race"):
                out.append(s)
                continue
            if self.atom_ndim != 1:
                self.fail(s, f"{f.name}() returns race(...) over {self.atom_ndim}-dimensional atoms, "
                          f"whose winner is a tuple of indices; a local function returns one int: "
                          f"write `u, v = race(...)` and return one of them")
            name = f"__rw{next(self.counter)}"
            out.append(ast.copy_location(ast.Assign([ast.Name(name, ast.Store())], s.value), s))
            out.append(ast.copy_location(ast.Return(ast.Name(name, ast.Load())), s))
        return out

    def check_defined(self, f, names, defined, stmts):
        """A local of a local function read where it may be unbound is refused (its stack
        slot would hold a stale value from another activation)."""
        def reads(node, defined):
            hidden = set()
            for n in ast.walk(node):
                if isinstance(n, ast.Lambda):
                    hidden |= {a.arg for a in n.args.args}
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in names \
                        and n.id not in defined and n.id not in hidden:
                    self.fail(n, f"local {n.id!r} of {f.name}() may be unbound here: it is not "
                              f"assigned on every path before this line")

        def block(stmts, defined):
            for s in stmts:
                if isinstance(s, ast.If):
                    reads(s.test, defined)
                    a, b = block(s.body, set(defined)), block(s.orelse, set(defined))
                    defined |= a & b
                elif isinstance(s, ast.For):
                    reads(s.iter, defined)
                    block(s.body, defined | {s.target.id} if isinstance(s.target, ast.Name) else set(defined))
                elif isinstance(s, ast.Assign):
                    reads(s.value, defined)
                    for t in s.targets:
                        if isinstance(t, ast.Subscript):
                            reads(t, defined)
                    defined |= {n.id for t in s.targets for n in ast.walk(t)
                                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
                elif isinstance(s, ast.AugAssign):
                    reads(s.value, defined)
                    target = s.target
                    reads(ast.copy_location(ast.Name(target.id, ast.Load()), target)
                          if isinstance(target, ast.Name) else target, defined)
                else:
                    reads(s, defined)
            return defined
        block(stmts, set(defined))

    def check_statement(self, f, s, in_loop):
        if isinstance(s, ast.Return):
            if in_loop:
                self.fail(s, "`return` inside a loop of a local function is outside the DSL: "
                          "end the loop with `break` and return after it")
            if s.value is not None:
                self.check_noise(s.value, "returned from a local function")
        call = call_of(s, self.functions)
        if call is not None:
            if in_loop:
                self.fail(s, f"a call to {call.func.id}() inside a loop of a local function is "
                          f"outside the DSL (the number of calls could not be bounded): recurse "
                          f"instead of looping")
            self.check_call(call, s)
        elif isinstance(s, (ast.If, ast.For)):
            self.check_calls_elsewhere(s.test if isinstance(s, ast.If) else s.iter)
            for t in s.body + s.orelse:
                self.check_statement(f, t, in_loop or isinstance(s, ast.For))
        else:
            self.check_calls_elsewhere(s)

    def check_calls_elsewhere(self, node):
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id in self.functions:
                self.fail(n, f"a call to the local function {n.id}() must be a statement of its "
                          f"own: `{n.id}(...)` or `x = {n.id}(...)`")

    def check_call(self, call, stmt):
        f = self.functions[call.func.id]
        if call.keywords or any(isinstance(a, ast.Starred) for a in call.args):
            self.fail(call, f"call {call.func.id}() with positional arguments only")
        if len(call.args) != len(f.args.args):
            self.fail(call, f"{call.func.id}() takes {len(f.args.args)} argument(s), got {len(call.args)}")
        for a in call.args:
            self.check_noise(a, f"passed to the local function {call.func.id}()")
            self.check_calls_elsewhere(a)
        if isinstance(stmt, ast.Assign) and not (len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            self.fail(stmt, f"assign the result of {call.func.id}() to one name")
        if isinstance(stmt, ast.Assign) and not self.returns_any(call.func.id):
            self.fail(stmt, f"{call.func.id}() returns no value")

    def returns_any(self, name):
        return any(isinstance(n, ast.Return) and n.value is not None
                   for s in self.functions[name].body for n in ast.walk(s))

    def check_noise(self, node, how):
        for n in free_names(node):
            if n.id == self.noise:
                self.fail(n, f"noise {self.noise!r} {how}: noise may only be the first argument "
                          f"of race() or race_groups(), or the argument of live()")


def prove_bounds(functions, file):
    """``(c, L)``: the most call sites of one function and the longest chain of calls
    without a race before them, which must not form a cycle (refused at the call)."""
    sites = {name: [] for name in functions}
    for name, f in functions.items():
        _call_sites(f.body, False, sites[name], functions)
    c = max(1, max(len(v) for v in sites.values()))
    # the unguarded call graph must be acyclic; L = its longest path
    edges = {name: [(call.func.id, call) for call, guarded in v if not guarded]
             for name, v in sites.items()}
    depth, state = {}, {}

    def longest(name):
        if state.get(name) == "open":
            return None
        if name in depth:
            return depth[name]
        state[name] = "open"
        best = 0
        for callee, call in edges[name]:
            d = longest(callee)
            if d is None:
                fail(file, call, f"{name}() can reach itself through this call without a race "
                     f"before it, so the number of calls cannot be bounded: race first in "
                     f"{name}() (each race retires an atom), then call {callee}()")
            best = max(best, 1 + d)
        state[name] = "done"
        depth[name] = best
        return best
    L = max(longest(name) for name in functions)
    return c, L


def _call_sites(stmts, raced, out, functions):
    """(call, guarded) for every call in ``stmts``; returns whether a race has surely run."""
    for s in stmts:
        call = call_of(s, functions)
        if call is not None:
            out.append((call, raced))
        elif isinstance(s, ast.If):
            a = _call_sites(s.body, raced, out, functions)
            b = _call_sites(s.orelse, raced, out, functions)
            raced = raced or (a and b)
        elif isinstance(s, ast.For):
            _call_sites(s.body, raced, out, functions)
        if is_race(s):
            raced = True
    return raced
