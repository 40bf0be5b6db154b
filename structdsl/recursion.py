"""Local functions and recursion, desugared into constructs every backend already lowers.

A spec may define local functions at its top level::

    def split(lo, hi, up):
        if lo < hi:
            r = race(pos, lambda i: lo <= i < hi)
            parent[r] = up
            split(lo, r, r)
            split(r + 1, hi, r)

This module rewrites the spec's AST before verification, so the verifier, the type pass and
every backend see plain DSL code: fixed-shape int arrays, one ``for`` loop with a static
bound, ``if`` and ``break``.

The desugaring
--------------
* Every parameter and local of a local function ``f`` is an int64 scalar kept in a stack
  ``__S_f__x = zeros(DEPTH, int)``; a read or write of ``x`` inside ``f`` is ``__S_f__x[__sp]``,
  where ``__sp`` is the index of the running activation.  ``__pc[d]`` is the resume point of the
  activation at depth ``d``.  ``__ret`` carries a return value.
* Each function body is cut into *segments* at its calls.  A call stores the caller's
  resume segment in ``__pc[__sp]``, pushes a frame with the arguments and the callee's entry
  segment, and ends the segment; ``return`` (or the end of the body) pops.  A call inside an
  ``if`` continues, after the call, in a segment that ends by jumping to the code after the
  ``if``.  Calls may not sit inside loops of a local function, so no segment runs twice in
  one activation.
* Each call from the spec's own body becomes a dispatch loop: push the first frame, then
  ``for __step in range(STEPS): if __sp < 0: break; run the segment __pc[__sp]``.

The bounds (proven, not guessed)
--------------------------------
A race that cannot come back empty retires one atom, so a lane runs at most ``A`` of them
(``A`` = the number of atoms).  A call site inside ``f`` is *guarded* when such a race has run
in the same activation on every path to it.  The verifier requires every cycle of calls to
pass through a guarded call.  Then, with ``c`` the largest number of call sites in one
function and ``L`` the longest chain of unguarded calls (an acyclic graph):

* activations of one dispatch loop ``N <= (1 + c * A) * (1 + c + ... + c**L)``: each guarded
  call is made by an activation that retired an atom, each call site runs once per
  activation;
* ``STEPS = N * S``, ``S`` the largest number of segments of one function;
* ``DEPTH = (1 + A) * (1 + L)``: below the running activation, every run of ``L + 1``
  frames holds a guarded call, hence a retired atom.

Traces record races in execution order (depth first), so replay, log-prob, ``E | T`` and
enumeration work unchanged.  Recursive specs are not ``nested``: depth-first races are
nested along the recursion tree, not along the trace, so they run on the generic path.
"""
from __future__ import annotations

import ast
import copy

from .errors import SpecError

_RACES = ("race", "race_groups")


def desugar(fdef: ast.FunctionDef, file: str) -> ast.FunctionDef:
    """Return ``fdef`` with its local functions desugared (unchanged if it has none)."""
    body = list(fdef.body)
    doc = body[:1] if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        and isinstance(body[0].value.value, str) else []
    functions = {s.name: s for s in body if isinstance(s, ast.FunctionDef)}
    _check_placement(fdef, functions, file)
    if not functions:
        return fdef
    return _Desugarer(fdef, doc, functions, file).run()


def _fail(file, node, message):
    raise SpecError(message, file, getattr(node, "lineno", None))


def _check_placement(fdef, functions, file):
    for stmt in fdef.body:
        for node in ast.walk(stmt):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node is not stmt:
                _fail(file, node, "define local functions at the top level of the spec, not "
                      "inside another function, a loop or an `if`")
            if isinstance(node, ast.Lambda) and any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                                                    and n.func.id in functions for n in ast.walk(node)):
                _fail(file, node, "a predicate cannot call a local function")


def _free_names(node):
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


def _is_race(stmt):
    """A race that cannot come back empty (so it retires an atom)."""
    if not (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id in _RACES):
        return False
    for kw in stmt.value.keywords:
        if kw.arg == "allow_empty" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
            return False
    return True


class _Desugarer:
    def __init__(self, fdef, doc, functions, file):
        self.fdef, self.doc, self.functions, self.file = fdef, doc, functions, file
        self.noise = next((s.targets[0].id for s in fdef.body if isinstance(s, ast.Assign)
                           and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Name)
                           and s.value.func.id == "atoms" and len(s.targets) == 1
                           and isinstance(s.targets[0], ast.Name)), None)
        decl = next((s.value for s in fdef.body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Call)
                     and isinstance(s.value.func, ast.Name) and s.value.func.id == "atoms"), None)
        self.atom_ndim = len(decl.args) if decl is not None else 1
        self.temps = []                 # scalar temporaries, initialised to 0 at the top
        self.segments = []              # pc -> list of statements
        self.entry = {}
        self.count = 0

    def fail(self, node, message):
        _fail(self.file, node, message)

    def temp(self, kind):
        self.count += 1
        name = f"__{kind}{self.count}"
        self.temps.append(name)
        return name

    # ---- checks ------------------------------------------------------------------------------
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
        if returns_value and not _always_returns(f.body):
            self.fail(f, f"local function {f.name!r} returns a value on some paths but may end "
                      f"without `return value` on others")
        self.locals[f.name] = params + sorted(stored - set(params))
        self.returns[f.name] = returns_value
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
            self.count += 1
            name = f"__rw{self.count}"
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
        call = _call_of(s, self.functions)
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
        for n in _free_names(node):
            if n.id == self.noise:
                self.fail(n, f"noise {self.noise!r} {how}: noise may only be the first argument "
                          f"of race() or race_groups(), or the argument of live()")

    # ---- bounds --------------------------------------------------------------------------------
    def call_sites(self, stmts, raced, out):
        """(call, guarded) for every call in ``stmts``; returns whether a race has surely run."""
        for s in stmts:
            call = _call_of(s, self.functions)
            if call is not None:
                out.append((call, raced))
            elif isinstance(s, ast.If):
                a = self.call_sites(s.body, raced, out)
                b = self.call_sites(s.orelse, raced, out)
                raced = raced or (a and b)
            elif isinstance(s, ast.For):
                self.call_sites(s.body, raced, out)
            if _is_race(s):
                raced = True
        return raced

    def bounds(self):
        sites = {name: [] for name in self.functions}
        for name, f in self.functions.items():
            self.call_sites(f.body, False, sites[name])
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
                    self.fail(call, f"{name}() can reach itself through this call without a race "
                              f"before it, so the number of calls cannot be bounded: race first in "
                              f"{name}() (each race retires an atom), then call {callee}()")
                best = max(best, 1 + d)
            state[name] = "done"
            depth[name] = best
            return best
        L = max(longest(name) for name in self.functions)
        return c, L

    # ---- rewriting -------------------------------------------------------------------------------
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
            call = _call_of(s, self.functions)
            if call is not None:
                resume = self.new_segment()
                after = []
                if isinstance(s, ast.Assign):
                    after.append(self.located(ast.Assign([self.rename(f, s.targets[0])], ast.Name("__ret", ast.Load())), s))
                self.segments[resume] = after + self.block(f, rest, k, s)
                out += self.push(f, call, resume, s)
                return out
            if isinstance(s, ast.Return):
                if s.value is not None:
                    out.append(self.located(ast.Assign([ast.Name("__ret", ast.Store())], self.rename(f, s.value)), s))
                out.append(self.located(ast.AugAssign(ast.Name("__sp", ast.Store()), ast.Sub(), ast.Constant(1)), s))
                return out
            if isinstance(s, ast.If) and _has_flow(s, self.functions):
                cont = k
                if rest:
                    cont = self.new_segment()
                    self.segments[cont] = self.block(f, rest, k, rest[-1])
                node = ast.If(self.rename(f, s.test), self.block(f, s.body, cont, s),
                              self.block(f, s.orelse, cont, s))
                out.append(self.located(node, s))
                return out
            out += self.plain(f, s)
        out += self.jump(k, stmts[-1] if stmts else near)
        return out

    def jump(self, k, near):
        node = ast.AugAssign(ast.Name("__sp", ast.Store()), ast.Sub(), ast.Constant(1)) if k is None else \
            ast.Assign([_pc_slot(ast.Store())], ast.Constant(k))
        return [self.located(node, near)]

    def push(self, f, call, resume, stmt):
        g = self.functions[call.func.id]
        out = [ast.Assign([_pc_slot(ast.Store())], ast.Constant(resume))]
        temps = [self.temp("a") for _ in call.args]
        for t, a in zip(temps, call.args):
            out.append(ast.Assign([ast.Name(t, ast.Store())], self.rename(f, a)))
        out.append(ast.AugAssign(ast.Name("__sp", ast.Store()), ast.Add(), ast.Constant(1)))
        for p, t in zip(g.args.args, temps):
            out.append(ast.Assign([_slot(g.name, p.arg, ast.Store())], ast.Name(t, ast.Load())))
        out.append(ast.Assign([_pc_slot(ast.Store())], ast.Constant(self.entry[g.name])))
        return [self.located(n, stmt) for n in out]

    def plain(self, f, s):
        """A statement without calls or returns, with its locals moved to the stack."""
        if _is_race_assign(s) or (isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Tuple)):
            targets = s.targets[0].elts if isinstance(s.targets[0], ast.Tuple) else [s.targets[0]]
            temps = [self.temp("w") for _ in targets]
            if len(s.targets) != 1:
                self.fail(s, "chained assignment of a race or a tuple is outside the DSL")
            lhs = ast.Tuple([ast.Name(t, ast.Store()) for t in temps], ast.Store()) if len(temps) > 1 \
                else ast.Name(temps[0], ast.Store())
            out = [ast.Assign([lhs], self.rename(f, s.value))]
            out += [ast.Assign([self.rename(f, t)], ast.Name(tmp, ast.Load())) for t, tmp in zip(targets, temps)]
            return [self.located(n, s) for n in out]
        if isinstance(s, ast.For) and isinstance(s.target, ast.Name):
            counter = self.temp("i")
            body = [ast.Assign([self.rename(f, s.target)], ast.Name(counter, ast.Load()))]
            for t in s.body:
                body += self.plain(f, t)
            node = ast.For(ast.Name(counter, ast.Store()), self.rename(f, s.iter), body, [])
            return [self.located(node, s)]
        if isinstance(s, ast.If):
            body = [x for t in s.body for x in self.plain(f, t)] or [ast.Pass()]
            orelse = [x for t in s.orelse for x in self.plain(f, t)]
            return [self.located(ast.If(self.rename(f, s.test), body, orelse), s)]
        return [self.rename(f, s)]

    @staticmethod
    def located(node, near):
        ast.copy_location(node, near)
        for child in ast.walk(node):
            if "lineno" in child._attributes and not hasattr(child, "lineno"):
                ast.copy_location(child, near)
        return node

    # ---- the whole spec -----------------------------------------------------------------------
    def run(self):
        self.locals, self.returns = {}, {}
        for f in self.functions.values():
            self.check_function(f)
        c, L = self.bounds()
        for name in self.functions:                      # entry segments first: pc = order
            self.entry[name] = self.new_segment()
        for name, f in self.functions.items():
            self.segments[self.entry[name]] = self.block(f, f.body, None, f)
        atoms_at = next((i for i, s in enumerate(self.fdef.body) if isinstance(s, ast.Assign)
                         and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Name)
                         and s.value.func.id == "atoms"), None)
        if atoms_at is None:
            return self.fdef                             # the verifier reports the missing atoms()
        decl = self.fdef.body[atoms_at]
        atoms = None
        for d in decl.value.args:
            atoms = copy.deepcopy(d) if atoms is None else _mul(atoms, copy.deepcopy(d))
        fan = sum(c ** d for d in range(L + 1))
        segments = max(1, len(self.segments))
        steps = _mul(_mul(_add(1, _mul(c, atoms)), fan), segments)
        depth = _mul(_add(1, copy.deepcopy(atoms)), 1 + L)
        self.steps, self.depth = steps, depth
        body = []
        for s in self.fdef.body[len(self.doc):]:
            if isinstance(s, ast.FunctionDef):
                continue
            body += self.top(s)
        setup = [ast.Assign([ast.Name("__pc", ast.Store())], _zeros(depth)),
                 ast.Assign([ast.Name("__sp", ast.Store())], ast.Constant(-1)),
                 ast.Assign([ast.Name("__ret", ast.Store())], ast.Constant(0))]
        setup += [ast.Assign([ast.Name(f"__S_{name}__{x}", ast.Store())], _zeros(depth))
                  for name in self.functions for x in self.locals[name]]
        setup += [ast.Assign([ast.Name(t, ast.Store())], ast.Constant(0)) for t in self.temps]
        setup = [self.located(n, decl) for n in setup]
        at = next(i for i, s in enumerate(body) if s is decl) + 1
        new = copy.copy(self.fdef)
        new.body = self.doc + body[:at] + setup + body[at:]
        return new

    def top(self, s):
        """A statement of the spec's own body: calls become dispatch loops."""
        call = _call_of(s, self.functions)
        if call is not None:
            self.check_call(call, s)
            return self.dispatch(call, s)
        if isinstance(s, ast.If):
            self.check_calls_elsewhere(s.test)
            node = copy.copy(s)
            node.body = [x for t in s.body for x in self.top(t)] or [ast.Pass()]
            node.orelse = [x for t in s.orelse for x in self.top(t)]
            return [node]
        if isinstance(s, ast.For):
            self.check_calls_elsewhere(s.iter)
            node = copy.copy(s)
            node.body = [x for t in s.body for x in self.top(t)] or [ast.Pass()]
            return [node]
        self.check_calls_elsewhere(s)
        return [s]

    def dispatch(self, call, stmt):
        g = self.functions[call.func.id]
        out = [ast.Assign([ast.Name("__sp", ast.Store())], ast.Constant(0))]
        for p, a in zip(g.args.args, call.args):
            out.append(ast.Assign([_slot(g.name, p.arg, ast.Store())], a))
        out.append(ast.Assign([_pc_slot(ast.Store())], ast.Constant(self.entry[g.name])))
        chain = None
        for pc in reversed(range(len(self.segments))):
            test = ast.Compare(ast.Name("__k", ast.Load()), [ast.Eq()], [ast.Constant(pc)])
            chain = ast.If(test, copy.deepcopy(self.segments[pc]) or [ast.Pass()], [chain] if chain else [])
        loop_body = [ast.If(ast.Compare(ast.Name("__sp", ast.Load()), [ast.Lt()], [ast.Constant(0)]),
                            [ast.Break()], []),
                     ast.Assign([ast.Name("__k", ast.Store())], _pc_slot(ast.Load())), chain]
        out.append(ast.For(ast.Name("__step", ast.Store()),
                           ast.Call(ast.Name("range", ast.Load()), [copy.deepcopy(self.steps)], []),
                           loop_body, []))
        # the bound is proven, but a proof bug must be loud: frames left on the stack
        # after the last step would otherwise return a truncated result
        out.append(ast.Expr(ast.Call(ast.Name("__fail", ast.Load()), [
            ast.Compare(ast.Name("__sp", ast.Load()), [ast.GtE()], [ast.Constant(0)]),
            ast.Constant("RaceError"),
            ast.Constant(f"the calls of {g.name}() did not finish within the proven bound of "
                         f"{ast.unparse(self.steps)} steps (a compiler bug: please report it "
                         f"with this spec)")], [])))
        if isinstance(stmt, ast.Assign):
            out.append(ast.Assign(stmt.targets, ast.Name("__ret", ast.Load())))
        return [self.located(n, stmt) for n in out]


def _num(x):
    return ast.Constant(x) if isinstance(x, int) else x


def _mul(a, b):
    """``a * b`` with the factor 1 left out (the bounds stay readable in ``prog.types``)."""
    if isinstance(a, int) and a == 1:
        return _num(b)
    if isinstance(b, int) and b == 1:
        return _num(a)
    return ast.BinOp(_num(a), ast.Mult(), _num(b))


def _add(a, b):
    return ast.BinOp(_num(a), ast.Add(), _num(b))


def _zeros(n):
    return ast.Call(ast.Name("zeros", ast.Load()), [copy.deepcopy(n), ast.Name("int", ast.Load())], [])


def _slot(fn, var, ctx):
    return ast.Subscript(ast.Name(f"__S_{fn}__{var}", ast.Load()), ast.Name("__sp", ast.Load()), ctx)


def _pc_slot(ctx):
    return ast.Subscript(ast.Name("__pc", ast.Load()), ast.Name("__sp", ast.Load()), ctx)


def _call_of(stmt, functions):
    """The local-function call of a statement ``f(...)`` or ``x = f(...)``, else None."""
    value = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in functions:
        return value
    return None


def _is_race_assign(s):
    return isinstance(s, ast.Assign) and isinstance(s.value, ast.Call) and \
        isinstance(s.value.func, ast.Name) and s.value.func.id in _RACES


def _has_flow(stmt, functions):
    """Does ``stmt`` contain a local-function call or a ``return``?"""
    for s in ast.walk(stmt):
        if isinstance(s, ast.Return) or (isinstance(s, ast.stmt) and _call_of(s, functions) is not None):
            return True
    return False


def _always_returns(stmts):
    if not stmts:
        return False
    last = stmts[-1]
    if isinstance(last, ast.Return):
        return True
    if isinstance(last, ast.If):
        return _always_returns(last.body) and _always_returns(last.orelse)
    return False
