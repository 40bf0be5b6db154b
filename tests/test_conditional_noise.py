"""``E | T`` (Program.conditional_noise) on specs where some live atoms are not in the first
race: atoms that never race at all, and atoms that only join a later race.

The conditional law checked here follows from the memoryless property alone: race ``r``
among members ``M_r`` has minimum ``m_r ~ Exp(sum of rates of M_r)``, independent of
which member won; every member's residual past ``m_r`` is again ``Exp(rate)``.  So given
the trace, an atom's noise is the sum of the minima of the races it took part in (plus a
fresh ``Exp(rate)`` if it never won), and an atom that never raced is simply ``Exp(rate)``.
These laws are checked with scipy's KS tests, and cross-checked against rejection sampling
(unconditional noise, race by hand in numpy, keep the draws that produce the trace).
Seeds are fixed; each KS check uses level 1e-4.
"""
import numpy as np
import pytest
from scipy import stats

import structdsl
from structdsl import atoms, race, spec

LEVEL = 1e-4
RATES = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
LOGITS = np.log(RATES)
N = 3000


@spec
def first_two(n):
    item = atoms(n)
    w = race(item, lambda i: i < 2)
    return w


@spec
def late_entrant(n):
    item = atoms(n)
    a = race(item, lambda i: i < 2)        # atoms 0, 1
    b = race(item, lambda i: i >= 1)       # atom 1 again if it lost; atoms 2.. join only here
    return a, b


def ks_exp(x, rate):
    return stats.kstest(x, stats.expon(scale=1 / rate).cdf).pvalue


def given(prog, trace, logits=LOGITS, n=N, seed=0):
    """n draws of E | T for one trace, after the generic sanity checks."""
    t = np.tile(np.asarray(trace, dtype=np.int64), (n, 1))
    e = prog.conditional_noise(t, logits, seed=seed)
    assert e.shape == (n, len(logits))
    assert not np.isnan(e).any()
    live = np.isfinite(logits)
    assert np.isfinite(e[:, live]).all() and (e[:, live] > 0).all()
    assert np.array_equal(prog.solve(e).trace, t)          # E | T reproduces T
    return e


@pytest.mark.parametrize("winner", [0, 1])
def test_atoms_that_never_race_keep_their_unconditional_law(winner):
    prog = structdsl.compile(first_two)
    assert prog.max_races((5,)) == 1
    e = given(prog, [winner], seed=10 + winner)
    loser = 1 - winner
    # the race {0, 1}: the winner's noise is the race minimum, Exp(r0 + r1) whoever won;
    # the loser's excess over it is a fresh Exp(rate of the loser)
    assert ks_exp(e[:, winner], RATES[0] + RATES[1]) > LEVEL
    assert ks_exp(e[:, loser] - e[:, winner], RATES[loser]) > LEVEL
    # atoms 2, 3, 4 never race: given the trace they are still Exp(rate)
    for j in (2, 3, 4):
        assert ks_exp(e[:, j], RATES[j]) > LEVEL, j
    # and independent of the race: not correlated with the winner's noise
    for j in (2, 3, 4):
        assert stats.spearmanr(e[:, j], e[:, winner]).pvalue > LEVEL
    # the check has power: the winner's noise is visibly not Exp(its own rate)
    assert ks_exp(e[:, winner], RATES[winner]) < 1e-10


def test_atoms_that_never_race_at_logit_minus_inf_or_with_extreme_logits():
    prog = structdsl.compile(first_two)
    logits = np.array([0.0, 1.0, -np.inf, 600.0, -600.0])
    e = given(prog, [1], logits=logits, n=200, seed=3)
    assert np.isposinf(e[:, 2]).all()                     # an excluded atom stays excluded


def test_atoms_joining_a_later_race():
    prog = structdsl.compile(late_entrant)
    assert prog.max_races((5,)) == 2
    e = given(prog, [0, 3], seed=20)
    # race 1 = {0, 1}, won by 0; race 2 = {1, 2, 3, 4}, won by 3
    m1, m2 = e[:, 0], e[:, 3]
    assert ks_exp(m1, RATES[0] + RATES[1]) > LEVEL
    assert ks_exp(m2, RATES[1:].sum()) > LEVEL
    assert stats.spearmanr(m1, m2).pvalue > LEVEL            # the race minima are independent
    assert ks_exp(e[:, 1] - m1 - m2, RATES[1]) > LEVEL       # raced twice, never won
    for j in (2, 4):                                         # raced once (the later race)
        assert ks_exp(e[:, j] - m2, RATES[j]) > LEVEL, j
    # power: atom 3 only raced in race 2, so its noise is not Exp(r0 + r1) nor Exp(r3)
    assert ks_exp(m2, RATES[0] + RATES[1]) < 1e-10 and ks_exp(m2, RATES[3]) < 1e-10


def late_entrant_by_hand(noise):
    """The trace of ``late_entrant`` computed directly from the residual races."""
    a = np.where(noise[:, 0] < noise[:, 1], 0, 1)
    residual = noise[:, 1:].copy()                         # atoms 1..4 in race 2
    residual[:, 0] = np.where(a == 0, noise[:, 1] - noise[:, 0], np.inf)   # 1 lost: residual
    b = 1 + np.argmin(residual, axis=1)
    return np.stack([a, b], axis=1)


@pytest.mark.parametrize("trace", [[0, 3], [1, 4], [0, 1]])
def test_later_race_noise_matches_rejection_sampling(trace):
    """Every atom's law given the trace equals the law of unconditional noise filtered on
    producing that trace (two-sample KS), for a trace of each shape."""
    prog = structdsl.compile(late_entrant)
    rng = np.random.default_rng(7)
    unconditional = rng.exponential(size=(200_000, 5)) / RATES
    hits = (late_entrant_by_hand(unconditional) == trace).all(axis=1)
    kept = unconditional[hits]
    assert len(kept) > 2000
    # the by-hand race agrees with the compiled solver on the unconditional draws
    first = unconditional[:500]
    assert np.array_equal(prog.solve(first).trace, late_entrant_by_hand(first))
    e = given(prog, trace, seed=30)
    for j in range(5):
        assert stats.ks_2samp(e[:, j], kept[:, j]).pvalue > LEVEL, j
