"""Single-linkage clustering: a spanning forest with exactly c trees ("declare your own")."""
from structdsl import arange, atoms, live, minimum, race, require, spec, where, zeros


@spec(nested=True)
def clustering(n, c):
    """Kruskal stopped at ``c`` components: a random single-linkage clustering.

    Atoms: ``[n, n]`` undirected edges ``u < v``.  Static: ``c`` clusters (``1 <= c <= n``).
    Structure: ``links`` (bool ``[n, n]``, symmetric forest adjacency) and ``label`` (int
    ``[n]``, each node's cluster named by its smallest node).  Each forest has ``(n-c)!``
    traces.

    Padding: a node whose every edge is at logit -inf is absent (label -1, no links) and
    does not count: the c clusters are made of the present nodes.  If the live edges leave
    more than c components, the clustering stops there (more than c clusters).
    """
    edge = atoms(n, n, valid=lambda u, v: u < v)
    require(1 <= c <= n, "clustering needs 1 <= c <= n clusters")
    ok = live(edge)
    present = zeros(n, bool)
    for u in range(n):
        present[u] = any(ok[u]) or any(ok[:, u]) or n == 1
    label = where(present, arange(n), -1)
    links = zeros((n, n), bool)
    for j in range(n - c):
        if j >= sum(present) - c:
            break                          # c clusters of the present nodes
        u, v = race(edge, lambda u, v: label[u] != label[v], allow_empty=True)
        if u < 0:
            break                          # the live edges allow no further merge
        links[u, v] = True
        links[v, u] = True
        merged = (label == label[u]) | (label == label[v])
        label = where(merged, minimum(label[u], label[v]), label)
    return links, label
