"""The intermediate representation every backend lowers.

A spec becomes a :class:`Program`: a straight list of statements over fixed-shape integer
and boolean state, with the noise reachable only through :class:`Race` and
:class:`GroupRace` statements.  Expressions are kept as checked Python ``ast.expr`` nodes
from a small subset (below), so every backend can print them in its own dialect and
tracebacks point at the user's own lines.

Expression subset
-----------------
Integers are int64 and indexing follows NumPy (a negative index counts from the end; every
backend must lower it the same way).

names (parameters, locals, inlined constants), int/bool constants, tuples, ``+ - * // %``,
``& | ^ ~``, comparisons, ``a if c else b``, subscripts ``x[i]``, ``x[i, j]``, ``x[mask]``,
calls to the DSL functions of :mod:`structdsl.dsl`, and :class:`Pred` (a ``lambda`` over atom
indices, only as a race's ``members``/``key`` or the atoms' ``valid``).  Inside a ``Pred``,
``and``/``or``/``not`` and chained comparisons are rewritten to elementwise logical
functions, because the predicate is evaluated on whole index grids.

Lowering rules (one row per construct; ``lane`` is one batch element)
---------------------------------------------------------------------
=================  ===========================  ===============================  ================================
construct          numpy (reference)            numba (planned)                  torch (planned)
=================  ===========================  ===============================  ================================
Program            one Python function per      one ``@njit`` per semantics,     one function on ``[B, ...]``
                   lane, driven by a Python     ``prange`` over lanes            tensors, all lanes in lock-step
                   loop over the batch
Assign / Store     numpy assignment             same, per lane                   batched write masked by the lane's
                                                                                 ``active`` mask (``torch.where``)
If                 Python ``if``                ``if``                           both branches run, writes masked
                                                                                 by ``cond`` and ``~cond``
Loop(count)        ``for _ in range(count)``,   same                             ``count`` unrolled steps of a
                   count static                                                  Python loop over masked bodies
Break              ``break``                    ``break``                        lane's ``active`` mask cleared
Pred               called on broadcasting       explicit loops over the atoms    called on broadcast index tensors
                   index grids (``ogrid``)
Race               handler call: argmin of      argmin over the live mask, or    masked argmin over the flattened
                   residuals over the member    next live item of one sorted     atoms, per lane
                   mask (sample/solve), fed     pass when ``nested``
                   winner (replay)
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
    """``for var in range(count)``; ``count`` is a static expression of the parameters."""
    var: str
    count: ast.expr
    body: list
    line: int


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


@dataclass
class GroupRace:
    """``targets = race_groups(noise, key, groups=G)``; ``groups`` is static."""
    targets: list
    key: object
    groups: ast.expr
    race_id: int
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

    def static_values(self, params, evaluate):
        """Parameters plus the derived static locals (``m = 2 * n``), evaluated in order."""
        env = dict(params)
        for name, expr in self.derived.items():
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
