"""Binary trees over ordered positions: the Cartesian tree of the noise, divide and conquer."""
from structdsl import arange, atoms, full, race_groups, spec, where, zeros


@spec(nested=True)
def binary_tree(n):
    """Race a span; its winner is the root; recurse on both sides.

    All open spans race at once (one group per span, keyed by the span's first position),
    so each round roots every span of one tree level.

    Atoms: ``[n]`` positions.  Structure: ``parent`` (int ``[n]``, root's parent -1),
    ``left`` and ``right`` (int ``[n]``, children, -1 if none).  One-to-one with traces;
    there are Catalan(n) trees.
    """
    pos = atoms(n)
    start = zeros(n, int)        # first position of the open span holding each position
    up = full(n, -1)             # the root whose split made that span (-1: the whole range)
    parent = full(n, -1)
    placed = zeros(n, bool)
    for _ in range(n):
        root = race_groups(pos, start, groups=n)     # root[s]: winner of the span starting at s
        r = root[start]                              # this round's root of each position's span
        won = r == arange(n)
        parent = where(won, up, parent)
        placed = placed | won
        if all(placed):
            break
        up = where(r >= 0, r, up)
        start = where(arange(n) > r, r + 1, start)
    left = full(n, -1)
    right = full(n, -1)
    for i in range(n):
        p = parent[i]
        if p >= 0:
            if i < p:
                left[p] = i
            else:
                right[p] = i
    return parent, left, right
