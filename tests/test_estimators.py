"""The gradient estimators: unbiased against the exact gradient (which itself matches finite
differences of the exact expectation), T-REINFORCE below E-REINFORCE in variance, clear
errors for bad input, and the toys' losses reach their stated optima."""
import math

import numpy as np
import pytest
import torch

import structdsl
from shared_specs import atom_shape, compiled, structure_loss
from structdsl import estimators, specs
from structdsl.toys import TOYS
from structdsl.torch import RaceDistribution

BUILTIN = ["categorical", "top_k", "permutation", "spanning_tree", "arborescence", "binary_tree",
           "matching", "clustering"]
# sizes small enough to enumerate, large enough that no coordinate's gradient is trivially 0
SIZE = {"categorical": 5, "top_k": 5, "permutation": 4, "spanning_tree": 4, "arborescence": 4,
        "binary_tree": 5, "matching": 3, "clustering": 4}


def loss_for(name, seed):
    """A fixed random loss of the structure at the test size (see ``structure_loss``)."""
    return structure_loss(name, SIZE[name], seed)


def logits_for(name, seed):
    x = np.random.default_rng(seed).normal(size=atom_shape(name, SIZE[name]))
    return torch.as_tensor(x)


def estimates(name, estimator, x0, f, draws):
    """``draws`` independent estimates at once: one batch element per draw (the surrogate is
    a batch mean, so element b's gradient is its own estimate / draws)."""
    x = x0.expand((draws,) + x0.shape).clone().requires_grad_(True)
    estimator(RaceDistribution(compiled(name, "torch"), x), f).backward()
    return x.grad * draws


def exact(name, x0, f):
    x = x0.clone().requires_grad_(True)
    estimators.exact_gradient(RaceDistribution(compiled(name, "torch"), x), f).backward()
    return x.grad


@pytest.mark.parametrize("name", BUILTIN)
def test_exact_gradient_matches_finite_differences(name):
    """exact_gradient's value is the enumerated expectation; its gradient matches central
    differences of that expectation (traces enumerated by the reference backend, their
    probabilities scored by the numba backend, which other tests hold to the reference)."""
    x0 = logits_for(name, 1)
    f = loss_for(name, 2)
    ref = compiled(name, "numpy")
    scorer = compiled(name, "numba")

    e = ref.enumerate(logits=x0.numpy())             # the support does not move with finite logits
    losses = f(type(e.structure)(*(torch.as_tensor(v) for v in e.structure))).numpy()

    def expectation(x):
        return float((np.exp(scorer.log_prob(e.traces, x)) * losses).sum())

    x = x0.clone().requires_grad_(True)
    value = estimators.exact_gradient(RaceDistribution(compiled(name, "torch"), x), f)
    value.backward()
    assert abs(value.item() - expectation(x0.numpy())) < 1e-12
    valid = ref.instance(tuple(x0.shape)).valid
    h = 1e-5
    fd = np.zeros(x0.shape)
    for idx in zip(*np.nonzero(valid)):
        up, down = x0.numpy().copy(), x0.numpy().copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (expectation(up) - expectation(down)) / (2 * h)
    np.testing.assert_allclose(x.grad.numpy(), fd, atol=1e-7)
    assert np.abs(fd).max() > 1e-3                     # the check has something to compare


def _relax_with_random_critic(name, seed=0):
    """RELAX whose critic is far from zero (so the control variate really acts)."""
    torch.manual_seed(seed)
    relax = estimators.RELAX(atom_shape=atom_shape(name, SIZE[name])).double()
    torch.nn.init.normal_(relax.critic.net[-1].weight, std=0.5)
    return relax


ESTIMATORS = {
    "t_reinforce": lambda name: estimators.t_reinforce,
    "e_reinforce": lambda name: estimators.e_reinforce,
    "t_reinforce+": lambda name: lambda d, f: estimators.t_reinforce(d, f, num_samples=3),
    "e_reinforce+": lambda name: lambda d, f: estimators.e_reinforce(d, f, num_samples=3),
    "relax": _relax_with_random_critic,
}


@pytest.mark.parametrize("name", BUILTIN)
def test_every_estimator_is_unbiased(name):
    """Mean of 4000 estimates within 4 standard errors of the exact gradient, every
    coordinate (4 SE: a two-sided 6e-5 per coordinate, under 1e-2 over all coordinates and
    estimators of a spec, Bonferroni); fixed seeds."""
    torch.manual_seed(3)
    x0 = logits_for(name, 4)
    f = loss_for(name, 5)
    truth = exact(name, x0, f)
    valid = torch.as_tensor(np.array(compiled(name, "numpy").instance(tuple(x0.shape)).valid))
    coords = int(valid.sum()) * len(ESTIMATORS)
    assert 4.0 >= -math.sqrt(2) * torch.erfinv(torch.tensor(1e-2 / coords) - 1).item()
    draws = 4000
    for est, make in ESTIMATORS.items():
        g = estimates(name, make(name), x0, f, draws)
        assert torch.isfinite(g).all(), est
        assert (g[:, ~valid] == 0).all(), est            # invalid atoms get no gradient
        mean, se = g.mean(0), g.std(0) / math.sqrt(draws)
        z = ((mean - truth) / se.clamp_min(1e-12))[valid]
        assert z.abs().max() < 4, (est, z.abs().max().item(), mean, truth)


@pytest.mark.parametrize("estimator", ["t_reinforce", "e_reinforce"])
@pytest.mark.parametrize("name", BUILTIN)
def test_score_estimators_fast_path_equals_the_lock_step_path(name, estimator):
    """On CPU, t_reinforce (e_reinforce) draws in one numba call, with the traces' scores
    (the noise's score, 1 - E_1 per live atom), and injects the estimate through one autograd
    node; from the same torch seed it must give the lock-step torch path's value and
    gradients, in the logits and in f's own parameters, with an absent (-inf) atom."""
    x0 = logits_for(name, 6).expand((5,) + tuple(logits_for(name, 6).shape)).clone()
    if name in ("categorical", "top_k", "spanning_tree", "clustering"):
        x0[0].view(-1)[-1] = -math.inf                # an absent atom in one element
    f0 = loss_for(name, 7)
    est = getattr(estimators, estimator)
    for K, loo in ((3, None), (3, False), (1, None)):      # leave-one-out, K plain ones, one
        out = []
        for fast in (True, False):
            x = x0.clone().requires_grad_(True)
            scale = torch.ones((), dtype=torch.float64, requires_grad=True)
            d = RaceDistribution(compiled(name, "torch"), x, fast_cpu=fast)
            assert (d._numba is not None) == fast
            torch.manual_seed(8)
            value = est(d, lambda s: scale * f0(s), num_samples=K, leave_one_out=loo)
            value.backward()
            out.append((value.detach(), x.grad, scale.grad))
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert out[0][1].abs().max() > 1e-6              # the comparison has something to compare


@pytest.mark.parametrize("name", BUILTIN)
def test_relax_closed_form_equals_the_autograd_path(name):
    """With the default critic on CPU, RELAX runs in closed form (one numba kernel, no double
    backward); from the same seeds it must equal the autograd path: value, logits gradient
    and every critic parameter's gradient, with -inf atoms and K = 2 samples per element."""
    x0 = logits_for(name, 9).expand((3,) + tuple(logits_for(name, 9).shape)).clone()
    if name in ("categorical", "top_k", "spanning_tree", "clustering"):
        x0[0].view(-1)[-1] = -math.inf                # an absent atom in one element
    f = loss_for(name, 10)
    out = []
    for fast in (True, False):
        relax = _relax_with_random_critic(name, seed=11)
        x = x0.clone().requires_grad_(True)
        d = RaceDistribution(compiled(name, "torch"), x, fast_cpu=fast)
        torch.manual_seed(12)
        value = relax(d, f, num_samples=2)
        value.backward()
        out.append([value.detach(), x.grad] + [p.grad for p in relax.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(out[0][0]) and out[0][1].abs().max() > 1e-6 and out[0][2].abs().max() > 1e-6


def test_fast_paths_take_float32_logits_and_expanded_batches():
    """The native estimators on float32 logits expanded to a [2, 3] batch: t_reinforce equals
    the lock-step path to float32 rounding, RELAX's closed form equals its autograd path, and
    gradients come back in the logits' dtype and shape."""
    base = torch.randn((1, 1, 3, 3), generator=torch.Generator().manual_seed(13))
    f = loss_for("matching", 14)
    g32 = {}
    for name, make in (("t", lambda: estimators.t_reinforce), ("relax", lambda: _relax_with_random_critic("matching"))):
        for fast in (True, False):
            x = base.clone().requires_grad_(True)
            d = RaceDistribution(compiled("matching", "torch"), x.expand(2, 3, 3, 3), fast_cpu=fast)
            est = make()
            torch.manual_seed(15)
            est(d, lambda s: f(s).float()).backward()
            assert x.grad.dtype == torch.float32 and x.grad.shape == base.shape
            g32[name, fast] = x.grad
        torch.testing.assert_close(g32[name, True], g32[name, False], rtol=1e-4, atol=1e-6)
        assert g32[name, True].abs().max() > 1e-4


def test_relax_runs_a_hooked_critic_through_autograd():
    """A forward hook on the default critic must see its calls: the closed form steps aside."""
    relax = _relax_with_random_critic("matching")
    calls = []
    relax.critic.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    x = logits_for("matching", 1).requires_grad_(True)
    relax(RaceDistribution(compiled("matching", "torch"), x), loss_for("matching", 2)).backward()
    assert calls and torch.isfinite(x.grad).all()


def test_t_reinforce_has_less_variance_than_e_reinforce():
    """Rao-Blackwellisation: at a spanning tree of 6 nodes the trace score's variance is a
    fraction of the noise score's (per coordinate, summed)."""
    torch.manual_seed(0)
    n = 6
    x0 = torch.as_tensor(np.random.default_rng(0).normal(size=(n, n)))
    f = lambda s: s.adjacency[..., 1:, 1:].sum((-1, -2)).double() / 2
    prog = compiled("spanning_tree", "torch")
    var = {}
    for est in (estimators.t_reinforce, estimators.e_reinforce):
        x = x0.expand(3000, n, n).clone().requires_grad_(True)
        est(RaceDistribution(prog, x), f).backward()
        var[est.__name__] = float((x.grad * 3000).var(0).sum())
    assert var["t_reinforce"] < 0.5 * var["e_reinforce"], var


def test_f_parameters_get_the_pathwise_gradient():
    """``f`` with its own parameter: the surrogate's gradient in it is that of the mean loss."""
    torch.manual_seed(0)
    theta = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    d = RaceDistribution(specs.permutation, x)
    seen = []

    def f(s):
        seen.append(s.rank[..., 0].double())
        return theta * s.rank[..., 0].double()
    for est in (estimators.t_reinforce, estimators.e_reinforce):
        seen.clear()
        theta.grad = None
        loss = est(d, f, num_samples=4)
        loss.backward()
        assert torch.isclose(theta.grad, seen[0].mean())
        assert torch.isclose(loss, theta * seen[0].mean())


def test_relax_trains_its_critic_and_stays_unbiased_zero_critic():
    """The critic's parameters receive the variance gradient (nonzero), the logits an
    estimate; the default critic starts at zero, so RELAX starts as T-REINFORCE (same
    estimate from the same random numbers)."""
    x0 = torch.randn(5, 5, dtype=torch.float64)
    f = lambda s: s.adjacency[..., 0, :].sum(-1).double()
    relax = estimators.RELAX(atom_shape=(5, 5)).double()
    grads = []
    for est in (relax, estimators.t_reinforce):
        torch.manual_seed(7)
        x = x0.clone().requires_grad_(True)
        est(RaceDistribution(specs.spanning_tree, x), f).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert relax.critic.net[-1].weight.grad.abs().sum() > 0


def test_bad_input_is_named():
    x = torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)
    d = RaceDistribution(specs.spanning_tree, x)
    with pytest.raises(ValueError, match=r"shape \(3,\).*got \(3, 2\)"):
        estimators.t_reinforce(d, lambda s: torch.zeros(3, 2), num_samples=3)
    with pytest.raises(FloatingPointError, match="non-finite loss nan"):
        estimators.e_reinforce(d, lambda s: torch.full((2,), math.nan), num_samples=2)
    # the CPU fast path screens the losses in its native kernel, then names the bad one
    assert d._numba is not None
    with pytest.raises(FloatingPointError, match=r"non-finite loss inf at \[sample, \*batch\] index \(1,\)"):
        estimators.t_reinforce(d, lambda s: torch.tensor([0.0, math.inf, 1.0], dtype=torch.float64), num_samples=3)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        estimators.t_reinforce(d, lambda s: torch.zeros(1), num_samples=1, leave_one_out=True)
    with pytest.raises(ValueError, match="positive int"):
        estimators.t_reinforce(d, lambda s: torch.zeros(1), num_samples=0)
    with pytest.raises(TypeError, match="must return a tensor"):
        estimators.t_reinforce(d, lambda s: 1.0)
    bad_critic = estimators.RELAX(critic=torch.nn.Sequential(torch.nn.Flatten(-2), torch.nn.Linear(16, 3)).double())
    with pytest.raises(ValueError, match=r"critic must map .* returned \(1, 3\)"):
        bad_critic(d, lambda s: s.adjacency.sum((-1, -2)).double())
    wrong_size = estimators.RELAX(atom_shape=(5, 5)).double()      # the closed form checks it too
    with pytest.raises(ValueError, match=r"MLPCritic expects \[\*lead, 5, 5\], got \(1, 4, 4\)"):
        wrong_size(d, lambda s: s.adjacency.sum((-1, -2)).double())
    frozen = RaceDistribution(specs.spanning_tree, torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="require grad"):
        estimators.RELAX(atom_shape=(4, 4))(frozen, lambda s: s.adjacency.sum((-1, -2)).double())


@pytest.mark.parametrize("toy", list(TOYS))
def test_toy_optimum_is_the_minimum_over_all_structures(toy):
    """The stated optimum is the exact minimum of the toy's loss over every structure
    (enumerated at n = 4), and the loss is not constant."""
    t = TOYS[toy]
    n = 4
    prog = structdsl.compile(getattr(specs, t.spec_name), **dict(t.static))
    e = prog.enumerate(logits=np.zeros(t.atom_shape(n)))
    losses = t.make_loss(n, torch.device("cpu"))(type(e.structure)(*(torch.as_tensor(v) for v in e.structure)))
    assert losses.dtype == torch.float64 and losses.shape == (len(e.traces),)
    assert float(losses.min()) == t.optimum(n)
    assert float(losses.max()) > t.optimum(n)


def test_toy_cli_writes_log_and_figure(tmp_path, capsys):
    """The main job's command on one short toy: a CSV row per evaluation, a summary, a PNG."""
    from structdsl.__main__ import main
    from structdsl.toys import read_csv
    rc = main(["toy", "--structure", "top_k", "--estimator", "t_reinforce+", "--estimator", "relax",
               "--steps", "40", "--eval-every", "20", "--eval-samples", "50", "--seeds", "2", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    rows = read_csv(tmp_path / "toys.csv")
    assert [(r["estimator"], r["seed"], r["step"]) for r in rows] == [
        (e, seed, s) for e in ("t_reinforce+", "relax") for seed in (0, 1) for s in (0.0, 20.0, 40.0)]
    assert {r["eval_samples"] for r in rows} == {50.0}
    assert all(math.isfinite(r["objective"]) and r["grad_std"] >= 0 for r in rows)
    assert (tmp_path / "top_k.png").stat().st_size > 10_000
    assert "top_k" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--structure"):
        main(["toy", "--out", str(tmp_path)])


def test_toy_figure_says_what_it_draws(tmp_path):
    """The figure names the evaluation size it used, n, K and what '+' means, has a
    wall-clock panel, and draws an exactly zero gradient std as a marker, not as a value."""
    from structdsl.toys import plot, summary
    rows = [{"structure": "top_k", "estimator": est, "seed": seed, "n": 10.0, "num_samples": 3.0,
             "eval_samples": 300.0, "step": float(step), "objective": 2.0 / (1 + step) + 0.01 * seed,
             "grad_std": 0.0 if (est == "relax" and step == 20) else 1.0 / (1 + step),
             "seconds": 0.001 * step, "optimum": 0.0, "start": 2.0}
            for est in ("t_reinforce+", "relax") for seed in (0, 1, 2) for step in (0, 10, 20)]
    drawn = plot(rows, "top_k", tmp_path / "top_k.png")
    assert drawn["ylabel"] == "mean loss (300 samples)"
    assert "n = 10" in drawn["title"] and "K = 3" in drawn["title"] and "leave-one-out" in drawn["title"]
    assert "3 seeds" in drawn["title"] and "seconds" in drawn["xlabel_time"]
    assert drawn["zero_std_markers"] == 1                   # relax at step 20 only (its mean over seeds is 0)
    table = {r["estimator"]: r for r in summary(rows)}
    assert table["t_reinforce+"]["seeds"] == 3
    assert table["t_reinforce+"]["final_min"] < table["t_reinforce+"]["final"] < table["t_reinforce+"]["final_max"]


# ---- RELAX: num_samples with one meaning, the critic's context, the closed form's scaling ----------
def _relax_with_context_critic(name, d=3, seed=0):
    """RELAX whose MLPCritic also reads a context of ``d`` features (random, far from zero)."""
    torch.manual_seed(seed)
    relax = estimators.RELAX(atom_shape=atom_shape(name, SIZE[name]), context_dim=d).double()
    torch.nn.init.normal_(relax.critic.net[-1].weight, std=0.5)
    torch.nn.init.normal_(relax.critic.net[0].weight, std=0.5)
    return relax


@pytest.mark.parametrize("name", ["top_k", "spanning_tree", "binary_tree"])
def test_relax_leave_one_out_and_context_are_unbiased(name):
    """RELAX with the leave-one-out baseline on top of a random critic (K = 3), and RELAX
    whose critic reads per-element context features: mean of 4000 estimates within 4
    standard errors of the exact gradient, every coordinate."""
    torch.manual_seed(3)
    x0 = logits_for(name, 4)
    f = loss_for(name, 5)
    truth = exact(name, x0, f)
    valid = torch.as_tensor(np.array(compiled(name, "numpy").instance(tuple(x0.shape)).valid))
    draws = 4000
    ctx = torch.randn((draws, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    relax_loo, relax_ctx = _relax_with_random_critic(name), _relax_with_context_critic(name)
    for label, est in (("loo", lambda d, f: relax_loo(d, f, num_samples=3, leave_one_out=True)),
                       ("context", lambda d, f: relax_ctx(d, f, context=ctx))):
        g = estimates(name, est, x0, f, draws)
        assert torch.isfinite(g).all() and (g[:, ~valid] == 0).all(), label
        mean, se = g.mean(0), g.std(0) / math.sqrt(draws)
        z = ((mean - truth) / se.clamp_min(1e-12))[valid]
        assert z.abs().max() < 4, (label, z.abs().max().item())


@pytest.mark.parametrize("loo", [False, True])
def test_num_samples_means_the_same_for_relax_and_t_reinforce(loo):
    """``num_samples=K`` is K samples per element in both; with the same ``leave_one_out`` and
    a zero critic (the default's start), RELAX's estimate is T-REINFORCE's from the same seed,
    on both paths."""
    x0 = logits_for("spanning_tree", 2).expand(2, 4, 4).clone()
    f = loss_for("spanning_tree", 3)
    for fast in (True, False):
        grads = []
        relax = estimators.RELAX(atom_shape=(4, 4)).double()     # built before the seed: its init draws
        for est in (lambda d: relax(d, f, num_samples=3, leave_one_out=loo),
                    lambda d: estimators.t_reinforce(d, f, num_samples=3, leave_one_out=loo)):
            x = x0.clone().requires_grad_(True)
            torch.manual_seed(5)
            est(RaceDistribution(compiled("spanning_tree", "torch"), x, fast_cpu=fast)).backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)
        assert grads[0].abs().max() > 1e-3
    with pytest.raises(ValueError, match="num_samples >= 2"):
        estimators.RELAX(atom_shape=(4, 4))(RaceDistribution(specs.spanning_tree, x0.requires_grad_(True)), f,
                                            leave_one_out=True)


@pytest.mark.parametrize("name", ["spanning_tree", "arborescence", "binary_tree", "clustering"])
def test_relax_closed_form_with_leave_one_out_equals_the_autograd_path(name):
    x0 = logits_for(name, 9).expand((3,) + tuple(logits_for(name, 9).shape)).clone()
    if name in ("spanning_tree", "clustering"):
        x0[0].view(-1)[-1] = -math.inf
    f = loss_for(name, 10)
    out = []
    for fast in (True, False):
        relax = _relax_with_random_critic(name, seed=11)
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(12)
        relax(RaceDistribution(compiled(name, "torch"), x, fast_cpu=fast), f, num_samples=3,
              leave_one_out=True).backward()
        out.append([x.grad] + [p.grad for p in relax.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_relax_critic_receives_the_context():
    """``critic(z, context)``: the context arrives unchanged (here a dict), z has shape
    ``[K, *batch, *atom]``; the closed form steps aside for a context; the default critic
    refuses a context it was not built for, and one built with context_dim needs one."""
    seen = []

    class Critic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, z, context):
            seen.append((tuple(z.shape), context))
            return self.w * z.sum((-1, -2)) * context["scale"]

    ctx = {"scale": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    x = logits_for("spanning_tree", 1).expand(2, 4, 4).clone().requires_grad_(True)
    f = loss_for("spanning_tree", 2)
    relax = estimators.RELAX(critic=Critic())
    relax(RaceDistribution(specs.spanning_tree, x), f, num_samples=3, context=ctx).backward()
    assert seen and all(shape == (3, 2, 4, 4) and c is ctx for shape, c in seen)
    assert relax.critic.w.grad is not None and relax.critic.w.grad != 0
    d = RaceDistribution(specs.spanning_tree, x)
    with pytest.raises(TypeError, match="context_dim=None"):
        estimators.RELAX(atom_shape=(4, 4)).double()(d, f, context=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="with a context"):
        estimators.RELAX(atom_shape=(4, 4), context_dim=3).double()(d, f)
    with pytest.raises(ValueError, match=r"context \[\.\.\., 3\]"):
        estimators.RELAX(atom_shape=(4, 4), context_dim=3).double()(d, f, context=torch.zeros(2, 5))


def _dense_jacobian(members, x, lse, log_m, log_et, phi, live):
    """``J = rho^T P + diag(phi)`` of one lane, dense (NumPy), from its definition."""
    on = members & live[None, :] & (log_m[:, None] > -np.inf)
    P = np.exp(np.where(members, x[None, :] - np.where(members, lse[:, None], 0.0), -np.inf))
    rho = np.exp(np.where(on, log_m[:, None] - log_et[None, :], -np.inf))
    return rho.T @ P + np.diag(phi)


@pytest.mark.parametrize("nested", [True, False])
def test_relax_kernel_jacobian_products(nested):
    """The closed form's Jacobian products: on nested member sets the O(A + R) prefix/suffix
    sums over exit races (and the member lists) equal J^T v and J v of the dense Jacobian; on
    other member sets the member lists do; logits far apart (exp would overflow) stay finite."""
    from structdsl.backends import numba_estimators as K
    rng = np.random.default_rng(0)
    R, A = 6, 11
    for trial in range(20):
        spread = 1.0 if trial < 10 else 300.0
        x = rng.normal(size=A) * spread
        live = rng.random(A) < 0.9
        if nested:
            exit_race = np.where(live, rng.integers(-1, R, size=A), -1)
            members = exit_race[None, :] >= np.arange(R)[:, None]
        else:
            members = (rng.random((R, A)) < 0.5) & live[None, :]
        members[:, ~live] = False
        trace = np.full(R, -1)
        for r in range(R):
            if members[r].any():
                trace[r] = rng.choice(np.flatnonzero(members[r]))
        u = rng.random(R + A)
        ptr, idx = np.empty(R + 1, np.int64), np.empty(R * A, np.int64)
        ex = np.empty(A, np.int64)
        is_nested, count = K._exit_races(members, ex)
        prefix = all(np.array_equal(members[:, a], np.arange(R) <= (np.flatnonzero(members[:, a]).max()
                                                                     if members[:, a].any() else -1))
                     for a in range(A))
        assert is_nested == prefix and (prefix or not nested) and count == members.sum()
        lse, log_m, log_cum = np.empty(R), np.empty(R), np.empty(R)
        K._lane_races(is_nested, members, x, trace, u, ptr, idx, ex, np.empty(R), lse, log_m, log_cum)
        with np.errstate(divide="ignore"):
            want_lse = np.array([np.logaddexp.reduce(x[m]) if m.any() else -np.inf for m in members])
            np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
            np.testing.assert_allclose(log_m, np.where(trace >= 0, np.log(-np.log(u[:R])) - want_lse, -np.inf))
            # E~ = (sum of the minima of the atom's races) + fresh noise (none for some atoms)
            log_s = np.array([np.logaddexp.reduce(log_m[members[:, a]]) if members[:, a].any() else -np.inf
                              for a in range(A)])
            fresh = (rng.random(A) < 0.7) | ~np.isfinite(log_s)
            log_f = np.where(fresh, np.log(rng.exponential(size=A)) - x, -np.inf)
            log_et = np.where(live, np.logaddexp(log_s, log_f), 0.0)
            phi = np.where(live & fresh, np.exp(log_f - log_et), 0.0)
        J = _dense_jacobian(members, x, lse, log_m, log_et, phi, live)
        v = rng.normal(size=A)
        y, out = np.empty(R), np.empty(A)
        P, rho = np.empty(R * A), np.empty(R * A)
        K._member_lists(members, ptr, idx)
        K._race_weights(ptr, idx, x, lse, log_m, log_et, live, P, rho)
        K._apply(ptr, idx, rho, P, phi, v, y, out)
        np.testing.assert_allclose(out, J.T @ v, rtol=1e-10, atol=1e-12)
        K._apply(ptr, idx, P, rho, phi, v, y, out)
        np.testing.assert_allclose(out, J @ v, rtol=1e-10, atol=1e-12)
        if is_nested:
            K._exit_jt(ex, live, x, lse, log_m, log_cum, log_et, phi, v, y, out)
            np.testing.assert_allclose(out, J.T @ v, rtol=1e-10, atol=1e-12)
            K._exit_jv(ex, live, x, lse, log_m, log_cum, log_et, phi, v, y, out)
            np.testing.assert_allclose(out, J @ v, rtol=1e-10, atol=1e-12)
        assert np.isfinite(J).all()


def test_relax_closed_form_at_a_larger_spanning_tree():
    """At n = 24 (552 atoms, 23 races per lane, every lane nested) the closed form, which
    takes the O(A + R) exit-race products there, still equals the autograd path."""
    n = 24
    x0 = torch.as_tensor(np.random.default_rng(0).normal(size=(2, n, n)) * 2)
    f = lambda s: (s.adjacency[..., 0, :].double() * torch.arange(n, dtype=torch.float64)).sum(-1)  # noqa: E731
    out = []
    for fast in (True, False):
        torch.manual_seed(1)
        relax = estimators.RELAX(atom_shape=(n, n), hidden=8).double()
        torch.nn.init.normal_(relax.critic.net[-1].weight, std=0.5)
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(2)
        relax(RaceDistribution(specs.spanning_tree, x, fast_cpu=fast), f, num_samples=2).backward()
        out.append([x.grad] + [p.grad for p in relax.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert out[0][0].abs().max() > 1e-3


@pytest.mark.parametrize("fast_cpu", [True, False], ids=["fast", "lockstep"])
@pytest.mark.parametrize("estimator", ["t_reinforce", "e_reinforce", "relax"])
def test_a_generator_gives_each_caller_its_own_stream(estimator, fast_cpu):
    """``generator=`` (one stream per rank under torch.distributed): the same generator state
    gives the same estimate whatever the global stream does, and another state another one."""
    prog = structdsl.compile(specs.spanning_tree, backend="torch")
    f = TOYS["spanning_tree"].make_loss(5, torch.device("cpu"))

    def grad(seed, global_seed):
        torch.manual_seed(global_seed)
        x = torch.zeros(5, 5, dtype=torch.float64, requires_grad=True)
        dist = RaceDistribution(prog, x, fast_cpu=fast_cpu)
        g = torch.Generator().manual_seed(seed)
        if estimator == "relax":
            torch.manual_seed(7)                          # the critic's initial weights
            relax = estimators.RELAX(atom_shape=(5, 5), hidden=4).double()
            torch.manual_seed(global_seed)
            loss = relax(dist, f, num_samples=3, generator=g)
        else:
            loss = getattr(estimators, estimator)(dist, f, num_samples=3, generator=g)
        loss.backward()
        return x.grad
    assert torch.equal(grad(1, global_seed=0), grad(1, global_seed=123))
    assert not torch.equal(grad(1, global_seed=0), grad(2, global_seed=0))
