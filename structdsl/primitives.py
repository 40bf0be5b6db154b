"""The DSL's primitives, each declared once.

A primitive is a function a spec may call inside an expression (``where``, ``sum``,
``arange`` ...).  Its entry here holds everything that is not backend-specific: the
spellings a spec uses, the number of arguments, and the type rule (dtype and shape of the
result, the checks on the arguments).  The type-and-shape pass resolves every call to its
:class:`Primitive` once (``Typing.primitive(node)``); each backend then holds one lowering
rule per primitive, keyed by :attr:`Primitive.name` (``PRIMITIVE_RULES`` in
``backends/numpy_reference.py``, ``numba_lowering.py`` and ``torch_exprs.py``), and the
conformance suite checks that every backend covers the registry exactly, as JAX keys its
lowering rules by primitive.

``min`` and ``max`` are two primitives each: with one argument the reductions ``min`` /
``max``, with two or more the elementwise ``minimum`` / ``maximum`` (also spelled so).

Adding a primitive: one :func:`primitive` entry below (name, arity, type rule), one rule in
each backend's ``PRIMITIVE_RULES``, the user-facing stub in :mod:`structdsl.dsl` (or a
Python builtin in ``dsl.PY_BUILTINS``), and a conformance case (``docs/design.md`` §4.8).

Statement-level forms (``atoms``, ``race``, ``race_groups``, ``require``, ``range``) are
not primitives: they shape the program rather than compute a value, and the IR has a node
for each.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Callable

from .typecheck_types import Type


@dataclass(frozen=True)
class Primitive:
    """One DSL function.  ``rule(checker, node, defined)`` types a call (``checker`` is the
    type pass, whose ``expr``, ``dims``, ``broadcast``, ``need_bool`` and ``fail`` it uses)
    and returns its :class:`Type`; arity has been checked before."""
    name: str
    spellings: tuple
    arity: tuple                  # (least, most) positional arguments
    rule: Callable
    doc: str

    def __str__(self):
        return self.name


#: Every primitive, by name.
PRIMITIVES: dict[str, Primitive] = {}


def primitive(name, arity, doc, spellings=None):
    """Declare a primitive whose type rule is the decorated function."""
    lo, hi = (arity, arity) if isinstance(arity, int) else arity

    def register(rule):
        PRIMITIVES[name] = Primitive(name, tuple(spellings or (name,)), (lo, hi), rule, doc)
        return rule
    return register


def resolve(spelling, nargs):
    """The primitive a call ``spelling(...)`` with ``nargs`` arguments means, or None."""
    if spelling in ("min", "max") and nargs >= 2:
        return PRIMITIVES["minimum" if spelling == "min" else "maximum"]
    found = PRIMITIVES.get(spelling)
    return found if found is not None and spelling in found.spellings else None


def _dtype_argument(checker, node, arg, default):
    if arg is None:
        return default
    if not (isinstance(arg, ast.Name) and arg.id in ("int", "bool")):
        checker.fail(node, f"the dtype of {node.func.id}() must be int or bool")
    return arg.id


def _typed_args(checker, node, defined):
    ts = [checker.expr(a, defined) for a in node.args]
    return ts, any(t.varying for t in ts)


@primitive("live", 1, "the atoms that can race (valid, logit above -inf): bool, the atoms' shape")
def _live(checker, node, defined):
    return Type("bool", checker.atom_dims)


@primitive("arange", 1, "arange(n): int64 [0, ..., n-1], n static")
def _arange(checker, node, defined):
    return Type("int", checker.dims(node.args[0]))


def _filled(checker, node, defined):
    name, args = node.func.id, node.args
    kws = {k.arg: k.value for k in node.keywords}
    if len(args) == 2 and "dtype" in kws:
        checker.fail(node, f"{name}() got dtype twice")
    dtype = _dtype_argument(checker, node, args[1] if len(args) == 2 else kws.get("dtype"), "int")
    return Type(dtype, checker.dims(args[0]))


primitive("zeros", (1, 2), "zeros(shape, dtype=int): a static shape of zeros")(_filled)
primitive("ones", (1, 2), "ones(shape, dtype=int): a static shape of ones")(_filled)


@primitive("full", 2, "full(shape, value, dtype=None): a static shape of one scalar value")
def _full(checker, node, defined):
    v = checker.expr(node.args[1], defined)
    if v.ndim:
        checker.fail(node, f"full()'s value must be a scalar, got {v}")
    dtype = _dtype_argument(checker, node, {k.arg: k.value for k in node.keywords}.get("dtype"), v.dtype)
    if dtype == "bool" and v.dtype == "int":
        checker.fail(node, "full(..., int value, dtype=bool): write the value as True/False")
    return Type(dtype, checker.dims(node.args[0]), v.varying)


@primitive("where", 3, "where(cond, a, b): elementwise choice, broadcast")
def _where(checker, node, defined):
    ts, varying = _typed_args(checker, node, defined)
    checker.need_bool(node.args[0], ts[0], "where()'s condition")
    dtype = "bool" if ts[1].dtype == ts[2].dtype == "bool" else "int"
    return Type(dtype, checker.broadcast(node, *ts), varying)


def _elementwise(checker, node, defined):
    ts, varying = _typed_args(checker, node, defined)
    dtype = "bool" if all(t.dtype == "bool" for t in ts) else "int"
    return Type(dtype, checker.broadcast(node, *ts), varying)


primitive("minimum", (2, 8), "elementwise minimum, broadcast (bool if all are bool)",
          spellings=("minimum", "min"))(_elementwise)
primitive("maximum", (2, 8), "elementwise maximum, broadcast (bool if all are bool)",
          spellings=("maximum", "max"))(_elementwise)


def _reduction(result):
    """A reduction of a whole array to a scalar; ``result(t)`` is its dtype."""
    def rule(checker, node, defined):
        name = node.func.id
        ts, varying = _typed_args(checker, node, defined)
        t = ts[0]
        if t.ndim == 0:
            checker.fail(node, f"{name}() reduces an array; `{ast.unparse(node.args[0])}` is a scalar")
        if name in ("any", "all"):
            checker.need_bool(node.args[0], t, f"{name}()")
        if name in ("argmin", "argmax") and t.ndim != 1:
            checker.fail(node, f"{name}() takes a 1-d array, got {t}")
        return Type(result(t), (), varying)
    return rule


primitive("any", 1, "any(mask): a bool array has a True (False when empty)")(_reduction(lambda t: "bool"))
primitive("all", 1, "all(mask): a bool array is all True (True when empty)")(_reduction(lambda t: "bool"))
primitive("sum", 1, "sum(x): int64 total (bools count 1; 0 when empty; overflow is an error)")(
    _reduction(lambda t: "int"))
primitive("min", 1, "min(x): the smallest entry (an empty array is an error)")(_reduction(lambda t: t.dtype))
primitive("max", 1, "max(x): the largest entry (an empty array is an error)")(_reduction(lambda t: t.dtype))
primitive("argmin", 1, "argmin(x): first index of the smallest entry of a 1-d array")(_reduction(lambda t: "int"))
primitive("argmax", 1, "argmax(x): first index of the largest entry of a 1-d array")(_reduction(lambda t: "int"))


@primitive("abs", 1, "abs(x): elementwise int64 absolute value (abs(INT64_MIN) is an error)")
def _abs(checker, node, defined):
    ts, varying = _typed_args(checker, node, defined)
    return Type("int", ts[0].shape, varying)


def _conversion(checker, node, defined):
    ts, varying = _typed_args(checker, node, defined)
    if ts[0].ndim:
        checker.fail(node, f"{node.func.id}() converts a scalar; for an array use where(...) or `x != 0`")
    return Type(node.func.id, (), varying)


primitive("int", 1, "int(b): a scalar as int64")(_conversion)
primitive("bool", 1, "bool(x): a scalar as bool (x != 0)")(_conversion)
