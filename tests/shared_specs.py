"""Specs that several test files use (each defined once, in a file, as specs must be)."""
from structdsl import atoms, full, race, spec, zeros


@spec
def topological_order(n, dag):
    """A random linear extension of a DAG given as a data parameter: race the items whose
    predecessors are placed (a per-atom reduction inside the predicate)."""
    item = atoms(n)
    placed = zeros(n, bool)
    order = full(n, -1)
    for j in range(n):
        w = race(item, lambda i: not placed[i] and not any(dag[:, i] & ~placed))
        order[j] = w
        placed[w] = True
    return order
