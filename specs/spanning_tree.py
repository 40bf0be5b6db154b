"""Spanning trees with the law of the minimum spanning tree of exponential edge weights:
Kruskal's algorithm as exponential races."""
import numpy as np

from structdsl import arange, atoms, race, spec, where, zeros


def mst_by_sorting(w):
    """The minimum spanning forest of raw weights, plainly (no DSL): textbook Kruskal.

    w: float ``[n, n]``, the weight of edge ``u - v`` at ``w[u, v]`` for ``u < v`` (the
    other entries are not read); ``+inf`` marks an absent edge.  Sort the edges by weight,
    keep an edge when it joins two components (union-find).  Returns
    ``{"adjacency": bool [n, n], symmetric}``.
    """
    w = np.asarray(w, dtype=float)
    n = w.shape[0]
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    edges = sorted((w[u, v], u, v) for u in range(n) for v in range(u + 1, n) if w[u, v] < np.inf)
    adjacency = np.zeros((n, n), dtype=bool)
    for _, u, v in edges:
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[rv] = ru
            adjacency[u, v] = adjacency[v, u] = True
    return {"adjacency": adjacency}


@spec(nested=True, reference=mst_by_sorting)
def spanning_tree(n):
    """Kruskal: race the edges joining two components; the winner merges them.

    Atoms: ``[n, n]`` with one undirected edge per ``u < v`` (entries with ``u >= v`` are
    ignored).  Structure: ``adjacency`` (bool ``[n, n]``, symmetric).  Each tree has
    ``(n-1)!`` traces (every order of its edges).  The law is that of the minimum spanning
    tree of independent ``Exp(exp(logits))`` edge weights (neither uniform nor proportional
    to the product of the rates).

    Padding: edges at logit -inf are absent; when the live edges do not connect every node
    (a padded node has no live edge at all), the result is the minimum spanning forest, one
    tree per connected component, and the trace ends early.

    Reference: :func:`mst_by_sorting` (``solve`` on raw weights is the minimum spanning
    forest; ``structdsl.check.reference_certificate`` proves the law equal to the MST law).
    """
    edge = atoms(n, n, valid=lambda u, v: u < v)
    comp = arange(n)                       # component label of every node
    adjacency = zeros((n, n), bool)
    for _ in range(n - 1):
        u, v = race(edge, lambda u, v: comp[u] != comp[v], allow_empty=True)
        if u < 0:
            break                          # every live edge lies inside one component
        adjacency[u, v] = True
        adjacency[v, u] = True
        comp = where(comp == comp[v], comp[u], comp)
    return adjacency
