"""Exact enumeration with rational arithmetic, against counts and closed forms computed
independently of structdsl (docs/design.md 1.3 and 2)."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

import structdsl
from structdsl import specs


def ones(shape):
    return np.ones(shape, dtype=int).astype(object)


def rand_rates(shape, seed):
    rng = np.random.default_rng(seed)
    return np.array([Fraction(int(a), int(b)) for a, b in
                     zip(rng.integers(1, 9, np.prod(shape)), rng.integers(1, 5, np.prod(shape)))],
                    dtype=object).reshape(shape)


@pytest.mark.parametrize("spec, shape, statics, traces, structures", [
    (specs.spanning_tree, (4, 4), {}, 96, 16),          # K4: 16 trees (Cayley), 96 orders
    (specs.binary_tree, (5,), {}, 42, 42),              # Catalan(5)
    (specs.matching, (3, 3), {}, 36, 6),                # d = 3
    (specs.permutation, (4,), {}, 24, 24),
    (specs.top_k, (5,), {"k": 2}, 20, 20),
    (specs.categorical, (6,), {}, 6, 6),
    (specs.arborescence, (4, 4), {}, None, 16),         # rooted Cayley: n^(n-2)
    (specs.arborescence, (5, 5), {"root": 3}, None, 125),
    (specs.clustering, (4, 4), {"c": 2}, 30, 15),       # 2-tree forests of K4
])
def test_counts_and_exact_total(spec, shape, statics, traces, structures):
    prog = structdsl.compile(spec, **statics)
    e = prog.enumerate(rates=ones(shape))
    if traces is not None:
        assert len(e) == traces
    assert len(e.by_structure()) == structures
    assert sum(e.probs, Fraction(0)) == 1                 # exactly, with rationals
    assert all(isinstance(p, Fraction) and p > 0 for p in e.probs)


def test_top_k_structures_are_subsets():
    e = structdsl.compile(specs.top_k, k=2).enumerate(rates=ones((5,)))
    subsets = {tuple(np.flatnonzero(s)) for s in e.structure.subset}
    assert len(subsets) == math.comb(5, 2)
    assert all(sorted(o) == list(np.flatnonzero(s)) for o, s in zip(e.structure.order, e.structure.subset))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_categorical_closed_form(seed):
    r = rand_rates((5,), seed)
    e = structdsl.compile(specs.categorical).enumerate(rates=r)
    for idx, p in zip(e.structure.index, e.probs):
        assert p == r[idx] / sum(r)


def plackett_luce(order, r):
    p, rest = Fraction(1), list(order)
    for j, item in enumerate(order):
        p *= r[item] / sum(r[i] for i in rest)
        rest.remove(item)
    return p


@pytest.mark.parametrize("seed", [0, 1])
def test_permutation_is_plackett_luce(seed):
    r = rand_rates((4,), seed)
    e = structdsl.compile(specs.permutation).enumerate(rates=r)
    for order, rank, p in zip(e.structure.order, e.structure.rank, e.probs):
        assert p == plackett_luce(list(order), r)
        assert (rank[order] == np.arange(4)).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_is_ordered_plackett_luce_prefix(seed):
    r = rand_rates((5,), seed)
    e = structdsl.compile(specs.top_k, k=3).enumerate(rates=r)
    for order, p in zip(e.structure.order, e.probs):
        q, rest = Fraction(1), list(range(5))
        for item in order:
            q *= r[item] / sum(r[i] for i in rest)
            rest.remove(item)
        assert p == q


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_tree_probability_is_product_over_subtrees(seed):
    """Cartesian tree: each node is the first of its subtree's span to fire, so
    p(tree) = prod over nodes of rate(node) / sum of rates in its subtree."""
    n = 5
    r = rand_rates((n,), seed)
    e = structdsl.compile(specs.binary_tree).enumerate(rates=r)
    for parent, left, right, p in zip(*e.structure, e.probs):
        def subtree(v):
            if v < 0:
                return []
            return [v] + subtree(left[v]) + subtree(right[v])
        q = Fraction(1)
        for v in range(n):
            q *= r[v] / sum(r[i] for i in subtree(v))
        assert p == q
        # in-order traversal of the tree is 0..n-1 (a binary tree over ordered positions)
        root = int(np.flatnonzero(parent < 0)[0])
        def inorder(v):
            return [] if v < 0 else inorder(left[v]) + [v] + inorder(right[v])
        assert inorder(root) == list(range(n))


def kruskal_by_rank(n, order, stop_at):
    """Edges kept by plain Kruskal when edges arrive in ``order``, until ``stop_at`` components."""
    label = list(range(n))
    kept = set()
    for u, v in order:
        if len(set(label)) == stop_at:
            break
        if label[u] != label[v]:
            kept.add((u, v))
            old = label[v]
            label = [label[u] if x == old else x for x in label]
    return frozenset(kept)


@pytest.mark.parametrize("spec, statics, stop_at", [
    (specs.spanning_tree, {}, 1), (specs.clustering, {"c": 2}, 2)])
def test_kruskal_law_with_equal_rates_is_the_rank_law(spec, statics, stop_at):
    """With i.i.d. noise the Kruskal tree depends only on the ranking of the edges, a
    uniform random order: count, for each forest, the orders of the 6 edges of K4 giving it."""
    n = 4
    edges = [(u, v) for u in range(n) for v in range(u + 1, n)]
    counts = {}
    for order in itertools.permutations(edges):
        f = kruskal_by_rank(n, order, stop_at)
        counts[f] = counts.get(f, 0) + 1
    want = {f: Fraction(c, math.factorial(len(edges))) for f, c in counts.items()}
    prog = structdsl.compile(spec, **statics)
    e = prog.enumerate(rates=ones((n, n)))
    got = {}
    for i in range(len(e)):
        adj = e.structure[0][i]
        f = frozenset((u, v) for u, v in edges if adj[u, v])
        got[f] = got.get(f, 0) + e.probs[i]
    assert got == want


def test_matching_is_uniform_with_equal_rates():
    e = structdsl.compile(specs.matching).enumerate(rates=ones((3, 3)))
    probs = e.by_structure()
    assert len(probs) == 6 and set(probs.values()) == {Fraction(1, 6)}
    for m in e.structure.match:
        assert sorted(m) == [0, 1, 2]


@pytest.mark.parametrize("name", ["spanning_tree", "arborescence", "binary_tree", "matching", "top_k"])
def test_log_prob_equals_enumeration_for_every_trace(name):
    from conftest import CASES
    spec, shape, statics = CASES[name]
    prog = structdsl.compile(spec, **statics)
    r = rand_rates(shape, 7)
    e = prog.enumerate(rates=r)
    logits = np.log(r.astype(float))
    lp = prog.log_prob(e.traces, logits)
    exact = np.array([math.log(p.numerator) - math.log(p.denominator) for p in e.probs])
    np.testing.assert_allclose(lp, exact, rtol=0, atol=1e-12)
    # float enumeration agrees with the exact one
    ef = prog.enumerate(logits)
    assert np.array_equal(ef.traces, e.traces)
    np.testing.assert_allclose(ef.log_probs, exact, atol=1e-12)


def test_arborescence_structures_are_arborescences():
    e = structdsl.compile(specs.arborescence, root=1).enumerate(rates=ones((4, 4)))
    for parent in e.structure.parent:
        assert parent[1] == -1 and (np.delete(parent, 1) >= 0).all()
        for v in range(4):                       # every node reaches the root
            seen, x = set(), v
            while x != 1:
                assert x not in seen
                seen.add(x)
                x = parent[x]


def test_structure_law_groups_traces():
    e = structdsl.compile(specs.spanning_tree).enumerate(rates=ones((3, 3)))
    law = e.structure_law()
    assert len(law) == 3 and [p for _, p in law] == [Fraction(1, 3)] * 3     # K3: symmetric
    for tree, _ in law:
        assert tree.adjacency.shape == (3, 3) and tree.adjacency.sum() == 4   # 2 undirected edges
    top = structdsl.compile(specs.top_k, k=2).enumerate(rates=np.array([1, 2, 3], dtype=object))
    assert len(top.structure_law()) == 6          # (order, subset) is one-to-one with traces
    law = {}
    for s, p in top.structure_law():
        key = tuple(np.flatnonzero(s.subset))
        law[key] = law.get(key, 0) + p
    # P({i, j}) = P(i then j) + P(j then i), by hand for rates 1, 2, 3
    assert law[(1, 2)] == Fraction(2, 6) * Fraction(3, 4) + Fraction(3, 6) * Fraction(2, 3)
    assert sum(law.values()) == 1


@pytest.mark.parametrize("spec, shape, statics, races", [
    (specs.spanning_tree, (1, 1), {}, 0), (specs.arborescence, (1, 1), {}, 0),
    (specs.arborescence, (2, 2), {}, 1), (specs.binary_tree, (1,), {}, 1),
    (specs.categorical, (1,), {}, 1), (specs.matching, (1, 1), {}, 1),
    (specs.top_k, (3,), {"k": 0}, 0), (specs.clustering, (3, 3), {"c": 3}, 0),
])
def test_degenerate_sizes(spec, shape, statics, races):
    """One-node graphs, k = 0, c = n: a single (possibly empty) trace of probability one."""
    prog = structdsl.compile(spec, **statics)
    assert prog.max_races(shape) == races
    e = prog.enumerate(rates=ones(shape))
    assert len(e) == 1 and e.probs[0] == 1
    s = prog.sample(np.zeros(shape), sample_shape=(2,), seed=0)
    assert s.trace.shape == (2, races)
    assert (prog.log_prob(s.trace, np.zeros(shape)) == 0).all()
    assert prog.conditional_noise(s.trace, np.zeros(shape), seed=0).shape == (2,) + shape
