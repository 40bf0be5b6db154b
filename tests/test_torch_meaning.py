"""One meaning on torch: hostile specs and boundary cases of every run-time check.

The torch backend (lock-step over ``[B, ...]`` tensors) must give each of these the NumPy
reference's meaning: the same result from identical uniforms, or the same error class, spec
line, batch element and message.  Each spec that fails marks its offending line with
``# BAD``.  The boundary tests were each checked against a hand-made mutant of the torch
backend's check (``>=`` turned into ``>``, a condition dropped) that they fail.
"""
import ast
import copy
import dataclasses

import numpy as np
import pytest

import structdsl
from structdsl import (EmptyRaceError, NestingError, RaceError, SpecError, SpecIndexError,
                       SpecValueError, atoms, full, ones, race, race_groups, spec, where, zeros)
from structdsl import ir as IR
from shared_specs import bad_line

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True, params=["cpu", "lock-step"])
def sync_mode(request, monkeypatch):
    """Every test twice: as on CPU (the interpreter may ask the device whether a mask is empty
    and skip work) and as on CUDA (it never asks: every check and loop runs in full, as a
    CUDA graph captures it)."""
    if request.param == "lock-step":
        from structdsl.backends import torch_backend
        init = torch_backend._Machine.__init__

        def never_sync(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.early_exit = False
        monkeypatch.setattr(torch_backend._Machine, "__init__", never_sync)
    return request.param


def T(x):
    return torch.as_tensor(np.asarray(x))


def both(s, **statics):
    """(numpy, torch) programs of ``s``."""
    return tuple(structdsl.compile(s, backend=b, **statics) for b in ("numpy", "torch"))


def outcome(fn):
    try:
        return fn(), None
    except (RaceError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        return None, exc


def same_error(want, got, line=None):
    """``got`` (torch) is ``want`` (numpy): class, line, lane and message."""
    assert want is not None and got is not None, (want, got)
    assert type(got) is type(want), (want, got)
    assert str(got) == str(want), (str(want), str(got))
    if isinstance(want, RaceError):
        assert (got.file, got.line, got.lane) == (want.file, want.line, want.lane), (want, got)
        if line is not None:
            assert want.line == line, (want, line)


def same_sample(ref, fast, logits, u):
    """Sample on both from the same uniforms: identical traces and structures, or the same
    error.  Returns the reference's sample (None on error)."""
    a, ea = outcome(lambda: ref.sample(logits, uniforms=u))
    b, eb = outcome(lambda: fast.sample(T(logits), uniforms=T(u)))
    if ea is not None or eb is not None:
        same_error(ea, eb)
        return None
    assert np.array_equal(b.trace.numpy(), a.trace)
    for x, y in zip(b.structure, a.structure):
        assert np.array_equal(x.numpy(), y), (x, y)
    return a


_PROGRAMS = {}


def programs(s, **statics):
    """(numpy, torch) programs of ``s``, compiled once per module."""
    key = (s.name, id(s), tuple(sorted(statics.items())))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = both(s, **statics)
    return _PROGRAMS[key]


N = 5


def first_winners(n, winners):
    """Uniforms under which lane ``b``'s first race over all atoms (equal logits) is won by
    atom ``winners[b]``; every other atom draws the same uniform, so later races tie and
    their lowest index wins."""
    u = np.full((len(winners), n), 0.5)
    u[np.arange(len(winners)), winners] = 0.9
    return u


def each_lane(s, n=N, **statics):
    """Sample ``s`` on both backends with the first winner 0 .. n - 1, one lane at a time and
    all lanes at once: the same result or the same error each time.  Returns the first
    winners whose lane raised on the reference."""
    ref, fast = programs(s, **statics)
    u = first_winners(n, np.arange(n))
    logits = np.zeros((n, n))
    failed = []
    for w in range(n):
        if same_sample(ref, fast, logits[w:w + 1], u[w:w + 1]) is None:
            failed.append(w)
    same_sample(ref, fast, logits, u)
    return failed


def compare_replays(ref, fast, t, logits, line):
    """log_prob, log_prob_and_grad, conditional_noise and (torch) decode of traces ``t``:
    the same values or the same error."""
    R, A = t.shape[-1], logits.shape[-1]
    v = np.random.default_rng(1).uniform(size=t.shape[:-1] + (R + A,))
    for method, args, kw in (("log_prob", (), {}), ("log_prob_and_grad", (), {}),
                             ("conditional_noise", (), {"uniforms": v})):
        x, ex = outcome(lambda: getattr(ref, method)(t, logits, **kw))
        y, ey = outcome(lambda: getattr(fast, method)(T(t), T(logits), **{k: T(a) for k, a in kw.items()}))
        if ex is not None or ey is not None:
            same_error(ex, ey, line if isinstance(ex, RaceError) else None)
            continue
        for p, q in zip(x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,)):
            np.testing.assert_allclose(q.detach().numpy(), p, rtol=1e-12, atol=1e-12)
    x, ex = outcome(lambda: ref.log_prob(t, logits))
    _, ey = outcome(lambda: fast.decode(T(t), T(logits)))
    if isinstance(ex, RaceError):
        same_error(ex, ey, line)


# ==== 1. the compiler's own check: a recursion that runs out of its step bound ==================
@spec
def descent(n):
    """A chain of calls whose length depends on the winners: each call races the positions
    from ``lo`` on and recurses past the winner."""
    pos = atoms(n)
    out = full(n, -1)
    depth = zeros(1, int)

    def down(lo):
        if lo < n:
            r = race(pos, lambda i: i >= lo)
            out[r] = depth[0]
            depth[0] += 1
            down(r + 1)

    down(0)  # BAD
    return out


def shortened(s, steps):
    """A fresh copy of recursive spec ``s`` whose dispatch loops run at most ``steps`` steps
    (the proven bound made too small, as a bug in the proof would)."""
    t = structdsl.spec(s.fn)
    loops = [x for x in IR.walk_statements(t.ir.body) if isinstance(x, IR.Loop) and x.var == "__step"]
    assert loops and any(isinstance(x, IR.Fail) for x in IR.walk_statements(t.ir.body))
    for loop in loops:
        loop.count = ast.copy_location(ast.Constant(steps), loop.count)
    return t


def test_a_recursion_that_runs_out_of_steps_fails_like_the_reference():
    """``ir.Fail``: a lane whose dispatch loop ends with frames on the stack raises the
    reference's RaceError at the call's line; lanes that finished in time are unaffected;
    on sampling, on replay (log_prob, its gradient, E | T) and on the built-in recursions."""
    n = 4
    rng = np.random.default_rng(0)
    u = np.concatenate([first_winners(n, [n - 1, 0, 1, 2]), rng.uniform(size=(4, n))])
    logits = rng.normal(size=(8, n))
    full_ref = structdsl.compile(descent)
    traces = full_ref.sample(logits, uniforms=u).trace
    seen = set()
    for steps in (2, 3, 4, 6, 9):
        ref, fast = both(shortened(descent, steps))
        R = ref.max_races((n,))
        assert fast.max_races((n,)) == R
        a = same_sample(ref, fast, logits, u)
        for b in range(len(u)):                            # lane by lane: who finishes in time
            seen.add(same_sample(ref, fast, logits[b:b + 1], u[b:b + 1]) is None)
        t = np.full((8, R), -1)
        t[:, :min(R, traces.shape[1])] = traces[:, :R]
        compare_replays(ref, fast, t, logits, bad_line(descent))
        if a is None:
            with pytest.raises(RaceError) as info:
                ref.sample(logits, uniforms=u)
            assert info.value.line == bad_line(descent) and "proven bound" in str(info.value)
    assert seen == {True, False}                          # some lanes finish, some run out
    from structdsl import specs
    from shared_specs import height
    for s in (specs.binary_tree, height):
        ref, fast = both(shortened(s, 3))
        logits = rng.normal(size=(2, 5))
        with pytest.raises(RaceError) as want:
            ref.sample(logits, uniforms=rng.uniform(size=(2, 5)))
        same_sample(ref, fast, logits, rng.uniform(size=(2, 5)))
        assert "did not finish within the proven bound" in str(want.value)
        ok_ref, ok_fast = both(s)                            # the proven bound itself is enough
        same_sample(ok_ref, ok_fast, logits, rng.uniform(size=(2, 5)))


# ==== 2. race_groups with no live member in any group ===========================================
@spec
def no_groups(n):
    item = atoms(n)
    w = race_groups(item, lambda i: -1, groups=0)  # BAD
    return w


@spec
def no_groups_allowed(n):
    item = atoms(n)
    w = race_groups(item, lambda i: -1, groups=0, allow_empty=True)
    v = race_groups(item, lambda i: -1, groups=2, allow_empty=True)
    x = race(item)
    return w, v, x


@spec
def sits_out_after(n):
    """Every key is -1 once the first winner is the last atom (a lane-dependent empty race)."""
    item = atoms(n)
    first = race(item)
    later = race_groups(item, lambda i: i if i > first else -1, groups=n)  # BAD
    return first, later


def test_race_groups_without_a_live_member_raises_like_the_reference():
    ref, fast = programs(no_groups)
    u = first_winners(N, [1, 2])
    with pytest.raises(EmptyRaceError) as want:
        ref.sample(np.zeros((2, N)), uniforms=u)
    same_sample(ref, fast, np.zeros((2, N)), u)
    assert want.value.line == bad_line(no_groups) and want.value.lane == (0,)
    assert "race_groups has no live member in any group" in str(want.value)
    assert each_lane(sits_out_after) == [N - 1]
    # allow_empty: all -1 and no trace slot, so the plain race after them takes slot 0
    ref, fast = programs(no_groups_allowed)
    a = same_sample(ref, fast, np.zeros((2, N)), u)
    assert a.trace[:, 0].tolist() == [1, 2] and (a.trace[:, 1:] == -1).all()
    assert a.structure.w.shape == (2, 0) and (a.structure.v == -1).all()


# ==== 3. more races than the static bound ===========================================================
@spec
def until_zero(n):
    """Races until atom 0 wins: the number of races depends on the lane."""
    item = atoms(n)
    order = full(n, -1)
    for k in range(n):
        w = race(item)  # BAD
        order[k] = w
        if w == 0:
            break
    return order


@spec
def grouped_rounds(n):
    """Two rounds of two groups: lanes whose absent atoms empty a group run fewer races."""
    item = atoms(n)
    a = race_groups(item, lambda i: i % 2, groups=2, allow_empty=True)
    b = race_groups(item, lambda i: i % 2, groups=2, allow_empty=True)  # BAD
    return a, b


def squeezed(prog, shape, by=1):
    """``prog`` with the trace length of ``shape`` lowered by ``by``: a bound below what a run
    can use (the static bound is proven, so only a bug could make it so)."""
    prog = copy.copy(prog)                       # not compile()'s shared program
    prog._instances = dict(prog._instances)
    inst = prog.instance(shape)
    prog._instances[shape] = dataclasses.replace(inst, max_races=inst.max_races - by)
    return prog


def test_more_races_than_the_static_bound_raise_like_the_reference():
    """A run past ``max_races`` raises the reference's RaceError at the race's line and lane
    instead of returning a truncated trace: sampling, log_prob, its gradient, E | T and
    decode; plain and grouped races; an impossible winner before the overflowing group of a
    grouped race still makes the trace impossible (-inf), as the reference replays in key order."""
    n = 4
    u = np.array([[0.9, 0.5, 0.4, 0.3], [0.5, 0.9, 0.4, 0.3],    # 1, 2, 3 and 4 races
                  [0.5, 0.9, 0.8, 0.3], [0.1, 0.9, 0.8, 0.7]])
    logits = np.zeros((4, n))
    ref, fast = (squeezed(p, (n,), by=2) for p in both(until_zero))
    traces = structdsl.compile(until_zero).sample(logits, uniforms=u).trace
    for lanes in ([0], [1], [2], [3], [0, 1, 3], [0, 1, 2, 3]):
        same_sample(ref, fast, logits[lanes], u[lanes])
        compare_replays(ref, fast, traces[lanes, :2], logits[lanes], bad_line(until_zero))
    with pytest.raises(RaceError) as want:
        ref.sample(logits, uniforms=u)
    assert want.value.lane == (2,) and "more races than the static bound 2" in str(want.value)
    # grouped: lane 0 has atoms 1 and 3 absent (one group a round), lane 1 uses all 4 slots
    logits = np.zeros((3, n))
    logits[0, [1, 3]] = -np.inf
    u = np.random.default_rng(2).uniform(size=(3, n))
    full_ref = structdsl.compile(grouped_rounds)
    traces = full_ref.sample(logits, uniforms=u).trace
    assert (traces[0] >= 0).sum() == 2 and (traces[1] >= 0).sum() == 4
    ref, fast = (squeezed(p, (n,)) for p in both(grouped_rounds))
    for lanes in ([0], [1], [0, 1, 2], [1, 0]):
        same_sample(ref, fast, logits[lanes], u[lanes])
        compare_replays(ref, fast, traces[lanes, :3], logits[lanes], bad_line(grouped_rounds))
    wrong = traces[1:2, :3].copy()
    wrong[0, 2] = wrong[0, 0]                             # group 0 of round 2: a retired atom
    assert ref.log_prob(wrong, logits[1:2])[0] == -np.inf
    compare_replays(ref, fast, wrong, logits[1:2], bad_line(grouped_rounds))


# ==== 4. boundaries of the run-time checks ==========================================================
@spec
def key_range(n):
    """Atom 0's key is w - 2: -2 (below the sit-out value), -1, 0, 1, then 2 == groups."""
    item = atoms(n)
    w = race(item)
    g = race_groups(item, lambda i: w - 2 if i == 0 else 0, groups=2)  # BAD
    return w, g


@spec(nested=True)
def group_outside(n):
    """The second race's group 1 (atoms 3 ..) lies wholly outside the first race (atoms 0, 1)."""
    item = atoms(n)
    a = race_groups(item, lambda i: 0 if i < 2 else -1, groups=1)
    b = race_groups(item, lambda i: 0 if i < 2 else 1 if i >= 3 else -1, groups=2)  # BAD
    return a, b


@spec(nested=True)
def group_inside(n):
    """The same with group 1 dropped: nested."""
    item = atoms(n)
    a = race_groups(item, lambda i: 0 if i < 2 else -1, groups=1)
    b = race_groups(item, lambda i: 0 if i < 2 else -1, groups=2)
    return a, b


@spec(nested=True)
def member_outside(n):
    """A plain race whose members leave the previous race's: the message names that race's line."""
    item = atoms(n)
    a = race(item, lambda i: i < 3)
    b = race(item, lambda i: i < 3 or i == n - 1)  # BAD
    return a, b


@spec
def stops_early(n):
    """Races until atom 0 wins (with padding after the last race)."""
    item = atoms(n)
    order = full(n, -1)
    for k in range(n):
        w = race(item)
        order[k] = w
        if w == 0:
            break
    return order


def test_race_groups_key_at_groups_and_below_minus_one():
    """Keys -1 .. groups - 1 run; groups and -2 raise the reference's SpecValueError, naming
    the key and the atom, never a raw scatter error."""
    assert each_lane(key_range) == [0, 4]


def test_a_group_wholly_outside_the_previous_race_breaks_nesting_on_sampling_and_replay():
    n = 5
    ref, fast = programs(group_outside)
    u = np.random.default_rng(3).uniform(size=(2, n))
    with pytest.raises(NestingError) as want:
        ref.sample(np.zeros((2, n)), uniforms=u)
    assert want.value.line == bad_line(group_outside)
    assert str(want.value).endswith(f"(line {bad_line(group_outside) - 1}) (batch element (0,))")
    same_sample(ref, fast, np.zeros((2, n)), u)
    # replay: a trace the nested reading would give (first race, then each group's winner)
    t = np.array([[0, 1, 3, -1], [1, 0, 4, -1]])
    R = ref.max_races((n,))
    t = t[:, :R] if R <= 4 else np.pad(t, ((0, 0), (0, R - 4)), constant_values=-1)
    compare_replays(ref, fast, t, np.zeros((2, n)), bad_line(group_outside))
    with pytest.raises(NestingError):
        ref.log_prob(t, np.zeros((2, n)))
    ok_ref, ok_fast = programs(group_inside)                 # the boundary: inside is fine
    same_sample(ok_ref, ok_fast, np.zeros((2, n)), u)
    # a plain race: the message names the previous race's line, as the reference's does
    ref, fast = programs(member_outside)
    with pytest.raises(NestingError) as want:
        ref.sample(np.zeros((2, n)), uniforms=u)
    same_sample(ref, fast, np.zeros((2, n)), u)
    assert f"(line {bad_line(member_outside) - 1})" in str(want.value)


def test_trace_entries_at_the_number_of_atoms_are_refused():
    """Entries in [-1, A) replay; A and -2 are refused with the Program API's ValueError."""
    n = 4
    ref, fast = programs(stops_early)
    logits = np.zeros((1, n))
    for bad in (n, -2):
        t = np.array([[1, 2, bad, -1]])
        x, ex = outcome(lambda: ref.log_prob(t, logits))
        for method in ("log_prob", "log_prob_and_grad", "decode"):
            _, ey = outcome(lambda: getattr(fast, method)(T(t), T(logits)))
            same_error(ex, ey)
        assert isinstance(ex, ValueError) and "flat atom indices in [0, 4)" in str(ex)
    t = np.array([[1, 2, n - 1, 0]])                          # the largest entry: a real trace
    assert np.isfinite(ref.log_prob(t, logits)[0])
    compare_replays(ref, fast, t, logits, None)


def test_a_winner_right_after_the_last_race_makes_the_trace_impossible():
    n = 4
    ref, fast = programs(stops_early)
    logits = np.random.default_rng(4).normal(size=(3, n))
    t = np.array([[2, 0, -1, -1], [2, 0, 1, -1], [2, 0, -1, 3]])   # ends after 2 races
    want = ref.log_prob(t, logits)
    assert np.isfinite(want[0]) and np.isneginf(want[1:]).all()
    compare_replays(ref, fast, t, logits, None)
    got = fast.log_prob(T(t), T(logits)).numpy()
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    for i in range(3):                                          # one lane at a time too
        assert np.isneginf(fast.log_prob(T(t[i:i + 1]), T(logits[i:i + 1])).numpy()[0]) == np.isneginf(want[i])


BIG = 2**63 - 1
SMALL = -2**63
HALF = 2**62


@spec
def read_at(n):
    item = atoms(n)
    w = race(item)
    x = arange(3) * 2
    y = x[w - 1]  # BAD
    return y


@spec
def read_array_at(n):
    item = atoms(n)
    w = race(item)
    x = arange(3)
    y = x[arange(2) + w - 1]  # BAD
    return y


@spec
def read_two_axes_at(n):
    """Both indices bad (w = 4): the reference checks axis 0 first, after evaluating both."""
    item = atoms(n)
    w = race(item)
    x = zeros((3, 2), int)
    y = x[w - 1, w - 3]  # BAD
    return y


@spec
def write_at(n):
    item = atoms(n)
    w = race(item)
    x = zeros(3, int)
    x[w - 1] = 1  # BAD
    return x


@spec
def write_row_at(n):
    item = atoms(n)
    w = race(item)
    x = zeros((3, 2), int)
    x[w - 1, :] = 1  # BAD
    return x


@spec
def augmented_at(n):
    """``x[i] += v`` is ``x[i] = x[i] + v`` on the reference: the read and its index check
    come before the value (w = 2: index 3 and 7 // 0 both fail; the index is first)."""
    item = atoms(n)
    w = race(item)
    x = zeros(3, int)
    x[w + 1] += 7 // (w - 2)  # BAD
    return x


@spec
def augmented_row_at(n):
    item = atoms(n)
    w = race(item)
    x = zeros((3, 2), int)
    x[w - 1, :] += arange(2)  # BAD
    return x


@spec
def winner_as_index(n):
    """A -1 winner of an allowed-empty race used as an index."""
    item = atoms(n)
    w = race(item)
    v = race(item, lambda i: i > w + 2, allow_empty=True)
    x = arange(n)
    y = x[v]  # BAD
    return w, y


@spec
def divide_at(n):
    item = atoms(n)
    w = race(item)
    y = 7 // (w - 2)  # BAD
    return y


@spec
def modulo_at(n):
    item = atoms(n)
    w = race(item)
    y = arange(3) % (w - 2)  # BAD
    return y


@spec
def floordiv_overflow_at(n):
    item = atoms(n)
    w = race(item)
    y = SMALL // (w - 3)  # BAD
    return y


@spec
def add_at(n):
    item = atoms(n)
    w = race(item)
    y = (BIG - 3) + w  # BAD
    return y


@spec
def add_array_at(n):
    item = atoms(n)
    w = race(item)
    y = full(2, BIG - 3) + w  # BAD
    return y


@spec
def sub_at(n):
    item = atoms(n)
    w = race(item)
    y = (SMALL + 3) - w  # BAD
    return y


@spec
def mul_at(n):
    item = atoms(n)
    w = race(item)
    y = (BIG // 3) * w  # BAD
    return y


@spec
def mul_min_at(n):
    """-1 * SMALL overflows, 1 * SMALL does not (the product whose quotient check wraps)."""
    item = atoms(n)
    w = race(item)
    y = (w - 1) * SMALL  # BAD
    return y


@spec
def min_mul_at(n):
    item = atoms(n)
    w = race(item)
    y = SMALL * (1 - w)  # BAD
    return y


@spec
def neg_at(n):
    item = atoms(n)
    w = race(item)
    y = -(SMALL + w)  # BAD
    return y


@spec
def abs_at(n):
    item = atoms(n)
    w = race(item)
    y = abs(SMALL + w)  # BAD
    return y


@spec
def lshift_at(n):
    item = atoms(n)
    w = race(item)
    y = 1 << (60 + w)  # BAD
    return y


@spec
def shift_count_at(n):
    item = atoms(n)
    w = race(item)
    y = 5 >> (w - 1)  # BAD
    return y


@spec
def sum_at(n):
    item = atoms(n)
    w = race(item)
    v = full(2, HALF)
    v[0] = HALF - 3 + w
    y = sum(v)  # BAD
    return y


@spec
def augmented_overflow_at(n):
    item = atoms(n)
    w = race(item)
    y = BIG - 3
    y += w  # BAD
    return y


@spec
def empty_race_at(n):
    item = atoms(n)
    w = race(item)
    v = race(item, lambda i: i >= w + 3)  # BAD
    return w, v


@spec
def predicate_read_at(n):
    item = atoms(n)
    w = race(item)
    x = zeros(3, int)
    v = race(item, lambda i: x[i + w - 2] == 0)  # BAD
    return v


@spec
def predicate_guarded(n):
    """Index errors only where the short-circuit lets an atom read."""
    item = atoms(n)
    w = race(item)
    x = zeros(3, int)
    v = race(item, lambda i: i + w < 5 and x[i + w - 2] == 0)  # BAD
    return v


@spec
def first_atom_decides(n):
    """Atom w divides by zero (the predicate's first check), the atoms before it read index
    -1 (its second): the reference evaluates atom by atom, so atom 0's error is raised."""
    item = atoms(n)
    w = race(item)
    x = zeros(2, int)
    v = race(item, lambda i: 7 // (i - w) > 0 or x[i - 1] == 0)  # BAD
    return v


@spec
def predicate_lane_read_first(n):
    """A read that fails for every atom alike (its index is the lane's), before a check that
    fails at atom w only: the lane's error is atom 0's read."""
    item = atoms(n)
    w = race(item)
    x = zeros(3, int)
    v = race(item, lambda i: x[w - 1] >= 0 and 7 // (i - w + 1) > 0)  # BAD
    return v


@spec
def predicate_lane_read_second(n):
    """The same two checks the other way round."""
    item = atoms(n)
    w = race(item)
    x = zeros(3, int)
    v = race(item, lambda i: 7 // (i - w + 1) > 0 or x[w - 1] >= 0)  # BAD
    return v


@spec
def predicate_lane_read_after(n):
    """``|`` evaluates both sides: for w = 1 atom 0 divides by zero, then reads index -1 like
    every atom; its first error, the division, is the lane's."""
    item = atoms(n)
    w = race(item)
    x = zeros(3, int)
    v = race(item, lambda i: (7 // (i - w + 1) > 0) | (x[w - 2] >= 0))  # BAD
    return v


@spec
def predicate_overflow_at(n):
    item = atoms(n)
    w = race(item)
    v = race(item, lambda i: (BIG - 6) + i + w > 0)  # BAD
    return v


@pytest.mark.parametrize("s, failing", [
    (read_at, [0, 4]), (read_array_at, [0, 3, 4]), (read_two_axes_at, [0, 1, 2, 4]),
    (write_at, [0, 4]), (write_row_at, [0, 4]), (augmented_at, [2, 3, 4]),
    (augmented_row_at, [0, 4]), (winner_as_index, [2, 3, 4]),
    (divide_at, [2]), (modulo_at, [2]), (floordiv_overflow_at, [2, 3]),
    (add_at, [4]), (add_array_at, [4]), (sub_at, [4]), (mul_at, [4]), (mul_min_at, [0, 3, 4]),
    (min_mul_at, [2, 3, 4]), (neg_at, [0]),
    (abs_at, [0]), (lshift_at, [3, 4]), (shift_count_at, [0]), (sum_at, [3, 4]),
    (augmented_overflow_at, [4]), (empty_race_at, [2, 3, 4]),
    (predicate_read_at, [0, 1, 2, 3, 4]), (predicate_guarded, [0, 1]), (first_atom_decides, [0, 1, 2, 3, 4]),
    (predicate_overflow_at, [3, 4]), (predicate_lane_read_first, [0, 1, 2, 3, 4]),
    (predicate_lane_read_second, [1, 2, 3, 4]), (predicate_lane_read_after, [0, 1, 2, 3, 4]),
], ids=lambda x: getattr(x, "name", ""))
def test_each_check_at_its_boundary_matches_the_reference(s, failing):
    """Each run-time check with the first winner 0 .. 4: the lanes on either side of its
    boundary run or raise exactly as on the reference, with the same message (the values it
    names: the bad index, the exact result of a scalar overflow, the predicate's atom)."""
    assert each_lane(s) == failing
    ref, _ = programs(s)
    with pytest.raises(RaceError) as info:
        ref.sample(np.zeros((N, N)), uniforms=first_winners(N, np.arange(N)))
    assert info.value.line == bad_line(s)


# ==== 5. argument checks ===================================================================
@spec
def half_valid(n):
    """Atoms above the diagonal only; two races."""
    edge = atoms(n, n, valid=lambda u, v: u < v)
    a, b = race(edge)
    c, d = race(edge)
    return a, b, c, d


@spec(nested=True)
def half_valid_nested(n):
    """The same, nested (the torch replay scores it by exit races, over every atom)."""
    edge = atoms(n, n, valid=lambda u, v: u < v)
    a, b = race(edge)
    c, d = race(edge)
    return a, b, c, d


def test_a_float_trace_is_refused_with_the_program_apis_words():
    ref, fast = programs(half_valid)
    n = 3
    logits = np.zeros((2, n, n))
    R = ref.max_races((n, n))
    for dtype, tdtype in ((np.float64, torch.float64), (np.float32, torch.float32), (bool, torch.bool)):
        t = np.zeros((2, R), dtype=dtype)
        _, ex = outcome(lambda: ref.log_prob(t, logits))
        assert isinstance(ex, TypeError) and "trace must be an integer array" in str(ex)
        for method in ("log_prob", "log_prob_and_grad", "conditional_noise", "decode"):
            _, ey = outcome(lambda: getattr(fast, method)(torch.zeros((2, R), dtype=tdtype), T(logits)))
            same_error(ex, ey)
            _, ey = outcome(lambda: getattr(fast, method)(t, logits))       # NumPy arguments too
            same_error(ex, ey)
    t = np.array([[1, 2], [5, 1]])
    for dtype in (torch.int64, torch.int32, torch.uint8):         # any integer dtype replays
        np.testing.assert_allclose(fast.log_prob(T(t).to(dtype), T(logits)).numpy(), ref.log_prob(t, logits))


@pytest.mark.parametrize("s", [half_valid, half_valid_nested], ids=["plain", "nested"])
def test_logits_at_invalid_atoms_are_ignored_whatever_they_hold(s):
    """NaN or +inf at an invalid atom changes nothing (values, gradients, E | T); NaN or +inf
    at a valid atom is refused naming its index in the batch, as the Program API does."""
    ref, fast = programs(s)
    n = 3
    rng = np.random.default_rng(5)
    clean = np.tril(np.full((n, n), -np.inf)) + np.triu(rng.normal(size=(2, n, n)), 1)
    u = rng.uniform(size=(2, n, n))
    want = fast.sample(T(clean), uniforms=T(u))
    t = want.trace
    v = rng.uniform(size=(2, fast.max_races((n, n)) + n * n))
    lp0, g0 = fast.log_prob_and_grad(t, T(clean))
    e0 = fast.conditional_noise(t, T(clean), uniforms=T(v))
    for junk in (np.nan, np.inf, -np.inf, 1e300):
        dirty = clean.copy()
        dirty[:, 1, 0] = junk                                  # below the diagonal: invalid
        dirty[1, 2, 2] = junk
        a = same_sample(ref, fast, dirty, u)
        assert np.array_equal(a.trace, t.numpy())
        x = T(dirty).requires_grad_(True)
        lp = fast.log_prob(t, x)
        (g,) = torch.autograd.grad(lp.sum(), x)
        assert torch.equal(lp.detach(), lp0) and not g.isnan().any()
        np.testing.assert_allclose(g.numpy(), g0.numpy(), atol=1e-12)
        lp1, g1 = fast.log_prob_and_grad(t, T(dirty))
        assert torch.equal(lp1, lp0) and torch.equal(g1, g0)
        np.testing.assert_allclose(lp1.numpy(), ref.log_prob(t.numpy(), dirty))
        e = fast.conditional_noise(t, x, uniforms=T(v))
        assert torch.equal(e.detach(), e0)
        (ge,) = torch.autograd.grad(torch.where(torch.isfinite(e), e, 0.0).sum(), x)
        assert not ge.isnan().any() and (ge[:, 1, 0] == 0).all()
        np.testing.assert_allclose(e0.numpy(), ref.conditional_noise(t.numpy(), dirty, uniforms=v), rtol=1e-12)
        assert torch.equal(fast.decode(t, T(dirty)).a, want.structure.a)
    for junk in (np.nan, np.inf):                              # at a valid atom: refused
        dirty = clean.copy()
        dirty[1, 0, 2] = junk
        dirty[0, 2, 1] = junk                                  # (and an ignored one before it)
        _, ex = outcome(lambda: ref.sample(dirty, uniforms=u))
        _, ey = outcome(lambda: fast.sample(T(dirty), uniforms=T(u)))
        same_error(ex, ey)
        assert "(1, 0, 2)" in str(ex)
        for method in ("log_prob", "log_prob_and_grad", "decode"):
            _, ex = outcome(lambda: getattr(ref, method if method != "decode" else "log_prob")(t.numpy(), dirty))
            _, ey = outcome(lambda: getattr(fast, method)(t, T(dirty)))
            same_error(ex, ey)


# ==== 6. a static shape that becomes negative ===============================================================
@spec
def shorter(n, k):
    item = atoms(n)
    w = race(item)
    x = zeros(n - k, int)  # BAD
    return w, x


def test_a_negative_static_shape_is_a_spec_error_on_both():
    for backend in ("numpy", "torch"):
        prog = structdsl.compile(shorter, backend=backend, k=5)
        logits = np.zeros((2, 4)) if backend == "numpy" else torch.zeros(2, 4, dtype=torch.float64)
        with pytest.raises(SpecError) as info:
            prog.sample(logits)
        assert info.value.line == bad_line(shorter) and "k=5" in str(info.value) and "n=4" in str(info.value)
    ref, fast = programs(shorter, k=4)                         # n - k == 0: an empty array, fine
    a = same_sample(ref, fast, np.zeros((2, 4)), first_winners(4, [1, 3]))
    assert a.structure.x.shape == (2, 0)


# ==== 7. empty arrays ==========================================================================
@spec
def empty_arrays(n, k):
    """Every operation on arrays of size 0 (n == k): reductions that have a value, elementwise
    work, stores through an empty mask, then a read from the empty array."""
    item = atoms(n)
    w = race(item)
    x = zeros(n - k, int)
    m = x > w
    x[m] = 3
    x = where(m, x + w, -x) * 2
    a = any(m) or all(x > 0)
    s = sum(x) + w
    r = zeros((n - k, 2), int)
    r[:, 0] = 1
    t = minimum(x, w) + maximum(x, 1)
    y = x[w - 2] if w >= 3 else s  # BAD
    return a, s, x, t, y


@spec
def empty_reduction(n, k):
    item = atoms(n)
    w = race(item)
    x = zeros(n - k, int)
    y = max(x) + w  # BAD
    return y


@spec
def empty_write(n, k):
    item = atoms(n)
    w = race(item)
    x = zeros((2, n - k), int)
    x[1, w - 3] = 1  # BAD
    return x


def test_empty_arrays_mean_the_same():
    assert each_lane(empty_arrays, k=N) == [3, 4]
    assert each_lane(empty_reduction, k=N) == [0, 1, 2, 3, 4]
    assert each_lane(empty_reduction, k=N - 1) == []
    assert each_lane(empty_write, k=N) == [0, 1, 2, 3, 4]
