"""Backend-independent part of a compiled spec: argument checking, shapes, results.

A :class:`Program` is what ``structdsl.compile`` returns.  It validates every input
(dimensions, NaN/+inf logits, trace shapes, uniforms' range), infers the sizes from the
logits' shape, specialises the IR to those sizes (:class:`Instance`, cached), flattens the
batch, and hands flat arrays to its backend.

**The backend contract** (docs/design.md §4.2): a backend implements three methods on a
flattened batch, without argument checks (``B`` lanes, ``A = prod(atom_shape)`` atoms,
``R = max_races``):

* ``solve_flat(inst, weights[B, A], log_space)`` -> traces ``[B, R]`` and structure fields
  ``[B, ...]`` (``log_space``: the weights are ``log E`` and residuals are kept as logs);
* ``draw_flat(inst, uniforms[B, A], logits[B, A], check_logits=None)`` -> :class:`Draw`
  (the default races ``log E = log(-log U) - logits`` with ``solve_flat``; its sibling
  ``draw_seeded_flat(inst, seed, logits)`` draws the uniforms of :mod:`structdsl.philox`
  first (``seeded_uniforms``, which a backend may compute faster), or, in a backend that
  overrides it, inside its lanes);
* ``replay_flat(inst, traces[B, R], logits[B, A])`` -> :class:`Replay`: which traces are
  possible and each race's member set, in the compact form the backend produces best
  (:class:`structdsl.races.Members` or :class:`structdsl.races.ExitRaces`);

and says what it can do in class attributes (``backend``, ``checks_nesting``).  Everything
else is derived once: log p, its gradient and ``E | T`` by :mod:`structdsl.races` from the
replay (:meth:`Program.score_flat`), enumeration by the reference backend.  A backend may
fuse a derived quantity into its kernels for speed (the numba backend overrides
``score_flat`` and ``draw_and_score_flat``); the conformance suite then holds the fused
kernels to :mod:`structdsl.races` applied to the backend's own replay.
"""
from __future__ import annotations

import ast
import collections
import functools
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from . import ir, philox, races
from .errors import RaceError
from .ir import static_eval  # noqa: F401  (re-exported: structdsl.testing uses it)

class Sample:
    """Result of ``Program.sample``; unpacks as ``trace, structure, noise``.

    trace: int64 ``[*batch, max_races]`` winners (flat atom indices, execution order), -1 padded.
    structure: the spec's structure record, each field ``[*batch, *field_shape]``.
    noise: float64 ``[*batch, *atom_shape]`` exponential noise (``+inf`` at invalid atoms),
    ``exp`` of the ``log E`` the races ran on, computed on first access (it may overflow to
    ``inf`` or underflow to 0 for atoms ~700 nats from 0; ``log_noise`` is always exact).
    """
    __slots__ = ("trace", "structure", "log_noise", "_noise")
    _fields = ("trace", "structure", "noise")

    def __init__(self, trace, structure, log_noise):
        self.trace, self.structure, self.log_noise, self._noise = trace, structure, log_noise, None

    @property
    def noise(self):
        if self._noise is None:
            if isinstance(self.log_noise, np.ndarray):
                with np.errstate(over="ignore", under="ignore"):
                    self._noise = np.exp(self.log_noise)
            else:                                  # a tensor (torch backend)
                self._noise = self.log_noise.exp()
        return self._noise

    def __iter__(self):
        return iter((self.trace, self.structure, self.noise))

    def __repr__(self):
        return f"Sample(trace={self.trace!r}, structure={self.structure!r}, noise=...)"


Solution = collections.namedtuple("Solution", "trace structure")
Solution.__doc__ = "Result of ``Program.solve``: trace ``[*batch, max_races]`` and structure."

Draw = collections.namedtuple("Draw", "trace fields log_noise")
Draw.__doc__ = ("A backend's flat draw: trace int64 ``[B, R]``, the structure's fields ``[B, ...]``, "
                "``log E`` float64 ``[B, A]`` (``+inf`` at atoms that cannot race).")

Replay = collections.namedtuple("Replay", "possible races")
Replay.__doc__ = ("A backend's flat replay: ``possible`` bool ``[B]`` (False: the trace has probability "
                  "zero) and the races' member sets (:class:`structdsl.races.Members` or "
                  ":class:`structdsl.races.ExitRaces`).")

Scores = collections.namedtuple("Scores", "logp grad noise replay")
Scores.__doc__ = ("Derived from a replay (:meth:`Program.score_flat`): log p ``[B]`` (``-inf`` where "
                  "impossible), its gradient ``[B, A]`` (0 there) or None, ``E | T`` ``[B, A]`` or None, "
                  "and the :class:`Replay` itself (or None when a fused kernel did not keep it).")


@dataclass(frozen=True)
class Instance:
    """A program specialised to concrete parameter values (sizes and static parameters)."""
    params: dict
    atom_shape: tuple
    valid: np.ndarray           # bool [*atom_shape]
    max_races: int
    types: object = None        # the type pass at these sizes (structdsl.typecheck.Typing)

    @property
    def num_atoms(self):
        return self.valid.size


class Enumeration:
    """Every trace of a small instance with its exact probability (``Program.enumerate``).

    traces: int64 ``[N, max_races]``; structure: fields ``[N, ...]``; probs: ``[N]``
    (``Fraction`` objects when exact rates were given, else float64); log_probs: float64 ``[N]``.
    """

    def __init__(self, traces, structure, probs, log_probs):
        self.traces, self.structure, self.probs, self.log_probs = traces, structure, probs, log_probs

    def __len__(self):
        return len(self.traces)

    def structure_key(self, i):
        """A hashable key of trace ``i``'s structure (its fields' bytes)."""
        return tuple(np.ascontiguousarray(f[i]).tobytes() for f in self.structure)

    def by_structure(self):
        """``{structure key: total probability}`` summed over the traces giving each structure."""
        out = {}
        for i in range(len(self)):
            k = self.structure_key(i)
            out[k] = out.get(k, 0) + self.probs[i]
        return out

    def structure_law(self):
        """``[(structure, probability)]``: each distinct structure (a record of the spec's
        fields, unbatched) with the total probability of its traces, most probable first."""
        first, total = {}, {}
        for i in range(len(self)):
            k = self.structure_key(i)
            first.setdefault(k, i)
            total[k] = total.get(k, 0) + self.probs[i]
        law = [(type(self.structure)(*(f[first[k]] for f in self.structure)), p) for k, p in total.items()]
        return sorted(law, key=lambda kv: -float(kv[1]))

    def __repr__(self):
        return f"<Enumeration: {len(self)} traces, {len(self.by_structure())} structures>"


class Program:
    """A spec compiled for one backend.  Create with :func:`structdsl.compile`.

    Logits are log-rates of shape ``[*batch, *atom_shape]`` (a larger logit wins more
    often; ``-inf`` excludes an atom; entries at invalid atoms are ignored, whatever they
    hold, NaN included).  Sizes are read from the trailing dimensions.
    """

    backend = None
    #: whether sampling and replay check a ``nested=True`` promise on every race (a backend
    #: whose nested fast paths trust it says False; ``check_spec`` verifies it on any backend)
    checks_nesting = True

    def __init__(self, spec, **static_params):
        self.spec = spec
        self.ir = spec.ir
        p = self.ir
        unknown = set(static_params) - set(p.params)
        if unknown:
            raise TypeError(f"spec {p.name!r} has no parameter(s) {sorted(unknown)}; its "
                            f"parameters are {list(p.params)} (sizes {list(p.sizes)} are read "
                            f"from the logits' shape unless fixed here)")
        missing = [s for s in p.statics if s not in static_params and s not in p.defaults]
        if missing:
            raise TypeError(f"spec {p.name!r} needs static parameter(s) {missing}: "
                            f"structdsl.compile({p.name}, {', '.join(m + '=...' for m in missing)})")
        ints, self.data = {}, {}
        for k, v in static_params.items():
            if isinstance(v, (np.ndarray, list, tuple)):
                self.data[k] = _data_array(k, v, p)
            elif isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"static parameter {k!r} must be an int, got {v!r} (or an int/bool "
                                f"NumPy array, as a data parameter)")
            elif not -2 ** 63 <= int(v) < 2 ** 63:
                raise ValueError(f"static parameter {k!r} of {p.name} is {int(v)}, which int64 (the "
                                 f"DSL's only integer type) cannot hold")
            else:
                ints[k] = int(v)
        self.static_params = {**{k: v for k, v in p.defaults.items() if k in p.statics}, **ints}
        self.Structure = collections.namedtuple(_camel(p.name) + "Structure", p.outputs)
        self._instances = {}
        self.types = self._typecheck(self.static_params)

    def _param_types(self):
        from .typecheck import INT, array_type
        types = {name: INT for name in self.ir.params}
        for name, value in {**self._constant_arrays, **self.data}.items():
            types[name] = array_type(value, name)
        return types

    @functools.cached_property
    def _constant_arrays(self):
        """Tuple constants the spec reads as arrays (read-only int/bool arrays), built once."""
        return {k: _data_array(k, v, self.ir) for k, v in self.ir.constants.items() if type(v) is tuple}

    def _typecheck(self, params):
        """The type-and-shape pass with the parameter values known so far (see
        :mod:`structdsl.typecheck`); ``self.types`` is the run without the sizes."""
        from . import typecheck
        p = self.ir
        env = p.static_values(params, lambda e, env: static_eval(e, env, p.file))
        return typecheck.check(p, self._param_types(), env)

    def __repr__(self):
        statics = ", ".join(f"{k}={v}" for k, v in self.static_params.items())
        return f"<{self.backend} program {self.ir.name}({statics})>"

    # ---- pickling (structdsl/cache.py) -----------------------------------------------------
    def __reduce__(self):
        """Pickle by reference: the spec (itself by reference), the backend's name and the
        parameter values; unpickling compiles again through the compile cache, so
        ``copy.deepcopy`` and a round trip in one process give back this very program."""
        from .cache import program_by_reference
        return program_by_reference, (self.spec, self.backend, {**self.static_params, **self.data})

    def __copy__(self):
        """A private shallow copy (compiled programs are shared through the cache)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    # ---- shapes --------------------------------------------------------------------------
    @property
    def atom_ndim(self):
        return len(self.ir.atoms.dims)

    def expected_shape(self):
        return "[..., " + ", ".join(ast.unparse(d) for d in self.ir.atoms.dims) + "]"

    def instance(self, atom_shape):
        """The :class:`Instance` for logits whose trailing dims are ``atom_shape``."""
        inst = self._instances.get(atom_shape) if isinstance(atom_shape, tuple) else None
        if inst is not None:                  # a shape seen before (NumPy ints hash as ints)
            return inst
        atom_shape = tuple(int(s) for s in atom_shape)
        inst = self._instances.get(atom_shape)
        if inst is None:
            inst = self._instances[atom_shape] = self._specialise(atom_shape)
        return inst

    def _specialise(self, atom_shape):
        p = self.ir
        params = dict(self.static_params)
        for dim, size in zip(p.atoms.dims, atom_shape):
            if isinstance(dim, ast.Name) and dim.id in p.sizes and dim.id not in params:
                params[dim.id] = size
        env = p.static_values(params, lambda e, env: static_eval(e, env, p.file))
        for cond, message, line in p.requires:
            if not static_eval(cond, env, p.file):
                values = ", ".join(f"{k}={v}" for k, v in params.items())
                raise ValueError(f"{p.name}: {message} (got {values}; require at {p.where(line)})")
        dims = tuple(static_eval(d, env, p.file) for d in p.atoms.dims)
        if dims != atom_shape:
            raise ValueError(f"{p.name} expects logits of shape {self.expected_shape()} with "
                             f"{', '.join(f'{k}={v}' for k, v in params.items())}, i.e. trailing "
                             f"dims {dims}; got trailing dims {atom_shape}")
        if any(d <= 0 for d in dims):
            raise ValueError(f"{p.name}: every atoms dimension must be positive, got {dims}")
        types = self._typecheck(params)    # every shape that meets agrees at these sizes
        valid = self._valid_mask({**params, **self._constant_arrays, **self.data}, dims)
        bound = min(_race_bound(p, p.body, env, {}), int(valid.sum()))
        return Instance({**params, **self.data}, dims, valid, bound, types)

    def max_races(self, atom_shape):
        """Trace length for logits with trailing dims ``atom_shape``."""
        return self.instance(atom_shape).max_races

    def _split(self, array, what="logits"):
        a = np.asarray(array)
        k = self.atom_ndim
        if a.ndim < k:
            raise ValueError(f"{self.ir.name}: {what} must have shape {self.expected_shape()} "
                             f"(at least {k} dims), got shape {a.shape}")
        return a.shape[:a.ndim - k], self.instance(a.shape[a.ndim - k:])

    def check_logits(self, logits, what="logits"):
        """The public API's check of ``logits`` ``[*batch, *atom_shape]``: a float64 array
        (invalid atoms' entries replaced by ``-inf``), the batch shape and the
        :class:`Instance`; NaN or ``+inf`` at a valid atom raises ValueError naming its index."""
        try:
            a = np.asarray(logits, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{what} must be a real array: {exc}") from None
        batch, inst = self._split(a, what)
        if a.size and not a.max() < np.inf:     # one reduction: max is NaN or +inf if any is
            # entries at invalid atoms are not part of the model: ignored, whatever they hold
            bad = ~(a < np.inf) & inst.valid
            if bad.any():
                nan = np.isnan(a) & inst.valid
                if nan.any():
                    idx = tuple(int(i) for i in np.argwhere(nan)[0])
                    raise ValueError(f"{what} contain NaN ({int(nan.sum())} "
                                     f"entries, first at index {idx})")
                idx = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(f"{what} contain +inf (first at index {idx}): a rate of +inf "
                                 f"has no race law; use large finite logits")
            a = np.where(inst.valid, a, -np.inf)
        return a, batch, inst

    # ---- public API ----------------------------------------------------------------------
    def sample(self, logits, *, sample_shape=(), uniforms=None, seed=None):
        """Draw structures by racing exponential noise.

        logits: ``[*batch, *atom_shape]`` log-rates.  sample_shape: extra leading dims.
        uniforms: optional ``[*lead, *atom_shape]`` in (0, 1), ``lead`` broadcasting with
        ``sample_shape + batch`` (so uniforms may carry the sample dims); the noise is
        ``E = -log(U) * exp(-logits)``, so identical uniforms give identical traces on every
        backend.  seed: when uniforms are not given, an int in ``[0, 2**64)`` (``None``: from
        the OS's entropy) keying the Philox stream of :mod:`structdsl.philox`, which every
        backend draws alike (the numba lanes draw their own, in parallel).
        The races run on ``log E``, so logits of any spread are exact; the returned ``noise``
        is ``exp`` of it and may overflow to ``inf`` (or underflow to 0) for atoms more than
        ~700 nats away from 0.
        Returns :data:`Sample` (trace, structure, noise).
        """
        logits, batch, inst = self.check_logits(logits)
        shape = tuple(sample_shape) + batch + inst.atom_shape
        if uniforms is not None and not sample_shape:
            # explicit uniforms may carry their own leading (sample) dims
            lead = np.shape(uniforms)[:max(np.ndim(uniforms) - self.atom_ndim, 0)]
            try:
                shape = np.broadcast_shapes(lead, batch) + inst.atom_shape
            except ValueError:
                raise ValueError(f"uniforms of shape {np.shape(uniforms)} do not broadcast with "
                                 f"logits of shape {logits.shape}") from None
        logits = np.broadcast_to(logits, shape)
        lead = shape[:len(shape) - self.atom_ndim]
        A = inst.num_atoms
        with naming_lanes(lead):
            if uniforms is None:                          # seed=: the Philox stream
                traces, fields, log_noise = self.draw_seeded_flat(inst, philox.check_seed(seed), logits.reshape(-1, A))
            else:
                u = self._uniforms(uniforms, seed, shape, "uniforms")       # refuses both
                traces, fields, log_noise = self.draw_flat(inst, u.reshape(-1, A), logits.reshape(-1, A))
        return Sample(traces.reshape(lead + (inst.max_races,)), self._structure(fields, lead),
                      log_noise.reshape(shape))

    def solve(self, weights):
        """Run the deterministic algorithm on raw noise values.

        weights: ``[*batch, *atom_shape]`` real; ``+inf`` excludes an atom; invalid atoms are
        ignored.  Returns :data:`Solution` (trace, structure).
        """
        w = np.asarray(weights, dtype=np.float64)
        batch, inst = self._split(w, "weights")
        if np.isnan(w).any() or np.isneginf(w).any():
            raise ValueError("weights contain NaN or -inf")
        w = np.where(inst.valid, w, np.inf).reshape(-1, inst.num_atoms)
        with naming_lanes(batch):
            traces, fields = self.solve_flat(inst, w, log_space=False)
        return Solution(traces.reshape(batch + (inst.max_races,)), self._structure(fields, batch))

    def log_prob(self, trace, logits):
        """log p(trace) = sum over races of ``logits[winner] - logsumexp(logits[members])``.

        trace: int ``[*batch1, max_races]``; logits: ``[*batch2, *atom_shape]``; the batch
        shapes broadcast.  Returns float64 ``[*batch]``, ``-inf`` where the logits cannot
        produce the trace.
        """
        t, logits, batch, inst = self.check_trace(trace, logits)
        with naming_lanes(batch):
            logp = self.score_flat(inst, t, logits).logp
        return logp.reshape(batch)

    def log_prob_and_grad(self, trace, logits):
        """log p(trace) and its analytic gradient with respect to the logits.

        ``d log p / d logits_i = [i won a race] - sum over races r with i in S_r of
        softmax(logits[S_r])_i``: no autograd graph is needed.  Shapes as :meth:`log_prob`;
        returns ``(logp [*batch], grad [*batch, *atom_shape])``; the gradient is 0 at atoms
        that never raced and where ``logp`` is ``-inf``.
        """
        t, logits, batch, inst = self.check_trace(trace, logits)
        with naming_lanes(batch):
            logp, grad, _, _ = self.score_flat(inst, t, logits, want_grad=True)
        return logp.reshape(batch), grad.reshape(batch + inst.atom_shape)

    def conditional_noise(self, trace, logits, *, uniforms=None, seed=None):
        """Sample the noise given the trace, ``E | T`` (exact, reparameterised).

        Race ``r`` gets one minimum ``m_r = -log(U_r) / sum(rates of its members)``; atom
        ``i`` gets the sum of the minima of the races it took part in, plus a fresh
        ``-log(V_i) / rate_i`` if it never won.  uniforms: ``[*batch, max_races + A]`` in
        (0, 1) (first the U_r, then V over the flattened atoms).  Solving the result
        reproduces ``trace``.  Returns float64 ``[*batch, *atom_shape]``.
        """
        t, logits, batch, inst = self.check_trace(trace, logits)
        R, A = inst.max_races, inst.num_atoms
        u = self._uniforms(uniforms, seed, batch + (R + A,), "uniforms").reshape(-1, R + A)
        with naming_lanes(batch):
            logp, _, noise, _ = self.score_flat(inst, t, logits, uniforms=u)
        if np.isneginf(logp).any():
            lane = int(np.argmax(np.isneginf(logp)))
            raise ValueError(f"trace (flat batch index {lane}) has probability zero under these "
                             f"logits: there is no noise that produces it")
        return noise.reshape(batch + inst.atom_shape)

    def enumerate(self, logits=None, *, rates=None, max_traces=20000):
        """Every trace with its structure and exact probability (small sizes only).

        Give either ``logits`` (``[*atom_shape]``, float probabilities) or exact ``rates``
        (``[*atom_shape]`` of ints or ``fractions.Fraction``; 0 excludes an atom), which
        make the probabilities exact ``Fraction`` objects.  Raises
        :class:`~structdsl.errors.EnumerationLimitError` past ``max_traces`` traces.
        """
        if (logits is None) == (rates is None):
            raise TypeError("enumerate takes exactly one of logits= or rates=")
        if rates is not None:
            r = np.asarray(rates, dtype=object)
            _, inst = self._split(r, "rates")
            if r.shape != inst.atom_shape:
                raise ValueError(f"enumerate takes unbatched rates of shape {inst.atom_shape}, got {r.shape}")
            flat = r.reshape(-1)
            for x in flat:
                if not isinstance(x, (int, Fraction, np.integer)) or x < 0:
                    raise TypeError(f"exact rates must be non-negative ints or Fractions, got {x!r}")
            weights = np.array([Fraction(int(x)) if isinstance(x, (int, np.integer)) else x
                                for x in flat], dtype=object)
            exact = True
        else:
            a, batch, inst = self.check_logits(logits)
            if batch:
                raise ValueError(f"enumerate takes unbatched logits of shape {inst.atom_shape}, got {a.shape}")
            weights, exact = a.reshape(-1), False
        ref = self.reference
        traces, fields, probs, logps = ref.enumerate_flat(ref.instance(inst.atom_shape), weights, exact, max_traces)
        structure = self._structure(fields, (len(traces),))
        return Enumeration(traces, structure, probs, logps)

    # ---- helpers shared by all backends ---------------------------------------------------
    def check_trace(self, trace, logits):
        """The public API's check of a trace ``[*b1, max_races]`` against logits ``[*b2,
        *atom_shape]``: ``(traces [B, R] int64, logits [B, A], batch, inst)`` flattened over
        the broadcast batch; a float trace, a wrong length or an entry outside ``[-1, A)`` raises."""
        logits, lbatch, inst = self.check_logits(logits)
        t = np.asarray(trace)
        if not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"trace must be an integer array, got dtype {t.dtype}")
        if t.ndim < 1 or t.shape[-1] != inst.max_races:
            raise ValueError(f"trace must have shape [..., {inst.max_races}] (max_races of "
                             f"{self.ir.name} for atoms {inst.atom_shape}), got {t.shape}")
        if ((t < -1) | (t >= inst.num_atoms)).any():
            raise ValueError(f"trace entries must be flat atom indices in [0, {inst.num_atoms}) "
                             f"or -1 padding")
        try:
            batch = np.broadcast_shapes(t.shape[:-1], lbatch)
        except ValueError:
            raise ValueError(f"trace batch shape {t.shape[:-1]} does not broadcast with logits "
                             f"batch shape {lbatch}") from None
        t = np.broadcast_to(t, batch + t.shape[-1:]).reshape(math.prod(batch), inst.max_races).astype(np.int64)
        logits = np.broadcast_to(logits, batch + inst.atom_shape).reshape(-1, inst.num_atoms)
        return t, logits, batch, inst

    def _uniforms(self, uniforms, seed, shape, what, lane_ndim=1):
        """``uniforms`` checked (shape ``shape``, strictly inside (0, 1)), or the Philox
        stream of ``seed`` (:meth:`seeded_uniforms`), each lane's values being the last
        ``lane_ndim`` dims of ``shape`` (flattened)."""
        if uniforms is None:
            cut = len(shape) - lane_ndim
            return self.seeded_uniforms(seed, math.prod(shape[:cut]), math.prod(shape[cut:])).reshape(shape)
        if seed is not None:
            raise TypeError("give either uniforms= or seed=, not both")
        u = np.asarray(uniforms, dtype=np.float64)
        if u.shape != shape:
            raise ValueError(f"{what} must have shape {shape}, got {u.shape}")
        # NaN fails both comparisons; two SIMD reductions instead of two temporaries
        if u.size and not (u.min() > 0 and u.max() < 1):
            raise ValueError(f"{what} must lie strictly inside (0, 1)")
        return u

    # ---- the backend contract (see the module docstring) ------------------------------------
    def seeded_uniforms(self, seed, lanes, width):
        """The Philox stream of ``seed`` (:func:`structdsl.philox.uniforms`): float64 ``[lanes,
        width]``, lane ``b``'s values in row ``b``; ``seed`` None draws one from the OS.  A
        backend may compute the same bits faster (the numba backend does, compiled)."""
        return philox.uniforms(seed, lanes, width)

    def draw_seeded_flat(self, inst, seed, logits, check_logits=None):
        """:meth:`draw_flat` on the uniforms of the Philox stream of ``seed`` (an int in
        ``[0, 2**64)``) for lanes ``0 .. B - 1`` and atoms ``0 .. A - 1``; a backend may draw
        them where its lanes run (the numba backend does, inside its compiled driver)."""
        B, A = logits.shape
        return self.draw_flat(inst, self.seeded_uniforms(seed, B, A), logits, check_logits)

    def draw_flat(self, inst, uniforms, logits, check_logits=None):
        """Race ``log E = log(-log U) - logits`` (exact for any spread of the logits, where E
        itself would overflow and turn live atoms into +inf).  ``uniforms``, ``logits``:
        float64 ``[B, A]``.  ``check_logits``: a callable that raises, naming a NaN or +inf
        logit, for a backend that finds one as it draws (this one never sees them: the
        public API checks first).  Returns :class:`Draw`."""
        live = inst.valid.reshape(-1) & ~np.isneginf(logits)
        with np.errstate(divide="ignore"):
            log_noise = np.where(live, races.log_race_minimum(uniforms, np.where(live, logits, 0.0)), np.inf)
        traces, fields = self.solve_flat(inst, log_noise, log_space=True)
        return Draw(traces, fields, log_noise)

    def score_flat(self, inst, traces, logits, want_grad=False, uniforms=None):
        """:class:`Scores` of ``traces`` ``[B, R]`` under ``logits`` ``[B, A]``, derived from
        :meth:`replay_flat` by :mod:`structdsl.races`; ``uniforms`` ``[B, R + A]``: also
        ``E | T`` (only when every trace is possible)."""
        rep = self.replay_flat(inst, traces, logits)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            logp = races.log_prob(logits, traces, rep.races, rep.possible)
            grad = races.trace_score(logits, traces, rep.races, rep.possible) if want_grad else None
            noise = None
            if uniforms is not None and rep.possible.all():
                live = inst.valid.reshape(-1) & ~np.isneginf(logits)
                noise = races.noise_given_trace(logits, traces, rep.races, uniforms, live)
        return Scores(logp, grad, noise, rep)

    def draw_and_score_flat(self, inst, uniforms, logits, check_logits=None, members=False):
        """:meth:`draw_flat`, then :meth:`score_flat` (with the gradient) of the drawn traces:
        a training step's sample and trace score.  Returns ``(Draw, Scores)``; ``members``:
        the scores' ``replay`` holds the races' member sets as :class:`structdsl.races.Members`."""
        d = self.draw_flat(inst, uniforms, logits, check_logits)
        return d, self.score_flat(inst, d.trace, logits, want_grad=True)

    def _structure(self, fields, lead):
        out = []
        for f in fields:
            f = np.asarray(f)
            out.append(f.reshape(lead + f.shape[1:]))
        return self.Structure(*out)

    def _valid_mask(self, params, dims):
        """The atoms' valid mask at sizes ``dims`` (the reference evaluates ``valid=``)."""
        return self.reference.instance(dims).valid

    def solve_flat(self, inst, weights, log_space):
        raise NotImplementedError

    def replay_flat(self, inst, traces, logits):
        raise NotImplementedError


class naming_lanes:
    """``with naming_lanes(batch):`` backends report a run-time error's lane as a flat
    index: name it in ``batch``.  (A class, not a generator: it wraps every draw of a
    training step, and costs a third as much.)"""
    __slots__ = ("batch",)

    def __init__(self, batch):
        self.batch = batch

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, RaceError):
            name_lane(exc, self.batch)
        return False


def name_lane(exc, batch):
    """Backends report a run-time error's lane as a flat index: name it in ``batch``."""
    if isinstance(exc.lane, (int, np.integer)):
        exc.lane = tuple(int(i) for i in np.unravel_index(int(exc.lane), batch)) if batch else None
        exc.locate()


def _race_bound(program, body, env, ranges):
    """Upper bound on winners per run from the loop counts (a grouped race: G each).
    ``ranges``: ``{loop variable: largest value}`` of the enclosing loops, for counts that
    are linear in them (their maximum is at a corner of the box)."""
    total = 0
    for stmt in body:
        if isinstance(stmt, ir.Race):
            total += 1
        elif isinstance(stmt, ir.GroupRace):
            groups = static_eval(stmt.groups, env, program.file)
            if groups < 0:
                raise ValueError(f"{program.where(stmt.line)}: race_groups(groups={ast.unparse(stmt.groups)}) "
                                 f"is {groups}; the number of groups must be >= 0")
            total += groups
        elif isinstance(stmt, ir.Loop):
            count = max(static_eval(stmt.count, {**env, **dict(zip(stmt.bound_vars, corner))}, program.file)
                        for corner in itertools.product(*([0, ranges[v]] for v in stmt.bound_vars)))
            count = max(count, 0)
            inner = _race_bound(program, stmt.body, env, {**ranges, stmt.var: max(count - 1, 0)})
            total += count * inner
        elif isinstance(stmt, ir.If):
            total += max(_race_bound(program, stmt.body, env, ranges),
                         _race_bound(program, stmt.orelse, env, ranges))
    return total


def _data_array(name, value, program):
    """A read-only int64/bool copy of a data parameter (or tuple constant)."""
    a = np.asarray(value)
    if a.dtype != bool and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"data parameter {name!r} of {program.name} must be an int or bool array, "
                        f"got dtype {a.dtype}")
    if name in program.static_names:
        raise TypeError(f"parameter {name!r} of {program.name} is used as a size, bound or shape "
                        f"at {program.where(program.static_names[name])}: it must be an int, got "
                        f"an array of shape {a.shape}")
    if a.dtype != bool and a.size and a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
        idx = tuple(int(i) for i in np.argwhere(a > np.iinfo(np.int64).max)[0])
        raise ValueError(f"data parameter {name!r} of {program.name} holds {int(a[idx])} at index "
                         f"{idx}, which int64 (the DSL's only integer type) cannot hold")
    a = np.array(a, dtype=bool if a.dtype == bool else np.int64)
    a.setflags(write=False)
    return a


def _camel(name):
    return "".join(part.capitalize() for part in name.split("_"))
