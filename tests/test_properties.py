"""Hypothesis properties for every built-in spec: E | T reproduces T, exact enumeration sums
to one on arbitrary rates, identical uniforms give identical traces."""
import math
from fractions import Fraction

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

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


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(CASES)), shift=st.floats(-50, 50))
def test_law_is_invariant_to_a_common_logit_shift(data, name, shift):
    """Softmax races ignore a common shift: same traces from the same uniforms, and the
    same log-probabilities."""
    prog = PROGRAMS[name]
    shape = CASES[name][1]
    lg = data.draw(logits_st(shape, scale=3.0))
    u = data.draw(uniforms_st((2,) + shape))
    a, b = prog.sample(lg, uniforms=u), prog.sample(lg + shift, uniforms=u)
    assert np.array_equal(a.trace, b.trace)
    np.testing.assert_allclose(prog.log_prob(a.trace, lg), prog.log_prob(a.trace, lg + shift), atol=1e-9)
