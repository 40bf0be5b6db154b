"""``structdsl.torch.RaceDistribution``: shapes, expand, support, validation, ragged sizes,
the CPU fast path against the lock-step path, the noise density, and a Pyro fit."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from structdsl import specs  # noqa: E402
from structdsl.torch import RaceDistribution  # noqa: E402


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
@pytest.mark.parametrize("sample_shape", [(), (2,), (2, 3)])
def test_shapes(batch, sample_shape):
    d = RaceDistribution(specs.spanning_tree, logits=torch.randn(batch + (5, 5), generator=gen(0), dtype=torch.float64))
    assert d.batch_shape == batch and d.event_shape == (4,)
    t = d.sample(sample_shape, generator=gen(1))
    assert t.shape == sample_shape + batch + (4,) and t.dtype == torch.int64
    assert d.log_prob(t).shape == sample_shape + batch
    assert d.structure(t).adjacency.shape == sample_shape + batch + (5, 5)
    trace, noise = d.sample_with_noise(sample_shape, generator=gen(1))
    assert torch.equal(trace, t) and noise.shape == sample_shape + batch + (5, 5)
    assert d.noise_log_prob(noise).shape == sample_shape + batch
    e = d.expand((7,) + batch)
    assert e.batch_shape == (7,) + batch and e.sample().shape == (7,) + batch + (4,)


def test_support_and_validation():
    d = RaceDistribution(specs.spanning_tree, logits=torch.randn(6, 5, 5, dtype=torch.float64), validate_args=True)
    t = d.sample((10,), generator=gen(2))
    assert bool(d.support.check(t).all())
    bad = t.clone()
    bad[..., 1] = bad[..., 0]                       # a retired edge cannot win again
    assert not bool(d.support.check(bad).any())
    with pytest.raises(ValueError, match="support"):
        d.log_prob(bad)
    with pytest.raises(ValueError):
        RaceDistribution(specs.spanning_tree, logits=torch.full((5, 5), float("nan")), validate_args=True)
    with pytest.raises(ValueError):
        RaceDistribution(specs.spanning_tree, logits=torch.full((5, 5), float("inf")), validate_args=True)
    with pytest.raises(TypeError, match="@spec"):
        RaceDistribution(lambda n: n, logits=torch.zeros(5, 5))
    with pytest.raises(ValueError, match="event_shape"):
        d.log_prob(torch.zeros(6, 3, dtype=torch.int64))
    lax = RaceDistribution(specs.spanning_tree, logits=d.logits, validate_args=False)
    assert bool(torch.isneginf(lax.log_prob(bad)).all())


def test_ragged_sizes_by_minus_inf_logits_give_the_smaller_law():
    rng = np.random.default_rng(3)
    small = torch.as_tensor(rng.normal(size=(4, 4)))
    big = torch.full((5, 5), -math.inf, dtype=torch.float64)
    big[:4, :4] = small
    d_big, d_small = (RaceDistribution(specs.spanning_tree, logits=x) for x in (big, small))
    t = d_big.sample((200,), generator=gen(4))
    assert bool((t[:, 3:] == -1).all())             # 3 races, then padding
    u, v = t[:, :3] // 5, t[:, :3] % 5
    t_small = u * 4 + v
    torch.testing.assert_close(d_big.log_prob(t), d_small.log_prob(t_small), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, atom", [("spanning_tree", (5, 5)), ("binary_tree", (6,)), ("arborescence", (4, 4))])
def test_cpu_fast_path_equals_the_lock_step_path(name, atom):
    pytest.importorskip("numba")
    logits = torch.randn((3,) + atom, generator=gen(5), dtype=torch.float64, requires_grad=True)
    fast = RaceDistribution(getattr(specs, name), logits=logits)
    slow = RaceDistribution(getattr(specs, name), logits=logits, fast_cpu=False)
    assert fast._numba is not None and slow._numba is None
    t1, n1 = fast.sample_with_noise((4,), generator=gen(6))
    t2, n2 = slow.sample_with_noise((4,), generator=gen(6))
    assert torch.equal(t1, t2)
    torch.testing.assert_close(n1, n2, rtol=1e-12, atol=0)
    lp1, lp2 = fast.log_prob(t1), slow.log_prob(t1)
    torch.testing.assert_close(lp1, lp2, rtol=1e-12, atol=1e-12)
    w = torch.randn(lp1.shape, generator=gen(7), dtype=torch.float64)
    (g1,) = torch.autograd.grad((lp1 * w).sum(), logits)
    (g2,) = torch.autograd.grad((lp2 * w).sum(), logits)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    # E | T: member sets from the numba replay, closed form in torch = the lock-step replay
    u = torch.rand(t1.shape[:-1] + (fast.instance.max_races + fast.instance.num_atoms,), generator=gen(8),
                   dtype=torch.float64)
    e1, e2 = fast.conditional_noise(t1, uniforms=u), slow.conditional_noise(t1, uniforms=u)
    torch.testing.assert_close(e1, e2, rtol=1e-12, atol=1e-12)
    finite = torch.isfinite(e2)
    v = torch.randn(e1.shape, generator=gen(9), dtype=torch.float64)
    (h1,) = torch.autograd.grad(torch.where(finite, e1 * v, 0.0).sum(), logits)
    (h2,) = torch.autograd.grad(torch.where(finite, e2 * v, 0.0).sum(), logits)
    torch.testing.assert_close(h1, h2, rtol=1e-10, atol=1e-12)


def test_noise_density_and_conditional_noise():
    logits = torch.randn(3, 5, 5, generator=gen(8), dtype=torch.float64)
    d = RaceDistribution(specs.spanning_tree, logits=logits)
    trace, noise = d.sample_with_noise((2,), generator=gen(9))
    valid = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    want = torch.distributions.Exponential(logits.exp().expand(2, 3, 5, 5)[..., valid]).log_prob(
        noise[..., valid]).sum(-1)
    torch.testing.assert_close(d.noise_log_prob(noise), want)
    e = d.conditional_noise(trace, generator=gen(10))
    assert torch.equal(d.program.solve(e).trace, trace)


def test_pyro_fits_a_guide_that_samples_this_distribution():
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as pdist
    from pyro.infer import SVI, TraceGraph_ELBO
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    n = 4

    def model(x):
        t = pyro.sample("tree", RaceDistribution(specs.spanning_tree, logits=torch.zeros(n, n, dtype=torch.float64)))
        adjacency = RaceDistribution(specs.spanning_tree, logits=torch.zeros(n, n, dtype=torch.float64)).structure(t).adjacency
        pyro.sample("x", pdist.Normal(adjacency[0, 1].double(), 0.2), obs=x)

    def guide(x):
        logits = pyro.param("logits", torch.zeros(n, n, dtype=torch.float64))
        pyro.sample("tree", RaceDistribution(specs.spanning_tree, logits=logits))

    # TraceGraph_ELBO's provenance tensors send log_prob down the lock-step torch path
    # (about 0.1 s a step): 50 steps at lr 0.3 end at 0.98-0.9995 for seeds 0-3
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.3}), loss=TraceGraph_ELBO())
    x = torch.tensor(1.0, dtype=torch.float64)
    for _ in range(50):
        loss = svi.step(x)
        assert math.isfinite(loss)
    q = RaceDistribution(specs.spanning_tree, logits=pyro.param("logits").detach())
    has_edge = q.structure(q.sample((2000,), generator=gen(11))).adjacency[:, 0, 1].double().mean()
    assert has_edge > 0.9          # the prior gives the edge (0, 1) probability 1/2


def test_fast_path_checks_its_inputs_without_validation():
    """With validate_args=False the CPU fast path still refuses NaN logits and traces whose
    entries are not atoms, with the same messages as the public API."""
    from structdsl import estimators
    x = torch.zeros(4, 4, dtype=torch.float64)
    x[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"NaN \(1 entries, first at index \(1, 2\)\)"):
        RaceDistribution(specs.spanning_tree, x, validate_args=False).sample()
    y = torch.zeros(3, 4, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y[2, 0, 3] = math.inf                         # a valid atom (u < v)
    lax = RaceDistribution(specs.spanning_tree, y, validate_args=False)
    for draw in (lambda: lax.sample((2,)), lambda: estimators.t_reinforce(lax, lambda s: s.adjacency.sum((-1, -2)))):
        with pytest.raises(ValueError, match=r"\+inf \(first at index \(2, 0, 3\)\)"):
            draw()
    with torch.no_grad():
        y[2, 0, 3], y[2, 3, 0] = 0.0, math.inf      # an invalid atom (u > v): ignored, whatever it holds
    lax = RaceDistribution(specs.spanning_tree, y, validate_args=False)
    assert lax.sample((2,)).shape == (2, 3, 3)
    assert torch.isfinite(estimators.t_reinforce(lax, lambda s: s.adjacency.sum((-1, -2)).double())).all()
    d = RaceDistribution(specs.spanning_tree, torch.zeros(4, 4, dtype=torch.float64), validate_args=False)
    assert d._numba is not None                       # the fast path is the one under test
    bad = d.sample().clone()
    bad[0] = 16
    with pytest.raises(ValueError, match=r"flat atom indices in \[0, 16\)"):
        d.log_prob(bad)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 3\]"):
        d.log_prob(bad[:2])
