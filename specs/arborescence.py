"""Rooted spanning arborescences: Chu-Liu/Edmonds with grouped races and contraction."""
from structdsl import arange, atoms, full, live, maximum, minimum, race_groups, require, spec, where, zeros


@spec
def arborescence(n, root=0):
    """Chu-Liu/Edmonds: every open supernode races its incoming edges; cycles contract.

    Each round, every open supernode (a node, or a contracted cycle, not holding the root)
    picks its cheapest incoming edge from outside: one grouped race, keyed by supernode.
    Losers keep their residuals, which are exactly Edmonds' reduced costs.  Chosen edges
    that close a cycle are contracted into a new open supernode.  When nothing is open,
    expand: latest supernode first, keep its edge unless a kept edge already enters it.

    Atoms: ``[n, n]`` directed edges ``u -> v`` (``u != v``, no edge into ``root``).
    Static: ``root`` (default 0).  Structure: ``parent`` (int ``[n]``, ``parent[root] = -1``).
    Many traces give one arborescence.  Not nested: a contracted cycle races edges with
    different shifts.

    Padding: a node whose every edge (in and out) is at logit -inf is absent (``parent``
    -1, never a parent).  Every present node must be reachable from the root through live
    edges, or the race of its supernode runs empty (``EmptyRaceError``).
    """
    edge = atoms(n, n, valid=lambda u, v: u != v and v != root)
    require(0 <= root < n, "the root must be a node: 0 <= root < n")
    m = 2 * n                          # supernode ids: nodes 0..n-1, contracted cycles n..2n-2
    comp = arange(n)                   # outermost supernode holding each node
    inside = zeros((m, n), bool)       # inside[x, v]: node v belongs to supernode x
    for v in range(n):
        inside[v, v] = True
    ok = live(edge)
    is_open = zeros(m, bool)           # supernodes still waiting for an incoming edge
    for v in range(n):
        is_open[v] = v != root and (any(ok[:, v]) or any(ok[v]))   # absent nodes never open
    is_top = zeros(m, bool)            # supernodes not contracted into a larger one
    for v in range(n):
        is_top[v] = True
    into_u = full(m, -1)               # edge chosen for each supernode: into_u -> into_v
    into_v = full(m, -1)
    fresh = n                          # next unused supernode id
    for _ in range(n):                 # each round closes everything or contracts a cycle
        if not any(is_open):
            break
        src, dst = race_groups(
            edge, lambda u, v: comp[v] if is_open[comp[v]] and comp[u] != comp[v] else -1,
            groups=m)
        into_u = where(src >= 0, src, into_u)
        into_v = where(src >= 0, dst, into_v)
        is_open = is_open & (src < 0)
        # cycles among the chosen edges: pred[x] is the supernode x's edge comes from
        pred = where(is_top & (into_u >= 0), comp[maximum(into_u, 0)], -1)
        on_cycle = zeros(m, bool)
        walk = pred
        for _ in range(m):
            on_cycle = on_cycle | (walk == arange(m))
            # settled: every walk ended, or reached a cycle already found (then its own
            # cycle, if it is on one, was found at the same step)
            if all((walk < 0) | on_cycle[maximum(walk, 0)]):
                break
            walk = where(walk >= 0, pred[maximum(walk, 0)], -1)
        if any(on_cycle):                           # contract the chosen cycles
            label = where(on_cycle, arange(m), m)       # smallest id on each cycle names it
            for _ in range(m):
                nxt = where(on_cycle, minimum(label, label[maximum(pred, 0)]), label)
                if all(nxt == label):
                    break
                label = nxt
            for x in range(m):
                if on_cycle[x] and label[x] == x:       # contract the cycle named x
                    # its nodes: those whose outermost supernode lies on it
                    held = on_cycle[comp] & (label[comp] == x)
                    inside[fresh] = held
                    is_top = is_top & ~(on_cycle & (label == x))
                    comp = where(held, fresh, comp)
                    is_top[fresh] = True
                    is_open[fresh] = True
                    fresh += 1
    # expansion: a supernode keeps its edge unless a later kept edge enters it
    entered = zeros(n, bool)
    parent = full(n, -1)
    for i in range(m):
        x = m - 1 - i
        if into_u[x] >= 0 and not any(entered & inside[x]):
            parent[into_v[x]] = into_u[x]
            entered[into_v[x]] = True
    return parent
