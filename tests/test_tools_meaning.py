"""The tools around the backends mean what they say: the property battery and its CLI on
every backend, NaN-proof statistics, ``probability_of`` with two fields, the order-only
detection of a reference solver, and the torch distribution's and estimators' handling of
float traces, NaN logits at invalid atoms, impossible traces and ragged batches.

Each test was checked against a hand-made mutant of the code it pins (named in its
docstring): the mutant fails it, the code passes it.
"""
import importlib
import itertools
import math
import subprocess
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import structdsl
from structdsl import specs
from structdsl.backends.numpy_reference import Program as NumpyProgram
from structdsl.testing import check_spec

torch = pytest.importorskip("torch")

from structdsl import estimators  # noqa: E402
from structdsl.torch import RaceDistribution  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INF = math.inf


@pytest.fixture
def backend(monkeypatch):
    """register(cls) -> a backend name under which structdsl.compile builds ``cls``
    (undone by monkeypatch), so that check_spec compiles it as it compiles a real backend."""
    registry = importlib.import_module("structdsl.backends")

    def register(cls):
        module = types.ModuleType(f"_structdsl_meaning_backend_{cls.__name__}")
        module.Program = cls
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(registry._BACKENDS, f"meaning-{cls.__name__}", module.__name__)
        return f"meaning-{cls.__name__}"

    return register


# ---- 1. the battery and `check` on every backend --------------------------------------------
@pytest.mark.parametrize("name, shape, statics", [("categorical", (4,), {}), ("top_k", (4,), {"k": 2})])
def test_check_spec_runs_on_the_torch_backend(name, shape, statics):
    """Was: TypeError from np.max on the torch tensor log_prob returns."""
    report = check_spec(getattr(specs, name), shape, backend="torch", samples=600, **statics)
    assert report.ok and report.total_probability == 1 and report.neg_inf_checked
    assert report.worst_gof_p >= 1e-3 and report.worst_marginal_p >= 1e-3


def test_check_spec_runs_on_the_numba_backend():
    report = check_spec(specs.categorical, (4,), backend="numba", samples=600)
    assert report.ok and report.neg_inf_checked


def test_check_spec_on_torch_is_not_vacuous(backend):
    """A torch program that samples from softmax(1.5 * logits) fails the chi-square part: the
    battery really looks at what the torch backend returns."""
    from structdsl.backends.torch_backend import Program as TorchProgram

    class Tempered(TorchProgram):
        def sample(self, logits, **kwargs):
            return super().sample(1.5 * torch.as_tensor(np.asarray(logits)), **kwargs)

    report = check_spec(specs.categorical, (4,), backend=backend(Tempered), samples=2000, raise_on_failure=False)
    assert any("chi-square" in f for f in report.failures)


def test_cli_check_runs_on_the_torch_backend():
    """Was: every spec crashed with the internal TypeError."""
    run = subprocess.run([sys.executable, "-m", "structdsl", "check", "--backend", "torch", "--samples", "300"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "(torch backend)" in run.stdout and "8/8 specs pass" in run.stdout
    assert "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "structdsl", "check", "specs/top_k.py", "--param", "k=2",
                          "--backend", "torch", "--samples", "300"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "battery      pass" in run.stdout


def test_cli_help_lists_every_backend_and_refuses_others(capsys):
    from structdsl.__main__ import BACKENDS, main
    from structdsl.backends import available
    assert set(BACKENDS) == set(available()) - {"toy"}      # toy: tests/conformance.py registers it
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "numpy (the reference, default), numba or torch" in text
    with pytest.raises(SystemExit) as exc:
        main(["check", "--backend", "jax"])
    assert exc.value.code == 2 and "invalid choice: 'jax'" in capsys.readouterr().err


# ---- 2. E | T marginals: absent atoms skipped, NaN fails -----------------------------------
class NaNNoise(NumpyProgram):
    """E | T with a NaN at live atom 0 in a few samples (solve refuses NaN weights)."""

    def conditional_noise(self, trace, logits, **kwargs):
        noise = super().conditional_noise(trace, logits, **kwargs)
        noise.reshape(len(noise), -1)[:7, 0] = np.nan
        return noise


def test_nan_conditional_noise_fails_the_battery_instead_of_passing_or_crashing(backend):
    """Was: a ValueError from solve escaped check_spec; and a NaN column in the marginals
    gave a NaN p-value that ``min(1.0, nan)`` turned into 1.0, a pass."""
    name = backend(NaNNoise)
    report = check_spec(specs.categorical, (5,), backend=name, samples=500, raise_on_failure=False)
    assert not report.ok
    assert any("E | T is NaN at live atom(s) [(0,)]" in f for f in report.failures)
    assert any("solve raised on the conditional noise" in f for f in report.failures)
    assert math.isnan(report.worst_marginal_p)
    with pytest.raises(AssertionError, match="NaN"):
        check_spec(specs.categorical, (5,), backend=name, samples=500)


def test_marginals_skip_atoms_at_minus_inf():
    """Mutant: the marginal check over every valid atom (``live = inst.valid``): the atoms at
    -inf give 0 * inf = NaN, which now fails (and used to pass silently)."""
    for spec, shape, statics in ((specs.categorical, (5,), {}), (specs.top_k, (5,), {"k": 3})):
        report = check_spec(spec, shape, samples=800, raise_on_failure=False, **statics)
        assert report.neg_inf_checked and report.ok, report.failures
        assert math.isfinite(report.worst_marginal_p) and report.worst_marginal_p >= 1e-3


def test_ks_p_value_of_nan_data_is_nan():
    from structdsl.testing import ks_uniform_p
    u = np.random.default_rng(0).random(200)
    assert 0 < ks_uniform_p(u) <= 1
    u[3] = np.nan
    assert math.isnan(ks_uniform_p(u))


# ---- 3. probability_of with two fields ---------------------------------------------------------
def test_probability_of_two_fields_against_exact_enumeration():
    """Mutant (symbolic.py): ``any`` instead of ``all`` over the given fields."""
    from structdsl import symbolic
    pytest.importorskip("sympy")
    rates = np.array([1, 2, 3, 5])
    law = symbolic.law(specs.top_k, (4,), k=2)
    S = int(rates.sum())
    for a, b in itertools.permutations(range(4), 2):
        subset = np.zeros(4, bool)
        subset[[a, b]] = True
        first = Fraction(int(rates[a]), S) * Fraction(int(rates[b]), S - int(rates[a]))
        other = Fraction(int(rates[b]), S) * Fraction(int(rates[a]), S - int(rates[b]))
        assert law.at(law.probability_of(order=[a, b], subset=subset), rates) == first
        assert law.at(law.probability_of(subset=subset.astype(int).tolist(), order=(a, b)), rates) == first
        assert law.at(law.probability_of(subset=subset), rates) == first + other
        wrong = np.roll(subset, 1) if not np.array_equal(np.roll(subset, 1), subset) else ~subset
        assert law.probability_of(order=[a, b], subset=wrong) == 0
    # clustering: (links, label), against Program.enumerate with the same integer rates
    prog = structdsl.compile(specs.clustering, c=2)
    law = symbolic.law(prog, (4, 4))
    r = np.random.default_rng(3).integers(1, 6, size=(4, 4))
    enum = prog.enumerate(rates=np.where(prog.instance((4, 4)).valid, r, 0).astype(object))
    exact = {}
    for i in range(len(enum)):
        key = (enum.structure.links[i].tobytes(), enum.structure.label[i].tobytes())
        exact[key] = exact.get(key, 0) + enum.probs[i]
    assert len(exact) == 15
    for i in range(len(enum)):
        links, label = enum.structure.links[i], enum.structure.label[i]
        p = law.at(law.probability_of(links=links, label=label), r)
        assert p == exact[(links.tobytes(), label.tobytes())]


# ---- 4. order-only detection -------------------------------------------------------------------
def closest_to_mean(w):
    finite = np.isfinite(w)
    return {"index": int(np.argmin(np.where(finite, np.abs(w - w[finite].mean()), np.inf)))}


def argmin_within_tolerance(w):
    """The argmin, ties within 0.1% broken towards the larger index: reads the values."""
    return {"index": int(np.flatnonzero(np.isclose(w, np.min(w), rtol=1e-3, atol=0))[-1])}


def mst_with_a_sentinel(w):
    """The MST by sorting, with weights >= 1000 meaning "no edge" (a sentinel)."""
    from structdsl.specs.spanning_tree import mst_by_sorting
    return mst_by_sorting(np.where(w >= 1e3, np.inf, w))


def argmin(w):
    return {"index": int(np.argmin(w))}


@pytest.mark.parametrize("seed", range(5))
def test_is_order_only_catches_references_the_smooth_maps_cannot(seed):
    """Was: the tolerance and sentinel references passed as order-only (2w + 1, w^3, sqrt,
    exp(w) - 1 and the ranks keep both answers on Exp(1) weights).  Mutant: the maps
    through the ranks and the power-of-two scalings removed from ``_order_maps``."""
    from structdsl.check import is_order_only
    cat, tree = structdsl.compile(specs.categorical), structdsl.compile(specs.spanning_tree)
    rng = lambda: np.random.default_rng(seed)          # noqa: E731
    for ref, prog, shape in ((argmin_within_tolerance, cat, (5,)), (mst_with_a_sentinel, tree, (4, 4)),
                             (closest_to_mean, cat, (4,)), (closest_to_mean, cat, (6,))):
        ok, why = is_order_only(ref, prog, shape, rng=rng())
        assert not ok and "strictly increasing map" in why, ref.__name__
    # true order-only references stay order-only, including one that reads the values but
    # whose answer is the median for three atoms (the closest to the mean of three)
    from structdsl.specs.spanning_tree import mst_by_sorting
    for ref, prog, shape in ((argmin, cat, (5,)), (mst_by_sorting, tree, (4, 4)), (mst_by_sorting, tree, (5, 5)),
                             (closest_to_mean, cat, (3,))):
        assert is_order_only(ref, prog, shape, rng=rng()) == (True, None), ref.__name__


def test_is_order_only_default_detection_and_certificate():
    from structdsl.check import is_order_only, reference_certificate
    pytest.importorskip("sympy")
    cat = structdsl.compile(specs.categorical)
    ok, why = is_order_only(argmin_within_tolerance, cat, (5,))
    assert not ok and "near-ties" in why
    cert = reference_certificate(specs.spanning_tree, (4, 4), mst_with_a_sentinel)
    assert not cert.applies and cert.message.startswith("not applicable")
    assert reference_certificate(specs.spanning_tree, (4, 4)).ok       # the sort-based MST: proved

    def raises_on_huge(w):
        if np.max(w[np.isfinite(w)]) > 1e12:
            raise OverflowError("too big")
        return argmin(w)
    ok, why = is_order_only(raises_on_huge, cat, (4,))
    assert not ok and "OverflowError: too big" in why


# ---- 5. float traces ---------------------------------------------------------------------------
def _program_refusal(prog, trace, logits):
    with pytest.raises(TypeError) as exc:
        prog.log_prob(trace, logits)
    return str(exc.value)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bool])
def test_race_distribution_refuses_non_integer_traces_like_the_program(fast, dtype):
    """Was: the CPU fast path cast a float trace to int64 (1.7 -> 1) and scored it.
    Mutant: ``RaceDistribution._check_trace_dtype`` made a no-op."""
    x = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for validate in (True, False):
        d = RaceDistribution(specs.spanning_tree, x, fast_cpu=fast, validate_args=validate)
        t = d.sample((3,), generator=torch.Generator().manual_seed(1))
        bad = t.to(dtype) + 0.25 if dtype.is_floating_point else t.to(dtype)
        want = _program_refusal(d.program, bad, x)          # the Program API's own refusal
        assert want.startswith("trace must be an integer")
        for call in (lambda: d.log_prob(bad), lambda: d.support.check(bad), lambda: d.conditional_noise(bad),
                     lambda: d.structure(bad), lambda: d._log_prob(bad)):
            with pytest.raises(TypeError) as exc:
                call()
            assert str(exc.value) == want
        # integer dtypes other than int64 are traces
        assert torch.equal(d.log_prob(t.to(torch.int32)), d.log_prob(t))


# ---- 6. NaN logits at invalid atoms ------------------------------------------------------------
def _spanning_tree_logits():
    x = torch.randn(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lower = torch.ones(4, 4, dtype=torch.bool).tril()            # u >= v: invalid atoms
    x[1, 0, 3] = -INF                                            # an absent edge in element 1
    zeros = torch.where(lower, 0.0, x)
    return zeros, torch.where(lower, torch.tensor(math.nan, dtype=torch.float64), x), lower


def _adjacent01(s):
    return s.adjacency[..., 0, 1].double() + 0.5 * s.adjacency[..., 1, 2].double()


def _every_entry_point(x0, fast, validate):
    """Every result a user can get from a RaceDistribution on logits ``x0`` and from the
    estimators (same random numbers), with the gradients in the logits."""
    out = {}
    x = x0.clone().requires_grad_(True)
    d = RaceDistribution(specs.spanning_tree, x, fast_cpu=fast, validate_args=validate)
    t = d.sample((5,), generator=torch.Generator().manual_seed(1))
    lp = d.log_prob(t)
    lp.sum().backward()
    out.update(trace=t, log_prob=lp.detach(), log_prob_grad=x.grad.clone(), support=d.support.check(t),
               structure=d.structure(t).adjacency, lax_log_prob=d._log_prob(t).detach())
    x.grad = None
    noise = d.conditional_noise(t, generator=torch.Generator().manual_seed(2))
    noise.sum().backward()
    out.update(noise=noise.detach(), noise_grad=x.grad.clone())
    s = d.sample_with_structure((2,), generator=torch.Generator().manual_seed(3))
    out.update(sampled=s.trace, sampled_noise=s.noise.detach(), noise_log_prob=d.noise_log_prob(s.noise).detach())
    with pytest.raises(ValueError, match="ragged"):
        d.enumerate_support()
    for name, run in (("t_reinforce", lambda d: estimators.t_reinforce(d, _adjacent01, num_samples=3)),
                      ("e_reinforce", lambda d: estimators.e_reinforce(d, _adjacent01, num_samples=3)),
                      ("relax", lambda d: estimators.RELAX(atom_shape=(4, 4))(d, _adjacent01, num_samples=2)),
                      ("exact", lambda d: estimators.exact_gradient(d, _adjacent01))):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(4)                 # the critic's initialisation and every draw
        loss = run(RaceDistribution(specs.spanning_tree, x, fast_cpu=fast, validate_args=validate))
        loss.backward()
        out[name] = loss.detach()
        out[name + "_grad"] = x.grad.clone()
    return out


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("validate", [True, False])
def test_nan_logits_at_invalid_atoms_are_ignored_everywhere(fast, validate):
    """Was: the constructor (validate_args) and every call refused the NaN of the lower
    triangle.  Mutant: ``_x`` returning the raw logits."""
    zeros, nans, lower = _spanning_tree_logits()
    a, b = _every_entry_point(zeros, fast, validate), _every_entry_point(nans, fast, validate)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        if k.endswith("_grad"):
            assert torch.isfinite(b[k]).all() and not b[k][..., lower].any(), k


@pytest.mark.parametrize("fast", [True, False])
def test_nan_logit_at_a_valid_atom_names_the_batch_element(fast):
    """Was: the fast log_prob returned NaN without a word.  Mutant: the check in
    ``_checked_logits`` restricted to invalid atoms."""
    zeros, _, _ = _spanning_tree_logits()
    x = zeros.clone()
    x[2, 1, 3] = math.nan                                      # upper triangle: a valid atom
    message = r"NaN \(1 entries, first at index \(2, 1, 3\)\) at valid atoms: batch element \(2,\), atom \(1, 3\)"
    with pytest.raises(ValueError, match=message):
        RaceDistribution(specs.spanning_tree, x, fast_cpu=fast, validate_args=True)
    d = RaceDistribution(specs.spanning_tree, x, fast_cpu=fast, validate_args=False)
    t = RaceDistribution(specs.spanning_tree, zeros, fast_cpu=fast).sample((2,))
    for call in (lambda: d.sample(), lambda: d.log_prob(t), lambda: d.support.check(t),
                 lambda: d.conditional_noise(t), lambda: d.structure(t), lambda: d.noise_log_prob(torch.ones(4, 4)),
                 lambda: estimators.t_reinforce(d, _adjacent01, num_samples=2),
                 lambda: estimators.exact_gradient(d, _adjacent01)):
        with pytest.raises(ValueError, match=message):
            call()
    y = zeros.clone()
    y[0, 0, 1] = INF
    with pytest.raises(ValueError, match=r"\+inf \(first at index \(0, 0, 1\)\) at a valid atom: batch element \(0,\)"):
        RaceDistribution(specs.spanning_tree, y, fast_cpu=fast, validate_args=False).sample()
    y = zeros.clone()
    y[0, 3, 1] = INF                                          # +inf at an invalid atom: ignored too
    assert torch.equal(RaceDistribution(specs.spanning_tree, y, fast_cpu=fast).sample(
        generator=torch.Generator().manual_seed(5)), RaceDistribution(specs.spanning_tree, zeros, fast_cpu=fast).sample(
        generator=torch.Generator().manual_seed(5)))


# ---- 7. impossible traces on the fast path of conditional_noise -------------------------------
def test_fast_conditional_noise_refuses_impossible_traces_like_the_lock_step_path():
    """Mutant: the probability-zero check removed from the fast path (it then returns noise
    for an impossible trace)."""
    x = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[1, 0, 3] = -INF
    fast = RaceDistribution(specs.spanning_tree, x, validate_args=False)
    lock = RaceDistribution(specs.spanning_tree, x, validate_args=False, fast_cpu=False)
    assert fast._numba is not None
    ok = fast.sample(generator=torch.Generator().manual_seed(1))
    impossible = {
        "an edge at -inf in element 1 only": torch.tensor([[1, 2, 3], [3, 1, 2]]),
        "an edge twice": torch.tensor([[1, 1, 2], [1, 2, 6]]),
        "an edge inside a component": torch.tensor([[1, 2, 6], [1, 2, 6]]),
        "an invalid atom": torch.tensor([[4, 2, 3], [1, 2, 3]]),
        "padding before a winner": torch.tensor([[1, -1, 2], [1, 2, 3]]),
        "a broadcast trace, impossible in element 1 only": torch.tensor([3, 1, 2]),
        "a sample dim": torch.stack([ok, torch.tensor([[1, 2, 3], [3, 1, 2]])]),
    }
    for what, t in impossible.items():
        errors = []
        for d in (lock, fast):
            with pytest.raises(ValueError) as exc:
                d.conditional_noise(t, generator=torch.Generator().manual_seed(2))
            errors.append(str(exc.value))
        assert errors[0] == errors[1], what
        assert "has probability zero under these logits: there is no noise that produces it" in errors[1], what
        assert not torch.isfinite(fast.log_prob(t)).all(), what
    for d in (lock, fast):
        assert torch.isfinite(d.conditional_noise(ok)[fast._live]).all()


# ---- 8. exact_gradient on a ragged batch ----------------------------------------------------------
C = torch.tensor([7.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)      # a cost per order entry + 1


def _order_cost(s):
    """Not 0 at the padding: order entry -1 costs C[0] = 7."""
    return C[s.order[..., 0] + 1] + 10 * C[s.order[..., 1] + 1]


def _top2_by_hand(x, live):
    """mean over the batch of E[cost(order)] for top-2 by exponential races, written out:
    P(order = (a, b)) = r_a / S * r_b / (S - r_a) over the live atoms; one live atom gives
    order (a, -1) with probability 1, none gives (-1, -1)."""
    total = 0
    for b in range(x.shape[0]):
        items = [i for i in range(x.shape[1]) if live[b][i]]
        r = torch.exp(x[b])
        if not items:
            total = total + C[0] + 10 * C[0]
        elif len(items) == 1:
            total = total + C[items[0] + 1] + 10 * C[0]
        else:
            S = sum(r[i] for i in items)
            for i, j in itertools.permutations(items, 2):
                total = total + r[i] / S * r[j] / (S - r[i]) * (C[i + 1] + 10 * C[j + 1])
    return total / x.shape[0]


@pytest.mark.parametrize("fast", [True, False])
def test_exact_gradient_on_a_ragged_batch(fast):
    """Different supports per batch element (12, 6, 1 and 1 traces), padded to 12: the
    padding must weigh 0 although the loss is not 0 there.  Mutants: padded traces weighted
    1 (``weight[:, b] = 1.0``), or neither ``p`` nor the losses masked (either mask alone
    suffices: dropping just one is an equivalent mutant)."""
    x0 = torch.tensor([[0.3, -0.2, 0.5, 0.1],
                       [0.2, -INF, 0.7, -0.4],
                       [0.2, -INF, -INF, -INF],
                       [-INF, -INF, -INF, -INF]], dtype=torch.float64)
    live = (x0 > -INF).tolist()
    x = x0.clone().requires_grad_(True)
    value = estimators.exact_gradient(RaceDistribution(specs.top_k, x, k=2, fast_cpu=fast), _order_cost)
    value.backward()
    y = x0.clone().requires_grad_(True)
    want = _top2_by_hand(torch.where(torch.isfinite(y), y, 0.0), live)
    want.backward()
    assert value.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    assert x.grad[2:].abs().sum() == 0 and x.grad[0].abs().sum() > 0
