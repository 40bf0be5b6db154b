"""Hypothesis properties for every built-in spec: E | T reproduces T, exact enumeration sums
to one on arbitrary rates, identical uniforms give identical traces."""
import math
from fractions import Fraction

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import structdsl
from conftest import CASES
from structdsl import EmptyRaceError
from structdsl.testing import logits as logits_st
from structdsl.testing import rates as rates_st
from structdsl.testing import uniforms as uniforms_st

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROGRAMS = {name: structdsl.compile(spec, **statics) for name, (spec, _, statics) in CASES.items()}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(CASES)))
def test_conditional_noise_reproduces_trace(data, name):
    prog = PROGRAMS[name]
    shape = CASES[name][1]
    lg = data.draw(logits_st(shape, scale=4.0))
    u = data.draw(uniforms_st((3,) + shape))
    s = prog.sample(lg, uniforms=u)
    R, A = prog.max_races(shape), int(np.prod(shape))
    v = data.draw(uniforms_st((3, R + A)))
    noise = prog.conditional_noise(s.trace, lg, uniforms=v)
    again = prog.solve(noise)
    assert np.array_equal(again.trace, s.trace)
    for a, b in zip(again.structure, s.structure):
        assert np.array_equal(a, b)
    # a trace's log-probability is finite and the noise of the sample reproduces it too
    assert np.isfinite(prog.log_prob(s.trace, lg)).all()
    assert np.array_equal(prog.solve(s.noise).trace, s.trace)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(CASES)))
def test_exact_enumeration_sums_to_one(data, name):
    prog = PROGRAMS[name]
    shape = CASES[name][1]
    r = data.draw(rates_st(shape, zeros=True))
    try:
        e = prog.enumerate(rates=r)
    except EmptyRaceError:
        assume(False)     # the structure does not exist with these atoms excluded
    assert sum(e.probs, Fraction(0)) == 1
    with np.errstate(divide="ignore"):
        lg = np.log(r.astype(float))
    lp = prog.log_prob(e.traces, lg)
    want = np.array([math.log(p.numerator) - math.log(p.denominator) for p in e.probs])
    np.testing.assert_allclose(lp, want, atol=1e-10)
    # no trace uses an excluded atom
    used = e.traces[e.traces >= 0]
    assert (r.reshape(-1)[used] > 0).all()


# Logits and shifts on a 1/8 grid: ``lg + shift`` is then exact in float64, so the shifted
# program sees exactly the shifted rates (off the grid, logits 2.2e-16 apart shifted by 2.0
# round into an exact tie, which is a different input, not a broken invariance).
GRID_LOGITS = st.integers(-24, 24).map(lambda k: k / 8)       # [-3, 3]
GRID_SHIFTS = st.integers(-400, 400).map(lambda k: k / 8)     # [-50, 50]
NEAR_TIE = 1e-9      # log-noise gaps below this are treated as ties (rounding can flip them)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(CASES)), shift=GRID_SHIFTS)
def test_law_is_invariant_to_a_common_logit_shift(data, name, shift):
    """Softmax races ignore a common shift: the same exact law (every trace's probability),
    the same log-probabilities, and the same traces from the same uniforms."""
    prog = PROGRAMS[name]
    shape = CASES[name][1]
    lg = data.draw(hnp.arrays(np.float64, shape, elements=GRID_LOGITS))
    shifted = lg + shift
    assert np.array_equal(shifted - shift, lg)           # the grid makes the shift exact
    # the law, from exact enumeration: same traces, same probabilities
    ea, eb = prog.enumerate(lg), prog.enumerate(shifted)
    law_a = {t.tobytes(): lp for t, lp in zip(ea.traces, ea.log_probs)}
    law_b = {t.tobytes(): lp for t, lp in zip(eb.traces, eb.log_probs)}
    assert law_a.keys() == law_b.keys()
    np.testing.assert_allclose([law_b[k] for k in law_a], list(law_a.values()), atol=1e-9)
    np.testing.assert_allclose(prog.log_prob(ea.traces, shifted), ea.log_probs, atol=1e-9)
    # pathwise: identical uniforms give identical traces, unless two live atoms' noises are
    # within rounding of a tie (a null event, where either winner is right)
    u = data.draw(hnp.arrays(np.float64, (2,) + shape, unique=True,
                             elements=st.floats(1e-9, 1 - 1e-9, allow_nan=False)))
    a, b = prog.sample(lg, uniforms=u), prog.sample(shifted, uniforms=u)
    live = np.isfinite(a.noise).reshape(2, -1)[0]          # the noise is +inf at invalid atoms
    log_noise = np.sort((np.log(-np.log(u)) - lg).reshape(2, -1)[:, live], axis=-1)
    assume(np.diff(log_noise, axis=-1).min() > NEAR_TIE)
    assert np.array_equal(a.trace, b.trace)
    for x, y in zip(a.structure, b.structure):
        assert np.array_equal(x, y)
    np.testing.assert_allclose(prog.log_prob(a.trace, lg), prog.log_prob(a.trace, shifted), atol=1e-9)
