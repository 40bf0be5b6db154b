"""One meaning per construct: hostile and careless specs.

Each bad spec marks its offending line with ``# BAD``.  Compile-time problems must raise a
``SpecError`` naming this file and exactly that line; run-time problems must raise a
structdsl ``RaceError`` subclass naming that line and the batch element.
"""
import collections
import enum
import functools
import inspect
import pydoc
from fractions import Fraction

import numpy as np
import pytest

import structdsl
from conformance import BACKENDS, assert_conforms, assert_refused_everywhere
from structdsl import (EmptyRaceError, EnumerationLimitError, SpecError, SpecIndexError,
                       SpecOverflowError, SpecZeroDivisionError, arange, atoms, full, maximum,
                       race, race_groups, spec, where, zeros)

K = 3                                           # a plain int constant


class Sneaky(int):
    """An int whose repr would inject code if the compiler parsed it."""
    calls = 0

    def __repr__(self):
        Sneaky.calls += 1
        return "__rt.residual"


SNEAKY = Sneaky(2)
Color = enum.IntEnum("Color", "RED GREEN")
Pair = collections.namedtuple("Pair", "a b")
PAIR = Pair(1, 2)
TABLE = ((0, 1, 1), (1, 0, 1), (1, 1, 0))       # a tuple constant: a read-only int array


def bad_line(s):
    lines, first = inspect.getsourcelines(inspect.unwrap(s.fn))
    hits = [first + i for i, text in enumerate(lines) if "# BAD" in text]
    assert len(hits) == 1, f"spec {s.name} must mark exactly one line with # BAD"
    return hits[0]


def assert_rejected(s, fragment, **statics):
    err = assert_refused_everywhere(s, **statics)
    assert err.file == __file__, err.file
    assert err.line == bad_line(s), f"{err} (expected line {bad_line(s)})"
    assert fragment in err.reason, err.reason
    return err


def assert_runtime_error(cls, s, logits, lane, fragment, **statics):
    """Sampling raises ``cls`` naming this file, the # BAD line and batch element ``lane``."""
    prog = structdsl.compile(s, **statics)
    with pytest.raises(cls) as info:
        prog.sample(logits, seed=0)
    err = info.value
    assert err.line == bad_line(s) and err.file == __file__, str(err)
    assert err.lane == lane, str(err)
    assert f"{__file__}:{bad_line(s)}: " in str(err) and f"(batch element {lane})" in str(err)
    assert fragment in str(err), str(err)
    for backend in BACKENDS:                # the same class, line and lane everywhere
        assert_conforms(backend, s, lambda r: r.sample(logits, seed=0), statics)
    return err


# ==== holes where noise information could reach the program ===============================
@spec
def ufunc_where_keyword(n):
    item = atoms(n)
    x = arange(n)
    y = abs(x, where=False)  # BAD
    w = race(item, y > 0)
    return w


@spec
def ufunc_out_keyword_in_predicate(n):
    item = atoms(n)
    a = arange(n)
    w = race(item, lambda i: maximum(i, a, out=i) > 0)  # BAD
    return w


@spec
def sneaky_constant(n):
    item = atoms(n)
    w = race(item, lambda i: i < SNEAKY)  # BAD
    return w


@spec
def int_enum_constant(n):
    item = atoms(n)
    x = full(n, Color.RED)  # BAD
    w = race(item)
    return w, x


@spec
def enum_name_constant(n):
    item = atoms(n)
    x = zeros(n, int)
    x[0] = PAIR  # BAD
    w = race(item)
    return w, x


@spec
def handler_rebound(n):
    item = atoms(n)
    __rt = 1  # BAD
    w = race(item)
    return w


@spec
def handler_returned(n):
    item = atoms(n)
    w = race(item)
    x = __rt  # BAD
    return w, x


@spec
def handler_parameter(n, __rt):  # BAD
    item = atoms(n)
    w = race(item)
    return w


@pytest.mark.parametrize("bad, fragment", [
    (ufunc_where_keyword, "abs() takes no keyword 'where'"),
    (ufunc_out_keyword_in_predicate, "maximum() takes no keyword 'out'"),
    (sneaky_constant, "is a Sneaky (a subclass of int)"),
    (int_enum_constant, "attribute access"),
    (enum_name_constant, "is a Pair (a subclass of tuple)"),
    (handler_rebound, "reserved for the compiler"),
    (handler_returned, "reserved for the compiler"),
    (handler_parameter, "reserved for the compiler"),
], ids=lambda x: getattr(x, "name", ""))
def test_noise_holes_are_rejected(bad, fragment):
    assert_rejected(bad, fragment)
    assert Sneaky.calls == 0          # the custom repr never ran


def test_predicates_see_read_only_index_grids():
    from structdsl.specs import spanning_tree
    prog = structdsl.compile(spanning_tree)
    prog.sample(np.zeros((4, 4)), seed=0)
    for grid in prog.grids((4, 4)):
        assert not grid.flags.writeable
        with pytest.raises(ValueError):
            grid[0] = 7


# ==== per-atom predicates ==================================================================
@spec
def degree_parity(n):
    """Races edges whose endpoints both have, or both lack, a chosen edge: a reduction over
    one atom's row inside the predicate."""
    edge = atoms(n, n, valid=lambda u, v: u < v)
    adj = zeros((n, n), bool)
    for _ in range(2):
        u, v = race(edge, lambda u, v: any(adj[u]) == any(adj[v]))
        adj[u, v] = True
        adj[v, u] = True
    return adj


def _per_atom_law(rates):
    """degree_parity's trace law, computed by hand: first race all edges, second race the
    edges (u, v) with deg(u) > 0 == deg(v) > 0 after the first edge."""
    n = len(rates)
    edges = [(u, v) for u in range(n) for v in range(u + 1, n)]
    law = {}
    total = sum(rates[e] for e in edges)
    for a in edges:
        touched = set(a)
        second = [e for e in edges if e != a and ((e[0] in touched) == (e[1] in touched))]
        s2 = sum(rates[e] for e in second)
        for b in second:
            law[(a, b)] = Fraction(rates[a], total) * Fraction(rates[b], s2)
    return law


def test_a_reduction_inside_a_predicate_has_the_per_atom_meaning():
    prog = structdsl.compile(degree_parity)
    pred = next(s for s in prog.ir.body if isinstance(s, structdsl.ir.Loop)).body[0].members
    assert not prog.types.grid_safe(pred)            # evaluated atom by atom
    rates = np.triu(np.arange(1, 17).reshape(4, 4) % 5 + 1, 1).astype(object)
    exact = prog.enumerate(rates=rates)
    want = _per_atom_law(rates)
    got = {tuple(tuple(int(i) for i in np.unravel_index(w, (4, 4))) for w in t[:2]): p
           for t, p in zip(exact.traces, exact.probs)}
    assert got == want and sum(got.values()) == 1


@spec
def guarded_index(n):
    item = atoms(n)
    mark = zeros(n, bool)
    mark[0] = True
    w = race(item, lambda i: i > 0 and mark[i - 1])     # the guard holds per atom only
    return w


def test_a_short_circuit_guard_holds_per_atom():
    prog = structdsl.compile(guarded_index)
    pred = prog.ir.body[-1].members
    assert prog.types.grid_safe(pred)                 # tried on the grid, which raises...
    exact = prog.enumerate(rates=np.array([1, 2, 3, 4], dtype=object))
    assert exact.traces.tolist() == [[1]] and list(exact.probs) == [1]   # ...so per atom


def test_grid_safe_predicates_are_evaluated_on_grids():
    from structdsl.specs import matching, spanning_tree
    for s in (spanning_tree, matching):
        prog = structdsl.compile(s)
        races = [st for st in structdsl.ir.walk_statements(prog.ir.body) if isinstance(st, structdsl.ir.Race)]
        assert races and all(prog.types.grid_safe(r.members) for r in races)


# ==== types and shapes =====================================================================
@spec
def mask_read(n):
    item = atoms(n)
    w = race(item)
    x = arange(n)
    y = x[x > w]  # BAD
    return y


@spec
def identity_compare(n):
    item = atoms(n)
    w = race(item)
    same = w is K  # BAD
    return same


@spec
def int_into_bool_local(n):
    item = atoms(n)
    flag = False
    w = race(item)
    flag = w + 1  # BAD
    return flag


@spec
def shape_changes(n):
    item = atoms(n)
    x = arange(n)
    w = race(item)
    x = w  # BAD
    return x


@spec
def array_condition(n):
    item = atoms(n)
    x = zeros(n, bool)
    w = race(item)
    if x:  # BAD
        w = 0
    return w


@spec
def int_condition(n):
    item = atoms(n)
    w = race(item)
    if w:  # BAD
        w = 0
    return w


@spec
def maybe_unbound(n):
    item = atoms(n)
    w = race(item)
    if w > 0:
        y = w
    z = y + 1  # BAD
    return z


@spec
def unbound_output(n):
    item = atoms(n)
    w = race(item)
    if w > 0:
        y = w
    return w, y  # BAD


@spec
def scatter_store(n):
    item = atoms(n)
    w = race(item)
    x = zeros(n, int)
    x[arange(n)] = w  # BAD
    return x


@spec
def mismatched_shapes(n, m):
    item = atoms(n)
    w = race(item)
    x = arange(n) + arange(m)  # BAD
    return w, x


@pytest.mark.parametrize("bad, fragment", [
    (mask_read, "boolean-mask read"),
    (identity_compare, "`is` compares object identity"),
    (int_into_bool_local, "local 'flag' is bool"),
    (shape_changes, "local 'x' is int64[n]"),
    (array_condition, "an `if` condition must be one bool"),
    (int_condition, "`if` takes a bool"),
    (maybe_unbound, "local 'y' may be unbound here"),
    (unbound_output, "returned field 'y' may be unbound"),
    (scatter_store, "scatter"),
], ids=lambda x: getattr(x, "name", ""))
def test_values_without_one_type_are_rejected(bad, fragment):
    assert_rejected(bad, fragment)


def test_shape_mismatch_is_caught_once_the_sizes_are_known():
    prog = structdsl.compile(mismatched_shapes, m=4)     # n is unknown: nothing to compare yet
    prog.sample(np.zeros(4), seed=0)                     # n == m: the shapes agree
    with pytest.raises(SpecError) as info:
        prog.sample(np.zeros(5), seed=0)
    assert info.value.line == bad_line(mismatched_shapes)
    assert "shapes [n=5] and [m=4] do not match" in info.value.reason


@spec
def operator_meanings(n):
    item = atoms(n)
    w = race(item)
    t = w >= 0
    nt = ~t                           # logical not, never -2
    bits = ~w                         # bitwise not on an int
    a = arange(n) > 0
    b = arange(n) < n - 1
    both = a and b                    # elementwise on arrays
    inside = 0 < arange(n) < n - 1    # chained: elementwise too
    widened = 0
    widened = t                       # a bool stored into an int local is 0/1
    neg = ~widened                    # ...and ~ on it is bitwise: -2
    floor = (w - 7) // 2              # floor division
    rem = (w - 7) % 3                 # floor modulo
    return nt, bits, both, inside, neg, floor, rem


def test_operators_have_one_meaning():
    prog = structdsl.compile(operator_meanings)
    assert str(prog.types.locals["nt"]) == "bool" and str(prog.types.locals["both"]) == "bool[n]"
    s = prog.solve(np.array([3.0, 1.0, 2.0, 4.0]))       # the winner is item 1
    r = s.structure
    assert r.nt.item() is False or r.nt.item() == 0 and r.nt.dtype == bool
    assert int(r.bits) == ~1
    assert r.both.tolist() == [False, True, True, False]
    assert r.inside.tolist() == [False, True, True, False]
    assert int(r.neg) == -2
    assert int(r.floor) == (1 - 7) // 2 == -3 and int(r.rem) == (1 - 7) % 3 == 0


@spec
def chosen_arrays_are_values(n):
    item = atoms(n, n)
    grid = zeros((n, n), int)
    other = zeros((n, n), int)
    u, v = race(item)
    picked = grid if u >= 0 else other    # an array chosen by a scalar test is a copy...
    picked[0, 0] = 7                      # ...so this never writes `grid`
    flags = zeros(n, bool)
    chosen = flags if u >= 0 else flags | True
    chosen[0] = True
    chosen = chosen & True                # a fused, in-place update must not reach `flags` either
    return grid, picked, flags, chosen


@pytest.mark.parametrize("backend", ["numpy", "numba", "torch"])
def test_an_array_chosen_by_a_scalar_test_is_a_value(backend):
    """`a = b if c else d` binds a copy, as `a = b` does (section 3.2), on every backend."""
    if backend != "numpy":
        pytest.importorskip(backend)
    prog = structdsl.compile(chosen_arrays_are_values, backend=backend)
    logits, u = np.zeros((2, 3, 3)), np.full((2, 3, 3), 0.5)
    if backend == "torch":
        import torch
        logits, u = torch.as_tensor(logits), torch.as_tensor(u)
    r = prog.sample(logits, uniforms=u).structure
    grid, picked, flags, chosen = (np.asarray(f) for f in r)
    assert (grid == 0).all() and (picked[:, 0, 0] == 7).all()
    assert not flags.any() and chosen[:, 0].all()


def test_types_are_visible():
    from structdsl.specs import arborescence
    prog = structdsl.compile(arborescence)
    text = str(prog.types)
    assert "inside" in text and "bool[m, n]" in text and "parent" in text
    assert str(prog.types.outputs["parent"]) == "int64[n]"


# ==== checked indices and arithmetic =======================================================
@spec
def careless_minus_one(n):
    item = atoms(n)
    out = zeros(n, int)
    w = race_groups(item, lambda i: 0 if i < n - 1 else 1, groups=2)
    out[w[1]] = 1  # BAD
    return out


def test_a_minus_one_winner_used_as_an_index_names_line_and_lane():
    logits = np.zeros((2, 3, 4))
    logits[1, 2, 3] = -np.inf          # lane (1, 2): group 1 is empty, its winner is -1
    err = assert_runtime_error(SpecIndexError, careless_minus_one, logits, (1, 2),
                               "write index -1 is out of range")
    assert isinstance(err, IndexError)


@spec
def divides_by_zero(n):
    item = atoms(n)
    w = race(item)
    x = 10 // w  # BAD
    return x


@spec
def overflows(n):
    item = atoms(n)
    w = race(item)
    x = 4611686018427387904 * (w + 2)  # BAD
    return x


@spec
def overflows_in_an_array(n):
    item = atoms(n)
    w = race(item)
    x = arange(n) + w + 9223372036854775805  # BAD
    return x


def test_division_by_zero_and_overflow_raise():
    logits = np.zeros((3, 4))
    logits[2, 1:] = -np.inf            # lane 2: item 0 wins
    u = np.full((3, 4), 0.5)
    u[:, 0] = 0.1                      # item 0 has the largest noise: it wins only in lane 2
    prog = structdsl.compile(divides_by_zero)
    with pytest.raises(SpecZeroDivisionError) as info:
        prog.sample(logits, uniforms=u)
    assert info.value.line == bad_line(divides_by_zero) and info.value.lane == (2,)
    for s in (overflows, overflows_in_an_array):
        with pytest.raises(SpecOverflowError) as info:
            structdsl.compile(s).sample(np.zeros(4), seed=0)
        assert info.value.line == bad_line(s) and "int64 overflow" in str(info.value)


def test_an_empty_race_names_its_batch_element():
    from structdsl.specs import categorical
    logits = np.zeros((1024, 3))
    logits[517] = -np.inf
    with pytest.raises(EmptyRaceError, match=r"categorical\.py:\d+: race has no live member.*"
                                             r"\(batch element \(517,\)\)"):
        structdsl.compile(categorical).sample(logits, seed=0)


# ==== static bounds ==========================================================================
@spec
def derived_from_constant(n):
    item = atoms(n)
    k = K
    order = full(k, -1)
    for j in range(k):
        w = race(item)
        order[j] = w
    return order


@spec
def triangular_loops(n):
    cell = atoms(n, n)
    count = 0
    for i in range(n):
        for j in range(i):
            a, b = race(cell, allow_empty=True)
            count += 1
    return count


@spec
def nonlinear_bound(n):
    item = atoms(n)
    for i in range(n):
        for j in range(i * i):  # BAD
            w = race(item)
    return n


@spec
def negative_groups(n):
    item = atoms(n)
    w = race_groups(item, lambda i: 0, groups=n - 10)  # BAD
    return w


def test_static_bounds():
    prog = structdsl.compile(derived_from_constant)          # `k = K`: no NameError
    assert prog.max_races((5,)) == K
    assert sorted(prog.solve(np.array([5.0, 1, 4, 2, 3])).trace.tolist()) == [1, 3, 4]
    tri = structdsl.compile(triangular_loops)
    assert tri.max_races((4, 4)) == 4 * 3                     # n loops of at most n - 1 races
    s = tri.sample(np.zeros((4, 4)), seed=0)
    assert int(s.structure.count) == 6 and (s.trace >= 0).sum() == 6
    assert_rejected(nonlinear_bound, "only linearly")
    with pytest.raises(ValueError, match=rf"{bad_line(negative_groups)}: .*number of groups must be >= 0"):
        structdsl.compile(negative_groups).sample(np.zeros(4), seed=0)


# ==== locations ================================================================================
def logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


@spec
@logged
def wrapped_bad(n):
    item = atoms(n)
    w = race(item)
    x = w / 2  # BAD
    return x


@spec
def constant_only_in_lambda(n):
    item = atoms(n)
    w = race(item, lambda i: i < K)
    return w


def make_indented_spec():
    @spec
    def indented(n):
        """A docstring whose second line sits at column 0:
continued here, which used to crash the dedent."""
        item = atoms(n)
        w = race(item)
        return w
    return indented


def test_locations():
    assert_rejected(wrapped_bad, "true division")               # this file, not the decorator's
    prog = structdsl.compile(constant_only_in_lambda)
    assert set(prog.enumerate(rates=np.ones(5, dtype=int)).traces[:, 0].tolist()) == {0, 1, 2}
    prog = structdsl.compile(make_indented_spec())
    assert prog.max_races((3,)) == 1


# ==== enumeration guard ==========================================================================
@spec
def many_groups(n):
    item = atoms(n)
    w = race_groups(item, lambda i: i // 3, groups=n // 3)
    return w


def test_enumeration_guard_fires_before_building_the_combinations(monkeypatch):
    from structdsl.backends import numpy_reference
    built = []
    real = numpy_reference.itertools.product

    def spy(*choices):
        built.append(int(np.prod([len(c) for c in choices])))
        return real(*choices)
    monkeypatch.setattr(numpy_reference.itertools, "product", spy)
    prog = structdsl.compile(many_groups)
    with pytest.raises(EnumerationLimitError):
        prog.enumerate(np.zeros(36), max_traces=10)              # 3**12 branches
    assert built == []                                            # no combination was built


# ==== help() shows each primitive's contract ======================================================
@pytest.mark.parametrize("name", ["atoms", "race", "race_groups", "live", "arange", "zeros", "ones",
                                  "full", "where", "minimum", "maximum", "argmin", "argmax", "require"])
def test_help_shows_the_primitives_own_contract(name):
    text = pydoc.render_doc(getattr(structdsl, name), renderer=pydoc.plaintext)
    assert f"{name}(" in text and "module docstring" not in text
    assert len(getattr(structdsl, name).__doc__) > 40


@spec
def short_table(n):
    item = atoms(n)
    seen = zeros(n - 1, bool)
    w = race(item, lambda i: not seen[i])  # BAD
    return w


@spec
def long_table(n):
    item = atoms(n)
    seen = zeros(n + 1, bool)
    seen[0] = True
    w = race(item, lambda i: not seen[i])
    return w


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_an_atom_coordinate_reads_in_range_only_where_the_array_is_long_enough(backend):
    """An atom coordinate indexes an array of its own length or longer without a check (the
    torch backend skips it; numba checks every index), and one past a shorter array's end is
    an index error."""
    pytest.importorskip(backend)
    logits = np.zeros((2, 4))
    prog = structdsl.compile(short_table, backend=backend)
    x = logits
    if backend == "torch":
        import torch
        x = torch.as_tensor(logits)
    with pytest.raises(SpecIndexError) as info:
        prog.sample(x, uniforms=np.full((2, 4), 0.5) if backend != "torch" else torch.full((2, 4), 0.5, dtype=torch.float64))
    assert info.value.line == bad_line(short_table) and info.value.lane == (0,)
    ok = structdsl.compile(long_table, backend=backend)
    u = np.array([[0.9, 0.5, 0.4, 0.3], [0.1, 0.2, 0.9, 0.3]])
    w = ok.sample(x, uniforms=u if backend != "torch" else torch.as_tensor(u)).trace
    want = structdsl.compile(long_table).sample(logits, uniforms=u).trace
    assert np.array_equal(np.asarray(w), want) and 0 not in want[:, 0]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "lockstep"])
def test_a_distributions_runtime_error_names_the_sample_and_batch_element(fast):
    """Through ``RaceDistribution``, on the CPU fast path (numba) and the lock-step path, a
    spec error names its lane in ``sample_shape + batch_shape``: here batch element (1, 2) of
    every sample (the only lane where item 0 can win) fails first in sample 0."""
    torch = pytest.importorskip("torch")
    from structdsl.torch import RaceDistribution
    logits = torch.zeros(2, 3, 4, dtype=torch.float64)
    logits[..., 0] = -np.inf                   # item 0 (whose win divides by zero) races only in (1, 2),
    logits[1, 2] = torch.tensor([0.0, -np.inf, -np.inf, -np.inf])   # alone there
    d = RaceDistribution(structdsl.compile(divides_by_zero, backend="torch"), logits, fast_cpu=fast)
    for draw in (lambda: d.sample((2,)), lambda: d.sample_and_score((2,))):
        with pytest.raises(SpecZeroDivisionError) as info:
            draw()
        assert info.value.lane == (0, 1, 2) and info.value.line == bad_line(divides_by_zero), str(info.value)
