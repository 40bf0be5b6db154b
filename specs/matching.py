"""Perfect bipartite matchings: race the live cells, retire the winner's row and column."""
from structdsl import atoms, full, ones, race, spec


@spec(nested=True)
def matching(d):
    """Greedy crossing-out on a ``d x d`` matrix of cells.

    Atoms: ``[d, d]`` cells (row i, column j).  Structure: ``match`` (int ``[d]``, the column
    matched to each row).  Each matching has ``d!`` traces.
    """
    cell = atoms(d, d)
    row_free = ones(d, bool)
    col_free = ones(d, bool)
    match = full(d, -1)
    for _ in range(d):
        i, j = race(cell, lambda i, j: row_free[i] and col_free[j])
        match[i] = j
        row_free[i] = False
        col_free[j] = False
    return match
