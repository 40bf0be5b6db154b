"""Permutation under the Plackett-Luce law: race the remaining items until none is left."""
from structdsl import atoms, full, race, spec


@spec(nested=True)
def permutation(n):
    """A ranking of all ``n`` items (Plackett-Luce).

    Atoms: ``[n]`` items (all must have finite logits).  Structure: ``order`` (int ``[n]``,
    ``order[j]`` is the item ranked j-th) and ``rank`` (int ``[n]``, its inverse).
    Trace and structure are one-to-one.
    """
    item = atoms(n)
    order = full(n, -1)
    rank = full(n, -1)
    for j in range(n):
        w = race(item)
        order[j] = w
        rank[w] = j
    return order, rank
