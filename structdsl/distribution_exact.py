"""The exact law of a :class:`structdsl.torch.RaceDistribution` at small sizes: its support
(every trace, by the reference's enumeration), the exact entropy of the trace law, and the
algorithm's output on noise-free weights (``argmax``).  A mixin of ``RaceDistribution``."""
from __future__ import annotations

import math

import numpy as np
import torch

from .eager import eager
from .errors import EnumerationLimitError
from .program import Solution, naming_lanes


class SupportTooLarge(EnumerationLimitError, NotImplementedError):
    """:meth:`RaceDistribution.entropy` needs the support enumerated and it is too large
    (an :class:`~structdsl.errors.EnumerationLimitError`, and a ``NotImplementedError`` as
    ``torch.distributions`` raise for an entropy they do not have)."""


class ExactLaw:
    """Enumeration, entropy and argmax of :class:`structdsl.torch.RaceDistribution`."""

    @eager
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

    @eager
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

    @eager
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

    @eager
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
