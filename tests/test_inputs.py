"""Input validation and "nothing silently wrong" properties of compiled programs.

Bad arguments must raise a clear exception that names what was expected; inputs that are
well formed but impossible must give exactly ``-inf`` (never a finite number, never NaN);
the run-time checks of the reference backend (nesting, empty races, group keys) must fire.
"""
import math
from fractions import Fraction

import numpy as np
import pytest

import structdsl
from structdsl import arange, atoms, full, race, race_groups, spec, where, zeros
from conformance import BACKENDS, runner
from structdsl.specs import (arborescence, binary_tree, categorical, clustering, matching,
                             permutation, spanning_tree, top_k)

# (spec, small atoms shape, static parameters) for every built-in spec
BUILTINS = {
    "categorical": (categorical, (5,), {}),
    "top_k": (top_k, (5,), {"k": 3}),
    "permutation": (permutation, (4,), {}),
    "spanning_tree": (spanning_tree, (4, 4), {}),
    "arborescence": (arborescence, (4, 4), {}),
    "binary_tree": (binary_tree, (5,), {}),
    "matching": (matching, (3, 3), {}),
    "clustering": (clustering, (4, 4), {"c": 2}),
}


def _compile(name, backend="numpy"):
    s, shape, statics = BUILTINS[name]
    return runner(s, backend, **statics), shape


# Every test that takes one of these runs on every backend, through the conformance
# harness's NumPy-speaking Runner (tests/conformance.py): one meaning, the same messages.
@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def cat(backend):
    return runner(categorical, backend)


@pytest.fixture(scope="module")
def perm(backend):
    return runner(permutation, backend)


@pytest.fixture(scope="module")
def tree(backend):
    return runner(spanning_tree, backend)


@pytest.fixture(scope="module")
def arb(backend):
    return runner(arborescence, backend)


# ---- custom specs (module level: the frontend reads their source) -------------------------
@spec(nested=True)
def split_halves(n):
    """Declared nested, but the second race (i >= 2) is disjoint from the first (i < 2)."""
    item = atoms(n)
    first = race(item, lambda i: i < 2)
    second = race(item, lambda i: i >= 2)
    return first, second


@spec
def split_halves_free(n):
    """The same algorithm without the nesting promise: it must run fine."""
    item = atoms(n)
    first = race(item, lambda i: i < 2)
    second = race(item, lambda i: i >= 2)
    return first, second


@spec
def groups_too_high(n):
    """race_groups with keys 0..n-1 but only 2 groups: key 2 is out of [-1, 2)."""
    item = atoms(n)
    key = arange(n)
    winners = race_groups(item, key, groups=2)
    return winners


@spec
def groups_too_low(n):
    """race_groups with key i - 2: items 0 gets -2, below the sit-out value -1."""
    item = atoms(n)
    winners = race_groups(item, lambda i: i - 2, groups=n)
    return winners


@spec
def groups_in_range(n):
    """Control: keys in [-1, 2): items 0, 1 race in group 0 and 1, the rest sit out."""
    item = atoms(n)
    key = where(arange(n) < 2, arange(n), full(n, -1))
    winners = race_groups(item, key, groups=2)
    taken = zeros(n, bool)
    return winners, taken


# ---- logits: NaN, +inf, dimensions, shapes ------------------------------------------------
def test_nan_logits_rejected_by_every_entry_point(cat):
    bad = np.array([0.0, np.nan, 1.0])
    trace = np.array([0])
    with pytest.raises(ValueError, match=r"logits contain NaN \(1 entries, first at index \(1,\)\)"):
        cat.sample(bad, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        cat.log_prob(trace, bad)
    with pytest.raises(ValueError, match="NaN"):
        cat.conditional_noise(trace, bad, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        cat.enumerate(bad)


@pytest.mark.parametrize("junk", [np.nan, np.inf, -np.inf, 1e300])
def test_entries_at_invalid_atoms_are_ignored_whatever_they_hold(tree, junk):
    """One meaning (docs/design.md 3.1): invalid atoms are not part of the model, so every
    entry point gives exactly what it gives with zeros there, NaN and +inf included."""
    clean = np.random.default_rng(1).normal(size=(2, 3, 3))
    dirty = clean.copy()
    dirty[:, 1, 1] = junk                    # the diagonal is not an edge
    dirty[:, 2, 0] = junk                    # nor is the lower triangle
    a, b = tree.sample(clean, seed=3), tree.sample(dirty, seed=3)
    np.testing.assert_array_equal(a.trace, b.trace)
    np.testing.assert_array_equal(a.structure.adjacency, b.structure.adjacency)
    np.testing.assert_array_equal(tree.log_prob(a.trace, clean), tree.log_prob(a.trace, dirty))
    lp_a, g_a = tree.log_prob_and_grad(a.trace, clean)
    lp_b, g_b = tree.log_prob_and_grad(a.trace, dirty)
    np.testing.assert_array_equal(lp_a, lp_b)
    np.testing.assert_array_equal(g_a, g_b)
    assert (g_b[:, 1, 1] == 0).all() and (g_b[:, 2, 0] == 0).all()
    np.testing.assert_array_equal(tree.conditional_noise(a.trace, clean, seed=4),
                                  tree.conditional_noise(a.trace, dirty, seed=4))
    assert tree.enumerate(clean[0]).probs.tolist() == tree.enumerate(dirty[0]).probs.tolist()
    bad = clean.copy()
    bad[1, 0, 2] = np.nan                    # a valid atom: an error naming the entry
    with pytest.raises(ValueError, match=r"NaN .*index \(1, 0, 2\)"):
        tree.sample(bad, seed=0)


def test_nan_in_batched_logits_names_the_batch_index(cat):
    logits = np.zeros((2, 3))
    logits[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN .*first at index \(1, 2\)"):
        cat.sample(logits, seed=0)


def test_posinf_logits_rejected(cat, tree):
    with pytest.raises(ValueError, match=r"logits contain \+inf \(first at index \(2,\)\)"):
        cat.sample(np.array([0.0, 1.0, np.inf]), seed=0)
    with pytest.raises(ValueError, match=r"\+inf"):
        cat.log_prob(np.array([2]), np.array([0.0, 1.0, np.inf]))
    with pytest.raises(ValueError, match=r"\+inf"):
        cat.enumerate(np.array([0.0, 1.0, np.inf]))
    logits = np.zeros((3, 3))
    logits[0, 2] = np.inf          # a valid atom
    with pytest.raises(ValueError, match=r"\+inf \(first at index \(0, 2\)\)"):
        tree.sample(logits, seed=0)


def test_non_numeric_logits_raise_type_error(cat):
    with pytest.raises(TypeError, match="logits must be a real array"):
        cat.sample(["a", "b", "c"])


def test_too_few_dimensions(cat, tree):
    with pytest.raises(ValueError, match=r"categorical: logits must have shape \[\.\.\., n\] "
                                         r"\(at least 1 dims\), got shape \(\)"):
        cat.sample(np.float64(0.0))
    with pytest.raises(ValueError, match=r"spanning_tree: logits must have shape \[\.\.\., n, n\] "
                                         r"\(at least 2 dims\), got shape \(3,\)"):
        tree.sample(np.zeros(3))
    with pytest.raises(ValueError, match=r"weights must have shape \[\.\.\., n, n\]"):
        tree.solve(np.ones(3))
    with pytest.raises(ValueError, match=r"at least 2 dims"):
        tree.log_prob(np.array([1, 2]), np.zeros(3))


def test_non_square_spanning_tree_logits(tree):
    msg = r"spanning_tree expects logits of shape \[\.\.\., n, n\] .*trailing dims \(3, 3\); " \
          r"got trailing dims \(3, 4\)"
    with pytest.raises(ValueError, match=msg):
        tree.sample(np.zeros((3, 4)), seed=0)
    with pytest.raises(ValueError, match=msg):
        tree.sample(np.zeros((2, 3, 4)), seed=0)
    with pytest.raises(ValueError, match=r"got trailing dims \(3, 4\)"):
        tree.max_races((3, 4))
    with pytest.raises(ValueError, match=r"got trailing dims \(3, 4\)"):
        tree.solve(np.ones((3, 4)))


def test_empty_atom_dimension(cat):
    with pytest.raises(ValueError, match=r"every atoms dimension must be positive, got \(0,\)"):
        cat.sample(np.zeros(0))


# ---- traces -------------------------------------------------------------------------------
def test_trace_last_dim_must_be_max_races(tree):
    assert tree.max_races((3, 3)) == 2
    with pytest.raises(ValueError, match=r"trace must have shape \[\.\.\., 2\] \(max_races of "
                                         r"spanning_tree for atoms \(3, 3\)\), got \(3,\)"):
        tree.log_prob(np.array([1, 2, 5]), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"trace must have shape \[\.\.\., 2\]"):
        tree.conditional_noise(np.array([[1], [2]]), np.zeros((3, 3)), seed=0)


def test_scalar_trace_rejected(cat):
    with pytest.raises(ValueError, match=r"trace must have shape \[\.\.\., 1\].*got \(\)"):
        cat.log_prob(np.array(1), np.zeros(3))


@pytest.mark.parametrize("entry", [9, 100, -2])
def test_trace_entries_out_of_range(tree, entry):
    with pytest.raises(ValueError, match=r"trace entries must be flat atom indices in \[0, 9\) "
                                         r"or -1 padding"):
        tree.log_prob(np.array([1, entry]), np.zeros((3, 3)))


@pytest.mark.parametrize("trace", [np.array([1.0, 2.0]), np.array([True, False])],
                         ids=["float", "bool"])
def test_non_integer_trace_rejected(tree, trace):
    with pytest.raises(TypeError, match=r"trace must be an integer array, got dtype"):
        tree.log_prob(trace, np.zeros((3, 3)))


def test_trace_and_logits_batches_must_broadcast(tree):
    with pytest.raises(ValueError, match=r"trace batch shape \(4,\) does not broadcast with "
                                         r"logits batch shape \(3,\)"):
        tree.log_prob(np.zeros((4, 2), dtype=np.int64) + np.array([1, 2]), np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="does not broadcast"):
        tree.conditional_noise(np.tile([1, 2], (2, 1)), np.zeros((3, 3, 3)), seed=0)


# ---- uniforms and seeds ------------------------------------------------------------------
def test_uniforms_wrong_shape(cat, tree):
    with pytest.raises(ValueError, match=r"uniforms must have shape \(3,\), got \(4,\)"):
        cat.sample(np.zeros(3), uniforms=np.full(4, 0.5))
    # with sample_shape and a batch: [*sample_shape, *batch, *atom_shape]
    with pytest.raises(ValueError, match=r"uniforms must have shape \(2, 5, 3\), got \(5, 3\)"):
        cat.sample(np.zeros((5, 3)), sample_shape=(2,), uniforms=np.full((5, 3), 0.5))
    # conditional_noise: [*batch, max_races + A] = [1 + 9]
    with pytest.raises(ValueError, match=r"uniforms must have shape \(11,\), got \(9,\)"):
        tree.conditional_noise(np.array([1, 2]), np.zeros((3, 3)), uniforms=np.full(9, 0.5))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5, np.nan])
def test_uniforms_outside_open_unit_interval(cat, bad):
    u = np.array([0.5, bad, 0.5])
    with pytest.raises(ValueError, match=r"uniforms must lie strictly inside \(0, 1\)"):
        cat.sample(np.zeros(3), uniforms=u)
    with pytest.raises(ValueError, match=r"strictly inside \(0, 1\)"):
        cat.conditional_noise(np.array([0]), np.zeros(3), uniforms=np.array([0.5, 0.5, bad, 0.5]))


def test_uniforms_and_seed_together(cat):
    with pytest.raises(TypeError, match="give either uniforms= or seed=, not both"):
        cat.sample(np.zeros(3), uniforms=np.full(3, 0.5), seed=1)
    with pytest.raises(TypeError, match="not both"):
        cat.conditional_noise(np.array([0]), np.zeros(3), uniforms=np.full(4, 0.5), seed=1)


# ---- enumerate ---------------------------------------------------------------------------
def test_enumerate_rejects_batched_logits_and_rates(cat):
    with pytest.raises(ValueError, match=r"enumerate takes unbatched logits of shape \(3,\), "
                                         r"got \(2, 3\)"):
        cat.enumerate(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"enumerate takes unbatched rates of shape \(3,\), "
                                         r"got \(2, 3\)"):
        cat.enumerate(rates=[[1, 2, 3], [1, 2, 3]])


def test_enumerate_needs_exactly_one_of_logits_and_rates(cat):
    with pytest.raises(TypeError, match="enumerate takes exactly one of logits= or rates="):
        cat.enumerate(np.zeros(3), rates=[1, 1, 1])
    with pytest.raises(TypeError, match="exactly one of logits= or rates="):
        cat.enumerate()


@pytest.mark.parametrize("rates, shown", [
    ([1, -1, 1], "-1"),
    ([1, Fraction(-1, 2), 1], r"Fraction\(-1, 2\)"),
    ([1, 1.5, 1], "1.5"),
    (np.array([1.0, 2.0, 3.0]), "1.0"),
], ids=["negative-int", "negative-fraction", "float", "float-array"])
def test_enumerate_rejects_negative_or_float_rates(cat, rates, shown):
    with pytest.raises(TypeError, match=r"exact rates must be non-negative ints or Fractions, "
                                        r"got " + shown):
        cat.enumerate(rates=rates)


def test_enumerate_exact_rates_give_exact_probabilities(cat):
    enum = cat.enumerate(rates=[1, 2, Fraction(3)])
    assert [int(t[0]) for t in enum.traces] == [0, 1, 2]
    assert list(enum.probs) == [Fraction(1, 6), Fraction(1, 3), Fraction(1, 2)]
    assert all(isinstance(p, Fraction) for p in enum.probs)


def test_enumeration_size_guard(perm):
    # permutation of 4 items: exactly 4! = 24 traces
    with pytest.raises(structdsl.EnumerationLimitError,
                       match=r"permutation with atoms \(4,\) has more than 23 traces.*max_traces"):
        perm.enumerate(np.zeros(4), max_traces=23)
    with pytest.raises(structdsl.EnumerationLimitError, match="more than 5 traces"):
        perm.enumerate(rates=[1, 1, 1, 1], max_traces=5)
    assert len(perm.enumerate(np.zeros(4), max_traces=24)) == 24


# ---- empty races -------------------------------------------------------------------------
def test_categorical_all_minus_inf_is_an_empty_race(cat):
    with pytest.raises(structdsl.EmptyRaceError, match=r"categorical\.py:\d+: race has no live member"):
        cat.sample(np.full(3, -np.inf), seed=0)
    with pytest.raises(structdsl.EmptyRaceError, match="no live member"):
        cat.enumerate(rates=[0, 0, 0])
    with pytest.raises(structdsl.EmptyRaceError, match="no live member"):
        cat.solve(np.full(3, np.inf))


def test_top_k_with_k_above_n_is_refused_by_its_require():
    prog = structdsl.compile(top_k, backend="numpy", k=4)
    with pytest.raises(ValueError, match=r"top_k needs 0 <= k <= n \(got k=4, n=3; require at .*top_k\.py:\d+\)"):
        prog.sample(np.zeros(3), seed=0)


def test_top_k_with_too_few_live_items_pads_its_order():
    prog = structdsl.compile(top_k, backend="numpy", k=3)
    s = prog.sample(np.array([0.0, 0.0, -np.inf]), seed=0)
    assert sorted(s.structure.order.tolist()[:2]) == [0, 1] and s.structure.order[2] == -1
    # k == n is fine and gives a full ordering
    ok = structdsl.compile(top_k, backend="numpy", k=3).sample(np.zeros(3), seed=0)
    assert sorted(ok.trace.tolist()) == [0, 1, 2]


def test_permutation_with_an_item_at_minus_inf_is_an_empty_race(perm):
    with pytest.raises(structdsl.EmptyRaceError, match=r"permutation\.py:\d+: race has no live member"):
        perm.sample(np.array([0.0, 0.0, -np.inf]), seed=0)
    with pytest.raises(structdsl.EmptyRaceError):
        perm.enumerate(np.array([0.0, 0.0, -np.inf]))


def test_empty_race_error_is_a_race_error():
    assert issubclass(structdsl.EmptyRaceError, structdsl.RaceError)
    assert issubclass(structdsl.NestingError, structdsl.RaceError)


# ---- compile-time parameters -------------------------------------------------------------
def test_missing_static_parameter():
    with pytest.raises(TypeError, match=r"spec 'top_k' needs static parameter\(s\) \['k'\]: "
                                        r"structdsl\.compile\(top_k, k=\.\.\.\)"):
        structdsl.compile(top_k, backend="numpy")
    with pytest.raises(TypeError, match=r"needs static parameter\(s\) \['c'\]"):
        structdsl.compile(clustering, backend="numpy")


def test_unknown_static_parameter():
    with pytest.raises(TypeError, match=r"spec 'top_k' has no parameter\(s\) \['q'\]; its "
                                        r"parameters are \['n', 'k'\]"):
        structdsl.compile(top_k, backend="numpy", k=2, q=1)
    with pytest.raises(TypeError, match=r"has no parameter\(s\) \['k'\]"):
        structdsl.compile(categorical, backend="numpy", k=2)


@pytest.mark.parametrize("value", [2.0, "2", True, None], ids=repr)
def test_non_int_static_parameter(value):
    with pytest.raises(TypeError, match=r"static parameter 'k' must be an int, got "):
        structdsl.compile(top_k, backend="numpy", k=value)


def test_numpy_int_static_parameter_is_accepted():
    prog = structdsl.compile(top_k, backend="numpy", k=np.int64(2))
    assert prog.static_params == {"k": 2} and type(prog.static_params["k"]) is int
    assert prog.max_races((5,)) == 2


def test_compile_rejects_non_spec_and_unknown_backend():
    with pytest.raises(TypeError, match="compile expects a @spec-decorated function, got function"):
        structdsl.compile(lambda n: n)
    with pytest.raises(ValueError) as info:
        structdsl.compile(categorical, backend="nope")
    # every registered backend is named (the conformance suite registers a test-only one)
    assert str(info.value) == f"unknown backend 'nope'; available: {structdsl.backends.available()}"
    assert {"numba", "numpy", "torch"} <= set(structdsl.backends.available())


# ---- solve -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_solve_rejects_nan_and_minus_inf_weights(tree, bad):
    w = np.ones((3, 3))
    w[0, 1] = bad
    with pytest.raises(ValueError, match="weights contain NaN or -inf"):
        tree.solve(w)


def test_solve_ignores_invalid_atoms_and_excludes_plus_inf(tree):
    w = np.array([[0.0, 5.0, 1.0],
                  [-7.0, 0.0, 2.0],     # (1, 0) and the diagonal are not edges: ignored
                  [-9.0, -9.0, 0.0]])
    trace, (adj,) = tree.solve(w)
    assert trace.tolist() == [2, 5]            # edges (0, 2) then (1, 2)
    w[0, 2] = np.inf                           # exclude edge (0, 2)
    trace, (adj,) = tree.solve(w)
    assert trace.tolist() == [5, 1]            # edges (1, 2) then (0, 1)
    assert adj[0, 1] and adj[1, 2] and not adj[0, 2]


# ---- log_prob: exactly -inf for impossible traces, finite otherwise ----------------------
def test_log_prob_winner_at_minus_inf_atom(cat):
    logits = np.array([0.0, -np.inf, 1.0])
    lp = cat.log_prob(np.array([[0], [1], [2]]), logits)
    assert lp[1] == -np.inf
    assert np.isfinite(lp[[0, 2]]).all()
    np.testing.assert_allclose(lp[[0, 2]], [0.0 - np.logaddexp(0.0, 1.0), 1.0 - np.logaddexp(0.0, 1.0)])
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0)


def test_log_prob_winner_at_minus_inf_edge_or_invalid_atom(tree):
    logits = np.zeros((3, 3))
    logits[0, 1] = -np.inf                     # edge (0, 1) excluded
    lp = tree.log_prob(np.array([[1, 5], [2, 5], [0, 5], [3, 5]]), logits)
    assert lp[0] == -np.inf                    # winner (0, 1) at -inf
    assert np.isfinite(lp[1])                  # (0, 2), (1, 2): a real tree
    assert lp[2] == -np.inf                    # (0, 0): not an edge
    assert lp[3] == -np.inf                    # (1, 0): not an edge (u >= v)


def test_log_prob_permutation_with_repeated_item_is_minus_inf(perm):
    logits = np.array([0.3, -1.0, 2.0])
    lp = perm.log_prob(np.array([[0, 1, 2], [0, 0, 1], [2, 1, 2], [2, 1, 0]]), logits)
    assert lp[1] == -np.inf and lp[2] == -np.inf
    assert np.isfinite(lp[[0, 3]]).all()
    # Plackett-Luce by hand for [2, 1, 0]
    expected = (2.0 - math.log(math.exp(0.3) + math.exp(-1.0) + math.exp(2.0))
                + (-1.0) - math.log(math.exp(0.3) + math.exp(-1.0)) + 0.0)
    assert lp[3] == pytest.approx(expected, rel=1e-12)


def test_log_prob_padding_too_early_is_minus_inf(perm, arb):
    logits = np.array([0.3, -1.0, 2.0])
    lp = perm.log_prob(np.array([[0, 1, -1], [-1, 0, 1], [-1, -1, -1]]), logits)
    assert (lp == -np.inf).all()
    assert arb.max_races((3, 3)) == 4
    lp = arb.log_prob(np.array([[1, -1, 2, -1], [-1, -1, -1, -1], [1, 2, -1, -1]]), np.zeros((3, 3)))
    assert lp[0] == -np.inf and lp[1] == -np.inf
    assert np.isfinite(lp[2])


def test_log_prob_extra_winner_after_program_ends_is_minus_inf(arb):
    logits = np.zeros((3, 3))
    # edges 0->1 (flat 1) and 0->2 (flat 2) finish the arborescence after two races
    good = np.array([1, 2, -1, -1])
    lp_good = arb.log_prob(good, logits)
    assert np.isfinite(lp_good)
    for extra in (5, 7):                       # 1->2 and 2->1 are real edges, but never raced
        bad = good.copy()
        bad[2] = extra
        assert arb.log_prob(bad, logits) == -np.inf
    bad = good.copy()
    bad[3] = 5                                 # a winner after a -1 gap
    assert arb.log_prob(bad, logits) == -np.inf


def test_log_prob_of_enumerated_traces_matches_and_sums_to_one(arb):
    logits = np.array([[0.0, 0.4, -0.3], [0.0, 0.0, 1.1], [0.0, -0.6, 0.0]])
    enum = arb.enumerate(logits)
    lp = arb.log_prob(enum.traces, logits)
    assert np.isfinite(lp).all()
    np.testing.assert_allclose(lp, enum.log_probs, rtol=1e-12)
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0, rtol=1e-12)


# ---- broadcasting ------------------------------------------------------------------------
def test_log_prob_batch_broadcasting_matches_per_element(tree):
    rng = np.random.default_rng(3)
    S, B, n = 2, 3, 4
    logits = rng.normal(size=(B, n, n))
    traces = tree.sample(logits, sample_shape=(S,), seed=4).trace
    assert traces.shape == (S, B, tree.max_races((n, n)))
    lp = tree.log_prob(traces, logits)
    assert lp.shape == (S, B)
    expected = np.array([[tree.log_prob(traces[s, b], logits[b]) for b in range(B)]
                         for s in range(S)])
    assert np.array_equal(lp, expected)
    assert np.isfinite(lp).all()
    # an unbatched trace against batched logits, and a [S, 1, R] trace against [B] logits
    lp0 = tree.log_prob(traces[0, 0], logits)
    assert lp0.shape == (B,)
    assert lp0[0] == lp[0, 0]
    lp1 = tree.log_prob(traces[:, :1], logits)
    assert lp1.shape == (S, B)
    assert np.array_equal(lp1, np.array([[tree.log_prob(traces[s, 0], logits[b]) for b in range(B)]
                                         for s in range(S)]))


def test_conditional_noise_broadcasts_and_reproduces_traces(tree):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 4, 4))
    traces = tree.sample(logits, sample_shape=(2,), seed=6).trace
    noise = tree.conditional_noise(traces, logits, seed=7)
    assert noise.shape == (2, 3, 4, 4)
    assert np.array_equal(tree.solve(noise).trace, traces)


# ---- sampling determinism ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_sample_with_uniforms_is_deterministic_and_equals_solve(name, backend):
    prog, shape = _compile(name, backend)
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(6,) + shape) * 2.0
    u = rng.uniform(size=(6,) + shape)
    first = prog.sample(logits, uniforms=u)
    again = prog.sample(logits, uniforms=u.copy())
    assert np.array_equal(first.trace, again.trace)
    for a, b in zip(first.structure, again.structure):
        assert np.array_equal(a, b)
    solved = prog.solve(-np.log(u) * np.exp(-logits))
    assert np.array_equal(first.trace, solved.trace)
    for a, b in zip(first.structure, solved.structure):
        assert np.array_equal(a, b)
    valid = prog.instance(shape).valid
    np.testing.assert_allclose(first.noise, np.where(valid, -np.log(u) * np.exp(-logits), np.inf),
                               rtol=1e-12)
    assert np.isfinite(prog.log_prob(first.trace, logits)).all()


def test_sample_is_invariant_to_a_common_logit_shift(perm):
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(20, 5))
    u = rng.uniform(size=(20, 5))
    base = perm.sample(logits, uniforms=u).trace
    assert np.array_equal(perm.sample(logits + 600.0, uniforms=u).trace, base)
    assert np.array_equal(perm.sample(logits - 600.0, uniforms=u).trace, base)


def test_same_seed_same_sample_and_seed_means_the_philox_stream(perm):
    from structdsl import philox
    logits = np.random.default_rng(13).normal(size=(4, 6))
    a = perm.sample(logits, sample_shape=(5,), seed=42)
    b = perm.sample(logits, sample_shape=(5,), seed=42)
    assert np.array_equal(a.trace, b.trace)
    assert np.array_equal(a.noise, b.noise)
    u = philox.uniforms(42, 5 * 4, 6).reshape(5, 4, 6)         # lanes in C order, sample dims first
    c = perm.sample(logits, sample_shape=(5,), uniforms=u)
    assert np.array_equal(a.trace, c.trace)
    d = perm.sample(logits, sample_shape=(5,), seed=43)
    assert not np.array_equal(a.trace, d.trace)


def test_sample_with_a_large_but_representable_logit_spread(perm):
    # exp(700) is finite: the leading item wins the first race with probability ~1
    s = perm.sample(np.array([700.0, 0.0, 0.0]), sample_shape=(4,), seed=0)
    assert (s.trace[:, 0] == 0).all()
    assert all(sorted(t) == [0, 1, 2] for t in s.trace.tolist())


def test_sample_with_a_huge_finite_logit_spread(perm):
    """Races run on log-noise, so finite logits 1000 nats apart are still exact."""
    logits = np.array([1000.0, 0.0, 0.0])
    with np.errstate(over="ignore"):
        s = perm.sample(logits, seed=0)
    assert s.trace[0] == 0
    assert sorted(s.trace.tolist()) == [0, 1, 2]
    assert np.isfinite(perm.log_prob(s.trace, logits))


# ---- conditional_noise -------------------------------------------------------------------
def test_conditional_noise_zero_probability_trace(perm, cat):
    with pytest.raises(ValueError, match=r"trace \(flat batch index 1\) has probability zero"):
        perm.conditional_noise(np.array([[0, 1, 2], [0, 0, 1]]), np.zeros(3), seed=0)
    with pytest.raises(ValueError, match="has probability zero under these logits"):
        cat.conditional_noise(np.array([1]), np.array([0.0, -np.inf, 0.0]), seed=0)


def test_conditional_noise_is_deterministic_given_uniforms(perm):
    logits = np.array([0.2, -0.4, 1.0])
    trace = np.array([2, 0, 1])
    u = np.random.default_rng(0).uniform(size=3 + 3)
    a = perm.conditional_noise(trace, logits, uniforms=u)
    b = perm.conditional_noise(trace, logits, uniforms=u.copy())
    assert np.array_equal(a, b)
    assert np.array_equal(perm.solve(a).trace, trace)


def test_conditional_noise_has_no_nan_for_a_far_below_atom(perm):
    logits = np.array([0.0, -750.0, 0.0])
    with np.errstate(over="ignore", invalid="ignore"):
        noise = perm.conditional_noise(np.array([0, 2, 1]), logits, seed=2)
    assert not np.isnan(noise).any()
    assert np.isfinite(noise[[0, 2]]).all()      # their races had ordinary total rates


# ---- custom specs: nesting promise and group keys ----------------------------------------
def test_nested_promise_broken_raises_nesting_error():
    prog = structdsl.compile(split_halves, backend="numpy")
    logits = np.zeros(4)
    with pytest.raises(structdsl.NestingError, match=r"declares nested=True, but this race's "
                                                     r"members are not inside"):
        prog.sample(logits, seed=0)
    with pytest.raises(structdsl.NestingError, match="nested"):
        prog.solve(np.arange(1.0, 5.0))
    with pytest.raises(structdsl.NestingError, match="nested"):
        prog.log_prob(np.array([0, 2]), logits)
    with pytest.raises(structdsl.NestingError, match="nested"):
        prog.enumerate(logits)


def test_same_algorithm_without_nesting_promise_runs():
    prog = structdsl.compile(split_halves_free, backend="numpy")
    s = prog.sample(np.zeros(4), sample_shape=(8,), seed=0)
    assert (s.trace[:, 0] < 2).all() and (s.trace[:, 1] >= 2).all()
    enum = prog.enumerate(rates=[1, 1, 1, 1])
    assert len(enum) == 4 and all(p == Fraction(1, 4) for p in enum.probs)


def test_race_groups_key_above_range_raises_race_error():
    prog = structdsl.compile(groups_too_high, backend="numpy")
    with pytest.raises(structdsl.RaceError, match=r"race_groups key 2 outside \[-1, 2\)"):
        prog.sample(np.zeros(4), seed=0)
    with pytest.raises(structdsl.RaceError, match=r"outside \[-1, 2\)"):
        prog.enumerate(np.zeros(4))


def test_race_groups_key_below_minus_one_raises_race_error():
    prog = structdsl.compile(groups_too_low, backend="numpy")
    with pytest.raises(structdsl.RaceError, match=r"race_groups key -2 outside \[-1, 4\)"):
        prog.sample(np.zeros(4), seed=0)
    with pytest.raises(structdsl.RaceError, match=r"key -2 outside"):
        prog.solve(np.ones(4))


def test_race_groups_keys_in_range_run():
    prog = structdsl.compile(groups_in_range, backend="numpy")
    s = prog.sample(np.zeros(4), seed=0)
    assert s.trace.tolist() == [0, 1]
    assert s.structure.winners.tolist() == [0, 1]
