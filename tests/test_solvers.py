"""``solve`` on raw weights against independent, well-known solvers (docs/design.md 2)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_solvers as ref
import structdsl
from structdsl import specs

CASES = [
    (specs.categorical, {}, 1, ref.categorical),
    (specs.permutation, {}, 1, ref.permutation),
    (specs.top_k, {"k": 3}, 1, lambda w: ref.top_k(w, 3)),
    (specs.spanning_tree, {}, 2, ref.spanning_tree),
    (specs.arborescence, {}, 2, ref.arborescence),
    (specs.arborescence, {"root": 2}, 2, lambda w: ref.arborescence(w, 2)),
    (specs.binary_tree, {}, 1, ref.cartesian_tree),
    (specs.matching, {}, 2, ref.greedy_matching),
    (specs.clustering, {"c": 2}, 2, lambda w: ref.single_linkage(w, 2)),
    (specs.clustering, {"c": 3}, 2, lambda w: ref.single_linkage(w, 3)),
]
IDS = [f"{c[0].name}{c[1] or ''}" for c in CASES]


@pytest.mark.parametrize("spec, statics, ndim, reference", CASES, ids=IDS)
@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 9), seed=st.integers(0, 2**32 - 1))
def test_solve_matches_reference(spec, statics, ndim, reference, n, seed):
    w = np.random.default_rng(seed).exponential(size=(n,) * ndim)
    prog = structdsl.compile(spec, **statics)
    got = prog.solve(w).structure
    want = reference(w)
    for field, value in want.items():
        np.testing.assert_array_equal(getattr(got, field), value, err_msg=f"field {field}")


@pytest.mark.parametrize("spec, statics, ndim, reference", CASES[:6], ids=IDS[:6])
def test_solve_is_batched(spec, statics, ndim, reference):
    """A batch of weights gives the same as solving each one alone."""
    w = np.random.default_rng(3).normal(size=(2, 3) + (6,) * ndim)
    prog = structdsl.compile(spec, **statics)
    sol = prog.solve(w)
    assert sol.trace.shape == (2, 3, prog.max_races((6,) * ndim))
    for i in range(2):
        for j in range(3):
            one = prog.solve(w[i, j])
            assert np.array_equal(one.trace, sol.trace[i, j])
            for a, b in zip(one.structure, sol.structure):
                assert np.array_equal(a, b[i, j])


def test_spanning_tree_on_large_graph_matches_networkx():
    w = np.random.default_rng(11).exponential(size=(40, 40))
    got = structdsl.compile(specs.spanning_tree).solve(w).structure.adjacency
    assert np.array_equal(got, ref.spanning_tree(w)["adjacency"])


def test_prim_written_as_races_is_valid_but_not_the_mst_law():
    """docs/design.md 2's converse trap: Prim as races keeps the invariant (it verifies and its
    enumeration sums to one) yet its law differs from Kruskal's, because losers carry shifts."""
    from fractions import Fraction
    from structdsl import atoms, race, spec, zeros

    @spec
    def prim(n):
        edge = atoms(n, n, valid=lambda u, v: u != v)
        in_tree = zeros(n, bool)
        in_tree[0] = True
        adjacency = zeros((n, n), bool)
        for _ in range(n - 1):
            u, v = race(edge, lambda u, v: in_tree[u] and not in_tree[v])
            adjacency[u, v] = True
            adjacency[v, u] = True
            in_tree[v] = True
        return adjacency

    n = 4
    rates = np.ones((n, n), dtype=int).astype(object)
    p = structdsl.compile(prim).enumerate(rates=rates)
    k = structdsl.compile(specs.spanning_tree).enumerate(rates=rates)
    assert sum(p.probs, Fraction(0)) == 1
    law_p = {key: v for key, v in p.by_structure().items()}
    law_k = {key: v for key, v in k.by_structure().items()}
    assert set(law_p) == set(law_k)          # the same 16 trees ...
    assert law_p != law_k                    # ... with a different law
