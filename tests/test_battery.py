"""The shipped property battery (structdsl.testing.check_spec) on every built-in spec,
with an independent reference solver where one exists: enumeration sums to exactly one,
log_prob matches it, sampling fits it (moderate, skewed and -inf logits), E | T reproduces
the trace and has Exp(rate) marginals."""
import numpy as np
import pytest

import reference_solvers as ref
from structdsl.testing import check_spec, chi2_gof, chi2_sf, ks_uniform_p

REFERENCES = {
    "categorical": lambda w, **s: ref.categorical(w),
    "top_k": lambda w, k: ref.top_k(w, k),
    "permutation": lambda w, **s: ref.permutation(w),
    "spanning_tree": lambda w, **s: ref.spanning_tree(w),
    "arborescence": lambda w, **s: ref.arborescence(w),
    "binary_tree": lambda w, **s: ref.cartesian_tree(w),
    "matching": lambda w, **s: ref.greedy_matching(w),
    "clustering": lambda w, c: ref.single_linkage(w, c),
}
# -inf atoms make these structures impossible (every item must be placed) or make the
# greedy algorithm hit a dead end; the battery reports the scenario as not applicable.
NO_NEG_INF = {"permutation", "binary_tree", "matching"}


def _battery(case, backend, samples):
    name, spec, shape, statics = case
    reference = REFERENCES[name]
    report = check_spec(spec, shape, reference=lambda w: reference(w, **statics), backend=backend,
                        samples=samples, seed=0, **statics)
    assert report.ok
    assert report.total_probability == 1
    assert report.reference_checked == 50
    assert report.neg_inf_checked == (name not in NO_NEG_INF)
    assert report.worst_gof_p >= 1e-3 and report.worst_marginal_p >= 1e-3


def test_battery_on_builtin_spec(case):
    """Every check of the battery on the reference backend (the executable meaning)."""
    _battery(case, "numpy", samples=1000)


def test_battery_at_full_power_on_numba(case):
    """The battery's goodness-of-fit and E | T marginals at 8000 draws a scenario: on the
    numba backend, which the conformance suite holds to the reference bit for bit (same
    uniforms, same traces), so this is the reference's law too, at an eighth of the time."""
    pytest.importorskip("numba")
    _battery(case, "numba", samples=8000)


def test_battery_catches_a_wrong_reference():
    """The battery is not vacuous: a reference that disagrees is reported."""
    from structdsl.specs import permutation
    report = check_spec(permutation, (4,), reference=lambda w: {"order": np.argsort(-w)},
                        samples=500, raise_on_failure=False)
    assert not report.ok and any("reference" in f for f in report.failures)
    with pytest.raises(AssertionError, match="reference"):
        check_spec(permutation, (4,), reference=lambda w: {"order": np.argsort(-w)}, samples=500)


def test_statistics_helpers_against_scipy():
    from scipy import stats
    for df in (3, 10, 50):
        for x in (0.5 * df, df, 2 * df):
            assert abs(chi2_sf(x, df) - stats.chi2.sf(x, df)) < 0.01
    rng = np.random.default_rng(0)
    u = rng.random(500)
    assert abs(ks_uniform_p(u) - stats.kstest(u, "uniform").pvalue) < 0.02
    assert ks_uniform_p(u ** 2) < 1e-6
    assert chi2_gof([100, 100, 100], [1 / 3] * 3) > 0.9
    assert chi2_gof([300, 0, 0], [1 / 3] * 3) < 1e-9


def test_battery_picks_a_small_size_by_itself():
    from structdsl.specs import binary_tree, clustering
    report = check_spec(clustering, samples=1000, c=2)
    assert report.atom_shape == (4, 4) and report.traces == 30 and report.ok
    # Catalan(6) = 132 traces <= 200 < Catalan(7)
    assert check_spec(binary_tree, samples=1000).atom_shape == (6,)
