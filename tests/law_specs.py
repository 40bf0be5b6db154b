"""Specs used by test_laws.py to show that a valid race program need not have the law its
author meant.  ``prim_tree`` is printed verbatim in the README ("Which law do you get");
test_laws.py checks that both copies stay identical.
"""
from structdsl import atoms, race, spec, zeros


@spec
def prim_tree(n):
    """Prim as races: race the edges with exactly one endpoint in the tree (node 0 first)."""
    edge = atoms(n, n, valid=lambda u, v: u < v)
    in_tree = zeros(n, bool)
    in_tree[0] = True
    adjacency = zeros((n, n), bool)
    for _ in range(n - 1):
        a, b = race(edge, lambda u, v: in_tree[u] != in_tree[v])
        adjacency[a, b] = True
        adjacency[b, a] = True
        in_tree[a] = True
        in_tree[b] = True
    return adjacency
