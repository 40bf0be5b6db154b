"""structdsl: structured discrete latent variables from one declared algorithm.

Declare a recursive algorithm that touches exponential noise only through races; the
compiler checks it keeps the stochastic invariant and derives the sampler, the trace
log-probability, the noise-given-trace sampler and exact enumeration.

>>> import structdsl
>>> from structdsl.specs import spanning_tree
>>> prog = structdsl.compile(spanning_tree, backend="numpy")
"""
from .dsl import (Spec, arange, argmax, argmin, atoms, full, live, maximum, minimum, ones, race,
                  race_groups, require, spec, where, zeros)
from .backends import program_class
from .cache import cache_clear, cache_info, compile_cached
from .errors import (EmptyRaceError, EnumerationLimitError, NestingError, RaceError, SpecError,
                     SpecIndexError, SpecOverflowError, SpecValueError, SpecZeroDivisionError)

__version__ = "0.1.0"


def compile(spec, backend="numpy", **static_params):  # noqa: A001 - the natural name
    """Verify ``spec`` and compile it for ``backend``.

    static_params: values of the spec's static parameters (e.g. ``k`` for top-k) and data
    parameters (int/bool arrays); sizes are read from the logits' shape at call time.
    Raises :class:`SpecError` (with the spec's file and line) if the spec is outside the DSL
    or could leak noise.

    Compiled once: equal arguments (the same spec, backend and parameter values, arrays by
    content) return the same program from a process-wide cache (:mod:`structdsl.cache`;
    :func:`cache_clear` empties it), which also keeps each program's per-shape
    specialisations.  Treat the program as shared: ``copy.copy`` it to change attributes.
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"compile expects a @spec-decorated function, got {type(spec).__name__}")
    cls = program_class(backend)
    spec.ir  # verify before anything else, so errors name the spec's own line
    return compile_cached(spec, backend, static_params, lambda: cls(spec, **static_params))


__all__ = ["compile", "cache_clear", "cache_info", "spec", "Spec", "atoms", "race", "race_groups", "live",
           "arange", "zeros", "ones", "full", "where", "minimum", "maximum", "argmin", "argmax", "require", "SpecError", "RaceError",
           "EmptyRaceError", "NestingError", "EnumerationLimitError", "SpecIndexError",
           "SpecOverflowError", "SpecValueError", "SpecZeroDivisionError"]
