"""The torch backend beyond the conformance suite (tests/test_conformance.py, which holds it
to the reference on every spec): float32 log-probabilities within 1e-5, autograd gradients
equal to the analytic trace score, E | T with a reparameterised gradient that matches finite
differences, grouped races as segment reductions, guards, augmented stores."""
import numpy as np
import pytest

import structdsl
from structdsl import NestingError, SpecOverflowError, atoms, race, spec, specs
from shared_specs import (atom_shape, augmented, bad_line, compiled, crossing_groups, guarded,
                          refining_groups)

torch = pytest.importorskip("torch")


def programs(name):
    """(torch, reference) programs, compiled once per test session."""
    return compiled(name, "torch"), compiled(name, "numpy")


def T(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


@pytest.mark.parametrize("name", ["spanning_tree", "arborescence", "binary_tree", "top_k", "height"])
def test_autograd_equals_the_analytic_score_and_the_noise_gradient_finite_differences(name):
    fast, ref = programs(name)
    shape = atom_shape(name, 4)
    rng = np.random.default_rng(5)
    logits = T(rng.normal(size=(3,) + shape)).requires_grad_(True)
    trace = fast.sample(logits, generator=torch.Generator().manual_seed(2)).trace
    lp = fast.log_prob(trace, logits)
    (auto,) = torch.autograd.grad(lp.sum(), logits)
    _, analytic = ref.log_prob_and_grad(trace.numpy(), logits.detach().numpy())
    np.testing.assert_allclose(auto.numpy(), analytic, atol=1e-12)
    # E | T is reparameterised: d sum(E * c) / d logits by autograd vs central differences
    R, A = fast.max_races(shape), int(np.prod(shape))
    v = T(rng.uniform(0.05, 0.95, size=(3, R + A)))
    c = T(rng.normal(size=(3,) + shape))
    noise = fast.conditional_noise(trace, logits, uniforms=v)
    fin = torch.isfinite(noise)                       # +inf at invalid atoms
    (g,) = torch.autograd.grad(torch.where(fin, noise * c, 0.0).sum(), logits)
    x0, eps = logits.detach().numpy(), 1e-6
    fd = np.zeros_like(x0)
    for idx in np.ndindex(*x0.shape):
        up, down = x0.copy(), x0.copy()
        up[idx] += eps
        down[idx] -= eps
        f = [np.where(fin.numpy(), ref.conditional_noise(trace.numpy(), z, uniforms=v.numpy()) * c.numpy(), 0).sum()
             for z in (up, down)]
        fd[idx] = (f[0] - f[1]) / (2 * eps)
    np.testing.assert_allclose(g.numpy(), fd, rtol=1e-5, atol=1e-6)
    assert np.array_equal(fast.solve(noise.detach()).trace.numpy(), trace.numpy())


def test_float32_log_probs_are_exact_to_1e5_even_100_nats_apart():
    fast, ref = programs("spanning_tree")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 6, 6)) * 3
    logits[:, 0, 1] += 100.0                          # one edge 100 nats above the others
    s = fast.sample(torch.as_tensor(logits, dtype=torch.float32), generator=torch.Generator().manual_seed(0))
    assert s.trace.dtype == torch.int64 and s.noise.dtype == torch.float32
    lp32 = fast.log_prob(s.trace, torch.as_tensor(logits, dtype=torch.float32))
    lp64 = ref.log_prob(s.trace.numpy(), logits.astype(np.float32).astype(np.float64))
    assert lp32.dtype == torch.float32
    np.testing.assert_allclose(lp32.numpy(), lp64, rtol=1e-5, atol=1e-5)
    # the races ran in log space: the 100-nat edge is in every tree
    adj = s.structure.adjacency
    assert bool(adj[:, 0, 1].all())


def test_grouped_races_as_segment_reductions_match_the_reference():
    """Grouped races run as segment reductions (every group at once): traces, structures,
    log p, its autograd gradient, E | T and solve against the reference, on a nested
    grouped spec; a grouping that breaks nesting fails at the same line and lane."""
    fast, ref = (structdsl.compile(refining_groups, backend=b) for b in ("torch", "numpy"))
    rng = np.random.default_rng(3)
    for n in (1, 3, 6, 8):
        logits = rng.normal(size=(5, n))
        logits[1, :n // 2] = -np.inf                   # ragged: absent atoms empty some groups
        u = rng.uniform(size=(5, n))
        a, b = fast.sample(T(logits), uniforms=T(u)), ref.sample(logits, uniforms=u)
        assert np.array_equal(a.trace.numpy(), b.trace)
        for x, y in zip(a.structure, b.structure):
            assert np.array_equal(x.numpy(), y)
        x = T(logits).requires_grad_(True)
        lp = fast.log_prob(a.trace, x)
        lp_ref, g_ref = ref.log_prob_and_grad(b.trace, logits)
        np.testing.assert_allclose(lp.detach().numpy(), lp_ref, rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(lp.sum(), x)
        np.testing.assert_allclose(g.numpy(), g_ref, atol=1e-12)
        R = fast.max_races((n,))
        v = rng.uniform(size=(5, R + n))
        na, nb = fast.conditional_noise(a.trace, T(logits), uniforms=T(v)).numpy(), \
            ref.conditional_noise(b.trace, logits, uniforms=v)
        assert np.array_equal(np.isinf(na), np.isinf(nb))
        np.testing.assert_allclose(na[np.isfinite(nb)], nb[np.isfinite(nb)], rtol=1e-12)
        assert np.array_equal(fast.solve(T(na)).trace.numpy(), b.trace)
        if R > 1:                                      # winners swapped: impossible on both
            t = b.trace.copy()
            t[..., [0, 1]] = t[..., [1, 0]]
            np.testing.assert_allclose(fast.log_prob(torch.as_tensor(t), T(logits)).numpy(),
                                       ref.log_prob(t, logits), rtol=1e-12, atol=1e-12)
    # arborescences: contracted cycles race residuals reduced by earlier group minima
    fast, ref = programs("arborescence")
    logits, u = rng.normal(size=(64, 5, 5)), rng.uniform(size=(64, 5, 5))
    a, b = fast.sample(T(logits), uniforms=T(u)), ref.sample(logits, uniforms=u)
    assert np.array_equal(a.trace.numpy(), b.trace)
    np.testing.assert_allclose(fast.log_prob(a.trace, T(logits)).numpy(), ref.log_prob(b.trace, logits), rtol=1e-12)
    bad_fast, bad_ref = (structdsl.compile(crossing_groups, backend=b) for b in ("torch", "numpy"))
    logits = rng.normal(size=(3, 6))
    with pytest.raises(NestingError) as want:
        bad_ref.sample(logits, uniforms=np.full((3, 6), 0.5))
    with pytest.raises(NestingError) as got:
        bad_fast.sample(T(logits), uniforms=T(np.full((3, 6), 0.5)))
    assert (got.value.line, got.value.lane) == (want.value.line, want.value.lane) == (bad_line(crossing_groups), (0,))


def test_guards_make_grid_evaluation_mean_the_per_atom_definition():
    fast, ref = (structdsl.compile(guarded, backend=b) for b in ("torch", "numpy"))
    rng = np.random.default_rng(1)
    logits, u = rng.normal(size=(8, 5)), rng.uniform(size=(8, 5))
    a, b = fast.sample(T(logits), uniforms=T(u)), ref.sample(logits, uniforms=u)
    assert np.array_equal(a.trace.numpy(), b.trace)


def test_bad_input_is_refused():
    fast, _ = programs("spanning_tree")
    with pytest.raises(ValueError, match="NaN"):
        fast.sample(torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\+inf"):
        fast.log_prob(torch.zeros(3, dtype=torch.int64), torch.full((3, 3), float("inf")))
    with pytest.raises(ValueError, match="trace must have shape"):
        fast.log_prob(torch.zeros((2, 7), dtype=torch.int64), torch.zeros((4, 4)))
    with pytest.raises(TypeError, match="floating-point"):
        fast.sample(torch.zeros((4, 4), dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        fast.sample(torch.zeros((4, 4)), uniforms=torch.zeros((4, 4)))


def test_a_padded_trace_does_not_give_atom_0_fresh_noise():
    """E | T: atom 0 won, the trace is padded with -1 after it; padding must not un-win it."""
    fast, ref = programs("top_k")
    logits = np.array([[0.3, -np.inf, -np.inf, -np.inf]])
    trace = np.array([[0, -1]])
    v = np.full((1, 2 + 4), 0.5)
    na = fast.conditional_noise(torch.as_tensor(trace), T(logits), uniforms=T(v)).numpy()
    nb = ref.conditional_noise(trace, logits, uniforms=v)
    np.testing.assert_allclose(na, nb, rtol=1e-12)


def test_augmented_stores_through_slices_match_the_reference():
    fast, ref = (structdsl.compile(augmented, backend=b) for b in ("torch", "numpy"))
    rng = np.random.default_rng(2)
    logits, u = rng.normal(size=(6, 4)), rng.uniform(size=(6, 4))
    a, b = fast.sample(T(logits), uniforms=T(u)), ref.sample(logits, uniforms=u)
    assert np.array_equal(a.structure.x.numpy(), b.structure.x)


HALVES = (2**62, 2**62 - 1, 1)


@spec
def big_sum(n):
    item = atoms(n)
    w = race(item)
    total = sum(HALVES) + w  # BAD
    return total



def test_sum_overflow_raises_like_the_reference():
    fast, ref = (structdsl.compile(big_sum, backend=b) for b in ("torch", "numpy"))
    with pytest.raises(SpecOverflowError) as want:
        ref.sample(np.zeros((2, 3)), seed=0)
    with pytest.raises(SpecOverflowError) as got:
        fast.sample(torch.zeros(2, 3, dtype=torch.float64))
    assert got.value.line == want.value.line == bad_line(big_sum)


def test_a_program_without_races_scores_zero_even_with_absent_atoms():
    """Clustering 2 nodes into 2 clusters runs no race: log p = 0 (not NaN from -inf * 0)
    with an atom at -inf, as the reference says (hypothesis found it)."""
    x = np.zeros((2, 2))
    x[1, 1] = -np.inf
    fast, ref = (structdsl.compile(specs.clustering, backend=b, c=2) for b in ("torch", "numpy"))
    trace = ref.sample(x, seed=0).trace
    lp, grad = fast.log_prob_and_grad(torch.as_tensor(trace), T(x))
    assert float(lp) == float(ref.log_prob(trace, x)) == 0.0
    assert not bool(grad.isnan().any())
