"""The conformance harness: one way to run a spec on any backend and compare it with the
reference (docs/design.md 4.5: every construct means the same on every backend).

``BACKENDS`` lists every backend of :func:`structdsl.backends.available` that imports here,
plus ``torch:cuda`` where a GPU is present; a test that takes the ``backend`` fixture runs on
each of them, so a new backend joins every conformance test with no new test code.  A
:class:`Runner` speaks NumPy to the test: it converts arrays to the backend's own (torch
tensors on the backend's device), draws every random number on the NumPy side (so a seed
means identical uniforms on every backend) and converts results back.
"""
import collections
import importlib.util
import inspect

import numpy as np

import structdsl
from structdsl.backends import available, register

register("toy", "toy_backend")          # tests/toy_backend.py: the reference through the contract


def _backends():
    out = []
    for name in available():
        if name in ("numba", "torch") and importlib.util.find_spec(name) is None:
            continue
        out.append(name)
        if name == "torch":
            import torch
            if torch.cuda.is_available():
                out.append("torch:cuda")
    return out


BACKENDS = _backends()
_COMPILED = {}
class Drawn(collections.namedtuple("Drawn", "trace structure log_noise")):
    """A sample in NumPy arrays (``log_noise`` is compared, not its ``exp``, which may
    overflow)."""

    @property
    def noise(self):
        with np.errstate(over="ignore", under="ignore"):
            return np.exp(self.log_noise)


def _key(statics):
    return tuple(sorted((k, v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in statics.items()))


class Runner:
    """A program of ``spec`` on ``backend`` (``"torch:cuda"`` = torch on the GPU), called
    with NumPy arrays and returning NumPy arrays.  ``seed=`` becomes uniforms drawn here, as
    the reference draws them, so every backend races identical noise."""

    def __init__(self, spec, backend="numpy", **statics):
        self.backend = backend
        name, _, device = backend.partition(":")
        self.device = device or "cpu"
        self.torch = name == "torch"
        self.prog = structdsl.compile(spec, backend=name, **statics)

    # ---- conversion --------------------------------------------------------------------
    def _in(self, x):
        """``x`` as the backend takes it: a NumPy array stays, a torch backend gets a tensor of
        the same dtype (what is not a numeric array is passed as it is, for the backend's own
        argument check to refuse)."""
        if x is None or not self.torch:
            return x
        import torch
        a = np.asarray(x)
        if a.dtype.kind not in "biuf":
            return x
        return torch.as_tensor(a, device=self.device)

    def _out(self, x):
        if isinstance(x, structdsl.program.Sample):
            return Drawn(self._out(x.trace), self._out(x.structure), self._out(x.log_noise))
        if isinstance(x, tuple):
            return type(x)(*(self._out(v) for v in x)) if hasattr(x, "_fields") else tuple(map(self._out, x))
        if hasattr(x, "detach"):
            return x.detach().cpu().numpy()
        return np.asarray(x) if isinstance(x, np.ndarray) else x

    def _uniforms(self, seed, shape):
        return self.prog._uniforms(None, seed, shape, "uniforms")

    # ---- the Program API -----------------------------------------------------------------
    def _takes_seed(self, method):
        return "seed" in inspect.signature(getattr(self.prog, method)).parameters

    def sample(self, logits, sample_shape=(), uniforms=None, seed=None):
        kw = {"sample_shape": sample_shape} if sample_shape else {}
        if self._takes_seed("sample"):
            kw["seed"] = seed
        elif uniforms is None and np.asarray(logits).dtype.kind in "biuf":
            # a backend without seed= (torch takes a generator) races the reference's draw
            uniforms = self._uniforms(seed, tuple(sample_shape) + np.shape(logits))
        return self._out(self.prog.sample(self._in(logits), uniforms=self._in(uniforms), **kw))

    def solve(self, weights):
        return self._out(self.prog.solve(self._in(weights)))

    def log_prob(self, trace, logits):
        return self._out(self.prog.log_prob(self._in(trace), self._in(logits)))

    def log_prob_and_grad(self, trace, logits):
        return self._out(self.prog.log_prob_and_grad(self._in(trace), self._in(logits)))

    def conditional_noise(self, trace, logits, uniforms=None, seed=None):
        if self._takes_seed("conditional_noise"):
            return self._out(self.prog.conditional_noise(trace, logits, uniforms=uniforms, seed=seed))
        trace = np.asarray(trace)
        if uniforms is None:
            inst = self.prog.instance(np.shape(logits)[np.ndim(logits) - self.prog.atom_ndim:])
            uniforms = self._uniforms(seed, trace.shape[:-1] + (inst.max_races + inst.num_atoms,))
        return self._out(self.prog.conditional_noise(self._in(trace), self._in(logits),
                                                     uniforms=self._in(uniforms)))

    def enumerate(self, logits=None, **kw):
        return self.prog.enumerate(logits, **kw)          # exact: every backend's is the reference's

    def __getattr__(self, name):                          # max_races, instance, ir, types ...
        return getattr(self.prog, name)


def runner(spec, backend="numpy", **statics):
    """A :class:`Runner`, compiled once per test session for each (spec, backend, statics)."""
    key = (spec.name, spec.fn.__module__, backend, _key(statics))
    if key not in _COMPILED:
        _COMPILED[key] = Runner(spec, backend, **statics)
    return _COMPILED[key]


def outcome(fn):
    """``(value, None)`` or ``(None, the error)``: a structdsl error, or the ValueError or
    TypeError of an argument check."""
    try:
        return fn(), None
    except (structdsl.RaceError, structdsl.SpecError, ValueError, TypeError) as exc:
        return None, exc


def assert_same_error(got, want):
    """The same class, spec line and batch element as the reference (and the same file);
    an argument error (no spec line) says the same thing."""
    assert type(got) is type(want), f"{type(got).__name__}: {got}  !=  {type(want).__name__}: {want}"
    if not isinstance(want, (structdsl.RaceError, structdsl.SpecError)):
        assert str(got) == str(want), f"{got}  !=  {want}"
        return
    assert (got.file, got.line) == (want.file, want.line), f"{got}  !=  {want}"
    assert getattr(got, "lane", None) == getattr(want, "lane", None), f"{got}  !=  {want}"


def assert_same_values(got, want, rtol=1e-12):
    """Equal traces and structures (exactly, dtype included), floats to ``rtol``."""
    if isinstance(want, tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same_values(g, w, rtol)
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype.kind == "f":
        assert np.array_equal(np.isinf(got), np.isinf(want)) and np.array_equal(np.isnan(got), np.isnan(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=1e-300 if rtol < 1e-6 else 1e-12)
    else:
        assert got.dtype == want.dtype and np.array_equal(got, want), (got, want)


def assert_conforms(backend, spec, call, statics=None):
    """Run ``call(runner)`` on ``backend`` and on the reference: the same values or the same
    error (class, line, batch element).  Returns the reference's outcome."""
    statics = statics or {}
    ref, ref_err = outcome(lambda: call(runner(spec, "numpy", **statics)))
    got, got_err = outcome(lambda: call(runner(spec, backend, **statics)))
    if isinstance(ref_err, structdsl.NestingError) and not runner(spec, backend, **statics).prog.checks_nesting:
        return None, ref_err      # a broken promise that this backend trusts (docs/design.md 3.11)
    if ref_err is not None or got_err is not None:
        assert ref_err is not None and got_err is not None, \
            f"{backend}: {got_err or 'no error'}; reference: {ref_err or 'no error'}"
        assert_same_error(got_err, ref_err)
        return None, ref_err
    assert_same_values(got, ref)
    return ref, None


def assert_refused_everywhere(spec, **statics):
    """``compile`` raises the same SpecError (file, line, message) on every backend;
    returns the reference's."""
    import pytest
    errors = []
    for name in dict.fromkeys(b.partition(":")[0] for b in BACKENDS):
        with pytest.raises(structdsl.SpecError) as info:
            structdsl.compile(spec, backend=name, **statics)
        errors.append(info.value)
    for err in errors[1:]:
        assert (err.file, err.line, err.reason) == (errors[0].file, errors[0].line, errors[0].reason), \
            f"{err}  !=  {errors[0]}"
    return errors[0]
