"""Prim's algorithm as exponential races: a valid tree distribution that is NOT the law of
the minimum spanning tree of the noise.

    python -m structdsl check examples/prim_spanning_tree.py --exact 4

The verifier accepts it and the property battery passes (every race reads only the
winners so far, so the stochastic invariant holds: exact log-probabilities, samples that
fit them, a correct noise given the trace).  But it declares the reference "the minimum
spanning tree of the weights" (plain Kruskal by sorting, from the built-in spanning-tree
spec), and the check refutes that claim twice: ``solve`` on raw weights returns another
tree, and the exact law over all orderings of the noise differs, structure by structure.

Why: Prim's races are not nested.  When a node joins the tree, its edges to the outside
enter the race with their raw noise, while the edges that lost earlier races stay in with
their residuals (noise minus what has elapsed).  Textbook Prim compares raw weights and
finds the MST; Prim-as-races compares residuals with raw values.  Compare the built-in
``spanning_tree`` (Kruskal, nested), whose certificate passes.
"""
from structdsl import atoms, race, spec, zeros
from structdsl.specs.spanning_tree import mst_by_sorting


@spec(reference=mst_by_sorting)
def prim_spanning_tree(n):
    """Grow a tree from node 0: each step races the edges with exactly one endpoint in it.

    Atoms: ``[n, n]`` undirected edges ``u < v``.  Structure: ``adjacency`` (bool ``[n, n]``,
    symmetric).  Every edge must be live (an edge at logit -inf may leave a node
    unreachable, and then a race is empty).
    """
    edge = atoms(n, n, valid=lambda u, v: u < v)
    in_tree = zeros(n, bool)
    in_tree[0] = True
    adjacency = zeros((n, n), bool)
    for _ in range(n - 1):
        a, b = race(edge, lambda u, v: in_tree[u] != in_tree[v])   # the edges leaving the tree
        adjacency[a, b] = True
        adjacency[b, a] = True
        in_tree[a] = True
        in_tree[b] = True
    return adjacency
