"""The property battery has power: check_spec with its default thresholds rejects programs
whose law is wrong, and its statistics agree with scipy.

Wrong programs are subclasses of the NumPy reference Program registered as extra backends
(``structdsl.backends._BACKENDS``, undone by ``monkeypatch``), so check_spec compiles them
exactly as it compiles a real backend:

* ``Tempered`` samples from ``softmax(1.2 * logits)``: only the trace law is wrong;
* ``InflatedNoise`` returns ``1.1 * (E | T)``, which still reproduces every trace (the races
  compare residuals, which all scale together) but whose marginals are ``Exp(rate / 1.1)``;
* a calibrated variant of it puts the Bonferroni-corrected KS p-value at ``alpha / 2``, so
  the verdict and the reported ``worst_marginal_p`` pin the correction (applied once).

The perturbations are mild on purpose: their p-values are far below ``alpha`` but far above
1e-30, so a weakened threshold would let them through.
"""
import importlib
import inspect
import sys
import types

import numpy as np
import pytest
from scipy import stats

import structdsl
from structdsl.backends.numpy_reference import Program as NumpyProgram
from structdsl.specs import categorical
from structdsl.testing import check_spec, chi2_gof, ks_uniform_p

ALPHA = inspect.signature(check_spec).parameters["alpha"].default      # the default level
SHAPE = (5,)


@pytest.fixture
def backend(monkeypatch):
    """register(cls) -> a backend name under which structdsl.compile builds ``cls``."""
    registry = importlib.import_module("structdsl.backends")

    def register(cls):
        module = types.ModuleType(f"_structdsl_test_backend_{cls.__name__}")
        module.Program = cls
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(registry._BACKENDS, f"test-{cls.__name__}", module.__name__)
        assert type(structdsl.compile(categorical, backend=f"test-{cls.__name__}")) is cls
        return f"test-{cls.__name__}"

    return register


class PassThrough(NumpyProgram):
    """The reference program, unchanged, through the same registration path."""


class Tempered(NumpyProgram):
    """Samples from softmax(1.2 * logits); everything else (log_prob, E | T) is right."""

    def sample(self, logits, **kwargs):
        return super().sample(1.2 * np.asarray(logits, dtype=np.float64), **kwargs)


class InflatedNoise(NumpyProgram):
    """E | T scaled by 1.1: reproduces the trace, wrong marginals."""

    def conditional_noise(self, trace, logits, **kwargs):
        return 1.1 * super().conditional_noise(trace, logits, **kwargs)


def test_default_level_is_a_significance_level():
    assert 1e-6 <= ALPHA <= 0.05


def test_correct_program_passes(backend):
    report = check_spec(categorical, SHAPE, backend=backend(PassThrough))   # raises on failure
    assert report.ok and report.total_probability == 1
    assert report.worst_gof_p >= ALPHA and report.worst_marginal_p >= ALPHA


def test_wrong_trace_law_is_caught_by_the_chi_square_part(backend):
    report = check_spec(categorical, SHAPE, backend=backend(Tempered), raise_on_failure=False)
    assert any("do not fit the enumerated law (chi-square" in f for f in report.failures)
    assert not any("reproduce" in f or "never produces" in f for f in report.failures)
    assert report.worst_gof_p < ALPHA
    assert report.worst_gof_p > 1e-30          # mild: a weakened threshold would miss it


def test_wrong_noise_given_trace_is_caught_by_the_ks_part(backend):
    name = backend(InflatedNoise)
    prog = structdsl.compile(categorical, backend=name)
    lg = np.random.default_rng(1).normal(size=SHAPE)
    s = prog.sample(lg, sample_shape=(1000,), seed=2)
    noise = prog.conditional_noise(s.trace, lg, seed=3)
    assert np.array_equal(prog.solve(noise).trace, s.trace)     # only the marginals are wrong
    report = check_spec(categorical, SHAPE, backend=name, raise_on_failure=False)
    assert report.failures
    assert all("marginals of E | T are not Exp(rate) (KS" in f for f in report.failures)
    assert report.worst_gof_p >= ALPHA                            # the trace law is right
    assert 1e-30 < report.worst_marginal_p < ALPHA


def _bonferroni_ks(logits, noise):
    """min(1, (number of live atoms) * min over atoms of scipy's KS p-value of
    exp(-rate * E) against Uniform(0, 1))."""
    live = np.isfinite(logits)                        # every atom of categorical is valid
    u = np.exp(-np.exp(logits[live]) * noise[:, live])
    return min(1.0, live.sum() * min(stats.kstest(col, "uniform").pvalue for col in u.T))


def _scale_to(logits, noise, target):
    """The c in [1, 2] with _bonferroni_ks(logits, c * noise) == target (bisection)."""
    lo, hi = 1.0, 2.0
    assert _bonferroni_ks(logits, lo * noise) > target > _bonferroni_ks(logits, hi * noise)
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _bonferroni_ks(logits, mid * noise) > target else (lo, mid)
    return (lo + hi) / 2


def test_bonferroni_correction_is_applied_once(backend):
    """A noise-given-trace error calibrated so that (number of atoms) * (smallest KS
    p-value) = alpha / 2 in the first scenario: check_spec must fail it, and report exactly
    that corrected value (applying the correction twice would report 5x more and pass)."""
    target = ALPHA / 2
    calls = []

    class Calibrated(NumpyProgram):
        def conditional_noise(self, trace, logits, **kwargs):
            noise = super().conditional_noise(trace, logits, **kwargs)
            if not calls:
                noise = _scale_to(np.asarray(logits), noise, target) * noise
            calls.append((np.asarray(logits, dtype=np.float64), noise))
            return noise

    report = check_spec(categorical, SHAPE, backend=backend(Calibrated), raise_on_failure=False)
    assert len(calls) == 3 and report.neg_inf_checked          # moderate, skewed, -inf atoms
    per_scenario = [_bonferroni_ks(lg, noise) for lg, noise in calls]
    assert per_scenario[0] == pytest.approx(target, rel=1e-3)
    assert min(per_scenario[1:]) > 10 * target                 # the others are right
    assert report.worst_marginal_p == pytest.approx(min(per_scenario), rel=0.1)
    assert len(report.failures) == 1 and "[moderate] marginals of E | T" in report.failures[0]


# ---- the statistics against scipy -------------------------------------------------------
def pooled(counts, probs, min_expected=5.0):
    """Counts and expectations with every category expecting < min_expected in one bin."""
    counts = np.asarray(counts, dtype=np.float64)
    expected = np.asarray(probs, dtype=np.float64) * counts.sum()
    small = expected < min_expected
    return (np.append(counts[~small], counts[small].sum()),
            np.append(expected[~small], expected[small].sum()))


def _skewed_case(seed=3, k=40, n=600):
    """40 categories from softmax(N(0, 2^2)) logits (36 expect < 5 of 600 draws), counts
    drawn from a slightly tilted law."""
    rng = np.random.default_rng(seed)
    probs = np.exp(rng.normal(0, 2, k))
    probs /= probs.sum()
    tilt = probs * np.exp(rng.normal(0, 0.15, k))
    return rng.multinomial(n, tilt / tilt.sum()).tolist(), probs.tolist()


CHI2_CASES = [
    # five categories expecting 4 each (pooled: 20); observed 28 in them
    pytest.param([70, 55, 47, 6, 7, 5, 6, 4], [0.4, 0.3, 0.2] + [0.02] * 5, id="pool-excess"),
    # the same categories, observed 12 in them
    pytest.param([82, 62, 44, 2, 3, 2, 3, 2], [0.4, 0.3, 0.2] + [0.02] * 5, id="pool-deficit"),
    pytest.param(*_skewed_case(), id="many-small-categories"),
]


@pytest.mark.parametrize("counts, probs", CHI2_CASES)
def test_chi2_gof_equals_scipy_on_the_pooled_categories(counts, probs):
    c, e = pooled(counts, probs)
    assert (e >= 5).all()
    want = stats.chisquare(c, e).pvalue
    assert 0.01 < want < 0.9            # where the library's Wilson-Hilferty tail is accurate
    assert chi2_gof(counts, probs) == pytest.approx(want, rel=0.05, abs=1e-3)
    # the pooled bin matters: dropping the small categories gives a very different p-value
    probs = np.asarray(probs)
    big = probs * sum(counts) >= 5
    kept = np.asarray(counts, dtype=np.float64)[big]
    dropped = stats.chisquare(kept, probs[big] / probs[big].sum() * kept.sum()).pvalue
    assert dropped > 2 * want


def test_chi2_gof_folds_a_pool_that_is_still_small():
    """One category expecting 0.01 that sees a count: its pool joins the smallest other
    category (expectation 0.01 as its own bin would add ~98 to the statistic)."""
    probs = [0.5, 0.3, 0.2 - 1e-5, 1e-5]
    counts = [480, 310, 209, 1]
    want = stats.chisquare([480, 310, 210], [500, 300, 200]).pvalue
    assert chi2_gof(counts, probs) == pytest.approx(want, rel=0.05, abs=1e-3)


def test_chi2_gof_keeps_its_level_with_a_rare_category():
    """Under the null, p < alpha must happen about alpha of the time, even when one
    category is so rare that the pool of small categories expects only 0.01."""
    rng = np.random.default_rng(0)
    probs = np.array([0.3, 0.3, 0.4 - 2.5e-6, 2.5e-6])
    p = np.array([chi2_gof(rng.multinomial(4000, probs), probs) for _ in range(4000)])
    assert (p < ALPHA).mean() <= 2.5 * ALPHA        # an unfolded pool gives ~9 * alpha
    assert (p < 0.1).mean() == pytest.approx(0.1, abs=0.03)


def test_chi2_gof_drops_categories_that_cannot_occur():
    want = stats.chisquare([30, 70], [50, 50]).pvalue
    assert chi2_gof([30, 70, 0, 0], [0.5, 0.5, 0.0, 0.0]) == pytest.approx(want, rel=0.05, abs=1e-3)


KS_SAMPLES = [
    pytest.param(lambda rng: rng.random(300), id="uniform-300"),
    pytest.param(lambda rng: rng.random(4000) ** 1.04, id="power-1.04-4000"),
    pytest.param(lambda rng: rng.random(2000) ** 1.08, id="power-1.08-2000"),
    pytest.param(lambda rng: rng.beta(1, 1.15, 1000), id="beta-1000"),
]


@pytest.mark.parametrize("draw", KS_SAMPLES)
def test_ks_uniform_p_equals_scipy(draw):
    u = draw(np.random.default_rng(0))
    want = stats.kstest(u, "uniform").pvalue
    assert 1e-5 < want < 0.9
    assert ks_uniform_p(u) == pytest.approx(want, rel=0.05, abs=1e-4)
