"""Recursion in the DSL: local functions desugared to a stack and a dispatch loop.

Recursive specs are checked against exact enumeration, independent recursions in plain
Python and the grouped-race binary tree; hostile variants are rejected at their lines.
"""
import inspect
from fractions import Fraction

import numpy as np
import pytest

import structdsl
from structdsl import (SpecError, SpecIndexError, arange, atoms, full, race, race_groups, spec,
                       where, zeros)
from structdsl.specs import binary_tree
from structdsl.testing import check_spec


# ---- specs that exist only here ---------------------------------------------------------------
@spec(nested=True)
def binary_tree_grouped(n):
    """The former built-in: every open span races at once (one group per span)."""
    pos = atoms(n)
    start = zeros(n, int)
    up = full(n, -1)
    parent = full(n, -1)
    placed = zeros(n, bool)
    for _ in range(n):
        root = race_groups(pos, start, groups=n)
        r = root[start]
        won = r == arange(n)
        parent = where(won, up, parent)
        placed = placed | won
        if all(placed):
            break
        up = where(r >= 0, r, up)
        start = where(arange(n) > r, r + 1, start)
    left = full(n, -1)
    right = full(n, -1)
    for i in range(n):
        p = parent[i]
        if p >= 0:
            if i < p:
                left[p] = i
            else:
                right[p] = i
    return parent, left, right


@spec
def bracketing(n):
    """A random binary bracketing of n leaves: race the gaps inside a span, split there."""
    gap = atoms(n, valid=lambda i: i >= 1)          # gap i lies between leaves i - 1 and i
    depth = full(n, -1)

    def split(lo, hi, d):
        if hi - lo >= 2:
            k = race(gap, lambda i: lo < i < hi)
            depth[k] = d
            split(lo, k, d + 1)
            split(k, hi, d + 1)

    split(0, n, 0)
    return depth


@spec
def bisection_height(n):
    """The height of the Cartesian tree, computed through return values."""
    pos = atoms(n)

    def height(lo, hi):
        if lo >= hi:
            return 0
        r = race(pos, lambda i: lo <= i < hi)
        a = height(lo, r)
        b = height(r + 1, hi)
        return 1 + max(a, b)

    h = height(0, n)
    return h


@spec
def zigzag(n):
    """Mutual recursion (even and odd levels) plus a helper called before any race."""
    pos = atoms(n)
    level = full(n, -1)
    visits = zeros(1, int)

    def visit():
        visits[0] += 1

    def even(lo, hi, d):
        visit()
        if lo < hi:
            r = race(pos, lambda i: lo <= i < hi)
            level[r] = d
            odd(lo, r, d + 1)
            odd(r + 1, hi, d + 1)

    def odd(lo, hi, d):
        visit()
        if lo < hi:
            r = race(pos, lambda i: lo <= i < hi)
            level[r] = d
            even(lo, r, d + 1)
            even(r + 1, hi, d + 1)

    even(0, n, 0)
    return level, visits


# ---- independent references --------------------------------------------------------------------
def cartesian_law(rates, lo, hi):
    """{(root, left law key, right law key) ...}: the Cartesian-tree law as {parent tuple: p}."""
    if lo >= hi:
        return {(): Fraction(1)}
    total = sum(rates[lo:hi])
    out = {}
    for r in range(lo, hi):
        for a, pa in cartesian_law(rates, lo, r).items():
            for b, pb in cartesian_law(rates, r + 1, hi).items():
                out[((r,) + a + b)] = out.get((r,) + a + b, 0) + Fraction(rates[r], total) * pa * pb
    return out


def bracketing_law(rates, lo, hi, d=0):
    """{((gap, depth), ...) sorted: p} by plain recursion."""
    if hi - lo < 2:
        return {(): Fraction(1)}
    gaps = range(lo + 1, hi)
    total = sum(rates[k] for k in gaps)
    out = {}
    for k in gaps:
        for a, pa in bracketing_law(rates, lo, k, d + 1).items():
            for b, pb in bracketing_law(rates, k, hi, d + 1).items():
                key = tuple(sorted(((k, d),) + a + b))
                out[key] = out.get(key, 0) + Fraction(rates[k], total) * pa * pb
    return out


def height_law(rates, lo, hi):
    if lo >= hi:
        return {0: Fraction(1)}
    total = sum(rates[lo:hi])
    out = {}
    for r in range(lo, hi):
        for a, pa in height_law(rates, lo, r).items():
            for b, pb in height_law(rates, r + 1, hi).items():
                h = 1 + max(a, b)
                out[h] = out.get(h, 0) + Fraction(rates[r], total) * pa * pb
    return out


def preorder(w, lo, hi):
    """Roots of the Cartesian tree of weights w in depth-first order (the trace)."""
    if lo >= hi:
        return []
    r = lo + int(np.argmin(w[lo:hi]))
    return [r] + preorder(w, lo, r) + preorder(w, r + 1, hi)


def law_of(prog, rates):
    e = prog.enumerate(rates=np.array(rates, dtype=object))
    return {tuple(np.asarray(f).tobytes() for f in s): p for s, p in e.structure_law()}


# ---- evidence ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_recursive_and_grouped_binary_trees_have_the_same_law(n):
    rates = [Fraction(k % 4 + 1, k % 3 + 1) for k in range(n)]
    recursive, grouped = structdsl.compile(binary_tree), structdsl.compile(binary_tree_grouped)
    a, b = law_of(recursive, rates), law_of(grouped, rates)
    assert a == b and sum(a.values()) == 1
    # and both equal the Cartesian-tree law computed by plain recursion
    e = recursive.enumerate(rates=np.array(rates, dtype=object))
    roots_first = {tuple(int(x) for x in t[t >= 0]): p for t, p in zip(e.traces, e.probs)}
    assert roots_first == cartesian_law(rates, 0, n)


def test_the_trace_is_depth_first_and_the_bounds_hold_in_the_worst_case():
    prog = structdsl.compile(binary_tree)
    rng = np.random.default_rng(0)
    for w in [rng.exponential(size=9) for _ in range(20)] + [np.arange(1.0, 10.0), np.arange(9.0, 0, -1)]:
        s = prog.solve(w)
        assert s.trace.tolist() == preorder(w, 0, 9)
    chain = prog.solve(np.arange(1.0, 10.0)).structure          # depth 9: the deepest recursion
    assert chain.parent.tolist() == [-1] + list(range(8)) and chain.right.tolist()[:8] == list(range(1, 9))
    assert prog.max_races((9,)) == 9
    text = str(prog.types)
    assert "split.lo" in text and "int64 per call (stack of 1 + n)" in text


@pytest.mark.parametrize("spec_", [bracketing, bisection_height, zigzag], ids=lambda s: s.name)
def test_recursive_specs_pass_check_spec(spec_):
    """(The recursive built-in, binary_tree, passes the battery with a reference solver on
    both backends in tests/test_battery.py.)"""
    report = check_spec(spec_, samples=2000)
    assert report.ok and report.total_probability == 1


def test_bracketing_law():
    rates = [7, 1, 2, 3, 4, 5]                        # gap 0 is invalid: its rate is ignored
    got = {}
    e = structdsl.compile(bracketing).enumerate(rates=np.array(rates, dtype=object))
    for d, p in zip(e.structure.depth, e.probs):
        key = tuple(sorted((int(k), int(d[k])) for k in range(1, 6)))
        got[key] = got.get(key, 0) + p
    assert got == bracketing_law(rates, 0, 6)
    assert len(got) == 42                              # Catalan(5) bracketings of 6 leaves


def test_return_values():
    rates = [3, 1, 4, 1, 5]
    e = structdsl.compile(bisection_height).enumerate(rates=np.array(rates, dtype=object))
    got = {}
    for h, p in zip(e.structure.h, e.probs):
        got[int(h)] = got.get(int(h), 0) + p
    assert got == height_law(rates, 0, 5)


def test_mutual_recursion_and_an_unguarded_helper():
    rates = [2, 3, 1, 4, 2]
    prog = structdsl.compile(zigzag)
    e = prog.enumerate(rates=np.array(rates, dtype=object))
    assert all(int(v[0]) == 2 * 5 + 1 for v in e.structure.visits)   # one visit per activation
    got = {}
    for level, p in zip(e.structure.level, e.probs):
        got[tuple(level.tolist())] = got.get(tuple(level.tolist()), 0) + p
    tree = structdsl.compile(binary_tree).enumerate(rates=np.array(rates, dtype=object))
    want = {}
    for parent, p in zip(tree.structure.parent, tree.probs):
        depth = []
        for i in range(5):
            d, j = 0, i
            while parent[j] >= 0:
                d, j = d + 1, parent[j]
            depth.append(d)
        want[tuple(depth)] = want.get(tuple(depth), 0) + p
    assert got == want


# ---- hostile and careless variants ---------------------------------------------------------------
@spec
def noise_passed(n):
    pos = atoms(n)

    def split(lo, hi, noise):
        if lo < hi:
            r = race(pos)
            split(lo, r, noise)

    split(0, n, pos)  # BAD
    return n


@spec
def unbounded(n):
    pos = atoms(n)
    out = zeros(n, int)

    def forever(i):
        out[0] = i
        forever(i + 1)  # BAD

    forever(0)
    return out


@spec
def call_before_race(n):
    pos = atoms(n)
    parent = full(n, -1)

    def split(lo, hi):
        if lo < hi:
            split(lo, hi - 1)  # BAD
            r = race(pos, lambda i: lo <= i < hi)
            parent[r] = 0

    split(0, n)
    return parent


@spec
def empty_race_does_not_count(n):
    pos = atoms(n)
    parent = full(n, -1)

    def split(lo, hi):
        r = race(pos, lambda i: lo <= i < hi, allow_empty=True)
        split(lo, r)  # BAD

    split(0, n)
    return parent


@spec
def call_in_a_loop(n):
    pos = atoms(n)
    parent = full(n, -1)

    def split(lo, hi):
        r = race(pos, lambda i: lo <= i < hi)
        for j in range(2):
            split(lo, r)  # BAD

    split(0, n)
    return parent


@spec
def call_in_an_expression(n):
    pos = atoms(n)

    def size(lo, hi):
        r = race(pos)
        return hi - lo

    s = 1 + size(0, n)  # BAD
    return s


@spec
def noise_returned(n):
    pos = atoms(n)

    def leak(i):
        return pos  # BAD

    x = leak(0)
    return x


@spec
def noise_captured(n):
    pos = atoms(n)

    def leak(i):
        e = pos  # BAD
        return i

    x = leak(0)
    return x


@spec
def maybe_unbound_in_function(n):
    pos = atoms(n)

    def f(lo):
        if lo > 0:
            r = race(pos)
        return r  # BAD

    x = f(1)
    return x


@spec
def bool_local(n):
    pos = atoms(n)
    out = zeros(n, int)

    def f(lo, hi):
        ok = lo < hi
        if ok:  # BAD
            out[0] = 1

    f(0, n)
    return out


@spec
def nested_def(n):
    pos = atoms(n)

    def outer(i):
        def inner(j):  # BAD
            return j
        return i

    x = outer(0)
    return x


@spec
def return_in_a_loop(n):
    pos = atoms(n)

    def f(i):
        for j in range(n):
            return j  # BAD
        return i

    x = f(0)
    return x


def bad_line(s):
    lines, first = inspect.getsourcelines(s.fn)
    return next(first + i for i, text in enumerate(lines) if "# BAD" in text)


@pytest.mark.parametrize("bad, fragment", [
    (noise_passed, "noise 'pos' passed to the local function split()"),
    (unbounded, "forever() can reach itself through this call without a race before it"),
    (call_before_race, "split() can reach itself through this call without a race"),
    (empty_race_does_not_count, "without a race before it"),
    (call_in_a_loop, "inside a loop of a local function"),
    (call_in_an_expression, "must be a statement of its own"),
    (noise_returned, "noise 'pos' returned from a local function"),
    (noise_captured, "noise 'pos' stored or aliased"),
    (maybe_unbound_in_function, "local 'r' of f() may be unbound here"),
    (bool_local, "`if` takes a bool, got int64 in `ok`"),
    (nested_def, "define local functions at the top level of the spec"),
    (return_in_a_loop, "`return` inside a loop of a local function"),
], ids=lambda x: getattr(x, "name", ""))
def test_hostile_recursive_specs_are_rejected_at_their_lines(bad, fragment):
    with pytest.raises(SpecError) as info:
        structdsl.compile(bad)
    err = info.value
    assert err.file == __file__ and err.line == bad_line(bad), str(err)
    assert fragment in err.reason, err.reason


@spec
def careless_recursion(n):
    pos = atoms(n)
    child = full(n, -1)

    def split(lo, hi, up):
        if lo < hi:
            r = race(pos, lambda i: lo <= i < hi)
            child[up] = r  # BAD
            split(lo, r, r)
            split(r + 1, hi, r)

    split(0, n, -1)
    return child


def test_a_run_time_error_inside_a_local_function_names_its_line_and_lane():
    prog = structdsl.compile(careless_recursion)
    with pytest.raises(SpecIndexError) as info:
        prog.sample(np.zeros((2, 4)), seed=0)
    err = info.value
    assert err.line == bad_line(careless_recursion) and err.lane == (0,)
    assert "write index -1 is out of range" in str(err)
