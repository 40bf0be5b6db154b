"""Spanning trees with the law of the minimum spanning tree of exponential edge weights:
Kruskal's algorithm as exponential races."""
from structdsl import arange, atoms, race, spec, where, zeros


@spec(nested=True)
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
