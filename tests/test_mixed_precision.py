"""float16 and bfloat16 logits (what ``torch.autocast("cpu")`` produces): the distribution and
the estimators race in float32/float64, return log-probs and gradients in the logits' dtype,
and agree with the float64 computation on the same values to the dtype's rounding."""
import math

import numpy as np
import pytest
import torch

from shared_specs import compiled, structure_loss
from structdsl import estimators
from structdsl.torch import RaceDistribution

HALF = [torch.bfloat16, torch.float16]
# one rounding of a value to the dtype: half its unit in the last place, relative
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def half_logits(shape, dtype, seed, requires_grad=False):
    x = torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)
    return x.requires_grad_(requires_grad)


def close_to(got, want, dtype, scale=None):
    """``got`` (in ``dtype``) is ``want`` (float64) rounded once, up to a few ulps."""
    assert got.dtype == dtype
    scale = want.abs() if scale is None else scale
    err = (got.double() - want).abs()
    tol = 4 * EPS[dtype] * scale + 1e-12
    assert bool((err <= tol).all()), (err.max().item(), tol.min().item())


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "lockstep"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_distribution_on_half_logits(dtype, fast):
    """Sample, log_prob (value and gradient), conditional_noise, noise_log_prob and the
    structure on float16/bfloat16 logits: the traces are those of the same values in float32
    from the same generator; log p and its gradient come back in the logits' dtype, equal to
    the float64 ones rounded once; E | T comes back in float32 and solving it reproduces the
    trace."""
    prog = compiled("spanning_tree", "torch")
    x = half_logits((3, 5, 5), dtype, 0, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    d = RaceDistribution(prog, x, fast_cpu=fast)
    d64 = RaceDistribution(prog, x64, fast_cpu=fast)
    d32 = RaceDistribution(prog, x.detach().float(), fast_cpu=fast)
    assert d.working_dtype == torch.float32 and d.cpu_fast_path == fast
    t = d.sample((4,), generator=gen(1))
    assert torch.equal(t, d32.sample((4,), generator=gen(1)))
    lp = d.log_prob(t)
    lp64 = d64.log_prob(t)
    close_to(lp, lp64.detach(), dtype)
    w = torch.randn(lp.shape, generator=gen(2), dtype=torch.float64)
    (lp.double() * w).sum().backward()
    (lp64 * w).sum().backward()
    assert x.grad.dtype == dtype
    close_to(x.grad, x64.grad, dtype, scale=x64.grad.abs().max())
    assert x64.grad.abs().max() > 0.1
    # E | T: float32 noise that reproduces the trace; differentiable into the half logits
    e = d.conditional_noise(t, generator=gen(3))
    assert e.dtype == torch.float32
    assert torch.equal(prog.solve(e.detach().double()).trace, t)
    x.grad = None
    torch.where(torch.isfinite(e), e, 0.0).sum().backward()
    assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())
    trace, noise = d.sample_with_noise((2,), generator=gen(4))
    assert noise.dtype == torch.float32 and torch.equal(trace, d32.sample((2,), generator=gen(4)))
    nlp = d.noise_log_prob(noise.detach())
    close_to(nlp, d64.noise_log_prob(noise.detach().double()).detach(), dtype)
    assert torch.equal(d.structure(t).adjacency, d64.structure(t).adjacency)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_log_prob_under_autocast_with_validation(dtype):
    """Logits computed under ``torch.autocast("cpu")`` are bfloat16 (float16 when asked):
    ``log_prob`` with validation scores the distribution's own traces (it used to call the
    dtype problem a support violation), in the logits' dtype; a float trace is still a
    TypeError, an impossible trace still a ValueError naming the support."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(3, 25)
    feats = torch.randn(4, 3)
    with torch.autocast("cpu", dtype=dtype):
        x = enc(feats).reshape(4, 5, 5)
        assert x.dtype == dtype
        d = RaceDistribution(compiled("spanning_tree", "torch"), x, validate_args=True)
        t = d.sample((2,))
        lp = d.log_prob(t)
        assert lp.dtype == dtype and bool(torch.isfinite(lp).all())
        with pytest.raises(TypeError, match="integer"):
            d.log_prob(t.float())
        bad = t.clone()
        bad[..., 1] = bad[..., 0]
        with pytest.raises(ValueError, match="support"):
            d.log_prob(bad)
    lp.float().sum().backward()
    assert enc.weight.grad.dtype == torch.float32 and enc.weight.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_enumeration_and_entropy_on_half_logits(dtype):
    x = half_logits((2, 4, 4), dtype, 5, requires_grad=True)
    d = RaceDistribution(compiled("spanning_tree", "torch"), x)
    d64 = RaceDistribution(compiled("spanning_tree", "torch"), x.detach().double())
    assert torch.equal(d.enumerate_support(), d64.enumerate_support())
    h = d.entropy()
    close_to(h, d64.entropy(), dtype)
    h.float().sum().backward()
    assert x.grad.dtype == dtype and x.grad.abs().max() > 0


ESTIMATORS = {
    "t_reinforce+": lambda d, f: estimators.t_reinforce(d, f, num_samples=3),
    "e_reinforce": lambda d, f: estimators.e_reinforce(d, f, num_samples=2, leave_one_out=True),
    "exact": estimators.exact_gradient,
}


def _relax(name):
    torch.manual_seed(11)
    relax = estimators.RELAX(atom_shape=(3, 3))
    torch.nn.init.normal_(relax.critic.net[-1].weight, std=0.5)
    return relax


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "lockstep"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("est", list(ESTIMATORS) + ["relax"])
def test_estimators_on_half_logits_equal_float32_rounded_once(est, dtype, fast):
    """Every estimator on float16/bfloat16 logits computes on their float32 values: from the
    same seed its gradient is the float32 one rounded once to the logits' dtype (exactly), so
    nothing inside is rounded to half precision; ``f`` may return half losses (a decoder
    under autocast)."""
    prog = compiled("matching", "torch")
    f0 = structure_loss("matching", 3, 7)
    x0 = half_logits((2, 3, 3), dtype, 8)
    grads = {}
    for work in (dtype, torch.float32):
        x = x0.detach().to(work).requires_grad_(True)
        d = RaceDistribution(prog, x, fast_cpu=fast)
        torch.manual_seed(9)
        if est == "relax":
            loss = _relax(est)(d, lambda s: f0(s).to(dtype), num_samples=2)
        else:
            loss = ESTIMATORS[est](d, lambda s: f0(s).to(dtype))
        assert torch.isfinite(loss)
        loss.float().backward()
        grads[work] = x.grad
    assert grads[dtype].dtype == dtype
    assert torch.equal(grads[dtype], grads[torch.float32].to(dtype))
    assert grads[torch.float32].abs().max() > 1e-3


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_training_step_under_autocast(dtype):
    """A model step as a user writes it: encoder and decoder under autocast, T-REINFORCE+ and
    RELAX with the default critic; the exact gradient on the bf16/f16 logits equals the
    float64 one to the dtype's rounding (the logits' values being the same)."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(4, 16)
    feats = torch.randn(2, 4)
    f0 = structure_loss("spanning_tree", 4, 3)
    prog = compiled("spanning_tree", "torch")
    with torch.autocast("cpu", dtype=dtype):
        x = enc(feats).reshape(2, 4, 4)
        x.retain_grad()
        d = RaceDistribution(prog, x)
        relax = estimators.RELAX()
        loss = estimators.t_reinforce(d, f0, num_samples=3) + relax(d, lambda s: f0(s).to(dtype))
        exact = estimators.exact_gradient(d, f0)
    (loss.float() + exact.float()).backward()
    assert enc.weight.grad.dtype == torch.float32 and bool(torch.isfinite(enc.weight.grad).all())
    assert next(relax.critic.parameters()).dtype == torch.float32
    x64 = x.detach().double().requires_grad_(True)
    exact64 = estimators.exact_gradient(RaceDistribution(prog, x64), f0)
    exact64.backward()
    # the value follows f's dtype (float64 here), from float32 probabilities
    torch.testing.assert_close(exact.detach().double(), exact64.detach(), rtol=1e-5, atol=1e-6)
    xg = x.detach().requires_grad_(True)
    estimators.exact_gradient(RaceDistribution(prog, xg), f0).float().backward()
    assert xg.grad.dtype == dtype
    close_to(xg.grad, x64.grad, dtype, scale=x64.grad.abs().max())
    assert math.isfinite(float(loss.detach()))


def test_half_uniforms_are_drawn_in_float32():
    """The races never see half-precision uniforms (8 significant bits in bfloat16 would tie
    atoms and distort the law): the empirical law on bfloat16 logits matches the exact one."""
    x = torch.tensor([0.0, 0.5, 1.0, -0.5], dtype=torch.bfloat16)
    d = RaceDistribution(compiled("categorical", "torch"), x)
    t = d.sample((40000,), generator=gen(0))[..., 0]
    freq = torch.bincount(t, minlength=4).double() / t.numel()
    p = torch.softmax(x.double(), 0)
    se = (p * (1 - p) / t.numel()).sqrt()
    assert bool(((freq - p).abs() < 5 * se).all()), (freq, p)
    lp = float(d.log_prob(torch.tensor([2])).float())
    assert np.isclose(lp, float(torch.log(p[2])), rtol=EPS[torch.bfloat16] * 4)
