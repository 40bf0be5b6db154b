"""PyTorch backend: the IR interpreted on batched tensors, every lane in lock-step.

One interpreter (:class:`_Machine`) walks the IR once per call; each value is a tensor
``[*lead, *own]`` where ``lead`` is the batch ``[B]`` (inside a predicate, the batch and the
atoms' index grid ``[B, *atom_shape]``, size-1 where a value does not vary) and ``own`` the
value's DSL shape from the type pass.  Control flow becomes masks:

* the lanes that execute a statement are ``active & ~dead``; an ``if`` runs both branches,
  each under its own mask, and a write is ``torch.where(mask, new, old)``;
* ``break`` clears the lane until its loop ends; a lane that raised a spec error (or whose
  replayed trace is impossible) is *dead* from then on;
* ``a and b``, ``a if c else b`` on scalars guard the side they would not evaluate, so an
  index error counts only where the reference would raise it;
* a race is a masked argmin over the flattened atoms (first index on ties, as the
  reference); a grouped race runs every group at once as segment reductions by key
  (``scatter_reduce``), its present groups taking trace slots in key order.

Errors are flags ``[B]`` (first error per lane, in program order) checked once per call and
raised as the reference raises them: the same class, spec line, batch element and message.
A message that names run-time values (the bad index, the exact result of a scalar overflow,
the bad key, the previous race's line) keeps them with the lane's first error; inside a
predicate, whose errors the reference meets atom by atom, each atom keeps its first error
and the lane takes that of its first failing atom, named in the message.  A lane that runs
more races than the static bound, or a compiler-inserted check (``ir.Fail``) that fails,
raises as well.  Nothing on the hot path leaves the device; on CPU a loop stops early once
no lane is active (one ``any()`` per iteration) and a check records nothing when no element
fails (one ``any()``), on CUDA every loop runs its static bound and every check runs in full.

Scores are differentiable by autograd: the replay folds ``log p(T)`` and the race minima of
``E | T`` race by race with :func:`structdsl.races.fold_race` / ``fold_groups`` (nested plain
races: exit races, :class:`structdsl.races.ExitRaces`), so ``conditional_noise`` is
reparameterised in the logits.

Layout: this module holds :class:`Program` (the public API and the backend contract); the
machine is :mod:`torch_machine` (lane state, errors, stores, statements), with its
expressions in :mod:`torch_exprs` and its races in :mod:`torch_races`; :mod:`torch_graphs`
captures and replays CUDA graphs, :mod:`torch_args` checks the tensor arguments, and
:mod:`torch_ops` holds the small tensor operations they share.
"""
from __future__ import annotations

import collections
import contextlib
import math

import numpy as np
import torch

from structdsl import errors, ir, races
from structdsl.program import Draw, Program as _BaseProgram, Replay
from structdsl.program import Sample, Solution

from .torch_args import TensorArguments
from .torch_graphs import GraphedCalls, _GraphedScore
from .torch_ops import _any
from .torch_machine import _Machine, _render


class Program(TensorArguments, GraphedCalls, _BaseProgram):
    """A spec lowered to batched PyTorch (see :class:`structdsl.program.Program`).

    Same semantics as the other backends, on tensors: every argument may be a
    ``torch.Tensor`` on any device (arrays are converted), results are tensors on the
    logits' device.  ``log_prob`` and ``conditional_noise`` are differentiable in the logits
    by autograd.  ``enumerate`` and the atoms' valid masks come from the reference backend.
    """

    backend = "torch"
    #: replay CUDA graphs of repeated calls on CUDA tensors (see ``_graphed``); set False on
    #: a program to run every call eagerly
    cuda_graphs = True

    def __init__(self, spec, **static_params):
        super().__init__(spec, **static_params)
        from .numpy_reference import Program as Reference
        self.reference = Reference(spec, **static_params)
        self._codes, self._code_of, self._tensors = [], {}, {}
        self._graph_cache = collections.OrderedDict()
        self._plain_races = not any(isinstance(s, ir.GroupRace) for s in ir.walk_statements(self.ir.body))
        # nested and plain: every atom takes part in a prefix of the races, up to its exit race
        self._exit_races = self.ir.nested and self._plain_races

    def numba_twin(self):
        """The same spec compiled for the numba backend (once), or None without numba: the
        CPU fast path of :class:`structdsl.torch.RaceDistribution`."""
        if not hasattr(self, "_numba_twin"):
            import importlib.util
            self._numba_twin = None
            if importlib.util.find_spec("numba") is not None:
                from .numba_backend import Program as Numba
                self._numba_twin = Numba(self.spec, **self.static_params, **self.data)
        return self._numba_twin

    def _code(self, cls, line, message, shape=None):
        """The error code of (class, line, message); ``shape``: the message is a template
        filled in from the lane's values (``{atom}`` unravelled in this atom shape)."""
        key = (cls, line, message, shape)
        if key not in self._code_of:
            self._codes.append(key)
            self._code_of[key] = len(self._codes)
        return self._code_of[key]

    def atom_mask(self, inst, device):
        """The atoms' valid mask, flat ``[A]``, on ``device`` (made once)."""
        key = ("__valid", inst.atom_shape, str(device))
        if key not in self._tensors:
            self._tensors[key] = torch.as_tensor(np.array(inst.valid.reshape(-1)), device=device)
        return self._tensors[key]

    def _tensors_of(self, inst, device):
        """Data parameters and tuple constants as tensors on ``device`` (made once)."""
        key = (inst.atom_shape, str(device))
        if key not in self._tensors:
            arrays = {**self._constant_arrays, **self.data}
            self._tensors[key] = {k: torch.as_tensor(np.array(v), device=device) for k, v in arrays.items()}
        return self._tensors[key]

    # ---- the machine ----------------------------------------------------------------------
    def _machine(self, inst, mode, live, device):
        m = _Machine(self, inst, mode, live, device)
        p = self.ir
        m.static_env = {k: v for k, v in p.static_values(
            {k: v for k, v in inst.params.items() if isinstance(v, int)},
            lambda e, env: ir.static_eval(e, env, p.file)).items()}
        m.loop_vars = {}
        return m

    def _finish(self, err, batch):
        """Raise the first lane's error, ``err`` ``[B, 4]`` the lanes' error codes and the
        values their messages name (see ``_Machine.errors``; one sync per call)."""
        if err.numel() and bool((err[:, 0] > 0).any()):
            lane = int(torch.nonzero(err[:, 0] > 0)[0, 0])
            code, *values = (int(v) for v in err[lane].tolist())
            cls, line, message, shape = self._codes[code - 1]
            if shape is not None:
                message = _render(message, values, shape)
            lane_index = tuple(int(i) for i in np.unravel_index(lane, batch)) if batch else None
            raise getattr(errors, cls)(message, self.ir.file, line, lane_index)

    def _no_trace(self, logp, what):
        """Raise for the first lane whose trace has probability zero (one sync)."""
        if bool(torch.isneginf(logp).any()):
            lane = int(torch.nonzero(torch.isneginf(logp))[0, 0])
            raise ValueError(f"trace (flat batch index {lane}) {what}")

    def _outputs(self, m):
        out = []
        for name in self.ir.outputs:
            v = m.env[name]
            t = m.inst.types.outputs[name]
            shape = tuple(d.value for d in t.shape)
            out.append(v.expand((m.B,) + shape))
        return out

    def _solve_t(self, inst, res, log_space, batch):
        """(trace ``[B, R]``, fields) of the algorithm on residuals ``res`` ``[B, A]``."""
        def body(res):
            device = res.device
            live = self.atom_mask(inst, device) & (res < math.inf)
            m = self._machine(inst, "solve", live, device)
            m.res, m.log_space = res.clone(), log_space
            m.trace = torch.full((m.B, inst.max_races), -1, dtype=torch.int64, device=device)
            with torch.no_grad():
                m.run(self.ir.body)
            return (m.errors(), m.trace, *self._outputs(m))
        err, trace, *fields = self._run_body(("solve", inst.atom_shape, log_space), body, (res.detach(),))
        self._finish(err, batch)
        return trace, fields

    # ---- public API -----------------------------------------------------------------------
    def sample(self, logits, *, sample_shape=(), uniforms=None, seed=None, generator=None):
        """Draw structures: ``log E = log(-log U) - logits`` raced in log space.

        logits: ``[*batch, *atom_shape]`` (float32 or float64, any device); uniforms:
        ``sample_shape + batch + atom_shape`` in (0, 1); or ``seed`` (an int: the Philox
        stream of :mod:`structdsl.philox`, so a seed gives the same sample on every backend); or drawn with
        torch's ``generator`` (its default when none of the three is given).
        Returns :class:`~structdsl.program.Sample` of tensors (trace ``[*lead, max_races]``).
        """
        x, batch, inst = self._logits(logits)
        shape = tuple(sample_shape) + batch + inst.atom_shape
        u = self._uniforms_t(uniforms, generator, shape, x, seed=seed, lane_ndim=self.atom_ndim)
        lead = shape[:len(shape) - self.atom_ndim]
        A = inst.num_atoms
        xb = x.detach().expand(shape).reshape(-1, A)
        live = self.atom_mask(inst, x.device) & ~torch.isneginf(xb)
        log_e = torch.where(live, races.log_race_minimum(u.reshape(-1, A), torch.where(live, xb, 0.0)), math.inf)
        trace, fields = self._solve_t(inst, log_e, True, lead)
        return Sample(trace.reshape(lead + (inst.max_races,)), self._structure_t(fields, lead),
                      log_e.reshape(shape))

    def solve(self, weights):
        """Run the algorithm on raw noise ``weights`` ``[*batch, *atom_shape]`` (+inf excludes)."""
        w = weights if torch.is_tensor(weights) else torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if not torch.is_floating_point(w):
            w = w.double()
        k = self.atom_ndim
        if w.dim() < k:
            raise ValueError(f"{self.ir.name}: weights must have shape {self.expected_shape()}, got {tuple(w.shape)}")
        batch, inst = tuple(w.shape[:w.dim() - k]), self.instance(tuple(w.shape[w.dim() - k:]))
        if w.numel() and bool((torch.isnan(w) | torch.isneginf(w)).any()):
            raise ValueError("weights contain NaN or -inf")
        w = torch.where(self.atom_mask(inst, w.device), w.reshape(-1, inst.num_atoms), math.inf)
        trace, fields = self._solve_t(inst, w, False, batch)
        return Solution(trace.reshape(batch + (inst.max_races,)), self._structure_t(fields, batch))

    def _structure_t(self, fields, lead):
        return self.Structure(*(f.reshape(tuple(lead) + tuple(f.shape[1:])) for f in fields))

    def _replay_t(self, t, x, inst, batch, u=None):
        """(log p ``[B]``, the machine, live atoms) of traces ``t`` ``[B, R]`` under logits
        ``x`` ``[B, A]``; differentiable in ``x``; raises the lanes' first spec error."""
        logp, m, live = self._replay_core(t, x, inst, u)
        self._finish(m.errors(), batch)
        return logp, m, live

    def _replay_core(self, t, x, inst, u=None, members=False):
        device = x.device
        live = self.atom_mask(inst, device) & ~torch.isneginf(x.detach())
        m = self._machine(inst, "replay", live, device)
        m.trace, m.logits, m.u = t, x, u
        m.member_sets = torch.zeros((m.B, inst.max_races, inst.num_atoms), dtype=torch.bool, device=device) \
            if members and not self._exit_races else None
        m.logp = torch.zeros(m.B, dtype=x.dtype, device=device)
        m.log_sum = torch.full((m.B, inst.num_atoms), torch.finfo(x.dtype).min / 4, dtype=x.dtype, device=device)
        m.exit = torch.full((m.B, inst.num_atoms), -1, dtype=torch.int64, device=device) \
            if self._exit_races else None
        with torch.no_grad() if self._exit_races else contextlib.nullcontext():
            m.run(self.ir.body)
        # nested plain races: log p from the exit races in one pass (the machine kept no score)
        m.races = races.ExitRaces(m.exit, inst.max_races) if m.exit is not None else None
        if m.races is not None:
            m.logp = races.log_prob(x, t, m.races)
        # winners the program never asked for
        tail = (torch.arange(inst.max_races, device=device)[None, :] >= m.slot[:, None]) & (t >= 0)
        m.impossible = m.impossible | (_any(tail) & ~m.dead)
        logp = torch.where(m.impossible, -math.inf, m.logp)
        return logp, m, live

    # ---- the backend contract (structdsl.program) on tensors ----------------------------------
    def solve_flat(self, inst, weights, log_space):
        return self._solve_t(inst, weights, log_space, (weights.shape[0],))

    def draw_flat(self, inst, uniforms, logits, check_logits=None):
        live = self.atom_mask(inst, logits.device) & ~torch.isneginf(logits)
        log_e = torch.where(live, races.log_race_minimum(uniforms, torch.where(live, logits, 0.0)), math.inf)
        trace, fields = self.solve_flat(inst, log_e, True)
        return Draw(trace, fields, log_e)

    def replay_flat(self, inst, traces, logits):
        """Exit races for a nested spec with plain races, else member sets ``[B, R, A]``."""
        logp, m, _ = self._replay_core(traces, logits, inst, members=True)
        self._finish(m.errors(), (traces.shape[0],))
        return Replay(logp > -math.inf, m.races if m.races is not None else races.Members(m.member_sets))

    def _score_body(self, inst):
        """``(t, x) -> (err, log p, d log p / dx)`` for a CUDA graph: the replay and its
        backward in one capture (0 gradient where log p is -inf)."""
        def body(t, x):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                logp, m, _ = self._replay_core(t, xg, inst)
                finite = torch.isfinite(logp)
                grad = None
                if logp.requires_grad:              # not when no lane ran a race
                    (grad,) = torch.autograd.grad(torch.where(finite, logp, 0.0).sum(), xg, allow_unused=True)
            grad = torch.zeros_like(x) if grad is None else torch.where(finite[:, None], grad, 0.0)
            return m.errors(), logp.detach(), grad
        return body

    def decode(self, trace, logits):
        """The structure record of ``trace`` (replayed under ``logits``, which say which atoms
        are live); fields ``[*batch, *field_shape]``.  Raises ValueError for an impossible trace."""
        t, x, batch, inst = self._trace(trace, logits)

        def body(t, x):
            with torch.no_grad():
                logp, m, _ = self._replay_core(t, x, inst)
            return (m.errors(), logp, *self._outputs(m))
        err, logp, *fields = self._run_body(("decode", inst.atom_shape), body, (t, x))
        self._finish(err, batch)
        self._no_trace(logp, f"is not a trace of {self.ir.name} under these logits: it has no structure")
        return self._structure_t(fields, batch)

    def log_prob(self, trace, logits):
        """log p(trace), differentiable in the logits; ``-inf`` for impossible traces.
        trace ``[*b1, max_races]``, logits ``[*b2, *atom_shape]``; returns ``[*broadcast(b1, b2)]``."""
        t, x, batch, inst = self._trace(trace, logits)
        if self._graphs_apply(t, x):
            if x.requires_grad and torch.is_grad_enabled():
                # the replay and its backward as one graph; the analytic gradient is the backward
                err, logp, grad = self._graphed(("score", inst.atom_shape), self._score_body(inst), (t, x.detach()))
                self._finish(err, batch)
                eager = lambda x: self._replay_t(t, x, inst, batch)[0]   # noqa: E731
                return _GraphedScore.apply(x, logp, grad, eager).reshape(batch)

            def body(t, x):
                logp, m, _ = self._replay_core(t, x, inst)
                return m.errors(), logp
            err, logp = self._graphed(("log_prob", inst.atom_shape), body, (t, x.detach()))
            self._finish(err, batch)
            return logp.reshape(batch)
        logp, _, _ = self._replay_t(t, x, inst, batch)
        return logp.reshape(batch)

    def log_prob_and_grad(self, trace, logits):
        """``(log p [*batch], d log p / d logits [*batch, *atom_shape])``, the gradient by
        autograd (0 where ``log p`` is ``-inf``); no graph is kept."""
        t, x, batch, inst = self._trace(trace, logits)
        err, logp, grad = self._run_body(("score", inst.atom_shape), self._score_body(inst), (t, x))
        self._finish(err, batch)
        return logp.reshape(batch), grad.reshape(batch + inst.atom_shape)

    def conditional_noise(self, trace, logits, *, uniforms=None, seed=None, generator=None):
        """``E | T``, reparameterised: differentiable in the logits given the uniforms.
        uniforms ``[*batch, max_races + A]`` (race minima first, then the fresh noise), or
        ``seed`` (the reference's draw) or ``generator``, as for :meth:`sample`."""
        t, x, batch, inst = self._trace(trace, logits)
        R, A = inst.max_races, inst.num_atoms
        u = self._uniforms_t(uniforms, generator, batch + (R + A,), x, seed=seed).reshape(-1, R + A)

        def body(t, x, u):
            logp, m, live = self._replay_core(t, x, inst, u)
            if m.races is not None:
                noise = races.noise_given_trace(x, t, m.races, u, live)
            else:                          # the machine summed the race minima as it replayed
                noise = races.noise_from_sums(x, t, m.log_sum, u, live)
            return m.errors(), logp, noise
        # without a gradient to carry, E | T is one more replay (differentiable: eager)
        err, logp, noise = self._run_body(("noise", inst.atom_shape), body, (t, x, u),
                                          graphs=not (x.requires_grad and torch.is_grad_enabled()))
        self._finish(err, batch)
        self._no_trace(logp, "has probability zero under these logits: there is no noise that produces it")
        return noise.reshape(batch + inst.atom_shape)
