"""The numba backend means what the NumPy reference means, at the edges of every run-time
check: int64 overflow (scalars, arrays, fused loops, augmented assignments), shift counts,
the order in which a statement's errors are found, errors inside predicates, the static
bound on the number of races, race_groups' key range and empty races, nesting, leftover
winners and the checks the recursion pass inserts (``ir.Fail``).

Each test compares numba against the reference from identical uniforms: the same result, or
the same error class, message, spec line (marked ``# BAD <tag>`` below) and batch element.
The specs are compiled once per module (a Numba compilation takes seconds); static
parameters select the case, since sizes and static values are run-time arguments of the
compiled code.
"""
import copy
import dataclasses
import inspect

import numpy as np
import pytest

import structdsl
from structdsl.program import naming_lanes
from structdsl import (EmptyRaceError, NestingError, RaceError, SpecOverflowError, SpecValueError, arange, atoms,
                       full, ir, ones, race, race_groups, spec, where, zeros)
from structdsl import specs as builtin

pytest.importorskip("numba")

MAX = 9223372036854775807          # int64's largest value (a module constant, inlined)
I64_MIN = -2**63


@spec
def hostile(n, op=0, k=0):
    """One race, then the operation ``op`` selects; ``k`` is its operand.  Every case
    fails for some winners only, so the batch element matters."""
    item = atoms(n)
    w = race(item)
    d = zeros(n, int)                  # [0, w, 0, ...]
    d[1] = w
    a = zeros(n, int)
    m = zeros((2, n), int)
    m[0, 0] = k
    y = 0
    if op == 0:
        y = k + w  # BAD add
    elif op == 1:
        y = k - w  # BAD sub
    elif op == 2:
        y = k * (w + 1)  # BAD mul
    elif op == 3:
        y = (k + w) // -1  # BAD floordiv
    elif op == 4:
        y = -(k + w)  # BAD neg
    elif op == 5:
        y = abs(k + w)  # BAD abs
    elif op == 6:
        y = (w + 1) << k  # BAD lshift
    elif op == 7:
        y = w << (k - w)  # BAD count
    elif op == 8:
        y = (w - 3) >> k + (d[1] >> k) - (7 >> k)      # counts past 63 shift everything out
    elif op == 9:
        y = k
        y += w  # BAD augadd
    elif op == 10:
        d[1] *= k  # BAD augmul
    elif op == 11:
        a = d + k  # BAD fused
    elif op == 12:
        m = m * (w + 1)  # BAD array2d
    elif op == 13:
        d[0] = k
        y = sum(d)  # BAD sum
    elif op == 24:
        d[0] = k
        d[1] = -w
        y = sum(d)  # BAD negsum
    elif op == 25:
        d[0] = k
        d[2] = -k
        y = sum(d)                     # a partial sum wraps, the total fits
    elif op == 14:
        a = where(d < 0, d + k, d)  # BAD unchosen
    elif op == 15:
        a[0] = 1
        a[1] = k * min(w, 1)
        b = zeros(n, int)
        b[0] = MAX - 1
        a = a * 2 + b  # BAD order
    elif op == 16:
        g = zeros(n, int)
        g[1] = n + w
        h = zeros(n, int)
        h[0] = -1 - w
        a = d[g] + d[h]  # BAD gathers
    elif op == 17:
        w2 = race(item, lambda i: d[i + w] >= 0)  # BAD pred
        y = w2
    elif op == 18:
        y = where(w > n, d[w + n - 2], 0)  # BAD where
    elif op == 19:
        d[d[w + n - 2]] = d[k]  # BAD store
    elif op == 20:
        y = m[k, d[w + n - 2]]  # BAD index
    elif op == 21:
        a = d >> (d - 1)  # BAD shifts
    elif op == 22:
        a = d * k if w > 2 else d  # BAD lazy
    elif op == 23:
        a = (d - k) // (d - w)  # BAD division
    elif op == 30:
        for j in range(n - 1):
            x = race(item, allow_empty=True)  # BAD bound
            if x < 0:
                break
            y = y + x
    return y, a, m


@spec(nested=True)
def grouped(n, g=2, shift=0, mode=0):
    """Nested grouped races (the generic path checks the promise): ``mode`` picks the case."""
    item = atoms(n)
    total = 0
    if mode == 0:
        a = race_groups(item, lambda i: i % 2 + shift, groups=g)  # BAD key
        total = a[0]
    elif mode == 1:
        b = race_groups(item, lambda i: -1, groups=g)  # BAD empty
        total = b[0]
    elif mode == 2:
        c = race_groups(item, lambda i: i % 2 if i < 4 else -1, groups=2)
        e = race_groups(item, lambda i: 0 if i == 2 + c[0] else -1, groups=1)  # BAD nest
        total = e[0]
    elif mode == 3:
        for _ in range(2):
            f = race_groups(item, lambda i: i % 2, groups=2, allow_empty=True)  # BAD bound
            total = total + f[0]
    return total


@spec(nested=True)
def below(n):
    """Record lows: each race's members are the atoms below the last winner (nested, with a
    predicate: the snapshot replay)."""
    item = atoms(n)
    top = n
    order = full(n, -1)
    for j in range(n):
        w = race(item, lambda i: i < top, allow_empty=True)  # BAD below
        if w < 0:
            break
        top = w
        order[j] = w
    return order


@spec(nested=True)
def shrinking(n):
    """Every live atom, one at a time (nested, with a mask: the exit-race replay)."""
    item = atoms(n)
    left = ones(n, bool)
    order = full(n, -1)
    for j in range(n):
        w = race(item, left, allow_empty=True)  # BAD shrink
        if w < 0:
            break
        left[w] = False
        order[j] = w
    return order


# ---- helpers ------------------------------------------------------------------------------
def bad_line(s, tag):
    lines, first = inspect.getsourcelines(inspect.unwrap(s.fn))
    hits = [first + i for i, text in enumerate(lines) if text.rstrip().endswith(f"# BAD {tag}")]
    assert len(hits) == 1, f"spec {s.name} must mark exactly one line with '# BAD {tag}'"
    return hits[0]


_COMPILED = {}


def programs(s, **statics):
    """(numba, numpy) programs of spec ``s``; Numba compiles each spec once (its static values
    are run-time arguments)."""
    key = (s.name, tuple(sorted(statics.items())))
    if key not in _COMPILED:
        _COMPILED[key] = tuple(structdsl.compile(s, backend=b, **statics) for b in ("numba", "numpy"))
    return _COMPILED[key]


def outcome(fn):
    """What a call means: its values, or its error (class, spec line, lane, message)."""
    try:
        out = fn()
    except RaceError as exc:
        assert exc.file == __file__ or exc.file.endswith(".py"), exc.file
        return type(exc), exc.line, exc.lane, str(exc)
    if hasattr(out, "structure"):
        out = (out.trace, *out.structure)
    return [np.asarray(x).tolist() for x in (out if isinstance(out, tuple) else (out,))]


def same(fast, ref, call):
    """``call(program)`` means the same on numba as on the reference; returns the meaning."""
    a, b = outcome(lambda: call(fast)), outcome(lambda: call(ref))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):   # values: floats to rounding
        for x, y in zip(a, b):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype.kind == y.dtype.kind == "f":
                np.testing.assert_allclose(x, y, rtol=1e-12)
            else:
                np.testing.assert_array_equal(x, y)
        return b
    assert a == b, f"\nnumba: {a}\nnumpy: {b}"
    return b


def winners_first(shape, winners):
    """Uniforms under which lane ``b``'s atom ``winners[b]`` fires first (flat index), the
    others later in index order."""
    A = int(np.prod(shape))
    u = np.tile(np.linspace(0.01, 0.5, A), (len(winners), 1))
    for b, w in enumerate(winners):
        u[b, w] = 0.999
    return u.reshape((len(winners),) + tuple(shape))


def with_bound(prog, shape, max_races):
    """``prog`` specialised to ``shape`` with its static race bound lowered to
    ``max_races`` (as if the bound were wrong): the run must stop with RaceError."""
    inst = prog.instance(shape)
    prog._instances[shape] = dataclasses.replace(inst, max_races=max_races)
    return prog


# ---- int64 overflow, shift counts, the order of a statement's errors ------------------------
CASES = [  # (op, k, tag): hostile(op=op, k=k) fails at '# BAD tag' for some winners
    (0, MAX - 1, "add"), (1, I64_MIN + 1, "sub"), (2, 2**62, "mul"), (2, -2**62, "mul"),
    (3, I64_MIN, "floordiv"), (4, I64_MIN, "neg"), (5, I64_MIN, "abs"), (6, 62, "lshift"),
    (6, 63, "lshift"), (6, 64, "lshift"), (7, 1, "count"), (8, 100, None), (9, MAX - 1, "augadd"),
    (10, 2**62, "augmul"), (11, MAX - 1, "fused"), (12, 2**62, "array2d"), (13, MAX - 1, "sum"),
    (24, I64_MIN + 1, "negsum"), (25, MAX, None), (14, MAX - 1, "unchosen"), (15, 2**62, "order"), (16, 0, "gathers"),
    (17, 0, "pred"), (18, 0, "where"), (19, -5, "store"), (20, 5, "index"), (21, 0, "shifts"),
    (22, 2**62, "lazy"), (23, I64_MIN, "division"),
]


@pytest.mark.parametrize("op, k, tag", CASES, ids=[f"{t or 'none'}-{k}" for _, k, t in CASES])
def test_every_check_means_what_the_reference_means(op, k, tag):
    """Each winner alone, then all of them in one batch: the same values, or the same error
    class, message, line and batch element as the reference, when sampling and when
    replaying (log_prob and E | T run the spec again from the trace)."""
    n = 5
    fast, ref = programs(hostile, op=op, k=k)
    R = ref.max_races((n,))
    logits = np.zeros((n, n))
    u = winners_first((n,), list(range(n)))
    trace = np.full((n, R), -1)
    trace[:, 0] = np.arange(n)
    errors = []
    for w in range(n):
        got = same(fast, ref, lambda p: p.sample(logits[w:w + 1], uniforms=u[w:w + 1]))
        if isinstance(got, tuple):
            errors.append(got)
            same(fast, ref, lambda p: p.log_prob(trace[w:w + 1], logits[w:w + 1]))
            same(fast, ref, lambda p: p.conditional_noise(trace[w:w + 1], logits[w:w + 1], seed=0))
    got = same(fast, ref, lambda p: p.sample(logits, uniforms=u))
    if tag is None:
        assert not errors
        return
    assert errors, "the case must fail for some winner"
    assert all(line == bad_line(hostile, tag) for _, line, _, _ in errors), errors
    assert isinstance(got, tuple) and got[1] == bad_line(hostile, tag)


def test_overflow_messages_give_the_exact_result():
    fast, ref = programs(hostile, op=2, k=-2**62)
    u = winners_first((5,), [1, 2])
    with pytest.raises(SpecOverflowError) as info:
        fast.sample(np.zeros(5), uniforms=u)
    err = info.value
    assert err.lane == (1,) and err.line == bad_line(hostile, "mul")
    assert err.reason == f"int64 overflow in * (the exact result is {-3 * 2**62})"


# ---- race_groups: key range, empty races, nesting ------------------------------------------
@pytest.mark.parametrize("g, shift, mode, cls, tag", [
    (2, 1, 0, SpecValueError, "key"),        # a key equal to groups
    (3, 1, 0, None, None),                   # ... which is fine with one more group
    (2, -2, 0, SpecValueError, "key"),       # a key below -1
    (0, 0, 1, EmptyRaceError, "empty"),      # groups=0, every key -1
    (3, 0, 1, EmptyRaceError, "empty"),      # every key -1
], ids=["key-equals-groups", "key-below-groups", "key-below-minus-one", "zero-groups", "all-minus-one"])
def test_race_groups_keys_and_empty_races(g, shift, mode, cls, tag):
    fast, ref = programs(grouped, g=g, shift=shift, mode=mode)
    n = 5
    logits = np.zeros((3, n))
    u = winners_first((n,), [0, 3, 4])
    got = same(fast, ref, lambda p: p.sample(logits, uniforms=u))
    R = ref.max_races((n,))
    trace = np.tile(np.arange(R) % n, (3, 1))
    same(fast, ref, lambda p: p.log_prob(trace, logits))
    if cls is None:
        assert not isinstance(got, tuple)
        return
    assert got[0] is cls and got[1] == bad_line(grouped, tag) and got[2] == (0,)


def test_a_group_outside_the_previous_race_breaks_the_nesting_promise():
    """The second grouped race is {2} (inside the first race's group {0, 2}) when atom 0 won
    that group, and {4} (outside every group of the first race) when atom 2 did."""
    fast, ref = programs(grouped, mode=2)
    n = 5
    logits = np.zeros((3, n))
    u = winners_first((n,), [0, 2, 0])
    u[0, 1] = u[1, 1] = u[2, 3] = 0.9                   # group 1 {1, 3}: any winner
    got = same(fast, ref, lambda p: p.sample(logits, uniforms=u))
    assert got[0] is NestingError and got[1] == bad_line(grouped, "nest") and got[2] == (1,)
    assert f"(line {bad_line(grouped, 'nest') - 1})" in got[3]
    trace = np.full((3, ref.max_races((n,))), -1)
    trace[:, :3] = [[0, 1, 2], [0, 1, 2], [2, 1, 4]]       # lane 2: {4} outside
    got = same(fast, ref, lambda p: p.log_prob(trace, logits))
    assert got[0] is NestingError and got[2] == (2,)


# ---- the static bound on the number of races; leftover winners ------------------------------
PATHS = {  # name: (spec, statics, atoms shape, the race's tag)
    "generic": (hostile, {"op": 30}, (5,), "bound"),
    "grouped": (grouped, {"mode": 3}, (5,), "bound"),
    "snapshots": (below, {}, (5,), "below"),
    "exit-races": (shrinking, {}, (5,), "shrink"),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_more_races_than_the_static_bound_is_an_error(path):
    s, statics, shape, tag = PATHS[path]
    fast, ref = (copy.copy(p) for p in programs(s, **statics))
    for p in (fast, ref):
        p._instances = dict(p._instances)
    x = np.zeros((3,) + shape)
    u = winners_first(shape, [4, 3, 4])
    full_trace = ref.sample(x, uniforms=u).trace
    R = ref.max_races(shape) - 1
    for p in (fast, ref):
        with_bound(p, shape, R)
    got = same(fast, ref, lambda p: p.sample(x, uniforms=u))
    assert got[0] is RaceError and got[1] == bad_line(s, tag) and got[2] == (0,)
    assert got[3].endswith(f"{s.name}: more races than the static bound {R} (batch element (0,))")
    trace = full_trace[:, :R]
    for call in (lambda p: p.log_prob(trace, x), lambda p: p.log_prob_and_grad(trace, x),
                 lambda p: p.conditional_noise(trace, x, seed=0)):
        again = same(fast, ref, call)
        assert again[:3] == got[:3]
    flat = u.reshape(3, -1)
    with pytest.raises(RaceError) as info, naming_lanes((3,)):   # sample and score at once
        fast.draw_and_score_flat(fast.instance(shape), flat.copy(), x.reshape(3, -1).copy())
    assert str(info.value) == got[3]


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_winner_right_after_the_last_race_makes_the_trace_impossible(path):
    s, statics, shape, _ = PATHS[path]
    fast, ref = programs(s, **statics)
    x = np.zeros((2,) + shape)
    x[:, 1] = -np.inf                       # atom 1 never races: the run ends a race early
    if path == "grouped":
        x[:, 3] = -np.inf                   # ... and group 1 stays empty
    s_ = ref.sample(x, seed=1)
    trace = s_.trace.copy()
    last = int((trace[1] >= 0).sum())
    assert last < trace.shape[1], "the run must leave a slot free"
    trace[1, last] = 1                      # one winner too many, right after the last race
    lp = same(fast, ref, lambda p: p.log_prob(trace, x))
    assert np.isfinite(lp[0][0]) and lp[0][1] == -np.inf
    logp = fast.score_flat(fast.instance(shape), trace, x.reshape(2, -1).copy(), want_grad=True).logp
    assert np.isfinite(logp[0]) and logp[1] == -np.inf


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_trace_entry_equal_to_the_number_of_atoms(path):
    """The reference refuses it (no atom has that index); the contract's score_flat, whose
    caller checks the range, never reads past the atoms and scores it impossible."""
    s, statics, shape, _ = PATHS[path]
    fast, ref = programs(s, **statics)
    x = np.zeros((2,) + shape)
    trace = ref.sample(x, seed=3).trace.copy()
    A = int(np.prod(shape))
    trace[1, 0] = A
    for p in (fast, ref):
        with pytest.raises(ValueError, match=r"trace entries must be flat atom indices in \[0, 5\)"):
            p.log_prob(trace, x)
    logp = fast.score_flat(fast.instance(shape), trace, x.reshape(2, -1).copy(), want_grad=True).logp
    assert np.isfinite(logp[0]) and logp[1] == -np.inf


# ---- the checks the compiler inserts (ir.Fail) -----------------------------------------------
def _short_of_steps(s, steps):
    """A copy of recursive spec ``s`` whose dispatch loop stops after ``steps`` steps (as if
    the proven bound were wrong): its ``ir.Fail`` check must stop the lane."""
    bad = copy.copy(s)
    program = copy.deepcopy(s.ir)
    loops = [x for x in ir.walk_statements(program.body) if isinstance(x, ir.Loop) and x.var == "__step"]
    assert loops and any(isinstance(x, ir.Fail) for x in ir.walk_statements(program.body))
    for loop in loops:
        loop.count = ast_constant(steps, loop.count)
    bad.__dict__["ir"] = program
    return bad


def ast_constant(value, like):
    import ast
    return ast.copy_location(ast.Constant(value), like)


def test_a_recursion_that_runs_out_of_steps_stops_with_the_reference_error():
    s = _short_of_steps(builtin.binary_tree, 3)
    fast, ref = (structdsl.compile(s, backend=b) for b in ("numba", "numpy"))
    x = np.zeros((3, 5))
    got = same(fast, ref, lambda p: p.sample(x, seed=0))
    fail = next(f for f in ir.walk_statements(s.ir.body) if isinstance(f, ir.Fail))
    assert got[0] is RaceError and got[1] == fail.line and got[2] == (0,) and fail.message in got[3]
    whole = structdsl.compile(builtin.binary_tree).sample(x, seed=0).trace
    trace = whole[:, :ref.max_races((5,))]
    for call in (lambda p: p.log_prob(trace, x), lambda p: p.conditional_noise(trace, x, seed=0)):
        assert same(fast, ref, call)[:3] == got[:3]
    # with enough steps the check is silent, and numba samples what the reference does
    fast, ref = (structdsl.compile(builtin.binary_tree, backend=b) for b in ("numba", "numpy"))
    same(fast, ref, lambda p: p.sample(x, seed=0))


# ==== array stores into views: the generated code's element loop (numba_kernels.put) ====
@spec
def overlapping_row_stores(n):
    item = atoms(n)
    m = zeros((n, n), int)
    for i in range(n):
        m[i] = arange(n) + i * n             # an array into a row
    w = race(item)
    m[:, w] = m[w]                           # a column from a row of the same array (they share m[w, w])
    m[0] = m[:, n - 1]                       # a row from a column (they share m[0, n - 1])
    flags = zeros((n, n), bool)
    flags[w] = m[w] > w * n                  # bool values into a bool row
    return w, m, flags


def test_array_stores_into_views_mean_what_numpy_means():
    """Stores of arrays into rows and columns, reading the array they write: the numba
    backend's element loop copies a value that reads its target first, as NumPy does."""
    logits = np.random.default_rng(0).normal(size=(40, 5))
    u = np.random.default_rng(1).random(size=(40, 5))
    ref = structdsl.compile(overlapping_row_stores, backend="numpy").sample(logits, uniforms=u)
    fast = structdsl.compile(overlapping_row_stores, backend="numba").sample(logits, uniforms=u)
    assert len(set(ref.trace[:, 0].tolist())) == 5                  # every column chosen
    for a, b in zip(ref.structure, fast.structure):
        np.testing.assert_array_equal(a, b)
    m = np.arange(25).reshape(5, 5)                                   # one lane by hand
    w = int(ref.trace[0, 0])
    m[:, w] = m[w].copy()
    m[0] = m[:, 4].copy()
    np.testing.assert_array_equal(ref.structure.m[0], m)
