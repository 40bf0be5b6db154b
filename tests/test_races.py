"""The race mathematics (structdsl/races.py) is the one definition of log p, its gradient and
E | T: these tests hold it to independent facts (brute-force sums over enumerated traces,
autograd of its own log p), hold its two compact forms of member sets to each other, and hold
the numba backend's fused kernels to it, applied to that backend's own replay."""
import importlib.util
from fractions import Fraction

import numpy as np
import pytest

import structdsl
from structdsl import races

import shared_specs as S
from conformance import assert_same_values

NESTED_PLAIN = ["categorical", "top_k", "permutation", "spanning_tree", "matching"]


def _replayed(name, n, seed, batch=3):
    prog = S.compiled(name, "numpy")
    shape = S.atom_shape(name, n)
    x = np.random.default_rng(seed).normal(size=(batch,) + shape)
    s = prog.sample(x, seed=seed)
    inst = prog.instance(shape)
    t, xf, _, _ = prog.check_trace(s.trace, x)
    return prog, inst, t, xf


def _exit_form(members):
    return races.ExitRaces.from_members(members)


@pytest.mark.parametrize("name", NESTED_PLAIN)
def test_exit_races_and_member_sets_agree(name):
    """A nested spec's races in either compact form give the same log p, gradient and E | T."""
    prog, inst, t, x = _replayed(name, 5, seed=1)
    rep = prog.replay_flat(inst, t, x)
    ex = _exit_form(rep.races.members)
    u = np.random.default_rng(2).random((len(t), inst.max_races + inst.num_atoms))
    live = inst.valid.reshape(-1) & ~np.isneginf(x)
    assert_same_values(races.log_prob(x, t, ex), races.log_prob(x, t, rep.races))
    assert_same_values(races.trace_score(x, t, ex), races.trace_score(x, t, rep.races))
    assert_same_values(races.noise_given_trace(x, t, ex, u, live), races.noise_given_trace(x, t, rep.races, u, live))


@pytest.mark.parametrize("name", ["top_k", "binary_tree", "clustering"])
def test_log_prob_sums_to_one_and_matches_exact_rationals(name):
    """Over every trace of a small instance, exp(log p) sums to 1, and equals the exact
    rational probability computed from integer rates."""
    prog = S.compiled(name, "numpy")
    shape = S.atom_shape(name, 3 if name != "clustering" else 3)
    rates = np.arange(1, int(np.prod(shape)) + 1).reshape(shape)
    e = prog.enumerate(rates=rates)
    inst = prog.instance(shape)
    rep = prog.replay_flat(inst, e.traces, np.broadcast_to(np.log(rates.reshape(-1).astype(float)),
                                                           (len(e), inst.num_atoms)))
    assert rep.possible.all()
    logp = races.log_prob(np.log(rates.reshape(1, -1).astype(float)).repeat(len(e), 0), e.traces, rep.races)
    assert abs(np.exp(logp).sum() - 1) < 1e-12
    exact = [races.exact_probability(np.array([Fraction(int(r)) for r in rates.reshape(-1)], dtype=object),
                                     t, m) for t, m in zip(e.traces, rep.races.members)]
    assert sum(exact) == 1
    np.testing.assert_allclose(np.exp(logp), [float(p) for p in exact], rtol=1e-12)


@pytest.mark.parametrize("name", ["spanning_tree", "binary_tree", "clustering"])
def test_trace_score_is_the_gradient_of_log_prob(name):
    """The closed-form trace score equals autograd of the same module's log p (both forms)."""
    torch = pytest.importorskip("torch")
    prog, inst, t, x = _replayed(name, 4, seed=3)
    rep = prog.replay_flat(inst, t, x)
    forms = [rep.races] + ([_exit_form(rep.races.members)] if prog.ir.nested else [])
    for form in forms:
        tt = torch.as_tensor(t)
        xt = torch.as_tensor(x.copy()).requires_grad_(True)
        f = form if isinstance(form, races.ExitRaces) else races.Members(torch.as_tensor(form.members))
        if isinstance(f, races.ExitRaces):
            f = races.ExitRaces(torch.as_tensor(f.exit_race), f.R)
        races.log_prob(xt, tt, f).sum().backward()
        np.testing.assert_allclose(xt.grad.numpy(), races.trace_score(x, t, form), rtol=1e-10, atol=1e-12)


def test_noise_score_is_the_gradient_of_noise_log_prob():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 6))
    x[0, 2] = -np.inf
    live = ~np.isneginf(x)
    log_e = np.where(live, np.log(rng.exponential(size=x.shape)) - np.where(live, x, 0), np.inf)
    xt = torch.as_tensor(x).requires_grad_(True)
    races.noise_log_prob(xt, torch.as_tensor(np.exp(log_e)), torch.as_tensor(live)).sum().backward()
    np.testing.assert_allclose(xt.grad.numpy(), races.noise_score(x, log_e), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", [b for b in ("numba", "torch") if importlib.util.find_spec(b)])
@pytest.mark.parametrize("name", sorted(S.SPECS))
def test_fast_kernels_are_the_race_mathematics(name, backend):
    """numba computes log p, its gradient and E | T inside its replay kernels, torch folds
    races one at a time as its machine replays: both must equal structdsl.races applied to
    the member sets that same backend's replay_flat reports, and those must be the
    reference's."""
    prog = S.compiled(name, backend)
    n = S.SIZES[name][1]
    shape = S.atom_shape(name, n)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4,) + shape)
    x[1] = np.where(rng.random(shape) < 0.2, -np.inf, x[1])
    ref = S.compiled(name, "numpy")
    try:
        s = ref.sample(x, seed=6)
    except structdsl.RaceError:
        x[1] = x[0]                                 # a masked lane this spec cannot run
        s = ref.sample(x, seed=6)
    inst = ref.instance(shape)
    t, xf, _, _ = ref.check_trace(s.trace, x)
    u = rng.random((len(t), inst.max_races + inst.num_atoms))
    if backend == "numba":
        fused = prog.score_flat(prog.instance(shape), t, xf, want_grad=True, uniforms=u)
        rep = prog.replay_flat(prog.instance(shape), t, xf)
        logp, grad, noise = fused.logp, fused.grad, fused.noise
    else:
        import torch
        tt, xt = torch.as_tensor(t), torch.as_tensor(xf)
        xs = xt.reshape((-1,) + shape)
        lp, g = prog.log_prob_and_grad(tt, xs)
        logp, grad = lp.numpy(), g.reshape(len(t), -1).numpy()
        noise = prog.conditional_noise(tt, xs, uniforms=torch.as_tensor(u)).reshape(len(t), -1).numpy()
        rep = prog.replay_flat(prog.instance(shape), tt, xt)
        form = rep.races
        form = races.Members(form.members.numpy()) if isinstance(form, races.Members) else \
            races.ExitRaces(form.exit_race.numpy(), form.R)
        rep = rep._replace(possible=rep.possible.numpy(), races=form)
    live = inst.valid.reshape(-1) & ~np.isneginf(xf)
    assert_same_values(logp, races.log_prob(xf, t, rep.races, rep.possible), rtol=1e-10)
    np.testing.assert_allclose(grad, races.trace_score(xf, t, rep.races, rep.possible), rtol=1e-9, atol=1e-12)
    assert_same_values(noise, races.noise_given_trace(xf, t, rep.races, u, live), rtol=1e-10)
    want = ref.replay_flat(inst, t, xf)
    assert np.array_equal(rep.possible, want.possible)
    if isinstance(rep.races, races.Members):
        assert np.array_equal(rep.races.members, want.races.members)
    else:
        assert np.array_equal(rep.races.exit_race, _exit_form(want.races.members).exit_race)
