"""Frontend and verifier: a spec's Python AST -> checked :class:`structdsl.ir.Program`.

The verifier is what makes the stochastic invariant hold by construction.  The noise
declared by ``atoms()`` may appear *only* as the first argument of ``race``/``race_groups``
(or of ``live``); every other name is a parameter, a local, a DSL function or an inlined
constant.  So all state, every member set and the returned structure are functions of the
parameters, the logits' support and the winners, never of noise values (docs/design.md,
sections 1-3).  Anything else is rejected with the user's file and line: noise compared,
combined, indexed, stored, passed on or used as a bound; randomness; I/O; globals that are
not plain constants; undocumented keywords; reserved ``__`` names; loops without a static
bound; recursion without a provable bound; constructs outside the subset documented in
:mod:`structdsl.ir`.  Local functions are first desugared (:mod:`structdsl.recursion`); the
types are checked afterwards (:mod:`structdsl.typecheck`).
"""
from __future__ import annotations

import ast
import builtins
import collections
import inspect
import re
import types

from . import ir
from .dsl import PRIMITIVES, PY_BUILTINS
from .errors import SpecError
from .recursion import desugar

_RACES = ("race", "race_groups")
_SHAPED = ("arange", "zeros", "ones", "full")          # their shape argument must be static
_IO = {"print", "open", "input", "exec", "eval", "compile", "__import__", "breakpoint",
       "globals", "locals", "vars", "getattr", "setattr", "delattr", "id", "hash"}
_RANDOM_SOURCES = ("random", "secrets", "torch")   # modules whose use inside a spec is randomness
_OK_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.BitAnd, ast.BitOr,
              ast.BitXor, ast.LShift, ast.RShift)
_STATIC_FUNCS = {"min", "max", "abs"}
_DSL_NAMES = frozenset(PRIMITIVES) | frozenset(PY_BUILTINS) | {"spec"}
# The keywords each DSL function accepts; any other keyword is refused (NumPy's ufunc keywords
# such as ``out=`` or ``where=`` would otherwise reach the arrays).
_KEYWORDS = {"zeros": {"dtype"}, "ones": {"dtype"}, "full": {"dtype"}, "atoms": {"valid"},
             "race": {"allow_empty"}, "race_groups": {"groups", "allow_empty"}}
_INT64 = (-2**63, 2**63 - 1)
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


def parse_spec(spec) -> ir.Program:
    """Parse and verify ``spec`` (a :class:`structdsl.dsl.Spec`); raise SpecError if rejected."""
    fn = inspect.unwrap(spec.fn)          # a functools.wraps decorator keeps the user's def
    file = inspect.getsourcefile(fn) or fn.__code__.co_filename
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError) as exc:
        raise SpecError(f"cannot read the source of spec {spec.name!r} ({exc}); specs must "
                        f"be defined in a file or notebook cell", file, fn.__code__.co_firstlineno)
    tree = ast.parse(_dedent(lines))
    ast.increment_lineno(tree, first - 1)
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise SpecError("@spec must decorate a plain `def`", file, first)
    frontend = _Frontend(spec, fn, fdef, file)
    frontend.check_reserved(fdef)                 # the user's names, before the compiler adds its own
    frontend.fdef = desugar(fdef, file)           # local functions -> stacks and a dispatch loop
    try:
        return frontend.program()
    except SpecError as exc:
        reason = _user_names(exc.reason)
        if reason == exc.reason:
            raise
        raise SpecError(reason, exc.file, exc.line) from None


_GENERATED = [(re.compile(r"__S_[A-Za-z0-9_]+?__([A-Za-z_][A-Za-z0-9_]*)\[__sp\]"), r"\1"),
              (re.compile(r"__S_[A-Za-z0-9_]+?__([A-Za-z_][A-Za-z0-9_]*)"), r"\1"),
              (re.compile(r"__r?w\d+"), "the winner"),
              (re.compile(r"__a\d+"), "the argument"),
              (re.compile(r"__ret\b"), "the return value")]


def _user_names(message):
    """A message about desugared code (local functions, section 3.10 of docs/design.md)
    in the user's own names: ``__S_f__x[__sp]`` is ``x``, ``__w1`` a race's winner."""
    for pattern, repl in _GENERATED:
        message = pattern.sub(repl, message)
    return message


def _dedent(lines):
    """Remove the ``def`` line's indentation from every line that has it.  Unlike
    ``textwrap.dedent`` this survives a docstring whose continuation lines sit at column 0
    (they are inside a string, so their indentation does not matter to the parser)."""
    first = lines[0]
    prefix = first[:len(first) - len(first.lstrip())]
    return "".join(line[len(prefix):] if line.startswith(prefix) else line for line in lines)


def _outer_names(fn):
    """Every name a spec body or its lambdas could read from outside: builtins, the module's
    globals and the enclosing function's cells (``inspect.getclosurevars`` misses names read
    only inside a lambda)."""
    names = dict(vars(builtins))
    names.update(fn.__globals__)
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            names[name] = cell.cell_contents
        except ValueError:        # an empty cell: the name is assigned after the spec
            pass
    return names


class _Frontend:
    def __init__(self, spec, fn, fdef, file):
        self.spec, self.fdef, self.file = spec, fdef, file
        self.fn = fn
        self.outer = _outer_names(fn)
        self.constants = {}
        self.noise = None
        self.atoms = None
        self.races = {}
        self.loop_vars = []            # variables of the enclosing loops, innermost last
        self.static_names = {}         # parameter -> first line using it as a size or bound

    # ---- errors -------------------------------------------------------------------------
    def fail(self, node_or_line, message):
        line = node_or_line if isinstance(node_or_line, int) else getattr(node_or_line, "lineno", None)
        raise SpecError(message, self.file, line)

    # ---- top level ----------------------------------------------------------------------
    def program(self):
        f = self.fdef
        a = f.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs:
            self.fail(f, "a spec takes plain parameters only (sizes and static parameters)")
        self.params = tuple(arg.arg for arg in a.args)
        defaults = dict(zip(self.params[len(self.params) - len(a.defaults):],
                            self.fn.__defaults__ or ()))
        for name, value in defaults.items():
            if type(value) not in (int, bool):
                self.fail(f, f"default of parameter {name!r} must be an int or bool, got {value!r}")
        body = list(f.body)
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        if not body or not isinstance(body[-1], ast.Return):
            self.fail(body[-1] if body else f, "a spec must end with `return field, ...` naming "
                      "the structure's fields")
        self.scan_names(body)
        stmts = self.block(body[:-1], top=True)
        if self.atoms is None:
            self.fail(f, "a spec must declare its noise first: `noise = atoms(n, ...)`")
        outputs = self.returns(body[-1])
        sizes = tuple(d.id for d in self.atoms.dims if isinstance(d, ast.Name) and d.id in self.params)
        return ir.Program(name=self.spec.name, file=self.file, doc=self.fn.__doc__,
                          params=self.params, defaults=defaults, sizes=tuple(dict.fromkeys(sizes)),
                          atoms=self.atoms, body=stmts, outputs=outputs, nested=self.spec.nested,
                          constants=self.constants, races=self.races, derived=self.derived,
                          requires=self.requires, static_names=self.static_names,
                          end_line=max(getattr(n, "lineno", 0) for n in ast.walk(f)))

    def check_reserved(self, fdef):
        """Names starting with ``__`` belong to the compiler (its race handler and helpers),
        and the DSL's own names (``race``, ``atoms``, ``range``, ``any`` ...) keep their
        meaning: a local function, variable or parameter may not shadow them, since every
        pass (the recursion pass's guards and bounds first) reads them as the primitives."""
        for n in ast.walk(fdef):
            names = []
            if isinstance(n, ast.Name):
                names = [(n.id, n, isinstance(n.ctx, ast.Store))]
            elif isinstance(n, ast.arg):
                names = [(n.arg, n, True)]
            elif isinstance(n, ast.FunctionDef) and n is not fdef:
                names = [(n.name, n, True)]
            for name, node, binds in names:
                if name.startswith("__"):
                    self.fail(node, f"name {name!r}: names starting with '__' are reserved for "
                              f"the compiler")
                if binds and name in _DSL_NAMES:
                    what = ("a local function" if isinstance(node, ast.FunctionDef) else
                            "a parameter" if isinstance(node, ast.arg) else "a variable")
                    self.fail(node, f"{what} named {name!r} would shadow the DSL's {name}(): "
                              f"every DSL and builtin name the DSL gives meaning to keeps it; "
                              f"rename it (e.g. {name}_)")

    def scan_names(self, body):
        """Collect every bound name before checking statements, so that a parameter
        rebound anywhere, a use of the noise before its declaration and a second binding
        of the noise's name are all caught at the right line."""
        stored = [n for stmt in body for n in ast.walk(stmt)
                  if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
        self.stores = collections.Counter(n.id for n in stored)
        self.locals = set(self.stores)
        self.derived = {}              # top-level names bound once to a static expression
        self.requires = []
        for n in stored:
            if n.id in self.params:
                self.fail(n, f"parameter {n.id!r} cannot be reassigned: sizes and static "
                          f"parameters fix shapes and loop bounds")
        decl = next((s for s in body if isinstance(s, ast.Assign) and len(s.targets) == 1
                     and isinstance(s.targets[0], ast.Name) and isinstance(s.value, ast.Call)
                     and isinstance(s.value.func, ast.Name) and s.value.func.id == "atoms"
                     and self.resolves_to_dsl("atoms")), None)
        if decl is not None:
            self.noise = decl.targets[0].id
            other = next((n for n in stored if n.id == self.noise and n is not decl.targets[0]), None)
            if other is not None:
                self.fail(other, f"noise {self.noise!r} cannot be reassigned (declared at line "
                          f"{decl.lineno})")

    def returns(self, node):
        value = node.value
        elts = value.elts if isinstance(value, ast.Tuple) else [value]
        names = []
        for e in elts:
            if isinstance(e, ast.Name) and e.id == self.noise:
                self.fail(e, f"noise {self.noise!r} returned: the structure must be built from "
                          f"the parameters and the winners only")
            if not isinstance(e, ast.Name) or e.id not in self.locals:
                self.fail(node, "return must name local variables (`return parent, left`); each "
                          "name becomes a field of the structure")
            names.append(e.id)
        if len(set(names)) != len(names):
            self.fail(node, "returned field names must be distinct")
        return tuple(names)

    # ---- statements ---------------------------------------------------------------------
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
                    and s.value.func.id in _RACES:
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
            if not isinstance(s.op, _OK_BINOPS):
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
                    and n.id not in self.derived and n.id not in _STATIC_FUNCS and not self.is_constant(n.id):
                self.fail(n, f"require() conditions may only read the parameters {list(self.params)}, "
                          f"not {n.id!r}")
            if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id in _STATIC_FUNCS):
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
        if call in _RACES:
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
            t.slice = _ExprChecker(self, "indexed").visit_index(t.slice)
            return t
        self.fail(t, "assignment targets must be names, tuples of names or `array[index]`")

    def declare_atoms(self, s, top):
        if not top:
            self.fail(s, "atoms() must be declared at the top level of the spec, not in a loop or if")
        if self.atoms is not None:
            self.fail(s, f"noise is already declared at line {self.atoms.line}: a spec has one atoms() array")
        if len(s.targets) != 1 or not isinstance(s.targets[0], ast.Name):
            self.fail(s, "write `noise = atoms(...)` with a single name")
        call = s.value
        if not call.args:
            self.fail(s, "atoms() needs at least one dimension")
        dims = tuple(self.static(d, "an atoms dimension") for d in call.args)
        valid = None
        for kw in call.keywords:
            if kw.arg != "valid":
                self.fail(s, f"atoms() takes only the keyword `valid=`, not {kw.arg!r}")
            valid = self.pred(kw.value, len(dims), "valid", state=False)
        self.noise = s.targets[0].id
        self.atoms = ir.AtomDecl(self.noise, dims, valid, s.lineno)
        return None

    def race(self, s, kind):
        call = s.value
        if len(s.targets) != 1:
            self.fail(s, f"assign the winner of {kind}() to one target")
        target = s.targets[0]
        ndim = len(self.atoms.dims)
        names = target.elts if isinstance(target, ast.Tuple) else [target]
        if not all(isinstance(n, ast.Name) for n in names):
            self.fail(s, f"the winner of {kind}() must be assigned to plain names")
        if len(names) != ndim:
            got = "one name" if len(names) == 1 else f"{len(names)} names"
            self.fail(s, f"{kind}() over {ndim}-d atoms returns {ndim} index "
                      f"{'value' if ndim == 1 else 'arrays' if kind == 'race_groups' else 'values'}; "
                      f"unpack them into {ndim} names, got {got}")
        if any(n.id == self.noise for n in names):
            self.fail(s, f"noise {self.noise!r} cannot be reassigned")
        if not call.args or not (isinstance(call.args[0], ast.Name) and call.args[0].id == self.noise):
            self.fail(s, f"the first argument of {kind}() must be the noise {self.noise!r} declared by atoms()")
        keywords = {}
        for kw in call.keywords:
            if kw.arg not in _KEYWORDS[kind]:
                hint = " (pass the members positionally: race(noise, members))" if kw.arg == "members" else ""
                self.fail(s, f"{kind}() takes no keyword {kw.arg!r}; its keywords are "
                          f"{sorted(_KEYWORDS[kind])}{hint}")
            keywords[kw.arg] = kw.value
        allow_empty = keywords.pop("allow_empty", None)
        if allow_empty is not None:
            if not (isinstance(allow_empty, ast.Constant) and type(allow_empty.value) is bool):
                self.fail(s, "allow_empty= must be written literally as True or False")
            allow_empty = allow_empty.value
        rid = len(self.races)
        self.races[rid] = s.lineno
        targets = [n.id for n in names]
        if kind == "race":
            if len(call.args) > 2:
                self.fail(s, "race(noise) or race(noise, members): members is a predicate lambda or a mask")
            members = self.members(call.args[1], ndim, "members") if len(call.args) == 2 else None
            return ir.Race(targets, members, rid, s.lineno, allow_empty=bool(allow_empty))
        args = list(call.args[1:])
        groups = keywords.get("groups")
        if len(args) == 2 and groups is None:
            groups = args.pop()
        if len(args) != 1 or groups is None:
            self.fail(s, "write race_groups(noise, key, groups=G): key gives each atom's group, G is static")
        key = self.members(args[0], ndim, "key")
        return ir.GroupRace(targets, key, self.static(groups, "a group count"), rid, s.lineno,
                            allow_empty=bool(allow_empty))

    def members(self, node, ndim, what):
        if isinstance(node, ast.Lambda):
            return self.pred(node, ndim, what, state=True)
        return self.expr(node, f"{what} of a race")

    def pred(self, node, ndim, what, state):
        if not isinstance(node, ast.Lambda):
            self.fail(node, f"{what} must be a lambda over the atom indices")
        a = node.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or a.posonlyargs:
            self.fail(node, f"the {what} lambda takes plain index parameters only")
        params = tuple(x.arg for x in a.args)
        if len(params) != ndim:
            self.fail(node, f"the {what} lambda takes {len(params)} index parameter(s) but the "
                      f"atoms have {ndim} dimension(s)")
        saved, noise = self.locals, self.noise
        self.locals = (saved if state else set()) | set(params)
        if noise in params:
            self.noise = None          # a lambda parameter shadows the noise's name, as in Python
        try:
            body = self.expr(node.body, what)
        finally:
            self.locals, self.noise = saved, noise
        return ir.Pred(params, body, node.lineno, state=state)

    # ---- expressions --------------------------------------------------------------------
    def static(self, node, what, shape=False, extra=()):
        """Check an expression built from parameters, int constants and arithmetic
        (``shape=True`` also admits a tuple of them; ``extra``: enclosing loop variables
        a loop bound may use)."""
        if shape and isinstance(node, ast.Tuple):
            for e in node.elts:
                self.static(e, what)
            return self.expr(node, what, static=True)
        if shape and isinstance(node, ast.Name) and isinstance(self.lookup(node.id), tuple) \
                and self.is_constant(node.id):
            return self.expr(node, what, static=True)
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id == self.noise:
                self.fail(n, f"noise {self.noise!r} used in {what}: bounds and shapes must come "
                          f"from the parameters")
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in self.params \
                    and n.id not in self.derived and n.id not in _STATIC_FUNCS \
                    and not self.is_constant(n.id) and n.id not in extra:
                self.fail(n, f"{what} must be computed from the size/static parameters "
                          f"{list(self.params)}; {n.id!r} is not one (a state-dependent bound "
                          f"cannot be known before running)")
            if isinstance(n, ast.Name) and isinstance(self.lookup(n.id), tuple) and self.is_constant(n.id):
                self.fail(n, f"{what} must be an int; the constant {n.id!r} is a tuple")
            if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id in _STATIC_FUNCS):
                self.fail(n, f"{what} may only call min, max or abs")
            if not isinstance(n, (ast.Name, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Call,
                                  ast.Load, ast.operator, ast.unaryop)):
                self.fail(n, f"{type(n).__name__} is not allowed in {what}")
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
                self.fail(n, "true division makes floats: use //")
        self.note_static(node, getattr(node, "lineno", None))
        return self.expr(node, what, static=True)

    def note_static(self, node, line):
        """Record the parameters an expression needs as ints (directly or through derived
        statics), so that passing an array for one is refused at compile time."""
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                if n.id in self.params:
                    self.static_names.setdefault(n.id, line)
                elif n.id in self.derived:
                    self.note_static(self.derived[n.id], line)

    def is_static(self, node):
        names_ok = all(n.id in self.params or n.id in self.derived or n.id in _STATIC_FUNCS
                       or (self.is_constant(n.id) and not isinstance(self.lookup(n.id), tuple))
                       for n in ast.walk(node) if isinstance(n, ast.Name))
        kinds_ok = all(isinstance(n, (ast.Name, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Load,
                                      ast.operator, ast.unaryop)) for n in ast.walk(node))
        return names_ok and kinds_ok and not any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
                                                 for n in ast.walk(node))

    _MISSING = object()

    def lookup(self, name):
        return self.outer.get(name, self._MISSING)

    def is_constant(self, name):
        if name in self.params or name in self.locals:
            return False
        value = self.lookup(name)
        return value is not self._MISSING and _is_constant(value)

    def resolves_to_dsl(self, name):
        """Is ``name`` (not a local) the DSL's own function or kept builtin?"""
        if name in self.locals or name in self.params:
            return False
        value = self.lookup(name)
        if name in PRIMITIVES:
            return value is self._MISSING or value is PRIMITIVES[name]
        if name in PY_BUILTINS:
            return value is self._MISSING or value is getattr(builtins, name)
        return False

    def expr(self, node, context, static=False):
        """Check ``node`` (context says how its value is used) and inline constants."""
        return _ExprChecker(self, context, static).visit(node)


def _is_random_module(name):
    return "random" in name or name.split(".")[0] in _RANDOM_SOURCES


def _is_constant(value):
    """Exact ints and bools, and (nested, rectangular) tuples of them.  Subclasses are not
    constants: their ``repr``, ``__index__`` or ``__eq__`` could run arbitrary code."""
    if type(value) is bool:
        return True
    if type(value) is int:
        return _INT64[0] <= value <= _INT64[1]
    if type(value) is tuple:
        return all(_is_constant(v) for v in value) and _rectangular(value)
    return False


def _rectangular(value):
    if not value or all(type(v) is not tuple for v in value):
        return True
    if any(type(v) is not tuple for v in value):
        return False
    return len({len(v) for v in value}) == 1 and all(_rectangular(v) for v in value)


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


def _constant_node(value, where):
    """An AST node for a verified constant, built directly (never by parsing a repr)."""
    if type(value) is tuple:
        node = ast.Tuple([_constant_node(v, where) for v in value], ast.Load())
    else:
        node = ast.Constant(value)
    return ast.copy_location(node, where)


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


class _ExprChecker(ast.NodeTransformer):
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
            if not isinstance(node.op, _OK_BINOPS):
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
            if not _INT64[0] <= node.value <= _INT64[1]:
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
        if node.id in _IO:
            self.fail(node, f"{node.id}() is I/O or introspection: a spec has no side effects")
        value = fe.lookup(node.id)
        if value is fe._MISSING:
            self.fail(node, f"name {node.id!r} is not defined")
        if isinstance(value, types.ModuleType):
            if _is_random_module(value.__name__):
                self.fail(node, f"module {value.__name__!r}: randomness inside a spec breaks "
                          f"the stochastic invariant; the noise comes only from atoms()")
            self.fail(node, f"module {value.__name__!r} cannot be used inside a spec; use DSL functions")
        if _is_constant(value):
            fe.constants[node.id] = value
            if type(value) is tuple and not self.static:
                return node        # an array constant: the program supplies a read-only array
            return _constant_node(value, node)
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
            if _is_random_module(self.fe.lookup(base.id).__name__) or "random" in full:
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
        if name in _RACES and fe.resolves_to_dsl(name):
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
        allowed = _KEYWORDS.get(name, set())
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
        if name in _SHAPED:
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
