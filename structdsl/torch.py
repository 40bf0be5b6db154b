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

import numpy as np
import torch
from torch.distributions import Distribution, constraints

from . import ops, races
from .dsl import Spec
from .eager import eager
from .distribution_exact import ExactLaw, SupportTooLarge
from .distribution_sampling import Sampling, ScoredSample
from .program import naming_lanes

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


class RaceDistribution(Sampling, ExactLaw, Distribution, _PyroMixin):
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

    @eager
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
        self._numba                   # resolved here: torch.compile reads it as a plain attribute

    # ---- the torch.distributions protocol ------------------------------------------------
    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return _Traces(self)

    @eager
    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(RaceDistribution, _instance)
        batch_shape = torch.Size(batch_shape)
        new.program, new.atom_shape, new.instance, new.fast_cpu = \
            self.program, self.atom_shape, self.instance, self.fast_cpu
        new.logits = self.logits.expand(batch_shape + self.atom_shape)
        super(RaceDistribution, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        new._numba                    # as in __init__
        return new

    @functools.cached_property
    def _checked_logits(self):
        """Check the logits once: a NaN or ``+inf`` at a valid atom raises ValueError naming
        the batch element; entries at invalid atoms are ignored whatever their value.
        Returns whether some invalid atom holds a NaN or ``+inf`` (then :meth:`_x` replaces
        the invalid atoms' entries by 0 before any backend sees them)."""
        x = self.logits.detach()
        if not x.numel():
            return False
        if type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            fine = bool(x.numpy().max() < math.inf)     # NumPy: a fifth of the two torch ops' cost
        else:
            fine = bool((x < math.inf).all())
        if fine:                                        # one reduction: no NaN (max is NaN), no +inf
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
            return self._fast_log_prob(value, x, batch_shape)
        return self.program.log_prob(value, x)

    def _fast_log_prob(self, value, x, batch_shape):
        """log p on the CPU fast path: traces ``[..., R]`` and logits ``[*batch_shape,
        *atom_shape]`` broadcast to one flat batch, then :func:`structdsl.ops.log_prob`."""
        R = self.instance.max_races
        shape = _broadcast(value.shape[:-1], batch_shape)
        t = value.expand(shape + (R,)).reshape(-1, R)
        x = x.expand(shape + self.atom_shape).reshape((-1,) + self.atom_shape)
        return ops.log_prob(self._numba, t, x).reshape(shape)

    def log_prob(self, value):
        """Exact ``log p(trace)``, differentiable in the logits (``-inf`` outside the support
        when validation is off).  value: int ``[*sample, *batch_shape, max_races]`` (or any
        shape broadcasting with the batch); returns ``broadcast(value.shape[:-1],
        batch_shape)`` in the logits' dtype (computed in float64 on the CPU fast path, else
        in ``working_dtype``).  Under ``torch.compile``, on the CPU fast path and with
        ``validate_args=False``, it is one custom operator in the graph
        (``structdsl::log_prob_and_score``); elsewhere the graph breaks here."""
        if torch.compiler.is_compiling() and not self._validate_args and self._numba is not None:
            return self._log_prob_in_graph(value)
        return self._log_prob_checked(value)

    def _log_prob_in_graph(self, value):
        """:meth:`log_prob` as torch.compile traces it: shapes, then the operator (the
        kernels read the logits at valid atoms only, so no ``_x`` masking is needed)."""
        lp = self._fast_log_prob(value, self.logits.to(self.working_dtype), self.batch_shape)
        return lp.to(self.logits.dtype)

    @eager
    def _log_prob_checked(self, value):
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
    @eager
    def structure(self, trace):
        """The spec's structure record decoded from ``trace`` (``[*lead, max_races]``): each
        field ``[*lead, *field_shape]`` as a tensor."""
        return self.program.decode(trace, self._x(detach=True))

    @eager
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

    @eager
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


    def __repr__(self):
        return (f"RaceDistribution({self.program.ir.name}, batch_shape={tuple(self.batch_shape)}, "
                f"atom_shape={self.atom_shape}, max_races={self.instance.max_races})")


__all__ = ["RaceDistribution", "ScoredSample", "SupportTooLarge"]
