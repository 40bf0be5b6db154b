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

The checks and the bounds proof are in :mod:`structdsl.recursion_analysis`, the cutting of
function bodies into segments in :mod:`structdsl.recursion_rewrite`; this module drives
both and builds the dispatch loops.
"""
from __future__ import annotations

import ast
import copy
import itertools

from .recursion_analysis import LocalFunctionChecker, call_of, check_placement, prove_bounds
from .recursion_rewrite import Segmenter, add, located, mul, pc_slot, slot, zeros_call


def desugar(fdef: ast.FunctionDef, file: str) -> ast.FunctionDef:
    """Return ``fdef`` with its local functions desugared (unchanged if it has none)."""
    body = list(fdef.body)
    doc = body[:1] if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        and isinstance(body[0].value.value, str) else []
    functions = {s.name: s for s in body if isinstance(s, ast.FunctionDef)}
    check_placement(fdef, functions, file)
    if not functions:
        return fdef
    return _Desugarer(fdef, doc, functions, file).run()


class _Desugarer:
    """The desugaring of ``functions``, the local functions of ``fdef``: check them (the
    analysis), prove the bounds, cut their bodies into segments (the rewriting), then turn
    each call from the spec's own body into a dispatch loop over those segments."""

    def __init__(self, fdef, doc, functions, file):
        self.fdef, self.doc, self.functions, self.file = fdef, doc, functions, file
        counter = itertools.count(1)            # one numbering for every generated name
        self.checker = LocalFunctionChecker(fdef, functions, file, counter)
        # the segmenter reads each function's stack slots as the checker records them
        self.segmenter = Segmenter(functions, self.checker.locals, file, counter)

    def bounds(self):
        """``(c, L)`` of the bounds proof (a method, so that a test can stand in a wrong one)."""
        return prove_bounds(self.functions, self.file)

    # ---- the whole spec -----------------------------------------------------------------------
    def run(self):
        for f in self.functions.values():
            self.checker.check_function(f)
        c, L = self.bounds()
        self.segmenter.cut()
        atoms_at = next((i for i, s in enumerate(self.fdef.body) if isinstance(s, ast.Assign)
                         and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Name)
                         and s.value.func.id == "atoms"), None)
        if atoms_at is None:
            return self.fdef                             # the verifier reports the missing atoms()
        decl = self.fdef.body[atoms_at]
        atoms = None
        for d in decl.value.args:
            atoms = copy.deepcopy(d) if atoms is None else mul(atoms, copy.deepcopy(d))
        fan = sum(c ** d for d in range(L + 1))
        segments = max(1, len(self.segmenter.segments))
        self.steps = mul(mul(add(1, mul(c, atoms)), fan), segments)
        depth = mul(add(1, copy.deepcopy(atoms)), 1 + L)
        body = []
        for s in self.fdef.body[len(self.doc):]:
            if isinstance(s, ast.FunctionDef):
                continue
            body += self.top(s)
        setup = [ast.Assign([ast.Name("__pc", ast.Store())], zeros_call(depth)),
                 ast.Assign([ast.Name("__sp", ast.Store())], ast.Constant(-1)),
                 ast.Assign([ast.Name("__ret", ast.Store())], ast.Constant(0))]
        setup += [ast.Assign([ast.Name(f"__S_{name}__{x}", ast.Store())], zeros_call(depth))
                  for name in self.functions for x in self.checker.locals[name]]
        setup += [ast.Assign([ast.Name(t, ast.Store())], ast.Constant(0)) for t in self.segmenter.temps]
        setup = [located(n, decl) for n in setup]
        at = next(i for i, s in enumerate(body) if s is decl) + 1
        new = copy.copy(self.fdef)
        new.body = self.doc + body[:at] + setup + body[at:]
        return new

    def top(self, s):
        """A statement of the spec's own body: calls become dispatch loops."""
        call = call_of(s, self.functions)
        if call is not None:
            self.checker.check_call(call, s)
            return self.dispatch(call, s)
        if isinstance(s, ast.If):
            self.checker.check_calls_elsewhere(s.test)
            node = copy.copy(s)
            node.body = [x for t in s.body for x in self.top(t)] or [ast.Pass()]
            node.orelse = [x for t in s.orelse for x in self.top(t)]
            return [node]
        if isinstance(s, ast.For):
            self.checker.check_calls_elsewhere(s.iter)
            node = copy.copy(s)
            node.body = [x for t in s.body for x in self.top(t)] or [ast.Pass()]
            return [node]
        self.checker.check_calls_elsewhere(s)
        return [s]

    def dispatch(self, call, stmt):
        g = self.functions[call.func.id]
        out = [ast.Assign([ast.Name("__sp", ast.Store())], ast.Constant(0))]
        for p, a in zip(g.args.args, call.args):
            out.append(ast.Assign([slot(g.name, p.arg, ast.Store())], a))
        out.append(ast.Assign([pc_slot(ast.Store())], ast.Constant(self.segmenter.entry[g.name])))
        chain = None
        for pc in reversed(range(len(self.segmenter.segments))):
            test = ast.Compare(ast.Name("__k", ast.Load()), [ast.Eq()], [ast.Constant(pc)])
            chain = ast.If(test, copy.deepcopy(self.segmenter.segments[pc]) or [ast.Pass()], [chain] if chain else [])
        loop_body = [ast.If(ast.Compare(ast.Name("__sp", ast.Load()), [ast.Lt()], [ast.Constant(0)]),
                            [ast.Break()], []),
                     ast.Assign([ast.Name("__k", ast.Store())], pc_slot(ast.Load())), chain]
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
        return [located(n, stmt) for n in out]
