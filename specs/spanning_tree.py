"""Uniform-law-by-weights spanning trees: Kruskal's algorithm as exponential races."""
from structdsl import arange, atoms, race, spec, where, zeros


@spec(nested=True)
def spanning_tree(n):
    """Kruskal: race the edges joining two components; the winner merges them.

    Atoms: ``[n, n]`` with one undirected edge per ``u < v`` (entries with ``u >= v`` are
    ignored).  Structure: ``adjacency`` (bool ``[n, n]``, symmetric).  Each tree has
    ``(n-1)!`` traces (every order of its edges).
    """
    edge = atoms(n, n, valid=lambda u, v: u < v)
    comp = arange(n)                       # component label of every node
    adjacency = zeros((n, n), bool)
    for _ in range(n - 1):
        u, v = race(edge, lambda u, v: comp[u] != comp[v])
        adjacency[u, v] = True
        adjacency[v, u] = True
        comp = where(comp == comp[v], comp[u], comp)
    return adjacency
