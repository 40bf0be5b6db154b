"""Drawing from a :class:`structdsl.torch.RaceDistribution`: traces, the noise that made them
and, for the estimators, a draw scored in the same pass (:class:`ScoredSample`).  On CPU
tensors the numba backend draws and scores in one native call (NumPy from there on: a torch
op costs ~5 us at a training step's sizes); elsewhere the torch backend runs in lock-step on
the logits' device.  A mixin of ``RaceDistribution``, which holds the state it reads
(``program``, ``instance``, ``atom_shape``, the checked logits)."""
from __future__ import annotations

import functools
import math
import numpy as np
import torch

from . import races
from .eager import eager
from .errors import RaceError
from .program import name_lane


class ScoredSample:
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

    ``log_prob``, ``score`` and ``members`` are made on first read (the noise's log-density
    is computed then; the fast path's arrays become tensors then: a conversion costs about
    1.3 us, a tenth of a training step's glue).  :meth:`array` hands the fast path's NumPy
    array itself to a caller that computes in NumPy, as the estimators do.
    """
    __slots__ = ("trace", "structure", "log_noise", "_lazy")

    def __init__(self, trace, structure, log_noise, log_prob, score, members=None):
        self.trace, self.structure, self.log_noise = trace, structure, log_noise
        # each value: a tensor, a NumPy array (made a tensor when read), a callable (called
        # when read) or None
        self._lazy = {"log_prob": log_prob, "score": score, "members": members}

    def array(self, name):
        """``log_prob``, ``score`` or ``members`` as a NumPy array (the CPU fast path's own
        array, no copy; a CPU tensor's ``.numpy()`` elsewhere), shaped as the field."""
        v = self._lazy[name]
        if callable(v):
            v = self._lazy[name] = v()
        return v.numpy() if torch.is_tensor(v) else v

    def _field(name):
        def read(self):
            v = self._lazy[name]
            if callable(v):
                v = v()
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(v)
            self._lazy[name] = v
            return v
        return property(read, doc=f"``{name}`` (see the class), made on first read.")

    log_prob, score, members = _field("log_prob"), _field("score"), _field("members")
    del _field

    def __repr__(self):
        return f"ScoredSample(trace={self.trace!r}, ...)"


_MEMBER_CHUNK = 1 << 23     # entries of member-set scratch one replay may hold


def _member_sets(program, inst, trace, logits):
    """The races' member sets, bool ``[B, R, A]``, of traces ``[B, R]`` under ``logits``
    ``[B, A]`` (NumPy), by the program's ``replay_flat`` over chunks of lanes: a replay may
    need ``O(R A)`` floats of scratch per lane (64 MB at a 200-node spanning tree), so a
    chunk holds at most ``2**23 / (R A)`` lanes."""
    B, R = trace.shape
    A = logits.shape[1]
    out = np.empty((B, R, A), dtype=bool)
    step = max(1, _MEMBER_CHUNK // max(1, R * A))
    for i in range(0, B, step):
        rep = program.replay_flat(inst, trace[i:i + step], logits[i:i + step])
        form = rep.races
        out[i:i + step] = form.members if isinstance(form, races.Members) else \
            np.asarray(form.exit_race)[:, None, :] >= np.arange(R)[None, :, None]
    return out


def _noise_log_prob(logits, log_noise, lead):
    """``noise_log_prob`` of the fast path's noise ``[L, A]`` under ``logits`` ``[L, A]``:
    float64 ``lead`` (NumPy)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return races.noise_log_prob(logits, np.exp(log_noise), np.isfinite(log_noise)).reshape(lead)


class Sampling:
    """The sampling methods of :class:`structdsl.torch.RaceDistribution`."""

    def _uniforms(self, shape, generator=None):
        dtype = self.working_dtype
        u = torch.rand(shape, generator=generator, dtype=dtype, device=self.logits.device)
        return u.clamp_min(torch.finfo(dtype).tiny)

    @eager
    def sample(self, sample_shape=torch.Size(), generator=None):
        """Traces ``sample_shape + batch_shape + (max_races,)`` (int64, no gradient)."""
        return self._draw(sample_shape, generator)[0]

    @eager
    def sample_with_noise(self, sample_shape=torch.Size(), generator=None):
        """``(trace, noise)``: the trace and the exponential noise ``E`` that produced it
        (``sample_shape + batch_shape + atom_shape``, ``+inf`` at atoms that cannot race, in
        ``working_dtype``).  The noise is reparameterised: ``E = E_1 / exp(logits)`` with
        ``E_1 ~ Exp(1)`` held fixed, so it is differentiable in the logits (``dE/dlogits =
        -E``), as RELAX needs."""
        s = self.sample_with_structure(sample_shape, generator)
        return s.trace, s.noise

    @eager
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
            s = self._draw_native(sample_shape, generator)
            return s.trace, s.structure, s.log_noise
        shape = torch.Size(sample_shape) + self.batch_shape + self.atom_shape
        with torch.no_grad():
            s = self.program.sample(self._x(detach=True).expand(shape), uniforms=self._uniforms(shape, generator))
        return s.trace, s.structure, s.log_noise

    def _draw_native(self, sample_shape, generator, score=None, members=False):
        """The CPU fast path's draw (requires ``self._numba``): a :class:`ScoredSample`
        whose scores are float64 / bool tensors backed by the kernels' NumPy arrays, or None
        where not asked for (``score=None``: a plain draw).  NumPy from here on: a torch op
        costs ~5 us at a training step's sizes."""
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
        # the member sets in the scoring pass itself while they fit in 2**23 floats
        one_pass = members and score == "trace" and xb.shape[0] * inst.max_races * A <= _MEMBER_CHUNK
        try:                             # (naming_lanes, without a context manager's cost per step)
            if score == "trace":
                (trace, fields, log_noise), scores = fast.draw_and_score_flat(inst, un.reshape(-1, A), xb, check,
                                                                               members=one_pass)
                logp, grad = scores.logp, scores.grad
                if one_pass:
                    mem = scores.replay.races.members
            else:
                trace, fields, log_noise = fast.draw_flat(inst, un.reshape(-1, A), xb, check)
        except RaceError as exc:
            name_lane(exc, tuple(lead))
            raise
        if members and not one_pass:
            mem = _member_sets(fast, inst, trace, xb)
        if score == "noise":
            grad = races.noise_score(xb, log_noise)
            logp = functools.partial(_noise_log_prob, xb, log_noise, lead)      # made if read
        elif logp is not None:
            logp = logp.reshape(lead)
        structure = self.program.Structure(*(torch.from_numpy(f.reshape(lead + f.shape[1:])) for f in fields))
        ln = torch.from_numpy(log_noise.reshape(shape))
        return ScoredSample(torch.from_numpy(trace.reshape(lead + trace.shape[1:])), structure,
                            ln if ln.dtype == dtype else ln.to(dtype), logp,
                            None if grad is None else grad.reshape(shape),
                            None if mem is None else mem.reshape(lead + mem.shape[1:]))

    @eager
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
        if self._numba is not None:
            return self._draw_native(sample_shape, generator, score, members)
        lead = torch.Size(sample_shape) + self.batch_shape
        R, A = self.instance.max_races, self.instance.num_atoms
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
