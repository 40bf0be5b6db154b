"""Tests for the spec verifier (structdsl/frontend.py).

Each bad spec below marks its offending line with a ``# BAD`` comment; the tests check
that ``structdsl.compile`` rejects it with a ``SpecError`` naming this file, exactly that
line, and a distinctive fragment of the reason.  The positive tests check that the
constructs the DSL does allow compile and behave as documented.
"""
import inspect
import random  # noqa: F401  (read by the randomness specs below)
from fractions import Fraction

import numpy as np
import pytest

import structdsl
from conformance import assert_refused_everywhere
from structdsl import (SpecError, arange, atoms, full, ones, race, race_groups, spec, where,
                       zeros)

# ---- module-level names the specs read ---------------------------------------------------
K = 2                         # an int constant: inlined
SHAPE = (2, 3)                # a tuple of ints: also a constant
TABLE = [1, 2, 3]             # a mutable global: rejected


def helper(x):                # a plain Python helper: cannot be called from a spec
    return x


def bad_line(s):
    """The absolute line number of the single ``# BAD`` line in spec ``s``'s source."""
    lines, first = inspect.getsourcelines(s.fn)
    hits = [first + i for i, text in enumerate(lines) if "# BAD" in text]
    assert len(hits) == 1, f"spec {s.name} must mark exactly one line with # BAD"
    return hits[0]


def assert_rejected(s, fragment):
    """compile(s) raises SpecError at the # BAD line of this file, with ``fragment``."""
    err = assert_refused_everywhere(s)
    expected = bad_line(s)
    assert err.file.endswith("test_verifier.py"), err.file
    assert err.line == expected, f"{err} (expected line {expected})"
    assert fragment in err.reason, err.reason
    assert str(err).startswith(f"{err.file}:{expected}: ")
    assert str(err).endswith(err.reason)
    return err


# =========================================================================================
# Bad specs: noise leaking out of race()
# =========================================================================================
@spec
def noise_compared(n):
    edge = atoms(n, n)
    x = zeros(n, int)
    if edge > 0:  # BAD
        x[0] = 1
    return x


@spec
def noise_arithmetic(n):
    edge = atoms(n)
    x = edge * 2  # BAD
    return x


@spec
def noise_negated(n):
    edge = atoms(n)
    x = -edge  # BAD
    return x


@spec
def noise_indexed(n):
    edge = atoms(n)
    x = edge[0]  # BAD
    return x


@spec
def noise_aliased(n):
    edge = atoms(n)
    e2 = edge  # BAD
    w = race(e2)
    return w


@spec
def noise_in_tuple(n):
    edge = atoms(n)
    pair = (edge, n)  # BAD
    return pair


@spec
def noise_to_helper(n):
    edge = atoms(n)
    x = helper(edge)  # BAD
    return x


@spec
def noise_to_builtin(n):
    edge = atoms(n)
    x = sum(edge)  # BAD
    return x


@spec
def noise_to_dsl_function(n):
    edge = atoms(n)
    x = where(edge, 1, 0)  # BAD
    return x


@spec
def noise_loop_bound(n):
    edge = atoms(n)
    x = zeros(n, int)
    for _ in range(edge):  # BAD
        x[0] = 1
    return x


@spec
def noise_shape(n):
    edge = atoms(n)
    x = zeros(edge)  # BAD
    return x


@spec
def noise_returned(n):
    edge = atoms(n)
    w = race(edge)
    return w, edge  # BAD


@spec
def noise_attribute(n):
    edge = atoms(n)
    x = edge.sum()  # BAD
    return x


@spec
def noise_in_condition(n):
    edge = atoms(n)
    x = zeros(n, int)
    if edge or n:  # BAD
        x[0] = 1
    return x


@spec
def noise_in_members_lambda(n):
    edge = atoms(n)
    w = race(edge, lambda i: edge[i] > 0)  # BAD
    return w


@spec
def noise_as_members_mask(n):
    edge = atoms(n)
    w = race(edge, edge)  # BAD
    return w


@spec
def noise_reassigned(n):
    edge = atoms(n)
    edge = zeros(n, int)  # BAD
    return edge


@spec
def noise_written(n):
    edge = atoms(n)
    edge[0] += 1  # BAD
    w = race(edge)
    return w


@spec
def noise_item_assigned(n):
    edge = atoms(n)
    edge[0] = 1  # BAD
    w = race(edge)
    return w


@spec
def noise_as_index(n):
    edge = atoms(n)
    x = zeros(n, int)
    x[edge] = 1  # BAD
    return x


NOISE_LEAKS = [
    pytest.param(noise_compared, "noise 'edge' compared", id="compared"),
    pytest.param(noise_arithmetic, "noise 'edge' used in arithmetic", id="arithmetic"),
    pytest.param(noise_negated, "noise 'edge' used in arithmetic", id="unary-minus"),
    pytest.param(noise_indexed, "noise 'edge' indexed", id="indexed"),
    pytest.param(noise_aliased, "noise 'edge' stored or aliased", id="aliased"),
    pytest.param(noise_in_tuple, "noise 'edge' packed into a tuple", id="tuple"),
    pytest.param(noise_to_helper, "call to 'helper': helper functions cannot be inlined",
                 id="passed-to-helper"),
    pytest.param(noise_to_builtin, "noise 'edge' passed to sum() (helpers cannot see the noise)",
                 id="passed-to-sum"),
    pytest.param(noise_to_dsl_function, "noise 'edge' passed to where()", id="passed-to-where"),
    pytest.param(noise_loop_bound, "noise 'edge' used in a loop bound", id="loop-bound"),
    pytest.param(noise_shape, "noise 'edge' used in the shape of zeros()", id="shape"),
    pytest.param(noise_returned, "noise 'edge' returned", id="returned"),
    pytest.param(noise_attribute, "noise 'edge' used through an attribute", id="attribute"),
    pytest.param(noise_in_condition, "noise 'edge' used in a condition", id="boolop"),
    pytest.param(noise_in_members_lambda, "noise 'edge' indexed", id="in-members-lambda"),
    pytest.param(noise_as_members_mask, "noise 'edge' used as members of a race", id="as-mask"),
    pytest.param(noise_reassigned, "noise 'edge' cannot be reassigned", id="reassigned"),
    pytest.param(noise_written, "noise 'edge' cannot be written to", id="written"),
    pytest.param(noise_item_assigned, "noise 'edge' cannot be written to", id="item-assigned"),
    pytest.param(noise_as_index, "noise 'edge'", id="as-index"),
]


@pytest.mark.parametrize("bad, fragment", NOISE_LEAKS)
def test_noise_leak_rejected(bad, fragment):
    err = assert_rejected(bad, fragment)
    # every noise-leak message restates the one rule (or names the helper problem)
    assert "first argument of race()" in err.reason or "helper" in err.reason \
        or "returned" in err.reason or "reassigned" in err.reason \
        or "written to" in err.reason or "bounds and shapes" in err.reason


# =========================================================================================
# Bad specs: randomness, I/O, mutable state
# =========================================================================================
@spec
def uses_random_module(n):
    item = atoms(n)
    x = random.randint(0, n)  # BAD
    return x


@spec
def uses_random_name(n):
    item = atoms(n)
    r = random  # BAD
    return r


@spec
def uses_numpy_random(n):
    item = atoms(n)
    x = np.random.rand()  # BAD
    return x


@spec
def uses_numpy_function(n):
    item = atoms(n)
    x = np.zeros(n)  # BAD
    return x


@spec
def imports_inside(n):
    item = atoms(n)
    import random  # BAD
    w = race(item)
    return w


@spec
def calls_print(n):
    item = atoms(n)
    w = race(item)
    print(w)  # BAD
    return w


@spec
def calls_open(n):
    item = atoms(n)
    f = open("log.txt")  # BAD
    return f


@spec
def reads_mutable_global(n):
    item = atoms(n)
    x = TABLE[0]  # BAD
    return x


@spec
def declares_global(n):
    global TABLE  # BAD
    item = atoms(n)
    w = race(item)
    return w


@spec
def reads_undefined(n):
    item = atoms(n)
    x = no_such_name  # BAD  # noqa: F821
    return x


SIDE_EFFECTS = [
    pytest.param(uses_random_module, "random.randint: randomness inside a spec", id="random.randint"),
    pytest.param(uses_random_name, "module 'random': randomness inside a spec", id="random-module"),
    pytest.param(uses_numpy_random, "np.random.rand: randomness inside a spec", id="np.random.rand"),
    pytest.param(uses_numpy_function, "np.zeros: module attributes are outside the DSL",
                 id="np.zeros"),
    pytest.param(imports_inside, "imports are outside the DSL (no randomness", id="import"),
    pytest.param(calls_print, "print() is I/O", id="print"),
    pytest.param(calls_open, "open() is I/O", id="open"),
    pytest.param(reads_mutable_global, "global 'TABLE' is a mutable list", id="mutable-global"),
    pytest.param(declares_global, "`global` makes the spec depend on mutable state", id="global-stmt"),
    pytest.param(reads_undefined, "name 'no_such_name' is not defined", id="undefined"),
]


@pytest.mark.parametrize("bad, fragment", SIDE_EFFECTS)
def test_side_effect_rejected(bad, fragment):
    assert_rejected(bad, fragment)


def test_numpy_random_is_not_reported_as_plain_module_use():
    # np.random.* is flagged as randomness, np.zeros only as "module attribute"
    assert "randomness" in assert_rejected(uses_numpy_random, "np.random").reason
    assert "randomness" not in assert_rejected(uses_numpy_function, "np.zeros").reason


# =========================================================================================
# Bad specs: control flow, shapes and bounds that are not static
# =========================================================================================
@spec
def while_loop(n):
    item = atoms(n)
    w = 0
    while True:  # BAD
        w = race(item)
        break
    return w


@spec
def state_loop_bound(n):
    item = atoms(n)
    w = race(item)
    x = zeros(n, int)
    for _ in range(w):  # BAD
        x[0] = 1
    return x


@spec
def state_shape(n):
    item = atoms(n)
    w = race(item)
    z = zeros(w)  # BAD
    return z


@spec
def state_shape_tuple(n):
    item = atoms(n)
    w = race(item)
    z = full((n, w), 0)  # BAD
    return z


@spec
def state_group_count(n):
    item = atoms(n)
    w = race(item)
    g = race_groups(item, lambda i: 0, groups=w)  # BAD
    return g


@spec
def loop_not_range(n):
    item = atoms(n)
    x = zeros(n, int)
    for i in arange(n):  # BAD
        x[i] = 1
    return x


@spec
def nested_function(n):
    item = atoms(n)
    for _ in range(n):
        def pick(i):  # BAD
            return i
    w = race(item)
    return w


@spec
def recursive(n):
    item = atoms(n)
    w = recursive(n)  # BAD
    return w


@spec
def return_expression(n):
    item = atoms(n)
    comp = arange(n)
    return comp + 1  # BAD


@spec
def return_parameter(n):
    item = atoms(n)
    return n  # BAD


@spec
def return_in_middle(n):
    item = atoms(n)
    w = race(item)
    if w > 0:
        return w  # BAD
    return w


@spec
def bounded_slice(n):
    item = atoms(n)
    z = zeros(n, int)
    y = z[1:]  # BAD
    return y


DYNAMIC = [
    pytest.param(while_loop, "unbounded loop", id="while"),
    pytest.param(state_loop_bound, "a loop bound must be computed from the size/static "
                 "parameters ['n']; 'w' is not one (a state-dependent bound", id="state-loop-bound"),
    pytest.param(state_shape, "the shape of zeros() must be computed from the size/static "
                 "parameters ['n']; 'w' is not one", id="state-shape"),
    pytest.param(state_shape_tuple, "the shape of full() must be computed", id="state-shape-tuple"),
    pytest.param(state_group_count, "a group count must be computed", id="state-group-count"),
    pytest.param(loop_not_range, "loops must be `for i in range(bound):`", id="loop-not-range"),
    pytest.param(nested_function, "define local functions at the top level of the spec",
                 id="nested-def"),
    pytest.param(recursive, "call to 'recursive': helper functions cannot be inlined",
                 id="recursion"),
    pytest.param(return_expression, "return must name local variables", id="return-expr"),
    pytest.param(return_parameter, "return must name local variables", id="return-param"),
    pytest.param(return_in_middle, "`return` must be the last statement", id="early-return"),
    pytest.param(bounded_slice, "slices with bounds or steps make shapes depend on state", id="slice"),
]


@pytest.mark.parametrize("bad, fragment", DYNAMIC)
def test_dynamic_construct_rejected(bad, fragment):
    assert_rejected(bad, fragment)


# =========================================================================================
# Bad specs: misuse of atoms()/race(), arithmetic and parameters
# =========================================================================================
@spec
def race_in_expression(n):
    edge = atoms(n)
    x = race(edge) + 1  # BAD
    return x


@spec
def race_unassigned(n):
    edge = atoms(n)
    race(edge)  # BAD
    x = zeros(n, int)
    return x


@spec
def race_first_arg_not_noise(n):
    edge = atoms(n)
    comp = arange(n)
    w = race(comp)  # BAD
    return w


@spec
def members_arity_mismatch(n):
    edge = atoms(n, n)
    u, v = race(edge, lambda u: u > 0)  # BAD
    return u, v


@spec
def valid_arity_mismatch(n):
    edge = atoms(n, n, valid=lambda u, v, t: u < v)  # BAD
    u, v = race(edge)
    return u, v


@spec
def winner_unpack_mismatch(n):
    edge = atoms(n, n)
    w = race(edge)  # BAD
    return w


@spec
def race_before_atoms(n):
    w = race(edge)  # BAD
    edge = atoms(n)
    return w


@spec
def no_atoms(n):  # BAD
    x = zeros(n, int)
    return x


@spec
def atoms_in_loop(n):
    x = zeros(n, int)
    for _ in range(n):
        item = atoms(n)  # BAD
    return x


@spec
def true_division(n):
    item = atoms(n)
    half = n / 2  # BAD
    return half


@spec
def true_division_augmented(n):
    item = atoms(n)
    w = race(item)
    w /= 2  # BAD
    return w


@spec
def float_constant(n):
    item = atoms(n)
    x = full(n, 0.5)  # BAD
    return x


@spec
def list_comprehension(n):
    item = atoms(n)
    x = [i for i in n]  # BAD
    return x


@spec
def reassign_parameter(n):
    item = atoms(n)
    n = n + 1  # BAD
    w = race(item)
    return w


@spec
def parameter_as_loop_variable(n):
    item = atoms(n)
    x = zeros(n, int)
    for n in range(3):  # BAD
        x[0] = 1
    return x


MISUSE = [
    pytest.param(race_in_expression, "a race must be its own statement: `w = race(noise, ...)`",
                 id="race-in-expression"),
    pytest.param(race_unassigned, "the winner of race() must be assigned", id="race-unassigned"),
    pytest.param(race_first_arg_not_noise, "the first argument of race() must be the noise 'edge'",
                 id="race-not-noise"),
    pytest.param(members_arity_mismatch, "the members lambda takes 1 index parameter(s) but the "
                 "atoms have 2 dimension(s)", id="members-arity"),
    pytest.param(valid_arity_mismatch, "the valid lambda takes 3 index parameter(s) but the atoms "
                 "have 2 dimension(s)", id="valid-arity"),
    pytest.param(winner_unpack_mismatch, "race() over 2-d atoms returns 2 index values; unpack "
                 "them into 2 names, got one name", id="winner-unpack"),
    pytest.param(race_before_atoms, "declare the noise with atoms() before the first race",
                 id="race-before-atoms"),
    pytest.param(no_atoms, "a spec must declare its noise first", id="no-atoms"),
    pytest.param(atoms_in_loop, "atoms() must be declared at the top level", id="atoms-in-loop"),
    pytest.param(true_division, "true division makes floats: use //", id="true-division"),
    pytest.param(true_division_augmented, "true division makes floats: use //", id="div-assign"),
    pytest.param(float_constant, "constant 0.5: only int and bool constants", id="float"),
    pytest.param(list_comprehension, "list comprehensions are outside the DSL", id="listcomp"),
    pytest.param(reassign_parameter, "parameter 'n' cannot be reassigned", id="reassign-param"),
    pytest.param(parameter_as_loop_variable, "parameter 'n' cannot be reassigned",
                 id="param-loop-var"),
]


@pytest.mark.parametrize("bad, fragment", MISUSE)
def test_misuse_rejected(bad, fragment):
    assert_rejected(bad, fragment)


@spec
def two_atoms(n):
    item = atoms(n)
    other = atoms(n)  # BAD
    w = race(item)
    return w


def test_two_atoms_rejected_naming_the_first_declaration():
    err = assert_rejected(two_atoms, "a spec has one atoms() array")
    first_decl = bad_line(two_atoms) - 1      # `item = atoms(n)` sits just above
    assert f"noise is already declared at line {first_decl}:" in err.reason


def test_rejection_is_lazy_and_repeatable():
    # decorating did not raise (the module imported); spec.ir raises the same error each time
    with pytest.raises(SpecError) as first:
        noise_compared.ir
    with pytest.raises(SpecError) as again:
        structdsl.compile(noise_compared, backend="numpy")
    assert (first.value.line, first.value.reason) == (again.value.line, again.value.reason)
    assert first.value.line == bad_line(noise_compared)


def test_all_bad_specs_are_distinct_and_counted():
    cases = NOISE_LEAKS + SIDE_EFFECTS + DYNAMIC + MISUSE
    specs = [p.values[0] for p in cases] + [two_atoms]
    assert len({s.name for s in specs}) == len(specs) >= 14


# =========================================================================================
# Gaps found while writing these tests, now closed
# =========================================================================================
@spec
def state_shape_by_keyword(n):
    item = atoms(n)
    w = race(item)
    z = zeros(shape=w)  # BAD
    return z


def test_state_dependent_shape_by_keyword_rejected():
    assert_rejected(state_shape_by_keyword, "zeros() takes no keyword 'shape'")


@spec
def noise_augmented(n):
    edge = atoms(n)
    edge += 1  # BAD
    w = race(edge)
    return w


def test_noise_augmented_assignment_rejected():
    assert_rejected(noise_augmented, "noise 'edge' cannot be")


# =========================================================================================
# Allowed constructs
# =========================================================================================
@spec
def constant_rounds(n):
    item = atoms(n)
    order = full(K, -1)
    for j in range(K):
        w = race(item)
        order[j] = w
    grid = zeros(SHAPE, int)
    return order, grid


def test_module_constants_are_inlined():
    prog = structdsl.compile(constant_rounds, backend="numpy")
    assert prog.ir.constants == {"K": 2, "SHAPE": (2, 3)}
    sol = prog.solve(np.array([5.0, 1.0, 3.0, 0.5]))
    assert sol.trace.tolist() == [3, 1]                   # K = 2 races, smallest weights first
    assert sol.structure.order.tolist() == [3, 1]
    assert sol.structure.grid.shape == SHAPE
    assert prog.max_races((4,)) == K


@spec
def derived_static(n):
    item = atoms(n)
    m = 2 * n
    grid = zeros((m, n), int)
    for r in range(m):
        grid[r, r % n] = r + 1
    w = race(item)
    return grid, w


def test_derived_static_local_sizes_shapes_and_bounds():
    prog = structdsl.compile(derived_static, backend="numpy")
    assert set(prog.ir.derived) == {"m"}
    sol = prog.solve(np.array([[2.0, 1.0, 3.0], [0.5, 4.0, 1.0]]))
    grid = sol.structure.grid
    assert grid.shape == (2, 6, 3)                         # batch 2, m = 2n = 6 rows
    expected = np.zeros((6, 3), int)
    for r in range(6):
        expected[r, r % 3] = r + 1
    assert (grid == expected).all()                        # loop ran m times
    assert sol.structure.w.tolist() == [1, 0]


@spec
def derived_reassigned(n):
    item = atoms(n)
    m = 2 * n
    m = m + 1
    z = zeros(m)  # BAD
    return z


def test_derived_local_assigned_twice_is_not_static():
    assert_rejected(derived_reassigned, "'m' is not one")


@spec
def elementwise_1d(n):
    item = atoms(n)
    w = race(item, lambda i: (1 <= i < 4 and not i == 2) or (i == 5 if n > 3 else i == 0))
    return w


def members_1d(i, n):
    """Plain-Python reading of elementwise_1d's members predicate."""
    return (1 <= i < 4 and not i == 2) or (i == 5 if n > 3 else i == 0)


@pytest.mark.parametrize("n", [3, 6, 7])
def test_boolean_operators_in_members_are_elementwise(n):
    prog = structdsl.compile(elementwise_1d, backend="numpy")
    expected = {i for i in range(n) if members_1d(i, n)}
    en = prog.enumerate(rates=[1] * n)
    winners = {int(t[0]) for t in en.traces}
    assert winners == expected
    assert all(p == Fraction(1, len(expected)) for p in en.probs)   # uniform over members
    # solve: the member with the smallest weight wins even if outsiders are smaller
    weights = np.arange(n, 0, -1, dtype=float)             # the last index is globally smallest
    assert int(prog.solve(weights).trace[0]) == max(expected)


@spec
def elementwise_2d(n):
    edge = atoms(n, n, valid=lambda u, v: not u == v)
    u, v = race(edge, lambda u, v: (u < v if u == 0 else v < u) and (u + v) % 2 == 1 or u == v + 2)
    return u, v


def members_2d(u, v):
    return u != v and ((u < v if u == 0 else v < u) and (u + v) % 2 == 1 or u == v + 2)


def test_boolean_operators_in_2d_members_and_valid_are_elementwise():
    n = 4
    prog = structdsl.compile(elementwise_2d, backend="numpy")
    rates = np.arange(1, n * n + 1).reshape(n, n).tolist()     # distinct exact rates
    en = prog.enumerate(rates=rates)
    got = {tuple(int(x) for x in np.unravel_index(int(t[0]), (n, n))) for t in en.traces}
    expected = {(u, v) for u in range(n) for v in range(n) if members_2d(u, v)}
    assert got == expected
    total = sum(rates[u][v] for u, v in expected)
    for t, p in zip(en.traces, en.probs):
        u, v = np.unravel_index(int(t[0]), (n, n))
        assert p == Fraction(rates[u][v], total)             # race law: rate / member total
    assert sum(en.probs) == 1


# =========================================================================================
# Outside a compiled spec
# =========================================================================================
def test_calling_a_spec_directly_raises_type_error():
    with pytest.raises(TypeError, match=r"spec 'constant_rounds' is a declaration"):
        constant_rounds(3)


@pytest.mark.parametrize("primitive, args", [
    (atoms, (3,)), (race, (None,)), (race_groups, (None, None)), (zeros, (3,)),
    (ones, (3,)), (arange, (3,)), (where, (True, 1, 0)),
])
def test_dsl_primitive_outside_a_spec_raises_runtime_error(primitive, args):
    with pytest.raises(RuntimeError, match=rf"{primitive.__name__}\(\) only has a meaning inside "
                                           r"a compiled @spec"):
        primitive(*args)


def test_compile_rejects_a_plain_function():
    def plain(n):
        return n
    with pytest.raises(TypeError, match="compile expects a @spec-decorated function"):
        structdsl.compile(plain, backend="numpy")


# A constant read in a *store* index is inlined too (it once stayed a bare global name).
@spec
def constant_in_store_index(n):
    item = atoms(n)
    x = zeros(n, int)
    w = race(item)
    x[K - 1] = w
    x[:] += K
    return x


def test_constant_in_store_index_is_inlined():
    prog = structdsl.compile(constant_in_store_index)
    x = prog.solve(np.array([3.0, 1.0, 2.0])).structure.x
    assert x.tolist() == [2, 3, 2]          # winner 1 written at index K-1 = 1, then + K
