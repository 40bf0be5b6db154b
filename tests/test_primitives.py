"""The primitive registry (:mod:`structdsl.primitives`): each DSL function is declared once,
every backend lowers exactly the registry, and the differential harness exercises every
primitive on every backend."""
import ast
import importlib

import pytest

import structdsl
from structdsl import dsl, primitives

from test_conformance import SPECS, _case

RULES = {"numpy": "structdsl.backends.numpy_reference", "numba": "structdsl.backends.numba_lowering",
         "torch": "structdsl.backends.torch_exprs"}


@pytest.mark.parametrize("backend", sorted(RULES))
def test_every_backend_lowers_exactly_the_registry(backend):
    pytest.importorskip(backend if backend != "numpy" else "numpy")
    rules = importlib.import_module(RULES[backend]).PRIMITIVE_RULES
    assert set(rules) == set(primitives.PRIMITIVES), (
        f"{backend}: missing {set(primitives.PRIMITIVES) - set(rules)}, "
        f"unknown {set(rules) - set(primitives.PRIMITIVES)}")


def test_every_spelling_is_a_name_a_spec_can_call():
    callable_names = set(dsl.PRIMITIVES) | set(dsl.PY_BUILTINS)
    for prim in primitives.PRIMITIVES.values():
        assert set(prim.spellings) <= callable_names, prim
        lo, hi = prim.arity
        for spelling in prim.spellings:
            assert primitives.resolve(spelling, hi) is prim or primitives.resolve(spelling, lo) is prim


def test_every_dsl_function_is_a_primitive_or_a_statement_form():
    statement_forms = {"atoms", "race", "race_groups", "require", "range"}
    spelled = {s for p in primitives.PRIMITIVES.values() for s in p.spellings}
    assert (set(dsl.PRIMITIVES) | set(dsl.PY_BUILTINS)) - statement_forms == spelled


def test_min_and_max_are_two_primitives_by_arity():
    assert primitives.resolve("min", 1).name == "min"
    assert primitives.resolve("min", 2).name == "minimum"
    assert primitives.resolve("max", 3).name == "maximum"
    assert primitives.resolve("print", 1) is None


def test_every_primitive_is_exercised_by_the_differential_harness():
    """Parity on the harness's specs (built-in and test-only) covers a primitive only if some
    spec calls it: collect each spec's resolved calls from its typing."""
    used = set()
    for name in SPECS:
        spec, _, statics, _ = _case(name)
        prog = structdsl.compile(spec, backend="numpy", **statics)
        used |= {prog.types.primitive(n).name for n in _calls(prog.ir)
                 if id(n) in prog.types.primitives}
    assert used == set(primitives.PRIMITIVES), f"not exercised: {set(primitives.PRIMITIVES) - used}"


def test_an_unknown_call_is_refused_at_its_line():
    @structdsl.spec
    def uses_len(x):
        noise = atoms(x.shape[0])  # noqa: F821
        w = race(noise)  # noqa: F821
        return w
    with pytest.raises(structdsl.SpecError):
        structdsl.compile(uses_len)


def test_arity_is_checked_from_the_registry():
    @structdsl.spec
    def bad_where(n):
        noise = atoms(n)  # noqa: F821
        w = race(noise)  # noqa: F821
        y = where(w > 0, 1)  # noqa: F821  BAD
        return y
    with pytest.raises(structdsl.SpecError, match=r"where\(\) takes 3 argument\(s\), got 2") as e:
        structdsl.compile(bad_where)
    assert e.value.line == bad_where.ir.body[-1].line


def _calls(program):
    """Every call node of the program's statements and predicates."""
    stack = [program]
    seen = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ast.Call):
            yield obj
        if isinstance(obj, ast.AST):
            stack.extend(ast.iter_child_nodes(obj))
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dataclass_fields__"):
            stack.extend(getattr(obj, f) for f in obj.__dataclass_fields__)
