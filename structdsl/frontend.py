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

The rules live in four modules next to this one: ``frontend_names`` (reserved names, outer
constants), ``frontend_statements`` (statement translation), ``frontend_races`` (``atoms``,
races and predicates) and ``frontend_exprs`` (the expression verifier).
"""
from __future__ import annotations

import ast
import builtins
import collections
import inspect
import re

from . import ir
from .dsl import PRIMITIVES, PY_BUILTINS
from .errors import SpecError
from .frontend_exprs import ExprChecker
from .frontend_names import STATIC_FUNCS, check_reserved, is_plain_constant, outer_names
from .frontend_races import RaceRules
from .frontend_statements import StatementRules
from .recursion import desugar


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
    check_reserved(fdef, file)                    # the user's names, before the compiler adds its own
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


class _Frontend(StatementRules, RaceRules):
    """One spec's verification: the top level, the names it binds and the static
    (parameter-only) expressions; statements and races are the mixins' rules."""

    def __init__(self, spec, fn, fdef, file):
        self.spec, self.fdef, self.file = spec, fdef, file
        self.fn = fn
        self.outer = outer_names(fn)
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

    # ---- static expressions and names ---------------------------------------------------
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
                    and n.id not in self.derived and n.id not in STATIC_FUNCS \
                    and not self.is_constant(n.id) and n.id not in extra:
                self.fail(n, f"{what} must be computed from the size/static parameters "
                          f"{list(self.params)}; {n.id!r} is not one (a state-dependent bound "
                          f"cannot be known before running)")
            if isinstance(n, ast.Name) and isinstance(self.lookup(n.id), tuple) and self.is_constant(n.id):
                self.fail(n, f"{what} must be an int; the constant {n.id!r} is a tuple")
            if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id in STATIC_FUNCS):
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
        names_ok = all(n.id in self.params or n.id in self.derived or n.id in STATIC_FUNCS
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
        return value is not self._MISSING and is_plain_constant(value)

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
        return ExprChecker(self, context, static).visit(node)
