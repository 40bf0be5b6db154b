"""``torch.distributions`` export: a structured latent variable for PyTorch (and Pyro) models.

>>> from structdsl import specs
>>> from structdsl.torch import RaceDistribution
>>> dist = RaceDistribution(specs.spanning_tree, logits=torch.zeros(8, 5, 5))
>>> trace = dist.sample((3,))                  # [3, 8, max_races]
>>> dist.log_prob(trace).shape                 # [3, 8], differentiable in the logits
>>> dist.structure(trace).adjacency.shape      # [3, 8, 5, 5]

The event is the padded trace (winners in execution order, ``-1`` after the last race); its
structure is decoded by replaying it.  When Pyro is installed the class also carries Pyro's
``TorchDistributionMixin`` (so ``pyro.sample("z", dist)`` works unchanged).

Beyond the ``torch.distributions`` protocol: :meth:`RaceDistribution.entropy` (exact, by
enumeration), :meth:`RaceDistribution.argmax` (the algorithm on noise-free weights),
:meth:`RaceDistribution.sample_and_score` (a draw with its score, what the estimators of
:mod:`structdsl.estimators` build on), ``conditional_noise`` (``E | T``) and
``noise_log_prob``.  float16 and bfloat16 logits (what ``torch.autocast`` produces) are
accepted: the races run in float32 or float64 (see the class's "Precision").
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch.distributions import Distribution, constraints

from . import races
from .dsl import Spec
from .errors import EnumerationLimitError
from .program import Solution, naming_lanes

try:        # Pyro's sample sites call the distribution and ask it for score parts
    from pyro.distributions.torch_distribution import TorchDistributionMixin as _PyroMixin
except ImportError:          # pragma: no cover - Pyro is an optional extra
    class _PyroMixin:
        pass


class _LogRates(constraints.Constraint):
    """Log-rates: real or ``-inf`` (an absent atom), never NaN or ``+inf``, at the valid
    atoms.  Entries at invalid atoms (outside the spec's ``valid=``) are ignored, whatever
    their value; this constraint does not know which atoms those are, so
    :class:`RaceDistribution` checks its logits itself (``_checked_logits``)."""

    def check(self, value):
        return value < math.inf                    # one op: NaN and +inf both fail

    def __repr__(self):
        return "LogRates()"


class _Traces(constraints.Constraint):
    """The traces this distribution can produce: replaying one gives a finite log-prob."""
    is_discrete = True
    event_dim = 1

    def __init__(self, dist):
        self.dist = dist
        super().__init__()

    def check(self, value):
        return torch.isfinite(self.dist._log_prob(value))


class _TraceScore(torch.autograd.Function):
    """log p(trace) on the numba backend, with the analytic trace score as its backward."""

    @staticmethod
    def forward(ctx, logits, trace, program):
        x = logits.detach()
        t = np.ascontiguousarray(trace.numpy(), dtype=np.int64)
        A = math.prod(x.shape[1:])
        if t.size and not (t.min() >= -1 and t.max() < A):
            raise ValueError(f"trace entries must be flat atom indices in [0, {A}) or -1 padding")
        inst = program.instance(tuple(x.shape[1:]))
        with naming_lanes((t.shape[0],)):
            scores = program.score_flat(inst, t, np.ascontiguousarray(x.numpy(), dtype=np.float64).reshape(-1, A),
                                        want_grad=True)
        ctx.save_for_backward(torch.from_numpy(scores.grad.reshape(x.shape)).to(x.dtype))
        return torch.from_numpy(scores.logp).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g.reshape(g.shape + (1,) * (grad.dim() - g.dim())) * grad, None, None


def _member_sets(program, inst, trace, logits):
    """The races' member sets, bool ``[B, R, A]``, of traces ``[B, R]`` under ``logits``
    ``[B, A]`` (NumPy), by the program's ``replay_flat`` over chunks of lanes: a replay may
    need ``O(R A)`` floats of scratch per lane (64 MB at a 200-node spanning tree), so a
    chunk holds at most ``2**23 / (R A)`` lanes."""
    B, R = trace.shape
    A = logits.shape[1]
    out = np.empty((B, R, A), dtype=bool)
    step = max(1, (1 << 23) // max(1, R * A))
    for i in range(0, B, step):
        rep = program.replay_flat(inst, trace[i:i + step], logits[i:i + step])
        form = rep.races
        out[i:i + step] = form.members if isinstance(form, races.Members) else \
            np.asarray(form.exit_race)[:, None, :] >= np.arange(R)[None, :, None]
    return out


def _integer_trace(value):
    """Whether ``value`` (a trace) may be scored: anything but a float, complex or bool tensor
    (arrays and lists go to the Program API, which checks them itself)."""
    if not torch.is_tensor(value):
        return True
    dtype = value.dtype
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _broadcast(a, b):
    """``torch.broadcast_shapes`` for two shapes, without its overhead on the hot path."""
    if a == b:
        return torch.Size(a)
    a, b = tuple(a), tuple(b)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for i, j in zip(a, b):
        if i != j and i != 1 and j != 1:
            raise ValueError(f"shapes {a} and {b} do not broadcast")
        out.append(j if i == 1 else i)
    return torch.Size(out)


#: logits of these dtypes race in float32 (see RaceDistribution's "Precision")
_HALF = (torch.float16, torch.bfloat16)


class ScoredSample(NamedTuple):
    """Result of :meth:`RaceDistribution.sample_and_score` (``lead = sample_shape +
    batch_shape``, ``R = max_races``, ``A = prod(atom_shape)``); nothing in it carries a
    gradient.

    trace: int64 ``[*lead, R]``.  structure: the spec's fields, each ``[*lead, *field_shape]``.
    log_noise: ``log E`` ``[*lead, *atom_shape]`` in ``working_dtype`` (``+inf`` at atoms that
    cannot race).  log_prob: ``[*lead]``, the log-density whose gradient ``score`` is:
    ``log p(trace)`` (``score="trace"``) or the noise's ``noise_log_prob(E)``
    (``score="noise"``).  score: its gradient in the logits, ``[*lead, *atom_shape]``.
    members: with ``members=True``, bool ``[*lead, R, A]``: race ``r``'s member set (the
    atoms that took part in it), else None.  log_prob and score are float64 on the CPU fast
    path (where they are computed in float64), else in ``working_dtype``.
    """
    trace: torch.Tensor
    structure: tuple
    log_noise: torch.Tensor
    log_prob: torch.Tensor
    score: torch.Tensor
    members: Optional[torch.Tensor]


class SupportTooLarge(EnumerationLimitError, NotImplementedError):
    """:meth:`RaceDistribution.entropy` needs the support enumerated and it is too large
    (an :class:`~structdsl.errors.EnumerationLimitError`, and a ``NotImplementedError`` as
    ``torch.distributions`` raise for an entropy they do not have)."""


class RaceDistribution(Distribution, _PyroMixin):
    """The law of a spec's execution traces under exponential races with log-rates ``logits``.

    spec_or_program: a ``@spec`` function (compiled here with ``**static``) or a compiled
    program of any backend.  logits: ``[*batch_shape, *atom_shape]`` log-rates, ``-inf``
    masks an atom (ragged sizes).  ``fast_cpu``: on CPU tensors, sample and score through
    the numba backend (its analytic trace score is the backward) when numba is installed;
    on other devices the torch backend runs in lock-step on the device.

    Shapes: ``event_shape = (max_races,)``; ``sample(sample_shape)`` returns int64 traces
    ``sample_shape + batch_shape + (max_races,)``; ``log_prob(trace)`` returns
    ``sample_shape + batch_shape``.

    ``has_rsample`` is False: a trace is a piecewise-constant function of the logits, so
    pathwise gradients through it are zero.  Train the logits with the score-function
    estimators of :mod:`structdsl.estimators` (``log_prob`` is exact and differentiable;
    ``conditional_noise`` gives the reparameterised ``E | T`` that RELAX needs).

    **Precision.** Logits may be float64, float32, float16 or bfloat16.  The races never run
    in half precision (a bfloat16 uniform has 8 significant bits: ties and a distorted law):
    ``working_dtype`` is float32 for float16/bfloat16 logits, else the logits' dtype; the
    uniforms are drawn in it, the lock-step path (other devices, ``fast_cpu=False``) races
    and scores in it, and the CPU fast path races and scores in float64 (as for float32
    logits).  The cast is differentiable, so gradients reach the logits in their own dtype.
    Log-probabilities (``log_prob``, ``noise_log_prob``, ``entropy``) are returned in the
    logits' dtype, rounded once at the end (bfloat16: about 3 significant digits, float16:
    about 4); noise (``sample_with_noise``, ``conditional_noise``) is returned in
    ``working_dtype``, since noise rounded to half precision would not reproduce its trace.
    For the same generator state, float16/bfloat16 logits give the same traces as the same
    values in float32.
    """

    has_rsample = False
    has_enumerate_support = True
    arg_constraints = {"logits": _LogRates()}

    def __init__(self, spec_or_program, logits, validate_args=None, fast_cpu=True, **static):
        if isinstance(spec_or_program, Spec):
            from . import compile as compile_spec
            self.program = compile_spec(spec_or_program, backend="torch", **static)
        elif hasattr(spec_or_program, "ir") and hasattr(spec_or_program, "spec"):
            if static:
                raise TypeError("static parameters go to compile(); this program is compiled already")
            prog = spec_or_program
            if prog.backend != "torch":
                from . import compile as compile_spec
                prog = compile_spec(prog.spec, backend="torch", **prog.static_params, **prog.data)
            self.program = prog
        else:
            raise TypeError(f"RaceDistribution expects a @spec function or a compiled program, "
                            f"got {type(spec_or_program).__name__}")
        if not torch.is_tensor(logits):
            logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
        if not torch.is_floating_point(logits):
            raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
        k = self.program.atom_ndim
        if logits.dim() < k:
            raise ValueError(f"logits must have shape [*batch, {self.program.expected_shape()[5:]}, got "
                             f"{tuple(logits.shape)}")
        self.logits = logits
        self.atom_shape = tuple(logits.shape[logits.dim() - k:])
        self.instance = self.program.instance(self.atom_shape)
        self.fast_cpu = fast_cpu
        # torch's own argument check would refuse a NaN at an invalid atom, which the spec
        # ignores: the logits are checked here, knowing which atoms are valid
        validate = Distribution._validate_args if validate_args is None else bool(validate_args)
        super().__init__(batch_shape=logits.shape[:logits.dim() - k],
                         event_shape=torch.Size((self.instance.max_races,)), validate_args=False)
        self._validate_args = validate
        if validate:
            self._checked_logits      # NaN or +inf at a valid atom: ValueError naming the batch element

    # ---- the torch.distributions protocol ------------------------------------------------
    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return _Traces(self)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(RaceDistribution, _instance)
        batch_shape = torch.Size(batch_shape)
        new.program, new.atom_shape, new.instance, new.fast_cpu = \
            self.program, self.atom_shape, self.instance, self.fast_cpu
        new.logits = self.logits.expand(batch_shape + self.atom_shape)
        super(RaceDistribution, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @functools.cached_property
    def _checked_logits(self):
        """Check the logits once: a NaN or ``+inf`` at a valid atom raises ValueError naming
        the batch element; entries at invalid atoms are ignored whatever their value.
        Returns whether some invalid atom holds a NaN or ``+inf`` (then :meth:`_x` replaces
        the invalid atoms' entries by 0 before any backend sees them)."""
        x = self.logits.detach()
        if not x.numel() or bool((x < math.inf).all()):      # one reduction: no NaN, no +inf
            return False
        valid = self.program.atom_mask(self.instance, x.device).reshape(self.atom_shape)
        nb = len(self.batch_shape)
        ignored = ("Entries at invalid atoms (outside the spec's valid=) are ignored, whatever "
                   "their value")
        for what, bad in (("NaN", torch.isnan(x) & valid), ("+inf", torch.isposinf(x) & valid)):
            if bool(bad.any()):          # the Program API's wording, then where it is
                idx = torch.nonzero(bad)[0].tolist()
                where = (f"batch element {tuple(idx[:nb])}, atom {tuple(idx[nb:])}" if nb
                         else f"atom {tuple(idx)}")
                if what == "NaN":
                    raise ValueError(f"logits contain NaN ({int(bad.sum())} entries, first at index "
                                     f"{tuple(idx)}) at valid atoms: {where}. {ignored}")
                raise ValueError(f"logits contain +inf (first at index {tuple(idx)}) at a valid atom: "
                                 f"{where}: a rate of +inf has no race law; use large finite logits. "
                                 f"{ignored}")
        return True

    @property
    def working_dtype(self):
        """The floating dtype the races run in off the CPU fast path, and the uniforms and
        the noise's dtype on every path: float32 for float16/bfloat16 logits, else the
        logits' dtype (see the class's "Precision")."""
        return torch.float32 if self.logits.dtype in _HALF else self.logits.dtype

    @property
    def cpu_fast_path(self):
        """Whether this distribution samples and scores through the numba backend on the CPU
        (``fast_cpu=True``, CPU logits that are a plain tensor, numba installed), computing
        in float64; else the torch backend runs in lock-step on the logits' device (a tensor
        subclass, e.g. Pyro's provenance tracking, takes torch ops, which it sees)."""
        return self._numba is not None and type(self.logits) is torch.Tensor

    def in_working_precision(self):
        """``self``, or for float16/bfloat16 logits the same law on the logits cast to float32
        (a differentiable cast: gradients flow back to the logits in their dtype).  The
        estimators compute on it, so that no intermediate is rounded to half precision."""
        if self.logits.dtype not in _HALF:
            return self
        return RaceDistribution(self.program, self.logits.to(torch.float32), validate_args=False,
                                fast_cpu=self.fast_cpu)

    def _x(self, detach=False):
        """The logits every entry point computes with: ``self.logits`` (checked, see
        :attr:`_checked_logits`) in ``working_dtype``, or, when an invalid atom holds a NaN or
        ``+inf``, with the invalid atoms' entries replaced by 0 (their value is ignored; the
        gradient there is 0).  A new cast and ``where`` per call: a cached one would be freed
        by the first backward."""
        x = self.logits.detach() if detach else self.logits
        if x.dtype in _HALF:
            x = x.to(torch.float32)
        if not self._checked_logits:
            return x
        valid = self.program.atom_mask(self.instance, x.device).reshape(self.atom_shape)
        return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def _check_trace_dtype(self, value):
        """Refuse a trace that is not an integer tensor with the Program API's own exception
        and message (its trace check runs on it), instead of rounding floats into atom
        indices as a cast would."""
        if _integer_trace(value):
            return
        self.program.log_prob(value, self._x(detach=True))     # raises its TypeError
        raise TypeError(f"trace must be an integer array, got dtype "          # pragma: no cover
                        f"{str(value.dtype).removeprefix('torch.')}")

    @functools.cached_property
    def _live(self):
        """``[*batch_shape, *atom_shape]`` bool: the atoms that can race (valid, logit above -inf)."""
        valid = self.program.atom_mask(self.instance, self.logits.device).reshape(self.atom_shape)
        return valid & ~torch.isneginf(self.logits.detach())

    @functools.cached_property
    def _numba(self):
        """The numba program for the CPU fast path, or None."""
        if not self.fast_cpu or self.logits.device.type != "cpu":
            return None
        return self.program.numba_twin()

    def _uniforms(self, shape, generator=None):
        dtype = self.working_dtype
        u = torch.rand(shape, generator=generator, dtype=dtype, device=self.logits.device)
        return u.clamp_min(torch.finfo(dtype).tiny)

    def sample(self, sample_shape=torch.Size(), generator=None):
        """Traces ``sample_shape + batch_shape + (max_races,)`` (int64, no gradient)."""
        return self._draw(sample_shape, generator)[0]

    def sample_with_noise(self, sample_shape=torch.Size(), generator=None):
        """``(trace, noise)``: the trace and the exponential noise ``E`` that produced it
        (``sample_shape + batch_shape + atom_shape``, ``+inf`` at atoms that cannot race, in
        ``working_dtype``).  The noise is reparameterised: ``E = E_1 / exp(logits)`` with
        ``E_1 ~ Exp(1)`` held fixed, so it is differentiable in the logits (``dE/dlogits =
        -E``), as RELAX needs."""
        s = self.sample_with_structure(sample_shape, generator)
        return s.trace, s.noise

    def sample_with_structure(self, sample_shape=torch.Size(), generator=None):
        """A :class:`structdsl.program.Sample`: ``trace`` ``sample_shape + batch_shape +
        (max_races,)``, ``structure`` (each field ``sample_shape + batch_shape + field_shape``,
        no second replay needed) and the reparameterised noise (``log_noise``, ``noise``)."""
        from .program import Sample
        trace, structure, log_noise = self._draw(sample_shape, generator)
        if self.logits.requires_grad:   # value unchanged; d log E / d logits = -1 at live atoms
            x = self._x()
            log_noise = log_noise + torch.where(self._live, x.detach() - x, 0.0)
        return Sample(trace, structure, log_noise)

    def _draw(self, sample_shape, generator):
        """(trace, structure, log noise), nothing differentiable."""
        if self._numba is not None:
            return self._draw_native(sample_shape, generator)[:3]
        shape = torch.Size(sample_shape) + self.batch_shape + self.atom_shape
        with torch.no_grad():
            s = self.program.sample(self._x(detach=True).expand(shape), uniforms=self._uniforms(shape, generator))
        return s.trace, s.structure, s.log_noise

    def _draw_native(self, sample_shape, generator, score=None, members=False):
        """The CPU fast path's draw (requires ``self._numba``): ``(trace, structure,
        log_noise, logp, grad, members)``, the first three tensors (``log_noise`` in
        ``working_dtype``); with ``score="trace"`` ``logp`` (``[L]``, ``L`` the flat
        ``sample_shape + batch_shape``) and ``grad`` (its gradient in the logits, ``[L, A]``),
        with ``score="noise"`` the noise's log-density and its gradient, with ``members`` the
        races' member sets (``[L, R, A]``, as ``replay_flat`` reports them): float64 / bool
        NumPy arrays (else None).  NumPy from here on: a torch op costs ~5 us at a training
        step's sizes."""
        shape = torch.Size(sample_shape) + self.batch_shape + self.atom_shape
        k = len(self.atom_shape)
        lead = shape[:len(shape) - k]
        dtype = self.working_dtype
        u = torch.rand(shape, generator=generator, dtype=dtype).numpy()   # torch's RNG stream
        # a 0 is clamped to the dtype's smallest normal, as the lock-step path does: for
        # float64 the kernel does it as it draws
        un = u if u.dtype == np.float64 else np.maximum(u, np.finfo(u.dtype).tiny).astype(np.float64)
        xn = self._x(detach=True).numpy()
        check = functools.partial(self.program.check_logits, xn)   # NaN, +inf: the lanes report them
        A = self.instance.num_atoms
        if math.prod(sample_shape) == 1 and xn.dtype == np.float64 and xn.flags.c_contiguous:
            xb = xn.reshape(-1, A)                             # the kernels only read the logits
        else:
            xb = np.empty((un.size // A if A else lead.numel(), A))
            xb.reshape(shape)[...] = xn                        # the batch's logits, once per sample
        fast = self._numba
        inst = fast.instance(self.atom_shape)
        logp = grad = mem = None
        with naming_lanes(tuple(lead)):
            if score == "trace":
                (trace, fields, log_noise), scores = fast.draw_and_score_flat(inst, un.reshape(-1, A), xb, check)
                logp, grad = scores.logp, scores.grad
            else:
                trace, fields, log_noise = fast.draw_flat(inst, un.reshape(-1, A), xb, check)
        if members:
            mem = _member_sets(fast, inst, trace, xb)
        if score == "noise":
            grad = races.noise_score(xb, log_noise)
            with np.errstate(over="ignore", invalid="ignore"):
                logp = races.noise_log_prob(xb, np.exp(log_noise), np.isfinite(log_noise))
        structure = self.program.Structure(*(torch.from_numpy(f.reshape(lead + f.shape[1:])) for f in fields))
        log_noise = torch.from_numpy(log_noise.reshape(shape))
        return (torch.from_numpy(trace.reshape(lead + trace.shape[1:])), structure,
                log_noise if log_noise.dtype == dtype else log_noise.to(dtype), logp, grad, mem)

    def sample_and_score(self, sample_shape=torch.Size(), generator=None, score="trace", members=False):
        """Draw traces and score them in one pass: a :class:`ScoredSample` (shapes there,
        ``lead = sample_shape + batch_shape``).

        ``score="trace"``: ``log_prob`` is ``log p(trace)`` and ``score`` its gradient in the
        logits, ``[i won a race] - sum_{races r with i in M_r} softmax(logits[M_r])_i``
        (what T-REINFORCE weighs by the losses); ``score="noise"``: the noise's log-density
        :meth:`noise_log_prob` and its gradient ``1 - exp(logits) E`` at live atoms
        (E-REINFORCE's).  ``members=True`` adds the races' member sets.  The same generator
        state gives the same traces as :meth:`sample`.  On the CPU fast path one native call
        draws, scores and records the member sets (float64 NumPy-backed tensors, no copy);
        elsewhere the torch backend samples, then replays the traces once.  Nothing is
        differentiable: use :meth:`log_prob` for a log-probability with a graph."""
        if score not in ("trace", "noise"):
            raise ValueError(f"score must be 'trace' or 'noise', got {score!r}")
        lead = torch.Size(sample_shape) + self.batch_shape
        R, A = self.instance.max_races, self.instance.num_atoms
        if self._numba is not None:          # NumPy reshapes: a torch op costs ~5 us at these sizes
            trace, structure, log_noise, logp, grad, mem = self._draw_native(sample_shape, generator, score, members)
            return ScoredSample(trace, structure, log_noise, torch.from_numpy(logp.reshape(lead)),
                                torch.from_numpy(grad.reshape(lead + self.atom_shape)),
                                torch.from_numpy(mem.reshape(lead + (R, A))) if members else None)
        trace, structure, log_noise = self._draw(sample_shape, generator)
        t = trace.reshape(-1, R)
        x = self._x(detach=True).expand(lead + self.atom_shape).reshape(-1, A)
        mem = None
        with torch.no_grad():
            if score == "trace" or members:
                rep = self.program.replay_flat(self.instance, t, x)
                if score == "trace":
                    logp, grad = races.log_prob(x, t, rep.races), races.trace_score(x, t, rep.races)
                if members:
                    mem = rep.races.members if isinstance(rep.races, races.Members) else \
                        rep.races.exit_race[:, None, :] >= torch.arange(R, device=x.device)[None, :, None]
            if score == "noise":
                ln = log_noise.reshape(-1, A)
                logp, grad = races.noise_log_prob(x, ln.exp(), torch.isfinite(ln)), races.noise_score(x, ln)
        return ScoredSample(trace, structure, log_noise, logp.reshape(lead), grad.reshape(lead + self.atom_shape),
                            None if mem is None else mem.reshape(lead + (R, A)))

    def enumerate_support(self, expand=True):
        """Every trace with positive probability: ``[N] + batch_shape + (max_races,)`` (or
        ``[N] + (1,) * len(batch_shape) + (max_races,)`` with ``expand=False``).

        Small sizes only (the reference enumerates; more than 20000 traces raise
        :class:`~structdsl.errors.EnumerationLimitError`).  The support depends only on which
        atoms are at ``-inf``; a batch whose elements differ in that (ragged sizes) has no
        common support and raises ValueError: enumerate its elements one by one."""
        self._checked_logits
        patterns = self._live_patterns()
        if len(patterns) != 1:
            raise ValueError(f"enumerate_support needs one support for the whole batch; these logits "
                             f"mask {len(patterns)} different sets of atoms with -inf (ragged sizes): "
                             f"enumerate the batch elements one by one")
        traces = self._support_of(next(iter(patterns)))
        nb = len(self.batch_shape)
        t = traces.reshape((traces.shape[0],) + (1,) * nb + traces.shape[1:])
        return t.expand((traces.shape[0],) + self.batch_shape + traces.shape[1:]) if expand else t

    def enumerate_supports(self):
        """The support of every batch element, also for a ragged batch: a list of ``(traces,
        elements)``, one per set of atoms alive (the support depends only on which atoms
        are at ``-inf``), ``traces`` int64 ``[N, max_races]`` every trace with positive
        probability, ``elements`` int64 ``[m]`` the batch elements (indices into the flattened
        ``batch_shape``) that share it.  Each support is enumerated once per distribution;
        more than 20000 traces raise :class:`~structdsl.errors.EnumerationLimitError`."""
        self._checked_logits
        return [(self._support_of(pattern), torch.as_tensor(lanes, dtype=torch.int64, device=self.logits.device))
                for pattern, lanes in self._live_patterns().items()]

    def _live_patterns(self):
        """``{live mask as bytes: [flat batch indices]}`` over the batch."""
        live = self._live.expand(self.batch_shape + self.atom_shape).reshape(-1, *self.atom_shape).cpu().numpy()
        patterns = {}
        for b, m in enumerate(live):
            patterns.setdefault(m.tobytes(), []).append(b)
        return patterns

    def _support_of(self, pattern):
        """The traces (int64 ``[N, max_races]``) of the atoms alive in ``pattern``."""
        cache = self.__dict__.setdefault("_supports", {})
        if pattern not in cache:
            rates = np.frombuffer(pattern, dtype=bool).reshape(self.atom_shape).astype(np.int64)
            e = self.program.enumerate(rates=rates)
            cache[pattern] = torch.as_tensor(np.asarray(e.traces), device=self.logits.device)
        return cache[pattern]

    def _log_prob(self, value):
        """log p(value) without validation, in the logits' dtype."""
        lp = self._log_prob_work(value)
        return lp if lp.dtype == self.logits.dtype else lp.to(self.logits.dtype)

    def _log_prob_work(self, value, x=None):
        """log p(value) in the working precision under logits ``x`` (default: this
        distribution's, in ``working_dtype``), differentiable in them."""
        self._check_trace_dtype(value)
        x = self._x() if x is None else x
        batch_shape = x.shape[:x.dim() - len(self.atom_shape)]
        fast = self._numba
        # a tensor subclass (e.g. Pyro's provenance tracking) takes the lock-step path, whose
        # every op goes through its __torch_function__; NumPy would drop what it tracks
        if fast is not None and type(value) is torch.Tensor and type(self.logits) is torch.Tensor:
            R = self.instance.max_races
            if value.dim() < 1 or value.shape[-1] != R:
                raise ValueError(f"trace must have shape [..., {R}] (max_races of {self.program.ir.name} for "
                                 f"atoms {self.atom_shape}), got {tuple(value.shape)}")
            shape = _broadcast(value.shape[:-1], batch_shape)
            t = value.expand(shape + (R,)).reshape(-1, R)
            x = x.expand(shape + self.atom_shape).reshape((-1,) + self.atom_shape)
            return _TraceScore.apply(x, t, fast).reshape(shape)
        return self.program.log_prob(value, x)

    def log_prob(self, value):
        """Exact ``log p(trace)``, differentiable in the logits (``-inf`` outside the support
        when validation is off).  value: int ``[*sample, *batch_shape, max_races]`` (or any
        shape broadcasting with the batch); returns ``broadcast(value.shape[:-1],
        batch_shape)`` in the logits' dtype (computed in float64 on the CPU fast path, else
        in ``working_dtype``)."""
        if not self._validate_args:
            return self._log_prob(value)
        # torch's shape checks, then the support from this one replay (not a second one)
        if not torch.is_tensor(value):
            raise ValueError("The value argument to log_prob must be a Tensor")
        self._check_trace_dtype(value)     # a type error, not a value outside the support
        self._checked_logits
        if value.shape[-1:] != self.event_shape:
            raise ValueError(f"The right-most size of value must match event_shape: {tuple(value.shape)} "
                             f"vs {tuple(self.event_shape)}.")
        try:
            _broadcast(value.shape, self.batch_shape + self.event_shape)
        except ValueError:
            raise ValueError(f"Value is not broadcastable with batch_shape+event_shape: {tuple(value.shape)} "
                             f"vs {tuple(self.batch_shape + self.event_shape)}.") from None
        try:         # only a bad trace is outside the support (a TypeError is not: it propagates)
            lp = self._log_prob(value)
        except ValueError as exc:
            raise ValueError(f"Expected value argument (trace tensor of shape {tuple(value.shape)}) to be "
                             f"within the support of {self!r}: {exc}") from None
        if not bool(lp.detach().min() > -math.inf):       # one reduction (NaN fails too)
            bad = torch.nonzero(~torch.isfinite(lp))[0].tolist()
            raise ValueError(f"Expected value argument (trace tensor of shape {tuple(value.shape)}) to be "
                             f"within the support of {self!r}, but the trace at index {tuple(bad)} has "
                             f"probability zero")
        return lp

    # ---- structured extras ----------------------------------------------------------------
    def structure(self, trace):
        """The spec's structure record decoded from ``trace`` (``[*lead, max_races]``): each
        field ``[*lead, *field_shape]`` as a tensor."""
        return self.program.decode(trace, self._x(detach=True))

    def conditional_noise(self, trace, uniforms=None, generator=None):
        """``E | T`` (reparameterised: differentiable, twice, in the logits given the
        uniforms); shape ``broadcast(trace.shape[:-1], batch_shape) + atom_shape``.
        ``uniforms``: ``[*that batch, max_races + num_atoms]`` (race minima first, then the
        fresh noise of each atom), drawn here when None.  Returned in ``working_dtype`` (so
        that solving it reproduces ``trace``; see the class's "Precision").  On the CPU fast
        path the races' member sets come from the numba replay and the noise is assembled
        here in closed form."""
        self._check_trace_dtype(trace)
        fast = self._numba
        if fast is None or type(trace) is not torch.Tensor or type(self.logits) is not torch.Tensor:
            return self.program.conditional_noise(trace, self._x(), uniforms=uniforms, generator=generator)
        R, A = self.instance.max_races, self.instance.num_atoms
        # the Program API's trace checks (length, range, broadcasting), then the replay
        t_np, x_np, shape, inst = fast.check_trace(trace.numpy(), self._x(detach=True).numpy())
        with naming_lanes(shape):
            replay = fast.replay_flat(inst, t_np, x_np)
        t = torch.from_numpy(t_np)
        x = self._x().expand(shape + self.atom_shape).reshape(-1, A)
        impossible = ~replay.possible
        if impossible.any():
            lane = int(np.flatnonzero(impossible)[0])
            raise ValueError(f"trace (flat batch index {lane}) has probability zero under these "
                             f"logits: there is no noise that produces it")
        members = replay.races.members
        if uniforms is None:
            u = self._uniforms((t.shape[0], R + A), generator)
        else:
            u = torch.as_tensor(uniforms, dtype=x.dtype).expand(shape + (R + A,)).reshape(-1, R + A)
        live = self._live.expand(shape + self.atom_shape).reshape(-1, A)
        noise = races.noise_given_trace(x, t, races.Members(torch.from_numpy(members)), u, live)
        return noise.reshape(shape + self.atom_shape)

    def noise_log_prob(self, noise):
        """log density of independent ``Exp(exp(logits))`` noise, summed over the atoms that
        can race (``[*lead, *atom_shape]`` -> ``[*lead]``): the score E-REINFORCE uses.
        Computed in ``working_dtype`` (or the noise's dtype, if wider), returned in the
        logits' dtype."""
        self._checked_logits                   # a NaN at a valid atom raises; at an invalid one it is ignored
        k = len(self.atom_shape)
        live, x = self._live, self.logits
        if x.dtype in _HALF or noise.dtype in _HALF:
            work = torch.promote_types(torch.promote_types(self.working_dtype, noise.dtype), torch.float32)
            x, noise = x.to(work), noise.to(work)
        shape = torch.broadcast_shapes(noise.shape, x.shape)
        flat = lambda v: v.expand(shape).reshape(shape[:len(shape) - k] + (-1,))   # noqa: E731
        lp = races.noise_log_prob(flat(x), flat(noise), flat(live))
        return lp if lp.dtype == self.logits.dtype else lp.to(self.logits.dtype)

    def entropy(self):
        """The exact entropy of the trace law, ``H = -sum_T p(T) log p(T)`` over every trace
        of each batch element's support: ``[*batch_shape]`` in the logits' dtype (computed in
        ``working_dtype``, or float64 on the CPU fast path), differentiable in the logits.

        This is the entropy of the *trace* (the event), which is at least that of the
        structure: several traces may give one structure (a spanning tree's ``n - 1`` edges
        in any order).  Each support is enumerated once (:meth:`enumerate_supports`, small
        sizes only); past 20000 traces this raises :class:`SupportTooLarge` (an
        ``EnumerationLimitError`` and a ``NotImplementedError``), whose message names the
        unbiased Monte Carlo estimate ``-dist.log_prob(dist.sample((n,))).mean(0)`` (its
        gradient: that of ``-((lp.detach() + 1) * lp).mean(0)``, ``lp`` those log-probs)."""
        try:
            supports = self.enumerate_supports()
        except EnumerationLimitError as exc:
            raise SupportTooLarge(
                f"entropy() of {self!r} is exact by enumeration, and this support is too large to "
                f"enumerate ({exc}). Use the Monte Carlo estimate -dist.log_prob(dist.sample((n,))).mean(0) "
                f"(unbiased); for its gradient, with lp = dist.log_prob(dist.sample((n,))), differentiate "
                f"-((lp.detach() + 1) * lp).mean(0) (the score-function form)") from None
        x = self._x()
        A = self.atom_shape
        flat = x.expand(self.batch_shape + A).reshape((-1,) + A)
        out = torch.zeros(flat.shape[0], dtype=x.dtype, device=x.device)
        for traces, elements in supports:
            lp = self._log_prob_work(traces[:, None, :], flat[elements])            # [N, m]
            # every listed trace is in the support; a log p of -inf (an underflow) adds nothing
            plogp = torch.where(torch.isfinite(lp), torch.exp(lp) * lp, 0.0)
            h = -plogp.sum(0)
            out = out.index_put((elements,), h.to(out.dtype))
        h = out.reshape(self.batch_shape)
        return h if h.dtype == self.logits.dtype else h.to(self.logits.dtype)

    def argmax(self):
        """The algorithm's output on noise-free weights: the spec run on the noise
        ``E = exp(-logits)``, each atom's noise at its mean ``1 / rate`` (equivalently the
        Gumbel-max trick with zero Gumbel noise, ``z = logits``).  For races whose member sets
        only shrink (a nested spec) every race is won by its member of largest logit: a
        top-k is the k largest logits in order, a spanning tree the maximum spanning tree of
        the logits (Kruskal's order).  This is the perturb-and-MAP solver at zero noise that
        straight-through and I-MLE baselines use.

        It is **not** the mode of the trace law in general (nor of the structure law): the
        most probable trace or structure need not be the one the noise-free weights select
        (e.g. a spanning tree's law sums over edge orders).  Ties between equal logits go to
        the lower flat index, as in every race.  Returns a
        :data:`structdsl.program.Solution`: ``trace`` int64 ``[*batch_shape, max_races]``
        and ``structure`` (fields ``[*batch_shape, *field_shape]``); nothing differentiable.
        Solved in log space (``log E = -logits``), so logits of any size are exact."""
        self._checked_logits
        x = self._x(detach=True)
        A = self.instance.num_atoms
        batch = tuple(self.batch_shape)
        live = self._live.expand(self.batch_shape + self.atom_shape).reshape(-1, A)
        log_e = torch.where(live, -x.expand(self.batch_shape + self.atom_shape).reshape(-1, A), math.inf)
        if self._numba is not None:
            fast = self._numba
            with naming_lanes(batch):
                trace, fields = fast.solve_flat(fast.instance(self.atom_shape),
                                                np.ascontiguousarray(log_e.numpy(), dtype=np.float64), log_space=True)
            trace = torch.from_numpy(trace)
            fields = [torch.from_numpy(np.asarray(f)) for f in fields]
        else:
            with torch.no_grad(), naming_lanes(batch):
                trace, fields = self.program.solve_flat(self.instance, log_e, log_space=True)
        structure = self.program.Structure(*(f.reshape(batch + tuple(f.shape[1:])) for f in fields))
        return Solution(trace.reshape(batch + (self.instance.max_races,)), structure)

    def __repr__(self):
        return (f"RaceDistribution({self.program.ir.name}, batch_shape={tuple(self.batch_shape)}, "
                f"atom_shape={self.atom_shape}, max_races={self.instance.max_races})")


__all__ = ["RaceDistribution", "ScoredSample", "SupportTooLarge"]
