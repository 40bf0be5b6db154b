"""structdsl.symbolic: exact laws with symbolic rates, normalisation shown by simplification,
and closed forms derived by hand."""
import itertools

import numpy as np
import pytest

sympy = pytest.importorskip("sympy")

from structdsl import specs, symbolic  # noqa: E402

CASES = {"categorical": ((5,), {}), "top_k": ((5,), {"k": 2}), "permutation": ((4,), {}),
         "spanning_tree": ((4, 4), {}), "arborescence": ((4, 4), {}), "binary_tree": ((5,), {}),
         "matching": ((3, 3), {}), "clustering": ((4, 4), {"c": 2})}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_built_in_law_sums_to_exactly_one(name):
    shape, static = CASES[name]
    law = symbolic.law(getattr(specs, name), shape, **static)
    assert law.total() == 1 and law.is_normalised()
    # the same law at numbers: the reference's exact Fractions, trace by trace
    rng = np.random.default_rng(0)
    rates = rng.integers(1, 5, size=shape)
    exact = law.program.enumerate(rates=rates)
    assert len(exact) == len(law)
    for i in range(len(law)):
        assert law.at(law.probs[i], rates) == sympy.Rational(exact.probs[i].numerator, exact.probs[i].denominator)


def test_a_law_missing_a_trace_is_not_normalised():
    law = symbolic.law(specs.permutation, (4,))
    law.traces, law.factors, law.probs = law.traces[1:], law.factors[1:], law.probs[1:]
    assert not law.is_normalised()


def test_k4_spanning_tree_law_at_equal_rates_matches_the_hand_count():
    """Kruskal on K4 with equal rates, by hand: a star's three edges win races of 6, then
    5, then 3 crossing edges, with 3, 2, 1 of them its own: 1/2 * 2/5 * 1/3 = 1/15; the 12
    paths share the rest, 11/180 each."""
    law = symbolic.law(specs.spanning_tree, (4, 4))
    ones = np.ones((4, 4), dtype=int)
    by_tree = {}
    for i, p in enumerate(law.probs):
        key = law.structure.adjacency[i].tobytes()
        by_tree[key] = by_tree.get(key, 0) + law.at(p, ones)
    by_shape = {}
    for key, p in by_tree.items():
        degree = np.frombuffer(key, dtype=bool).reshape(4, 4).sum(1)
        by_shape.setdefault("star" if degree.max() == 3 else "path", []).append(p)
    assert by_shape["star"] == [sympy.Rational(1, 15)] * 4
    assert by_shape["path"] == [sympy.Rational(11, 180)] * 12


def test_k4_star_law_matches_its_closed_form_in_the_rates():
    """The star at node 0 (edges a, b, c to nodes 1, 2, 3), by hand: its first edge x wins
    against all six edges; then every edge but x crosses; last, node z's three edges."""
    law = symbolic.law(specs.spanning_tree, (4, 4))
    r = {(u, v): law.rates[(u, v)] for u, v in itertools.combinations(range(4), 2)}
    total = sum(r.values())
    want = 0
    for x, y, z in itertools.permutations((1, 2, 3)):
        last = r[(0, z)] + r[tuple(sorted((x, z)))] + r[tuple(sorted((y, z)))]
        want += r[(0, x)] / total * r[(0, y)] / (total - r[(0, x)]) * r[(0, z)] / last
    adjacency = np.zeros((4, 4), dtype=bool)
    adjacency[0, 1:] = adjacency[1:, 0] = True
    got = law.probability_of(adjacency=adjacency)
    assert got == sympy.cancel(sympy.together(want))      # both in canonical p/q form
    assert "r_{0,1}" in law.latex(got)


def test_binary_tree_law_is_the_product_over_subtrees():
    """The Cartesian tree of exponential noise: each node is the first of its subtree's
    span to fire, so P(tree) = product over nodes of rate(node) / sum of its span's rates."""
    n = 5
    law = symbolic.law(specs.binary_tree, (n,))
    r = [law.rates[(i,)] for i in range(n)]
    laws = law.structure_law()
    assert len(laws) == 42                                  # Catalan(5)

    def span(node, left, right):
        lo = hi = node
        if left[node] >= 0:
            lo = span(left[node], left, right)[0]
        if right[node] >= 0:
            hi = span(right[node], left, right)[1]
        return lo, hi

    for s, p in laws:
        want = 1
        for node in range(n):
            lo, hi = span(node, s.left, s.right)
            want *= r[node] / sum(r[lo:hi + 1])
        assert sympy.cancel(sympy.together(p - want)) == 0


def test_law_records_the_members_of_every_race():
    """``law.members``: per trace, per race, the flat atoms that raced; each factor is the
    winner's rate over their total (Kruskal on K4: 6 edges, then 5, then 3 or 4)."""
    law = symbolic.law(specs.spanning_tree, (4, 4))
    symbol = {int(np.ravel_multi_index(idx, (4, 4))): s for idx, s in law.rates.items()}
    sizes = set()
    for trace, factors, members in zip(law.traces, law.factors, law.members):
        winners = [int(w) for w in trace if w >= 0]
        assert len(winners) == len(factors) == len(members) == 3
        for w, f, m in zip(winners, factors, members):
            assert w in m and m <= set(symbol)
            assert sympy.cancel(f - symbol[w] / sum(symbol[a] for a in m)) == 0
        sizes.add(tuple(len(m) for m in members))
    assert sizes == {(6, 5, 3), (6, 5, 4)}
