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
from conformance import assert_same_values, runner

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
    B, R, A = members.shape
    last = np.full((B, A), -1, dtype=np.int64)
    if R:
        last = np.where(members.any(1), R - 1 - np.argmax(members[:, ::-1, :], axis=1), -1)
    return races.ExitRaces(last, R)


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
        xt = torch.as_tensor(x).requires_grad_(True)
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


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
@pytest.mark.parametrize("name", sorted(S.SPECS))
def test_numba_fused_kernels_are_the_race_mathematics(name):
    """The numba backend computes log p, its gradient and E | T inside its replay kernels for
    speed; they must equal structdsl.races applied to the member sets that same backend's
    replay reports."""
    prog = S.compiled(name, "numba")
    n = S.SIZES[name][1]
    shape = S.atom_shape(name, n)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4,) + shape)
    x[1] = np.where(rng.random(shape) < 0.2, -np.inf, x[1])
    try:
        s = prog.sample(x, seed=6)
    except structdsl.RaceError:
        x[1] = x[0]                                 # a masked lane this spec cannot run
        s = prog.sample(x, seed=6)
    inst = prog.instance(shape)
    t, xf, _, _ = prog.check_trace(s.trace, x)
    u = rng.random((len(t), inst.max_races + inst.num_atoms))
    fused = prog.score_flat(inst, t, xf, want_grad=True, uniforms=u)
    rep = prog.replay_flat(inst, t, xf)
    live = inst.valid.reshape(-1) & ~np.isneginf(xf)
    assert_same_values(fused.logp, races.log_prob(xf, t, rep.races, rep.possible), rtol=1e-10)
    np.testing.assert_allclose(fused.grad, races.trace_score(xf, t, rep.races, rep.possible), rtol=1e-9, atol=1e-12)
    assert_same_values(fused.noise, races.noise_given_trace(xf, t, rep.races, u, live), rtol=1e-10)
    # and the replay's member sets are the reference's
    ref = runner(S.SPECS[name], "numpy", **S.STATICS.get(name, {}), **({"dag": S.DAG} if name == "topological" else {}))
    want = ref.prog.replay_flat(ref.prog.instance(shape), t, xf)
    assert np.array_equal(rep.possible, want.possible) and np.array_equal(rep.races.members, want.races.members)
