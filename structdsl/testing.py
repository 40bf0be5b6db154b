"""Property battery and hypothesis strategies for any spec, built-in or your own.

>>> from structdsl.testing import check_spec
>>> from structdsl.specs import spanning_tree
>>> report = check_spec(spanning_tree, (4, 4))          # raises AssertionError on failure
>>> report = check_spec(spanning_tree)                  # or let it pick the size

:func:`check_spec` runs, on small sizes:

1. the verifier (compilation);
2. exact enumeration with random integer rates (``fractions.Fraction`` arithmetic):
   probabilities sum to exactly 1, and ``log_prob`` of every trace equals its enumerated
   value;
3. goodness of fit: sampled trace frequencies against the enumeration (chi-square, bins
   with expected count < 5 pooled) on moderate logits, on skewed logits and, where the
   structure still exists, with some atoms at ``-inf``;
4. ``conditional_noise`` reproduces every sampled trace when solved, and its per-atom
   marginals are the unconditional ``Exp(rate)`` laws (Kolmogorov-Smirnov, Bonferroni);
5. ``solve`` against an independent reference solver on random weights
   (:func:`compare_solve`): the ``reference=`` argument, or the spec's own
   ``@spec(reference=fn)``.

Randomness is seeded; the thresholds are significance levels, not tuned constants.  The
battery runs on any backend (``backend="numpy"``, ``"numba"`` or ``"torch"``): results are
converted to NumPy at the program's boundary (:func:`numpy_view`), so every check is the same
NumPy computation whatever the backend returns.  A NaN anywhere a statistic is computed fails
the check (a p-value that is not a number is not evidence of a fit).
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from . import compile as _compile
from .errors import EmptyRaceError, EnumerationLimitError, RaceError, SpecError


@dataclass
class SpecReport:
    """What :func:`check_spec` measured."""
    name: str
    atom_shape: tuple
    params: dict
    traces: int = 0
    structures: int = 0
    total_probability: Fraction = Fraction(0)
    worst_gof_p: float = 1.0
    worst_marginal_p: float = 1.0
    neg_inf_checked: bool = False
    reference_checked: int = 0
    reference_excluded_checked: int = 0
    failures: list = field(default_factory=list)
    #: per sampling scenario: (label, exact trace probabilities, sampled frequencies)
    fits: list = field(default_factory=list)
    #: the size parameters at ``atom_shape`` (``{"n": 4}``)
    sizes: dict = field(default_factory=dict)
    #: where ``atom_shape`` came from: ``"given"`` (``shape=``), or the checker's choice and why
    shape_source: str = "given"
    #: what the battery could not vouch for without failing (a law with too few structures)
    warnings: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.failures


# ---- a program's results as NumPy arrays -------------------------------------------------
def _to_numpy(value):
    """``value`` as a NumPy array: a tensor (torch backend) is detached and copied to the
    host; anything else goes through ``np.asarray``."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class _NumpyView:
    """A compiled program whose results come back as NumPy arrays (see :func:`numpy_view`)."""

    def __init__(self, program):
        self.program = program

    def __getattr__(self, name):                   # instance, enumerate, Structure, ir, ...
        return getattr(self.program, name)

    def _seeded(self, method, seed):
        """Keyword arguments that seed ``method``: ``seed=`` (NumPy backends) or a seeded
        ``torch.Generator`` (the torch backend's ``generator=``)."""
        params = inspect.signature(method).parameters       # (a subclass may take **kwargs)
        if "seed" in params or ("generator" not in params and getattr(self.program, "backend", None) != "torch"):
            return {"seed": seed}
        import torch
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed(int(seed))
        return {"generator": gen}

    def _structure(self, structure):
        return self.program.Structure(*(_to_numpy(f) for f in structure))

    def sample(self, logits, *, sample_shape=(), seed=None):
        from .program import Sample
        s = self.program.sample(logits, sample_shape=sample_shape, **self._seeded(self.program.sample, seed))
        return Sample(_to_numpy(s.trace), self._structure(s.structure), _to_numpy(s.log_noise))

    def solve(self, weights):
        from .program import Solution
        s = self.program.solve(weights)
        return Solution(_to_numpy(s.trace), self._structure(s.structure))

    def log_prob(self, trace, logits):
        return _to_numpy(self.program.log_prob(trace, logits))

    def conditional_noise(self, trace, logits, *, seed=None):
        return _to_numpy(self.program.conditional_noise(trace, logits,
                                                        **self._seeded(self.program.conditional_noise, seed)))


def numpy_view(program):
    """``program`` (compiled for any backend) with ``sample``, ``solve``, ``log_prob`` and
    ``conditional_noise`` returning NumPy arrays (``trace``, structure fields, noise), and
    ``seed=`` accepted by every backend (the torch backend gets a seeded ``torch.Generator``).
    Everything else is the program's own.  The battery checks programs through this view."""
    return program if isinstance(program, _NumpyView) else _NumpyView(program)


# ---- statistics (no scipy needed) ------------------------------------------------------------
def chi2_sf(x, df):
    """Upper tail of the chi-square law (Wilson-Hilferty normal approximation)."""
    if df <= 0:
        return 1.0
    z = ((x / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi2_gof(counts, expected_probs, min_expected=5.0):
    """Chi-square goodness-of-fit p-value; categories with small expectation are pooled.

    Every category with expected count below ``min_expected`` goes into one pool; if the
    pool itself is still below ``min_expected``, the smallest remaining categories are
    folded into it until it is not (a pool expecting 0.01 that sees one count would
    otherwise contribute ~100 to the statistic: a false failure about 1% of the time).
    A pool of expectation exactly 0 is dropped.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    expected = np.asarray(expected_probs, dtype=np.float64) * total
    small = expected < min_expected
    if small.any():
        pool_count, pool_expected = counts[small].sum(), expected[small].sum()
        counts, expected = counts[~small], expected[~small]
        if pool_expected > 0:
            order = np.argsort(expected, kind="stable")
            k = 0
            while pool_expected < min_expected and k < len(order):
                pool_count += counts[order[k]]
                pool_expected += expected[order[k]]
                k += 1
            keep = np.ones(len(counts), dtype=bool)
            keep[order[:k]] = False
            counts = np.append(counts[keep], pool_count)
            expected = np.append(expected[keep], pool_expected)
    stat = float(np.sum((counts - expected) ** 2 / expected))
    return chi2_sf(stat, len(counts) - 1)


def ks_uniform_p(u):
    """Kolmogorov-Smirnov p-value of ``u`` against Uniform(0, 1) (asymptotic law); NaN when
    ``u`` is empty or holds a NaN (callers treat a NaN p-value as a failure)."""
    u = np.sort(np.asarray(u, dtype=np.float64))
    n = len(u)
    if n == 0 or np.isnan(u[-1]):           # NaN sorts last: no law fits it, and no p-value
        return math.nan
    i = np.arange(1, n + 1)
    d = max(np.max(i / n - u), np.max(u - (i - 1) / n))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(min(max(p, 0.0), 1.0))


# ---- the battery ------------------------------------------------------------------------
#: A law with fewer structures than this is degenerate: the battery passes it whatever the
#: sampler does (one structure: every check is trivially met).  ``check_spec`` warns, and
#: fails under ``strict=True``.
MIN_STRUCTURES = 3


def check_spec(spec, shape=None, *, backend="numpy", reference=None, samples=4000, seed=0,
               alpha=1e-3, solve_trials=50, excluded_trials=0, raise_on_failure=True, strict=False,
               **static_params):
    """Run the property battery on ``spec`` for atoms of shape ``shape``.

    shape: the atoms' shape.  By default it is taken from the data parameters when their
    dimensions fix the sizes (a ``dag`` array of shape ``[4, 4]`` given for ``atoms(n)``
    whose predicate reads ``dag[:, i]``: ``n = 4``), else it is the largest size ``n <= 6``
    (every free size parameter set to ``n``) whose exact enumeration has at most 200
    traces.  ``report.shape_source`` says which; when the battery fails at a size it
    picked, the exception carries a note naming that size and ``shape=``.

    strict: fail (not only warn) when the law checked has fewer than
    :data:`MIN_STRUCTURES` structures, where the battery cannot tell a right sampler from
    a wrong one; the warning is in ``report.warnings`` (and a ``UserWarning`` when
    ``raise_on_failure``).

    reference: ``f(weights[*shape]) -> structure`` (a dict of some of the spec's fields, a
    tuple in field order, or one array) from an independent solver, compared with ``solve``
    on ``solve_trials`` random weight arrays (``+inf`` at invalid atoms), plus
    ``excluded_trials`` with some valid atoms excluded (``+inf``); see
    :func:`compare_solve`.  ``None`` (default) uses the spec's ``@spec(reference=...)`` if
    it has one; ``False`` skips the comparison.
    samples: draws per goodness-of-fit scenario.  alpha: significance level of every test.
    Returns a :class:`SpecReport`; raises ``AssertionError`` listing the failures unless
    ``raise_on_failure=False``.
    """
    prog = numpy_view(_compile(spec, backend=backend, **static_params))
    if shape is not None:
        return _battery(spec, prog, tuple(int(s) for s in shape), "given", reference, samples, seed,
                        alpha, solve_trials, excluded_trials, raise_on_failure, strict)
    shape, source = pick_shape(prog)
    try:
        return _battery(spec, prog, shape, source, reference, samples, seed, alpha, solve_trials,
                        excluded_trials, raise_on_failure, strict)
    except AssertionError:
        raise                                  # the battery's own verdict names the shape
    except Exception as exc:
        sizes = _sizes_text(prog, shape)
        _add_note(exc, f"check_spec picked atoms of shape {shape}{f' ({sizes})' if sizes else ''}: "
                       f"{source}; pass another with check_spec({spec.name}, shape=...) "
                       f"(python -m structdsl check FILE --shape ...)")
        raise


def _add_note(exc, note):
    """Attach ``note`` to ``exc`` (PEP 678, shown under the message; Python 3.10 has no notes:
    the note is appended to the message)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    elif exc.args and isinstance(exc.args[0], str):           # pragma: no cover - Python 3.10
        exc.args = (f"{exc.args[0]}\n{note}",) + exc.args[1:]


def _sizes_text(prog, shape):
    """``"n = 4"``: the size parameters at atoms of ``shape`` (fixed ones included)."""
    sizes = _sizes_at(prog, shape)
    return ", ".join(f"{k} = {v}" for k, v in sizes.items())


def _sizes_at(prog, shape):
    p = prog.ir
    try:
        params = prog.instance(tuple(shape)).params
    except Exception:                          # the shape itself is refused: read the dims
        params = {d.id: s for d, s in zip(p.atoms.dims, shape) if getattr(d, "id", None) in p.sizes}
    return {k: int(params[k]) for k in p.sizes if k in params}


def _battery(spec, prog, shape, source, reference, samples, seed, alpha, solve_trials,
             excluded_trials, raise_on_failure, strict):
    inst = prog.instance(shape)
    report = SpecReport(spec.name, shape, dict(inst.params), sizes=_sizes_at(prog, shape),
                        shape_source=source)
    rng = np.random.default_rng(seed)
    fail = report.failures.append

    # 2. exact enumeration
    rates = np.where(inst.valid, rng.integers(1, 6, size=shape), 0).astype(object)
    enum = prog.enumerate(rates=rates)
    report.traces, report.structures = len(enum), len(enum.by_structure())
    if report.structures < MIN_STRUCTURES:
        sizes = f" ({_sizes_text(prog, shape)})" if report.sizes else ""
        what = "one structure" if report.structures == 1 else f"{report.structures} structures"
        advice = ("check a larger size (shape=, or --shape on the command line)" if not prog.data else
                  "check a larger size or data that leave more freedom (shape= and the data "
                  "parameters, or --shape and --data on the command line)")
        report.warnings.append(
            f"degenerate size: the law checked at atoms {shape}{sizes} has only {what}, too few "
            f"for the battery to tell a right sampler from a wrong one; {advice}")
        if strict:
            fail(report.warnings[-1] + " [strict]")
    report.total_probability = sum(enum.probs, Fraction(0))
    if report.total_probability != 1:
        fail(f"enumerated probabilities sum to {report.total_probability}, not exactly 1")
    logits = np.log(np.where(inst.valid, rates, 1).astype(np.float64))
    lp = prog.log_prob(enum.traces, logits)
    err = np.max(np.abs(lp - enum.log_probs))
    if not err < 1e-9:
        fail(f"log_prob differs from the enumerated log-probability by {err:.3g}")

    # 3-4. sampling scenarios
    scenarios = [("moderate", rng.normal(0, 1, shape)), ("skewed", rng.normal(0, 3, shape))]
    masked = _neg_inf_scenario(prog, inst, rng)
    if masked is not None:
        scenarios.append(("-inf atoms", masked))
        report.neg_inf_checked = True
    for label, lg in scenarios:
        _check_sampling(prog, inst, label, lg, samples, rng, alpha, report)

    # 5. reference solver
    if reference is None:
        reference = getattr(spec, "reference", None)
    if reference is not None and reference is not False:
        cmp = compare_solve(prog, reference, shape, rng=rng, trials=solve_trials,
                            excluded_trials=excluded_trials)
        report.reference_checked, report.reference_excluded_checked = cmp.checked, cmp.excluded_checked
        if cmp.failure:
            fail(cmp.failure)

    if raise_on_failure and report.failures:
        raise AssertionError(f"check_spec({spec.name}, {shape}) failed:\n  - " + "\n  - ".join(report.failures))
    if raise_on_failure:
        for w in report.warnings:
            warnings.warn(f"check_spec({spec.name}): {w}", UserWarning, stacklevel=3)
    return report


def atom_shape_at(prog, n):
    """The atoms' shape of compiled ``prog`` with every size parameter set to ``n`` (static
    parameters as compiled)."""
    from .program import static_eval
    p = prog.ir
    env = p.static_values({**prog.static_params, **{s: int(n) for s in p.sizes}},
                          lambda e, env: static_eval(e, env, p.file))
    return tuple(static_eval(d, env, p.file) for d in p.atoms.dims)


def _shape_at(prog, values):
    """The atoms' shape of compiled ``prog`` with the size parameters ``values`` (a dict;
    sizes fixed at compile time keep their values)."""
    from .program import static_eval
    p = prog.ir
    env = p.static_values({**{s: int(v) for s, v in values.items()}, **prog.static_params},
                          lambda e, env: static_eval(e, env, p.file))
    return tuple(static_eval(d, env, p.file) for d in p.atoms.dims)


def _free_sizes(prog):
    """The size parameters read off the logits' shape (not fixed at compile time)."""
    return [s for s in prog.ir.sizes if s not in prog.static_params]


def pick_shape(prog, max_traces=200):
    """The atoms' shape :func:`check_spec` checks when given none, and why:
    ``(shape, reason)``.

    When the program has data parameters (arrays) whose dimensions fix the free sizes (the
    program accepts sizes equal to dimensions of the data, and its type pass refuses each
    size one more or one less: the shapes meet), those sizes (the largest such assignment).
    Else the largest ``n <= 6`` (every free size set to ``n``) whose exact enumeration has
    at most ``max_traces`` traces (with data parameters, a size at which a data array is
    indexed out of range is skipped).  Raises ``ValueError`` when no size qualifies."""
    from .errors import SpecIndexError
    shape = _shape_from_data(prog)
    if shape is not None:
        return shape
    p = prog.ir
    free = _free_sizes(prog)
    if not free:
        shape = _shape_at(prog, {})
        return shape, f"the sizes given to compile ({_sizes_text(prog, shape)})"
    skip = (ValueError, EmptyRaceError, SpecError) + ((SpecIndexError,) if prog.data else ())
    best, why, out_of_range = None, None, []
    for n in range(1, 7):
        shape = (n,) * len(p.atoms.dims)       # (for a note, should the shape itself fail)
        try:
            shape = _shape_at(prog, {s: n for s in free})
            prog.enumerate(rates=np.ones(shape, dtype=int).astype(object), max_traces=max_traces)
        except skip as exc:
            why = exc                # a require(), the structure or a data shape rules it out
            if isinstance(exc, SpecIndexError):
                out_of_range.append(n)
            continue
        except EnumerationLimitError:
            break
        except Exception as exc:
            _add_note(exc, f"check_spec was trying atoms of shape {shape} (every size {n}) to pick "
                           f"a size to check; pass one with check_spec({p.name}, shape=...) "
                           f"(python -m structdsl check FILE --shape ...)")
            raise
        best, best_n = shape, n
    if best is None:
        raise ValueError(f"check_spec: no size n <= 6 of {p.name} enumerates in at most "
                         f"{max_traces} traces; pass shape= explicitly (last problem: {why})")
    n = best_n
    values = ", ".join(f"{s} = {n}" for s in free)
    reason = f"{values}: the largest n <= 6 whose enumeration has at most {max_traces} traces"
    later = [m for m in out_of_range if m > n]
    if later:
        reason += f" (at n = {', '.join(map(str, later))} the spec indexes its data out of range)"
    return best, reason


def _default_shape(prog, max_traces=200):
    """The atoms' shape :func:`pick_shape` picks (without the reason)."""
    return pick_shape(prog, max_traces)[0]


def _shape_from_data(prog, max_assignments=256):
    """``(shape, reason)`` with the free sizes taken from the data parameters' dimensions,
    or None (no data, no free size, or no assignment the program accepts)."""
    import itertools
    free = _free_sizes(prog)
    if not prog.data or not free:
        return None
    dims = sorted({int(d) for a in prog.data.values() for d in a.shape if d > 0})
    if not dims or len(dims) ** len(free) > max_assignments:
        return None

    def accepted(values):
        try:
            shape = _shape_at(prog, values)
            prog.instance(shape)          # the type pass at these sizes, the require()s
        except (ValueError, SpecError, NameError):
            return None
        return shape

    found = []
    for combo in itertools.product(dims, repeat=len(free)):
        values = dict(zip(free, combo))
        shape = accepted(values)
        # fixed: the program refuses each size one more and one less than this one
        if shape is not None and all(accepted({**values, s: values[s] + d}) is None
                                     for s in free for d in (-1, 1) if values[s] + d >= 1):
            found.append((combo, shape))
    if not found:
        return None
    combo, shape = max(found)
    data = ", ".join(f"{k} of shape {tuple(a.shape)}" for k, a in prog.data.items())
    values = ", ".join(f"{s} = {v}" for s, v in zip(free, combo))
    return shape, f"{values}, fixed by the data ({data})"


def _neg_inf_scenario(prog, inst, rng, tries=40):
    """Logits with some atoms at -inf for which the structure still exists (or None)."""
    for _ in range(tries):
        lg = rng.normal(0, 1, inst.atom_shape)
        drop = inst.valid & (rng.random(inst.atom_shape) < 0.3)
        if not drop.any():
            continue
        lg[drop] = -np.inf
        try:
            e = prog.enumerate(lg)
        except EmptyRaceError:
            continue
        if len(e) >= 2:
            return lg
    return None


def _check_sampling(prog, inst, label, logits, samples, rng, alpha, report):
    fail = report.failures.append
    enum = prog.enumerate(logits)
    index = {t.tobytes(): i for i, t in enumerate(enum.traces)}
    s = prog.sample(logits, sample_shape=(samples,), seed=int(rng.integers(2**31)))
    ids = np.array([index.get(t.tobytes(), -1) for t in s.trace])
    if (ids < 0).any():
        fail(f"[{label}] sampled a trace that enumeration never produces: {s.trace[ids < 0][0]}")
        return
    counts = np.bincount(ids, minlength=len(enum))
    report.fits.append((label, np.asarray(enum.probs, dtype=np.float64), counts / samples))
    p = chi2_gof(counts, enum.probs)
    report.worst_gof_p = _worst(report.worst_gof_p, p)
    if not p >= alpha:                             # a NaN p-value fails too
        fail(f"[{label}] sampled traces do not fit the enumerated law (chi-square p = {p:.2e})")
    # log_prob is a function of the trace: each distinct sampled trace is scored once
    seen, first = np.unique(ids, return_index=True)
    lp = prog.log_prob(s.trace[first], logits)
    if not np.allclose(lp, enum.log_probs[seen], rtol=1e-9, atol=1e-9):
        fail(f"[{label}] log_prob of sampled traces differs from enumeration")
    noise = np.asarray(prog.conditional_noise(s.trace, logits, seed=int(rng.integers(2**31))), dtype=np.float64)
    try:
        again = prog.solve(noise).trace
    except (ValueError, RaceError) as exc:          # e.g. NaN noise: a failure, not a crash
        fail(f"[{label}] solve raised on the conditional noise: {type(exc).__name__}: {exc}")
    else:
        if not np.array_equal(again, s.trace):
            bad = int(np.argmax((again != s.trace).any(axis=-1)))
            fail(f"[{label}] conditional noise does not reproduce trace {s.trace[bad]} (got {again[bad]})")
    # the marginals: only atoms that can race have an Exp(rate) law; an absent atom (logit
    # -inf, or invalid) has rate 0 and noise +inf, whose product is NaN, not a uniform
    live = (inst.valid & np.isfinite(logits)).reshape(-1)
    if not live.any():
        return
    with np.errstate(invalid="ignore", over="ignore"):
        u = np.exp(-np.exp(logits.reshape(-1)[live]) * noise.reshape(samples, -1)[:, live])
    nan = np.isnan(u).any(axis=0)
    if nan.any():
        atoms = [tuple(int(i) for i in np.unravel_index(a, inst.atom_shape))
                 for a in np.flatnonzero(live)[nan]]
        report.worst_marginal_p = math.nan
        fail(f"[{label}] E | T is NaN at live atom(s) {atoms[:5]}{' ...' if len(atoms) > 5 else ''} "
             f"(in {int(np.isnan(u).any(axis=1).sum())} of {samples} samples): its marginals cannot be "
             f"Exp(rate)")
        return
    ps = [ks_uniform_p(col) for col in u.T]
    worst = _worst(1.0, min(ps, key=lambda q: -math.inf if math.isnan(q) else q) * len(ps))   # Bonferroni
    report.worst_marginal_p = _worst(report.worst_marginal_p, worst)
    if not worst >= alpha:
        fail(f"[{label}] marginals of E | T are not Exp(rate) (KS, Bonferroni p = {worst:.2e})")


def _worst(a, b):
    """The smaller of two p-values; NaN if either is NaN (``min`` would drop it)."""
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


# ---- solve against a reference solver ------------------------------------------------------
@dataclass
class SolveComparison:
    """What :func:`compare_solve` found: how many weight arrays agreed (``checked``: all
    valid atoms finite; ``excluded_checked``: some valid atoms at ``+inf``), and the first
    disagreement (or a malformed reference output) as a readable message, else None."""
    checked: int = 0
    excluded_checked: int = 0
    failure: str | None = None


def reference_fields(value, names):
    """A reference solver's output as ``{field: array}``: ``value`` is a dict of some of the
    fields ``names``, a tuple of all of them in order, or one array (the first field).
    Raises ``ValueError`` naming the fields when the output is not of that form."""
    if isinstance(value, dict):
        out = value
    elif isinstance(value, tuple) and len(value) == len(names):
        out = dict(zip(names, value))
    elif isinstance(value, (np.ndarray, list, int, np.integer, bool, np.bool_)):
        out = {names[0]: value}
    else:
        raise ValueError(f"the reference returned {type(value).__name__} {value!r}; it must return "
                         f"a dict of some of the fields {list(names)}")
    unknown = [k for k in out if k not in names]
    if unknown:
        raise ValueError(f"the reference returned field(s) {unknown}, which the spec does not have; "
                         f"its fields are {list(names)}")
    if not out:
        raise ValueError(f"the reference returned no field; the spec's fields are {list(names)}")
    return {k: np.asarray(v) for k, v in out.items()}


def _tie_free_weights(rng, valid):
    """Exponential(1) weights of ``valid``'s shape, pairwise distinct on the valid atoms
    (redrawn on a tie), ``+inf`` at invalid atoms."""
    while True:
        w = rng.exponential(size=valid.shape)
        if len(np.unique(w[valid])) == int(valid.sum()):
            return np.where(valid, w, np.inf)


def _show(a):
    return np.array2string(np.asarray(a), max_line_width=100, threshold=400)


def compare_solve(prog, reference, shape, *, rng=None, trials=50, excluded_trials=0):
    """Compare ``prog.solve(w)`` with ``reference(w)`` on random weights.

    prog: a compiled program (any backend); reference: ``f(weights) -> fields`` (see
    :func:`reference_fields`) called with one lane's weights, a float64 array of shape
    ``shape`` (the atoms') holding tie-free Exponential(1) draws at valid atoms and ``+inf``
    at invalid ones.  ``trials`` arrays have every valid atom finite; ``excluded_trials``
    more have about a quarter of the valid atoms at ``+inf`` (excluded: ``solve`` treats them
    as absent, as logits of ``-inf``), and those on which ``solve`` finds no structure
    (``RaceError``, e.g. an empty race) are skipped.  Only the fields the reference returns
    are compared (``np.array_equal``, so bool and 0/1 int agree).  Stops at the first
    disagreement; the message gives the weights and both outputs.  Returns a
    :class:`SolveComparison`.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    prog = numpy_view(prog)
    inst = prog.instance(tuple(shape))
    names = prog.Structure._fields
    label = getattr(reference, "__name__", "the reference solver")
    result = SolveComparison()
    for trial in range(trials + excluded_trials):
        excluded = trial >= trials
        w = _tie_free_weights(rng, inst.valid)
        if excluded:
            w[inst.valid & (rng.random(inst.atom_shape) < 0.25)] = np.inf
            try:
                got = prog.solve(w).structure
            except RaceError:
                continue                   # no structure on these atoms: nothing to compare
        else:
            got = prog.solve(w).structure
        context = " (some valid atoms excluded at +inf, which solve treats as absent)" if excluded else ""
        try:
            value = reference(w.copy())
        except Exception as exc:         # the user's code: report, do not crash the check
            result.failure = (f"the reference {label} raised on weights{context}\n{_show(w)}\n"
                              f"{type(exc).__name__}: {exc}")
            return result
        try:
            want = reference_fields(value, names)
        except ValueError as exc:
            result.failure = f"the reference {label} returned something unusable on weights{context}\n{_show(w)}\n{exc}"
            return result
        for name, value in want.items():
            mine = np.asarray(getattr(got, name))
            if not np.array_equal(mine, value):
                result.failure = (f"solve disagrees with the reference solver on field {name!r} for weights"
                                  f"{context}\n{_show(w)}\nsolve gives {name} =\n{_show(mine)}\n"
                                  f"{label} gives {name} =\n{_show(value)}")
                return result
        if excluded:
            result.excluded_checked += 1
        else:
            result.checked += 1
    return result


# ---- hypothesis strategies --------------------------------------------------------------
def logits(shape, *, scale=3.0, neg_inf=False):
    """Hypothesis strategy: float64 logits of ``shape`` in ``[-scale, scale]``, optionally
    with some entries at ``-inf``."""
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
    finite = st.floats(-scale, scale, allow_nan=False, allow_infinity=False)
    elements = st.one_of(finite, st.just(-np.inf)) if neg_inf else finite
    return hnp.arrays(np.float64, tuple(shape), elements=elements)


def rates(shape, *, max_rate=6, zeros=False):
    """Hypothesis strategy: exact integer rates of ``shape`` (object array, for
    ``Program.enumerate(rates=...)``); ``zeros=True`` allows excluded atoms."""
    from hypothesis import strategies as st
    lo = 0 if zeros else 1
    n = int(np.prod(shape))
    return st.lists(st.integers(lo, max_rate), min_size=n, max_size=n).map(
        lambda xs: np.array(xs, dtype=object).reshape(shape))


def uniforms(shape):
    """Hypothesis strategy: uniforms strictly inside (0, 1) of ``shape``."""
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
    return hnp.arrays(np.float64, tuple(shape),
                      elements=st.floats(1e-9, 1 - 1e-9, allow_nan=False))
