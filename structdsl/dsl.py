"""The user-facing DSL: the ``@spec`` decorator and the names a spec may call.

A spec is an ordinary-looking Python function that is never executed as written: the
compiler reads its source (:mod:`structdsl.frontend`), checks it, and lowers it to each
backend.  The functions below exist so that specs import cleanly, editors autocomplete
and ``help()`` works; calling one outside a compiled spec raises ``RuntimeError``.

The DSL vocabulary
------------------
Noise and races (the only way to touch noise):

``noise = atoms(*dims, valid=lambda *idx: mask)``
    Declare the exponential noise: one atom per cell of an array of shape ``dims`` (each
    dim a size parameter, a static parameter or an integer).  ``valid`` (optional) is a
    predicate on the index grids; invalid cells never race.  Exactly one per spec, at the
    top level.  Logits passed by the user have shape ``[*batch, *dims]``.
``w = race(noise)`` / ``w = race(noise, members)``
    One race among the live atoms selected by ``members`` (a predicate ``lambda *idx: bool``
    evaluated on the index grids, or a boolean array of the atoms' shape; omitted: all).
    Returns the winner's index (an int for 1-d atoms, a tuple of ints otherwise).
``w = race_groups(noise, key, groups=G)``
    One race per group, all in one step: ``key`` (a ``lambda *idx: int`` or an int array of
    the atoms' shape) gives each atom's group in ``[0, G)``, or ``-1`` to sit out.  Returns
    winners per group (an int array ``[G]``, or a tuple of them), ``-1`` for empty groups.

``mask = live(noise)``
    The atoms that can race at all (valid, logit above -inf): reads the logits' support,
    never the noise.  ``race(..., allow_empty=True)`` returns -1 on an empty member set.

Retired winners, invalid atoms and atoms at logit ``-inf`` never race.  A race over no live
atom raises :class:`~structdsl.errors.EmptyRaceError` (for ``race_groups``: all groups empty)
unless ``allow_empty=True``.

Parameter checks: ``require(condition, "message")`` at the top level, the condition on
parameters only; checked once the sizes are known (a clear ``ValueError`` otherwise).

Integer/boolean state: ``arange(n)``, ``zeros(shape, dtype=int)``, ``ones``, ``full(shape,
value)``, ``where``, ``minimum``, ``maximum``, ``abs``, ``any``, ``all``, ``sum``, ``min``,
``max`` (one argument: reduction; two: elementwise), ``argmin``, ``argmax``, ``int``, ``bool``,
``range`` (loop bounds only).  Array shapes and loop bounds must be computed from the
parameters alone (a loop bound may also be linear in enclosing loop variables), so every
backend knows them before running.  Each function's ``help()`` states its contract;
``docs/design.md`` states the meaning of every operator.
"""
from __future__ import annotations

import functools
import inspect

__all__ = [
    "spec", "Spec", "atoms", "race", "race_groups", "live", "arange", "zeros", "ones", "full",
    "where", "minimum", "maximum", "argmin", "argmax", "require",
]


class Spec:
    """A declared structured distribution: the user's function plus its declarations.

    Build with the :func:`spec` decorator; compile with :func:`structdsl.compile`.
    The parsed and verified IR is built lazily (``spec.ir``) and cached.  ``reference`` is
    the plain Python solver the spec claims to compute (or None); see :func:`spec`.
    """

    def __init__(self, fn, nested=False, reference=None):
        if not inspect.isfunction(fn):
            raise TypeError(f"@spec decorates a function, got {type(fn).__name__}")
        if reference is not None and not callable(reference):
            raise TypeError(f"@spec(reference=...) of {fn.__name__!r} must be a function of one "
                            f"lane's weights, got {type(reference).__name__} {reference!r}")
        self.fn = fn
        self.name = fn.__name__
        self.nested = bool(nested)
        self.reference = reference
        self.__doc__ = fn.__doc__
        functools.update_wrapper(self, fn, updated=())

    @functools.cached_property
    def ir(self):
        """The verified IR (:class:`structdsl.ir.Program`); raises SpecError if rejected."""
        from .frontend import parse_spec
        return parse_spec(self)

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"spec {self.name!r} is a declaration, not a function: use "
            f"structdsl.compile({self.name}, backend='numpy', ...) and call .sample(logits)")

    def __repr__(self):
        return f"<structdsl spec {self.name}{' (nested)' if self.nested else ''}>"

    def __reduce__(self):
        """Pickle by reference: module and qualified name, or (``__main__``, a notebook, a
        function's local spec) the source text and the constants it reads; unpickling
        verifies it like any spec (:mod:`structdsl.cache`).  ``copy.deepcopy`` returns the
        spec itself, as for a function."""
        from .cache import reduce_spec
        return reduce_spec(self)

    def __copy__(self):
        """A distinct spec sharing this one's function and cached IR (a variant to modify)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new


def spec(fn=None, *, nested=False, reference=None):
    """Declare a structured distribution.  Use as ``@spec``, ``@spec(nested=True)`` or
    ``@spec(reference=fn)``.

    ``nested=True`` promises that every race's members are a subset of the previous race's
    members minus its winner (for ``race_groups``: each group inside one group of the
    previous race).  The reference backend checks the promise on every run; the fast
    backends rely on it to serve all races from one sorted pass over the noise.

    ``reference=fn`` names the plain algorithm the spec is meant to be: ``fn(weights)``
    takes one lane's weights, a float64 array of the atoms' shape with ``+inf`` at invalid
    (and excluded) atoms, and returns a dict of some of the spec's structure fields (or a
    tuple in field order, or one array for the first field).  It must not use the DSL.
    ``structdsl.check`` and ``python -m structdsl check FILE`` compare ``solve`` with it
    and, when it depends only on the order of the weights, prove that the spec's law is
    the law of ``fn`` on exponential noise.
    """
    if fn is None:
        return lambda f: Spec(f, nested=nested, reference=reference)
    return Spec(fn, nested=nested, reference=reference)


_SIGNATURES = {
    "atoms": "*dims, valid=None", "race": "noise, members=None, *, allow_empty=False",
    "race_groups": "noise, key, groups, *, allow_empty=False", "live": "noise", "arange": "n",
    "zeros": "shape, dtype=int", "ones": "shape, dtype=int", "full": "shape, value, dtype=None",
    "where": "cond, a, b", "minimum": "a, b", "maximum": "a, b", "argmin": "x", "argmax": "x",
    "require": "condition, message",
}


def _dsl_only(name, doc):
    def stub(*args, **kwargs):
        raise RuntimeError(f"{name}() only has a meaning inside a compiled @spec")
    stub.__name__ = stub.__qualname__ = name
    stub.__module__ = __name__
    stub.__doc__ = doc
    stub.__signature__ = inspect.signature(eval(f"lambda {_SIGNATURES[name]}: None"))  # for help()
    return stub


atoms = _dsl_only("atoms", """noise = atoms(*dims, valid=lambda *idx: bool)

Declare the exponential noise: one atom per cell of an array of shape ``dims``.  Each dim
is a size parameter (read from the logits' shape), a static parameter, or a static
expression of them.  ``valid`` (optional) is a predicate on one atom's indices and the
parameters; invalid atoms never race.  Exactly one per spec, at the top level, before the
first race.  The noise may then appear only as the first argument of ``race`` /
``race_groups`` or as the argument of ``live``.  Logits have shape ``[*batch, *dims]``.
""")
race = _dsl_only("race", """w = race(noise[, members][, allow_empty=False])

One exponential race: the live member with the smallest residual noise wins, with
probability ``softmax(logits[members])[w]``; the winner is retired for good, the losers keep
their residuals (the stochastic invariant keeps them fresh).

members: omitted (every live atom), a predicate ``lambda *idx: bool`` evaluated per atom
    with that atom's scalar indices and the current state, or a bool array of the atoms'
    shape.
allow_empty: ``True`` makes a race with no live member return -1 (a tuple of -1 for
    multi-dimensional atoms) without taking a trace slot; otherwise it raises
    ``EmptyRaceError`` naming the line and the batch element.
Returns the winner's index: an int for 1-d atoms, a tuple of ints otherwise (unpack it:
``u, v = race(edge, ...)``).  Must be its own assignment statement.
""")
race_groups = _dsl_only("race_groups", """w = race_groups(noise, key, groups=G[, allow_empty=False])

One race per group, all in one step.  ``key`` (a ``lambda *idx: int`` evaluated per atom,
or an int array of the atoms' shape) gives each atom's group in ``[0, G)``, or -1 to sit
out; ``G`` is a static expression (>= 0).  Returns the winners per group: an int array
``[G]`` (a tuple of them for multi-d atoms), -1 for an empty group.  The trace records the
winners in group order.  When every group is empty it raises ``EmptyRaceError`` unless
``allow_empty=True`` (then all -1, no trace slot).
""")
live = _dsl_only("live", """mask = live(noise)

The bool array (the atoms' shape) of atoms that can race at all: valid and with a logit
above -inf.  It depends on the logits' support, never on the noise, so reading it keeps the
stochastic invariant; padded (ragged) batches use it to leave absent items out.
""")
arange = _dsl_only("arange", "arange(n): the int64 array [0, 1, ..., n-1]; n static.")
zeros = _dsl_only("zeros", "zeros(shape, dtype=int): an int64 (or bool) array of zeros; "
                           "shape a static int or tuple of them.")
ones = _dsl_only("ones", "ones(shape, dtype=int): an int64 (or bool) array of ones; shape static.")
full = _dsl_only("full", "full(shape, value, dtype=None): an array of ``value`` (a scalar); its "
                         "dtype is bool for a bool value, int64 otherwise, unless dtype= is given.")
where = _dsl_only("where", "where(cond, a, b): elementwise choice; cond bool, a and b broadcast "
                           "(a scalar broadcasts to any shape, arrays must have equal shapes).")
minimum = _dsl_only("minimum", "minimum(a, b): elementwise minimum (bool if both are bool, else int64).")
maximum = _dsl_only("maximum", "maximum(a, b): elementwise maximum (bool if both are bool, else int64).")
argmin = _dsl_only("argmin", "argmin(x): index of the first smallest entry of a 1-d array "
                             "(an empty array raises).")
argmax = _dsl_only("argmax", "argmax(x): index of the first largest entry of a 1-d array "
                             "(an empty array raises).")
require = _dsl_only("require", """require(condition, "message")

A check of the parameters (sizes and static parameters only), at the top level of the spec.
It is evaluated once the sizes are known; a false condition raises ``ValueError`` with the
message, the parameter values and the spec line.
""")

#: DSL functions, by name (the compiler resolves a spec's names against this table).
PRIMITIVES = {f.__name__: f for f in (atoms, race, race_groups, live, arange, zeros, ones, full,
                                      where, minimum, maximum, argmin, argmax, require)}
#: Python builtins that keep a meaning inside a spec.
PY_BUILTINS = ("any", "all", "sum", "min", "max", "abs", "int", "bool", "range")
