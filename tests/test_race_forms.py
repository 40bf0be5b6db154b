"""The forms a race can take: predicate or mask members, grouped races keyed by a lambda or
an array, 1-d and 2-d atoms; each checked against exact enumeration by hand."""
from fractions import Fraction

import numpy as np

import structdsl
from structdsl import arange, atoms, race, race_groups, spec, where


@spec(nested=True)
def mask_members(n):
    item = atoms(n)
    free = arange(n) % 2 == 0          # even items only
    first = race(item, free)
    return first


def test_mask_members_race_only_the_mask():
    r = np.array([1, 2, 3, 4, 5], dtype=object)
    e = structdsl.compile(mask_members).enumerate(rates=r)
    law = {int(i): p for i, p in zip(e.structure.first, e.probs)}
    assert law == {0: Fraction(1, 9), 2: Fraction(3, 9), 4: Fraction(5, 9)}


@spec
def rows_race(n, m):
    """One grouped race per row of an n x m grid: the argmin of every row at once."""
    cell = atoms(n, m)
    i, j = race_groups(cell, lambda i, j: i, groups=n)   # key broadcasts over j
    pick = j
    return pick


def test_grouped_race_over_rows_is_independent_per_row():
    r = np.array([[1, 2], [3, 1], [1, 1]], dtype=object)
    prog = structdsl.compile(rows_race, m=2)
    e = prog.enumerate(rates=r)
    assert len(e) == 8 and sum(e.probs) == 1
    for pick, p in zip(e.structure.pick, e.probs):
        want = Fraction(1)
        for row in range(3):
            want *= Fraction(r[row, pick[row]], sum(r[row]))
        assert p == want
    # winners are recorded in group order: row 0's winner first
    assert all((t[:3] // 2 == [0, 1, 2]).all() for t in e.traces)
    # and solve takes each row's argmin
    w = np.array([[0.5, 0.1], [0.2, 0.9], [0.3, 0.4]])
    assert prog.solve(w).structure.pick.tolist() == [1, 0, 0]


@spec
def two_stage(n):
    """A grouped race keyed by an array, then a plain race among the group winners' rivals."""
    item = atoms(n)
    key = where(arange(n) < n // 2, 0, 1)
    w = race_groups(item, key, groups=2)
    last = race(item, lambda i: i >= n // 2)    # the second half, minus its retired winner
    return w, last


def test_residuals_carry_across_races():
    """The second race's members lost the first race: by memorylessness their residuals
    are fresh, so the second race is again a softmax over the remaining rates."""
    r = np.array([1, 1, 2, 3, 5], dtype=object)
    prog = structdsl.compile(two_stage)
    e = prog.enumerate(rates=r)
    assert sum(e.probs) == 1
    for (a, b), last, p in zip(e.structure.w, e.structure.last, e.probs):
        want = Fraction(r[a], 2) * Fraction(r[b], 10) * Fraction(r[last], 10 - r[b])
        assert p == want
    # sampling agrees with the enumeration on the joint law of (w, last)
    s = prog.sample(np.log(r.astype(float)), sample_shape=(20000,), seed=0)
    for (a, b), last, p in zip(e.structure.w, e.structure.last, e.probs):
        freq = np.mean((s.structure.w[:, 0] == a) & (s.structure.w[:, 1] == b) & (s.structure.last == last))
        assert abs(freq - float(p)) < 4 * np.sqrt(float(p) * (1 - float(p)) / 20000) + 1e-4


def test_lowered_source_is_readable_python():
    from structdsl.specs import spanning_tree
    src = structdsl.compile(spanning_tree).source
    # the race's members: a grid version and a per-atom version of the user's lambda, with
    # every index checked (no wrap-around) and the arithmetic checked for overflow
    assert "__rt.race(0, __P(lambda u, v: __get(comp, (u,)) != __get(comp, (v,)), " in src
    assert "for _ in range(__sub(n, 1)):" in src
    compile(src, "<lowered>", "exec")          # valid Python
