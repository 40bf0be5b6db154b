"""Binary trees over ordered positions: the Cartesian tree of the noise, by recursion."""
from structdsl import atoms, full, race, spec


@spec
def binary_tree(n):
    """Race a span; its winner is the root; recurse on both sides (depth first).

    Atoms: ``[n]`` positions.  Structure: ``parent`` (int ``[n]``, root's parent -1),
    ``left`` and ``right`` (int ``[n]``, children, -1 if none).  One-to-one with traces;
    there are Catalan(n) trees.  The trace lists the roots in depth-first order.
    """
    pos = atoms(n)
    parent = full(n, -1)
    left = full(n, -1)
    right = full(n, -1)

    def split(lo, hi, up):
        if lo < hi:
            r = race(pos, lambda i: lo <= i < hi)      # the span's root
            parent[r] = up
            if up >= 0:
                if r < up:
                    left[up] = r
                else:
                    right[up] = r
            split(lo, r, r)
            split(r + 1, hi, r)

    split(0, n, -1)
    return parent, left, right
