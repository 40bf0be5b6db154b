"""The intermediate representation every backend lowers.

A spec becomes a :class:`Program`: a straight list of statements over fixed-shape int64 and
bool state, with the noise reachable only through :class:`Race` and :class:`GroupRace`
statements (and ``live(noise)``, the mask of atoms that can race).  Expressions are kept as
checked Python ``ast.expr`` nodes from a small subset (below), so every backend can print
them in its own dialect and tracebacks point at the user's own lines.  The type-and-shape
pass (:mod:`structdsl.typecheck`) gives every node a dtype and a shape; backends lower from
those types, never from NumPy's dynamic behaviour.

Expression subset and its one meaning
-------------------------------------
names (parameters, data parameters, locals, constants), int/bool constants, ``+ - * // % <<
>>`` (int64; overflow and division by zero are errors; ``//`` and ``%`` floor), ``& | ^``
(logical on bools, bitwise on ints), ``~`` (logical not on bools), ``not``/``and``/``or`` on
bools (short-circuit on scalars, elementwise on arrays), single comparisons (chains become
``and``), ``a if c else b``, subscripts ``x[i]``, ``x[i, :]``, ``x[int_array]`` with every
index checked to lie in ``[0, dim)`` (no wrap-around), ``x[mask] = v`` (stores only), calls to
the DSL's primitives (:mod:`structdsl.primitives`, one rule per backend), and :class:`Pred` (a ``lambda`` over one atom's
indices, only as a race's ``members``/``key`` or the atoms' ``valid``).  A predicate's value
for an atom depends only on that atom's indices, the parameters and the state.

Lowering rules (one row per construct; ``lane`` is one batch element)
---------------------------------------------------------------------
=================  ===========================  ===============================  ================================
construct          numpy (reference)            numba                            torch
=================  ===========================  ===============================  ================================
Program            one Python function per      one ``chunk`` function (a loop   one function on ``[B, ...]``
                   lane, driven by a Python     over lanes) for every semantics  tensors, all lanes in lock-step
                   loop over the batch          (a mode argument), ``prange``
                                                over ranges of lanes
Assign / Store     checked ``__set``; arrays    same, per lane                   batched write masked by the lane's
                   copied on assignment                                          ``active`` mask (``torch.where``)
Subscript          checked ``__get``            every index checked (an error    gather with clamped indices, error
                                                code in the lane's status row)   flag for active lanes
If                 Python ``if``                ``if``                           both branches run, writes masked
                                                                                 by ``cond`` and ``~cond``
Loop(count)        ``for _ in range(count)``    same                             ``max count`` unrolled steps of a
                                                                                 Python loop over masked bodies
Break              ``break``                    ``break``                        lane's ``active`` mask cleared
Pred               grid version on read-only    explicit loops over the atoms    one evaluation on broadcast index
                   ``ogrid`` indices when                                        tensors (an atom axis per index;
                   grid-safe, else per atom                                      errors kept per atom)
Race               handler call: argmin of      argmin over the live mask, or    masked argmin over the flattened
                   residuals over the member    the next member popped from one  atoms, per lane
                   mask (sample/solve), fed     heap of the lane's noise when
                   winner (replay)              ``nested`` (``nested_heap``)
GroupRace          handler call, one argmin     one pass over the atoms keeping  ``scatter_reduce(amin)`` of the
                   per non-empty group          a per-group minimum              residuals by key, per lane
=================  ===========================  ===============================  ================================

All semantics share this IR: **solve** (run on given raw noise), **sample** (solve on
``E = -log(U)/rate``), **replay** (feed a trace's winners back to get log p(T) and the
member sets that ``E | T`` needs) and **enumerate** (replay every prefix, branching at the
first race past it).  Only the race handler differs between them.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pred:
    """``lambda *index: expr`` evaluated elementwise on the atoms' index grids."""
    params: tuple
    body: ast.expr
    line: int
    state: bool = True      # False for the atoms' ``valid``: it reads parameters only


@dataclass
class Assign:
    """``t1 = t2 = value``; targets are Names, Subscripts or tuples of Names."""
    targets: list
    value: ast.expr
    line: int


@dataclass
class AugAssign:
    """``target op= value``."""
    target: ast.expr
    op: ast.operator
    value: ast.expr
    line: int


@dataclass
class If:
    test: ast.expr
    body: list
    orelse: list
    line: int


@dataclass
class Loop:
    """``for var in range(count)``; ``count`` is a static expression of the parameters, or
    linear in the variables of enclosing loops (``bound_vars``), bounded by their counts."""
    var: str
    count: ast.expr
    body: list
    line: int
    bound_vars: tuple = ()


@dataclass
class Break:
    line: int


@dataclass
class Race:
    """``targets = race(noise, members)``; members is a Pred, a mask expression or None."""
    targets: list
    members: object
    race_id: int
    line: int
    allow_empty: bool = False   # an empty member set gives -1 and takes no trace slot


@dataclass
class GroupRace:
    """``targets = race_groups(noise, key, groups=G)``; ``groups`` is static."""
    targets: list
    key: object
    groups: ast.expr
    race_id: int
    line: int
    allow_empty: bool = False   # every group empty gives all -1 and takes no trace slot


@dataclass
class Fail:
    """A run-time check the compiler inserts (users cannot write it): when the scalar bool
    ``test`` holds, the lane stops with ``errors.<error>(message)`` at ``line``, on every
    backend.  The recursion pass ends each dispatch loop with one, so that a loop that runs
    out of steps with frames still on the stack is loud instead of returning a truncated
    result."""
    test: ast.expr
    error: str          # the name of a RaceError subclass in structdsl.errors
    message: str
    line: int


@dataclass
class AtomDecl:
    """``name = atoms(*dims, valid=pred)``; dims are static expressions."""
    name: str
    dims: tuple
    valid: Pred | None
    line: int


@dataclass
class Program:
    """A verified spec.

    ``sizes`` are the parameters read off the logits' shape (bare names among the atoms'
    dims); the other parameters are static and given to ``compile``.  ``constants`` are the
    globals the spec reads, inlined by value.  ``races`` maps race id to source line.
    """
    name: str
    file: str
    doc: str | None
    params: tuple
    defaults: dict
    sizes: tuple
    atoms: AtomDecl
    body: list
    outputs: tuple
    nested: bool
    constants: dict = field(default_factory=dict)
    races: dict = field(default_factory=dict)
    derived: dict = field(default_factory=dict)
    requires: list = field(default_factory=list)
    static_names: dict = field(default_factory=dict)   # parameter -> line needing it as an int
    end_line: int = 0

    def static_values(self, params, evaluate):
        """Int parameters plus the derived static locals (``m = 2 * n``), evaluated in order;
        a derived value that reads an array parameter or an unknown size is left out."""
        env = {k: v for k, v in params.items() if isinstance(v, int)}
        for name, expr in self.derived.items():
            needs = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} - {"min", "max", "abs"}
            if needs <= set(env):
                env[name] = evaluate(expr, env)
        return env

    def where(self, line):
        """``file:line`` of a spec line, for messages."""
        return f"{self.file}:{line}"

    @property
    def statics(self):
        return tuple(p for p in self.params if p not in self.sizes)


def walk_statements(body):
    """Yield every statement of ``body``, nested ones included, in source order."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, If):
            yield from walk_statements(stmt.body)
            yield from walk_statements(stmt.orelse)
        elif isinstance(stmt, Loop):
            yield from walk_statements(stmt.body)


def static_eval(expr, params, file="<spec>"):
    """Evaluate a verified static expression (parameters, ints, arithmetic, min/max/abs);
    raises NameError when it reads a name ``params`` does not hold."""
    code = compile(ast.Expression(expr), file, "eval")
    value = eval(code, {"__builtins__": {}, "min": min, "max": max, "abs": abs}, dict(params))
    return int(value)
