"""Specs that several test files use (each defined once, in a file, as specs must be)."""
import inspect

import numpy as np

import structdsl
from structdsl import arange, atoms, full, ones, race, race_groups, spec, where, zeros
from structdsl import specs as builtin


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


# ---- the backends' parity cases (tests/test_numba.py, tests/test_torch.py) ----------------
SIZES = {"categorical": (1, 7), "top_k": (2, 7), "permutation": (1, 6), "spanning_tree": (1, 6),
         "arborescence": (1, 5), "binary_tree": (1, 7), "matching": (1, 4), "clustering": (2, 6),
         "height": (1, 7), "topological": (4, 4), "pointer_jumps": (1, 5), "nested_sites": (1, 6)}
STATICS = {"top_k": {"k": 2}, "clustering": {"c": 2}}
DAG = np.array([[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=bool)


@spec
def height(n):
    """Recursive, with return values: the height of the Cartesian tree and the preorder."""
    pos = atoms(n)
    order = full(n, -1)
    count = zeros(1, int)

    def grow(lo, hi):
        if lo >= hi:
            return 0
        r = race(pos, lambda i: lo <= i < hi)
        order[count[0]] = r
        count[0] += 1
        a = grow(lo, r)
        b = grow(r + 1, hi)
        return 1 + max(a, b)

    h = grow(0, n)
    return h, order


@spec
def pointer_jumps(n):
    """Whole-array statements the numba backend fuses into loops: a gather from the very
    array being assigned (never done in place), an in-place update, a hoisted scalar read,
    arange and bool/int mixing, on a successor function drawn by one race per row."""
    succ = atoms(n, n)
    nxt = full(n, -1)
    for i in range(n):
        u, v = race(succ, lambda a, b: a == i)
        nxt[i] = v
    reach = nxt
    moved = zeros(n, int)
    for _ in range(n):
        moved = moved + (reach != arange(n))
        reach = reach[reach]
    mixed = where(reach == reach[0], moved * 2, -moved) + (nxt > reach[0])
    # reductions the numba backend fuses into loops: all() through a gather, any() over a
    # row of a 2-d local inside `a and not any(...)`, two gathers in one expression, and an
    # any() without checks that stops at its first True
    fixed = 0                             # an int local that a reduction then assigns
    fixed = all(reach[reach] == reach)
    same = zeros((n, n), bool)
    for i in range(n):
        same[i] = reach == reach[i]
    lone = 0
    for i in range(n):
        if nxt[i] != i and not any(same[i] & (nxt == i)):
            lone += 1
    both = reach[nxt] * (nxt[reach] == reach)     # int times bool (`&` of the two is refused)
    if any(moved > 1):
        lone += 10
    mixed = mixed + lone + fixed + both
    return nxt, reach, mixed


@spec(nested=True)
def nested_sites(n):
    """Nested races at three statements: one without a predicate, then two whose predicates
    read different lane locals (a bool array, its complement and a growing scalar).  The
    numba score keeps one snapshot per race and finds exit races by search across the sites;
    a window that closes ends the trace early through an empty race."""
    item = atoms(n)
    taken = zeros(n, bool)
    avail = ones(n, bool)
    order = full(n, -1)
    first = race(item)                 # a third site, without a predicate
    order[0] = first
    taken[first] = True
    avail[first] = False
    lo = 1 if first <= 1 else 0
    for k in range(n - 1):
        if k % 2 == 0:
            w = race(item, lambda i: not taken[i] and i >= lo, allow_empty=True)
        else:
            w = race(item, lambda i: i >= lo and avail[i], allow_empty=True)
        if w < 0:
            break
        order[k + 1] = w
        taken[w] = True
        avail[w] = False
        if w <= lo + 1:
            lo += 1
    return order


SPECS = {**{name: getattr(builtin, name) for name in builtin.__all__}, "height": height,
         "topological": topological_order, "pointer_jumps": pointer_jumps, "nested_sites": nested_sites}
_COMPILED = {}


def compiled(name, backend):
    """Spec ``name`` of :data:`SPECS` compiled for ``backend``, once per test session."""
    if (name, backend) not in _COMPILED:
        statics = dict(STATICS.get(name, {}))
        if name == "topological":
            statics["dag"] = DAG
        _COMPILED[name, backend] = structdsl.compile(SPECS[name], backend=backend, **statics)
    return _COMPILED[name, backend]


def structure_loss(name, n, seed, device="cpu"):
    """A fixed random function of all the structure's fields (flattened), a stand-in for a
    random loss table over the structures of spec ``name`` at size ``n``:
    ``[*lead, *fields] -> [*lead]`` (float64 torch tensors on ``device``)."""
    import torch
    prog = compiled(name, "torch")
    inst = prog.instance(atom_shape(name, n))
    dims = [len(inst.types.outputs[o].shape) for o in prog.ir.outputs]
    width = sum(int(np.prod([d.value for d in inst.types.outputs[o].shape])) for o in prog.ir.outputs)
    w = torch.as_tensor(np.random.default_rng(seed).normal(size=width), device=device)

    def f(s):
        flat = torch.cat([v.reshape(v.shape[:v.dim() - d] + (-1,)).double() for v, d in zip(s, dims)], -1)
        z = flat @ w
        return torch.cos(2.0 * z) + 0.3 * z
    return f


def atom_shape(name, n):
    return (n, n) if name in ("spanning_tree", "arborescence", "matching", "clustering", "pointer_jumps") else (n,)


# ---- grouped races, guards and augmented stores (first written for the torch backend) ----------
@spec(nested=True)
def refining_groups(n):
    """Grouped races that refine: blocks of four, then pairs inside them, then one plain race
    inside a pair; groups emptied by earlier winners and absent atoms, atoms sitting out (-1)."""
    item = atoms(n)
    quads = race_groups(item, lambda i: i // 4, groups=n, allow_empty=True)
    pairs = race_groups(item, lambda i: i // 2 if i % 4 != 3 else -1, groups=n, allow_empty=True)
    last = race(item, lambda i: i < 2, allow_empty=True)
    return quads, pairs, last


@spec(nested=True)
def crossing_groups(n):
    """Not nested: the second grouping mixes atoms of two first groups (a NestingError)."""
    item = atoms(n)
    halves = race_groups(item, lambda i: i % 2, groups=2)
    thirds = race_groups(item, lambda i: i // 3, groups=n)   # BAD
    return halves, thirds


@spec
def guarded(n):
    """Short-circuits that hold atom by atom, not on a whole grid."""
    item = atoms(n)
    w = race(item, lambda i: i > 0 and item_ok[i - 1] if i < n else False)
    v = race(item, lambda i: (i == 0) or (w // i >= 0))
    return w, v


item_ok = (True, True, True, True, True, True)


@spec
def augmented(n):
    """Augmented stores through slices and scalar indices, values broadcast from lane scalars."""
    item = atoms(n)
    x = zeros((2, n), int)
    w = race(item)
    x[0, :] += 1
    x[:, w] += 2
    x[1] += x[0] * w
    return x


# ---- errors ----------------------------------------------------------------------------------
@spec
def careless(n):
    item = atoms(n)
    out = zeros(n, int)
    w = race(item, allow_empty=True)
    out[w - 1] = 1  # BAD
    return out


@spec
def careless_vector(n):
    item = atoms(n)
    order = full(n, -1)
    w = race(item)
    order[w] = w
    out = order[order]  # BAD
    return out


@spec
def careless_reduction(n):
    item = atoms(n)
    order = full(n, -1)
    w = race(item)
    order[w] = w
    found = any((order[order] >= 0) & (order[order] == w))  # BAD
    return found


@spec
def divides(n):
    item = atoms(n)
    w = race(item)
    x = 7 // w  # BAD
    return x


@spec(nested=True)
def false_promise(n):
    item = atoms(n)
    first = race(item, lambda i: i < 2)
    second = race(item, lambda i: i >= 1)  # BAD
    return first, second


@spec
def empty(n):
    item = atoms(n)
    w = race(item, lambda i: i > n)  # BAD
    return w


def bad_line(s):
    """The line of spec ``s`` marked ``# BAD`` (exactly one)."""
    lines, first = inspect.getsourcelines(inspect.unwrap(s.fn))
    hits = [first + i for i, text in enumerate(lines) if "# BAD" in text]
    assert len(hits) == 1, f"spec {s.name} must mark exactly one line with # BAD"
    return hits[0]


