"""Single-linkage clustering: a spanning forest with exactly c trees ("declare your own")."""
from structdsl import arange, atoms, minimum, race, require, spec, where, zeros


@spec(nested=True)
def clustering(n, c):
    """Kruskal stopped at ``c`` components: a random single-linkage clustering.

    Atoms: ``[n, n]`` undirected edges ``u < v``.  Static: ``c`` clusters (``1 <= c <= n``).
    Structure: ``links`` (bool ``[n, n]``, symmetric forest adjacency) and ``label`` (int
    ``[n]``, each node's cluster named by its smallest node).  Each forest has ``(n-c)!``
    traces.
    """
    edge = atoms(n, n, valid=lambda u, v: u < v)
    require(1 <= c <= n, "clustering needs 1 <= c <= n clusters")
    label = arange(n)
    links = zeros((n, n), bool)
    for _ in range(n - c):
        u, v = race(edge, lambda u, v: label[u] != label[v])
        links[u, v] = True
        links[v, u] = True
        merged = (label == label[u]) | (label == label[v])
        label = where(merged, minimum(label[u], label[v]), label)
    return links, label
