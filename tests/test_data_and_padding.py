"""Data parameters (read-only int/bool arrays given to compile) and ragged batches (padding
with -inf logits), each checked against an independent brute-force computation."""
import inspect
import itertools
from fractions import Fraction

import numpy as np
import pytest

import structdsl
from structdsl import SpecError, arange, atoms, race, spec, where, zeros
from shared_specs import topological_order
from structdsl.specs import arborescence, clustering, spanning_tree, top_k

TRIANGLE = ((0, 1, 1), (1, 0, 1), (1, 1, 0))     # a tuple constant read as an int array


# ---- specs that need data ------------------------------------------------------------------
@spec(nested=True)
def partition_basis(n, group, capacity):
    """A basis of a partition matroid: at most capacity[g] items of each group g."""
    item = atoms(n)
    left = capacity                    # a writable copy (arrays are values)
    chosen = zeros(n, bool)
    for _ in range(n):
        w = race(item, lambda i: left[group[i]] > 0, allow_empty=True)
        if w < 0:
            break
        chosen[w] = True
        left[group[w]] -= 1
    return chosen


@spec(nested=True)
def tree_on_graph(n, graph):
    """Kruskal restricted to the edges of a given graph."""
    edge = atoms(n, n, valid=lambda u, v: u < v and graph[u, v])
    comp = arange(n)
    adjacency = zeros((n, n), bool)
    for _ in range(n - 1):
        u, v = race(edge, lambda u, v: comp[u] != comp[v])
        adjacency[u, v] = True
        adjacency[v, u] = True
        comp = where(comp == comp[v], comp[u], comp)
    return adjacency


@spec(nested=True)
def triangle_tree(n):
    edge = atoms(n, n, valid=lambda u, v: u < v and TRIANGLE[u, v] == 1)
    comp = arange(n)
    adjacency = zeros((n, n), bool)
    for _ in range(n - 1):
        u, v = race(edge, lambda u, v: comp[u] != comp[v])
        adjacency[u, v] = True
        comp = where(comp == comp[v], comp[u], comp)
    return adjacency


@spec
def data_as_bound(n, dag):
    item = atoms(n)
    count = 0
    for _ in range(dag):  # BAD
        w = race(item)
        count += 1
    return count


@spec
def writes_data(n, dag):
    item = atoms(n)
    w = race(item)
    dag[w, w] = True  # BAD
    return w


def bad_line(s):
    lines, first = inspect.getsourcelines(s.fn)
    return next(first + i for i, text in enumerate(lines) if "# BAD" in text)


# ---- brute force -----------------------------------------------------------------------------
def sequential_law(n, rates, members_of):
    """{winner sequence: probability} of a race program given as ``members_of(prefix)``
    (the member set of the next race, or an empty set when the program stops)."""
    law = {}

    def walk(prefix, p):
        members = [i for i in members_of(prefix) if rates[i] > 0 and i not in prefix]
        if not members:
            law[prefix] = law.get(prefix, 0) + p
            return
        total = sum(rates[i] for i in members)
        for i in members:
            walk(prefix + (i,), p * Fraction(rates[i], total))
    walk((), Fraction(1))
    return law


def test_topological_order_of_a_given_dag():
    dag = np.zeros((5, 5), bool)
    for u, v in [(0, 2), (1, 2), (2, 3), (1, 4)]:
        dag[u, v] = True
    prog = structdsl.compile(topological_order, dag=dag)
    rates = [1, 3, 2, 5, 4]
    exact = prog.enumerate(rates=np.array(rates, dtype=object))
    got = {tuple(int(x) for x in o): p for o, p in zip(exact.structure.order, exact.probs)}
    extensions = {p for p in itertools.permutations(range(5))
                  if all(p.index(u) < p.index(v) for u, v in zip(*np.nonzero(dag)))}
    want = sequential_law(5, rates, lambda pre: [i for i in range(5)
                                                 if all(u in pre for u in np.flatnonzero(dag[:, i]))])
    assert set(got) == extensions and got == want
    # the caller's array was copied: changing it does not change the compiled program
    dag[0, 1] = True
    assert prog.enumerate(rates=np.array(rates, dtype=object)).probs.tolist() == exact.probs.tolist()
    assert not prog.data["dag"].flags.writeable
    # a data shape that disagrees with the sizes is caught at that line
    with pytest.raises(SpecError, match=r"shapes \[5\] and \[n=6\] do not match"):
        prog.sample(np.zeros(6), seed=0)


def test_partition_matroid_basis():
    group = np.array([0, 0, 1, 1, 1, 2])
    capacity = np.array([1, 2, 1])
    prog = structdsl.compile(partition_basis, group=group, capacity=capacity)
    rates = [2, 1, 3, 1, 2, 4]
    exact = prog.enumerate(rates=np.array(rates, dtype=object))

    def members(prefix):
        left = capacity.copy()
        for w in prefix:
            left[group[w]] -= 1
        return [i for i in range(6) if left[group[i]] > 0]
    want = {}
    for seq, p in sequential_law(6, rates, members).items():
        key = tuple(sorted(seq))
        want[key] = want.get(key, 0) + p
    got = {}
    for chosen, p in zip(exact.structure.chosen, exact.probs):
        key = tuple(int(i) for i in np.flatnonzero(chosen))
        got[key] = got.get(key, 0) + p
    assert got == want and sum(got.values()) == 1
    assert all(np.bincount(group[list(k)], minlength=3).tolist() == capacity.tolist() for k in got)


def test_tree_on_a_given_graph_and_a_tuple_constant():
    graph = np.zeros((5, 5), bool)
    for u, v in [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4), (1, 3)]:
        graph[u, v] = True
    prog = structdsl.compile(tree_on_graph, graph=graph)
    exact = prog.enumerate(rates=np.ones((5, 5), dtype=int))
    edges = list(zip(*np.nonzero(graph)))
    trees = set()
    for subset in itertools.combinations(edges, 4):             # spanning trees by brute force
        comp = list(range(5))
        for u, v in subset:
            a, b = comp[u], comp[v]
            comp = [a if c == b else c for c in comp]
        if len(set(comp)) == 1:
            trees.add(frozenset(subset))
    got = {frozenset((int(u), int(v)) for u, v in zip(*np.nonzero(np.triu(a))))
           for a in exact.structure.adjacency}
    assert got == trees and sum(exact.probs) == 1
    tri = structdsl.compile(triangle_tree).enumerate(rates=np.ones((3, 3), dtype=int))
    assert len(tri.by_structure()) == 3


def test_data_parameter_errors():
    with pytest.raises(TypeError, match=rf"'dag' .* is used as a size, bound or shape at .*:{bad_line(data_as_bound)}"):
        structdsl.compile(data_as_bound, dag=np.zeros(3, int))
    with pytest.raises(TypeError, match="must be an int or bool array, got dtype float64"):
        structdsl.compile(topological_order, dag=np.zeros((3, 3)))
    with pytest.raises(SpecError) as info:
        structdsl.compile(writes_data, dag=np.zeros((3, 3), bool))
    assert info.value.line == bad_line(writes_data) and "is a parameter" in info.value.reason


# ---- ragged batches ----------------------------------------------------------------------------
def _drop_last_node(field, name):
    """A structure field of the padded (n + 1)-node graph restricted to the first n nodes,
    after checking that the padded node is absent."""
    f = np.asarray(field)
    if name == "adjacency" or name == "links":
        assert not f[-1].any() and not f[:, -1].any()
        return f[:-1, :-1]
    if name in ("label", "parent"):
        assert f[-1] == -1 and not (f[:-1] == len(f) - 1).any()
        return f[:-1]
    if name == "subset":
        assert not f[-1]
        return f[:-1]
    return f                                   # top_k's order: item indices are unchanged


def _law(prog, rates, drop):
    exact = prog.enumerate(rates=rates)
    out = {}
    for structure, p in exact.structure_law():
        fields = [(_drop_last_node(getattr(structure, k), k) if drop else np.asarray(getattr(structure, k)))
                  for k in structure._fields]
        key = tuple(f.tobytes() for f in fields)
        out[key] = out.get(key, 0) + p
    return out


@pytest.mark.parametrize("spec_, statics, square", [
    (spanning_tree, {}, True), (clustering, {"c": 2}, True), (arborescence, {}, True),
    (top_k, {"k": 3}, False)], ids=["spanning_tree", "clustering", "arborescence", "top_k"])
def test_a_padded_node_is_absent_and_the_law_is_the_smaller_graphs(spec_, statics, square):
    prog = structdsl.compile(spec_, **statics)
    rng = np.random.default_rng(1)
    n = 4
    shape = (n, n) if square else (n,)
    small = rng.integers(1, 5, size=shape).astype(object)
    big = np.zeros((n + 1, n + 1) if square else (n + 1,), dtype=object)
    big[tuple(slice(0, n) for _ in shape)] = small
    assert _law(prog, big, drop=True) == _law(prog, small, drop=False)


def test_mixed_batches_sample_score_and_condition():
    prog = structdsl.compile(spanning_tree)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 5))
    logits[1, 4, :] = logits[1, :, 4] = -np.inf          # lane 1: a 4-node graph, padded
    s = prog.sample(logits, sample_shape=(50,), seed=3)
    assert not s.structure.adjacency[:, 1, 4].any()
    assert ((s.trace[:, 1] >= 0).sum(-1) == 3).all() and ((s.trace[:, 0] >= 0).sum(-1) == 4).all()
    lp = prog.log_prob(s.trace, logits)
    assert np.isfinite(lp).all()
    # lane 1's traces, written on the 4-node graph, have the same log-probability there
    t = s.trace[:, 1]
    small = np.where(t >= 0, (t // 5) * 4 + t % 5, -1)[:, :3]
    np.testing.assert_allclose(prog.log_prob(small, logits[1, :4, :4]), lp[:, 1], rtol=1e-12)
    noise = prog.conditional_noise(s.trace, logits, seed=4)
    assert np.array_equal(prog.solve(noise).trace, s.trace)


def test_top_k_with_fewer_live_items_than_k_pads_the_order():
    prog = structdsl.compile(top_k, k=3)
    s = prog.sample(np.array([[0.0, 0.0, 0.0, 0.0], [0.0, -np.inf, 1.0, -np.inf]]), seed=0)
    assert sorted(s.structure.order[1].tolist()) == [-1, 0, 2]
    assert s.structure.order[1, 2] == -1 and s.structure.subset[1].tolist() == [True, False, True, False]
    assert (s.trace[1] >= 0).sum() == 2
