"""Categorical distribution: one race over all atoms (the Gumbel-max trick itself)."""
from structdsl import atoms, race, spec


@spec(nested=True)
def categorical(n):
    """One draw from ``softmax(logits)``.

    Atoms: ``[n]`` items.  Structure: ``index`` (int, shape ``[]``), the winner.
    Trace and structure are one-to-one.
    """
    item = atoms(n)
    index = race(item)
    return index
