"""Top-k: k successive races over the remaining items (sampling without replacement)."""
from structdsl import atoms, full, race, require, spec, zeros


@spec(nested=True)
def top_k(n, k):
    """The first ``k`` items to fire, in order (Gumbel-top-k).

    Atoms: ``[n]`` items; static ``k <= n``.  Structure: ``order`` (int ``[k]``, winners in
    firing order) and ``subset`` (bool ``[n]``, the unordered k-subset).  Each subset has
    ``k!`` traces.  Padding: items at logit -inf never fire; with fewer than ``k`` live
    items, ``order`` ends with -1 and ``subset`` holds every live item.
    """
    item = atoms(n)
    require(0 <= k <= n, "top_k needs 0 <= k <= n")
    order = full(k, -1)
    subset = zeros(n, bool)
    for j in range(k):
        w = race(item, allow_empty=True)
        if w < 0:
            break                          # fewer than k live items
        order[j] = w
        subset[w] = True
    return order, subset
