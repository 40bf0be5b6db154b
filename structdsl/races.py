"""The mathematics of exponential races, written once (docs/design.md §1 and §4.2).

Every quantity the library derives from a replayed trace is defined here, over the replay's
output, for NumPy arrays and torch tensors alike (the functions only use operations both
have, through :func:`ops`; on tensors they are differentiable, twice, in the logits):

* :func:`log_prob` -- ``log p(T) = sum_r x[w_r] - logsumexp(x[M_r])``;
* :func:`trace_score` -- its gradient in the logits, ``[i won] - sum_{r: i in M_r} softmax(x[M_r])_i``;
* :func:`noise_given_trace` -- ``E | T``: atom ``i`` gets the sum of the minima of the races
  it ran in, ``m_r = -log(U_r) / sum(exp(x[M_r]))``, plus a fresh ``Exp(exp(x_i))`` unless it won;
* :func:`noise_log_prob`, :func:`noise_score` -- the density of the noise and its gradient
  (E-REINFORCE's score);
* :func:`exact_probability` -- ``p(T)`` in exact rationals (enumeration with integer rates).

A replay reports each race's member set in one of two compact forms (the backend contract,
:mod:`structdsl.program`): *member sets* ``members[B, R, A]`` (race ``r``'s members; a grouped
race takes one slot per group), or, for a nested spec with plain races, *exit races*
``exit_race[B, A]``: atom ``i`` ran in races ``0 .. exit_race[i]`` (-1: none), so race ``r``'s
members are the atoms whose exit race is ``>= r``.  :func:`race_log_rates` and
:func:`sum_over_races` are the two operations that depend on the form; everything else is
written once on top of them.  A backend that streams races one at a time (the torch machine)
calls the per-race pieces, :func:`masked_logsumexp` and :func:`log_race_minimum`.

Numerics: log space throughout (rates ``exp(x)`` of logits far apart would overflow), and
where a quantity is empty a finite stand-in ``tiny`` (a quarter of the dtype's most negative
value) replaces ``-inf``, so that every derivative is free of NaN; ``exp(tiny) == 0``.

Shapes: ``x`` logits ``[B, A]`` (``-inf`` at atoms that cannot race), ``trace`` int64 ``[B, R]``
(-1 after the last race), ``live`` bool ``[B, A]``, ``u`` uniforms ``[B, R + A]`` (the race
minima's first, then the fresh noise of each atom).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


class _NumPyOps:
    """The operations the formulas need, on NumPy arrays."""
    where, log, exp, logaddexp = (staticmethod(f) for f in (np.where, np.log, np.exp, np.logaddexp))
    isneginf, isfinite, expm1 = (staticmethod(f) for f in (np.isneginf, np.isfinite, np.expm1))

    @staticmethod
    def tiny(x):
        return np.finfo(x.dtype).min / 4

    @staticmethod
    def logsumexp(x, axis):
        top = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
        top = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            return np.log(np.sum(np.exp(x - top), axis=axis)) + np.squeeze(top, axis)

    @staticmethod
    def take(x, index):                   # x[b, index[b, j]]
        return np.take_along_axis(x, index, axis=1)

    @staticmethod
    def mark(shape, index, ok):
        """bool ``shape`` ``[B, A]``, True at ``index[b, j]`` where ``ok[b, j]``."""
        out = np.zeros(shape, dtype=bool)
        rows = np.nonzero(ok)
        out[rows[0], index[rows]] = True
        return out

    @staticmethod
    def segment(values, bucket, n, how):
        """Per row, reduce ``values[b, a]`` into ``n`` buckets ``bucket[b, a]`` (``how``:
        "max" or "sum"); empty buckets: ``-inf`` / 0."""
        B = values.shape[0]
        rows = np.broadcast_to(np.arange(B)[:, None], values.shape)
        if how == "max":
            out = np.full((B, n), -np.inf, dtype=values.dtype)
            np.maximum.at(out, (rows, bucket), values)
        else:
            out = np.zeros((B, n), dtype=values.dtype)
            np.add.at(out, (rows, bucket), values)
        return out

    @staticmethod
    def full(shape, value, like):
        return np.full(shape, value, dtype=like.dtype)

    @staticmethod
    def constant(x):                       # no gradient to stop
        return x

    @staticmethod
    def stack(xs, axis):
        return np.stack(xs, axis)

    @staticmethod
    def concat(xs, axis):
        return np.concatenate(xs, axis)


class _TorchOps:
    """The same operations on torch tensors (differentiable)."""

    def __init__(self):
        import torch
        self.torch = torch
        self.where, self.log, self.exp, self.logaddexp = torch.where, torch.log, torch.exp, torch.logaddexp
        self.isneginf, self.isfinite, self.expm1 = torch.isneginf, torch.isfinite, torch.expm1

    def tiny(self, x):
        return self.torch.finfo(x.dtype).min / 4

    def logsumexp(self, x, axis):
        return self.torch.logsumexp(x, axis)

    def take(self, x, index):
        return x.gather(1, index)

    def mark(self, shape, index, ok):
        B, A = shape
        out = self.torch.zeros((B, A + 1), dtype=self.torch.bool, device=index.device)
        return out.scatter(1, self.torch.where(ok, index, A), True)[:, :A]   # A: a spare column

    def segment(self, values, bucket, n, how):
        B = values.shape[0]
        if how == "max":
            out = self.torch.full((B, n), -math.inf, dtype=values.dtype, device=values.device)
            return out.scatter_reduce(1, bucket, values, "amax")
        return self.torch.zeros((B, n), dtype=values.dtype, device=values.device).scatter_add(1, bucket, values)

    def full(self, shape, value, like):
        return self.torch.full(shape, value, dtype=like.dtype, device=like.device)

    def constant(self, x):
        """``x`` without its gradient (a shift that only keeps exponentials in range)."""
        return x.detach()

    def stack(self, xs, axis):
        return self.torch.stack(xs, axis)

    def concat(self, xs, axis):
        return self.torch.cat(xs, axis)


_NUMPY = _NumPyOps()
_TORCH = None


def ops(x):
    """The operations for ``x``'s kind of array (torch is imported only for a tensor)."""
    global _TORCH
    if isinstance(x, np.ndarray):
        return _NUMPY
    if _TORCH is None:
        _TORCH = _TorchOps()
    return _TORCH


# ---- one race ------------------------------------------------------------------------------
def masked_logsumexp(x, mask, axis=-1):
    """``logsumexp`` of ``x`` over ``axis`` restricted to ``mask`` (``tiny`` where empty):
    the log of a race's total rate when ``x`` are its atoms' logits."""
    o = ops(x)
    return o.logsumexp(o.where(mask, x, o.tiny(x)), axis)


def log_race_minimum(u, log_rate):
    """``log m`` of a race's minimum ``m = -log(u) / rate`` (``Exp(rate)``, reparameterised)."""
    o = ops(log_rate)
    return o.log(-o.log(u)) - log_rate


def fold_race(x, mask, winner, raced, logp, log_sum=None, u_race=None):
    """One race, for a backend that replays races one at a time (the torch machine):
    ``mask`` ``[B, A]`` its members, ``winner`` ``[B]``, ``raced`` ``[B]`` the lanes that ran
    it.  Returns ``logp + (x[winner] - log total rate)`` and, with ``log_sum`` ``[B, A]`` and
    the race's uniforms ``u_race`` ``[B]``, ``log_sum`` with ``log m_r`` added at the members
    (the running sums of race minima that :func:`noise_from_sums` completes)."""
    o = ops(x)
    m = mask & raced[:, None]
    lse = masked_logsumexp(x, m)
    logp = logp + o.where(raced, o.take(x, winner[:, None])[:, 0] - lse, 0.0)
    if log_sum is not None:
        log_min = log_race_minimum(u_race, o.where(raced, lse, 0.0))
        log_sum = o.logaddexp(log_sum, o.where(m, log_min[:, None], o.tiny(x)))
    return logp, log_sum


def fold_groups(x, col, G, winner, present, logp, log_sum=None, u_groups=None):
    """Every group of a grouped race at once (segment reductions by key): atom ``a`` is in
    group ``col[b, a] - 1`` (``col`` 0: no group), ``winner`` ``[B, G]``, ``present``
    ``[B, G]`` the groups that ran; ``u_groups`` ``[B, G]`` their uniforms.  As
    :func:`fold_race`, one race per present group."""
    o = ops(x)
    member = col > 0
    xd = o.constant(x)
    shift = o.segment(o.where(member, xd, -math.inf), col, G + 1, "max")
    shift = o.where(o.isfinite(shift), shift, 0.0)
    e = o.exp(o.where(member, x - o.take(shift, col), -math.inf))        # no inf * 0 in a backward
    total = o.segment(e, col, G + 1, "sum")[:, 1:]
    lse = o.log(o.where(present, total, 1.0)) + shift[:, 1:]               # [B, G]
    logp = logp + o.where(present, o.take(x, winner) - lse, 0.0).sum(1)
    if log_sum is not None:
        tiny = o.tiny(x)
        log_min = o.where(present, log_race_minimum(u_groups, lse), tiny)
        log_min = o.concat([o.full((log_min.shape[0], 1), tiny, log_min), log_min], 1)   # column 0: no group
        log_sum = o.logaddexp(log_sum, o.where(member, o.take(log_min, col), tiny))
    return logp, log_sum


# ---- the two forms of a replay's member sets ------------------------------------------------
class _Form:
    """What both forms share: :meth:`race_log_rates` is remembered for the last logits it
    was asked about (log p and ``E | T`` of one replay both need it)."""
    _seen = None

    def race_log_rates(self, x):
        """``[B, R]``: the log total rate of each race's members (``tiny`` for an unused slot)."""
        if self._seen is None or self._seen[0] is not x:
            self._seen = (x, self._race_log_rates(x))
        return self._seen[1]


class Members(_Form):
    """Race ``r``'s member set as a mask, ``members`` bool ``[B, R, A]``."""

    def __init__(self, members):
        self.members = members

    def _race_log_rates(self, x):
        return masked_logsumexp(x[:, None, :], self.members)

    def sum_over_races(self, log_v):
        """``[B, A]``: per atom, ``log sum_{r: atom in M_r} exp(log_v[r])`` (``tiny`` if none)."""
        o = ops(log_v)
        tiny = o.tiny(log_v)
        ran = self.members.any(1)
        return o.where(ran, o.logsumexp(o.where(self.members, log_v[:, :, None], tiny), 1), tiny)

    def softmax_sum(self, x, lse):
        """``[B, A]``: ``sum_{r: i in M_r} softmax(x[M_r])_i`` (the trace score's second term)."""
        o = ops(x)
        # exp only where a member: an unused slot's lse is tiny, and exp(-tiny) would overflow
        share = o.exp(o.where(self.members, x[:, None, :] - lse[:, :, None], o.tiny(x)))
        return share.sum(1)


class ExitRaces(_Form):
    """Nested plain races: atom ``i`` ran in races ``0 .. exit_race[i]`` (``-1``: none)."""

    def __init__(self, exit_race, R):
        self.exit_race, self.R = exit_race, R

    @classmethod
    def from_members(cls, members):
        """The exit races of NumPy member sets ``[B, R, A]`` whose races only shrink (a nested
        spec's plain races): each atom's last race, -1 if it ran in none."""
        B, R, A = members.shape
        last = np.full((B, A), -1, dtype=np.int64)
        if R:
            last = np.where(members.any(1), R - 1 - np.argmax(members[:, ::-1, :], axis=1), -1)
        return cls(last, R)

    def _buckets(self, x):
        o = ops(x)
        return o.where(self.exit_race >= 0, self.exit_race, self.R)            # R: no race

    def _race_log_rates(self, x):
        """Race ``r``'s members are the atoms whose exit race is ``>= r``: a suffix log-sum
        over the per-exit-race log-sums (one pass over the atoms, not one per race)."""
        o = ops(x)
        R = self.R
        if R == 0:
            return x[:, :0]
        tiny = o.tiny(x)
        bucket = self._buckets(x)
        xd = o.constant(x)
        shift = o.segment(xd, bucket, R + 1, "max")
        shift = o.where(o.isfinite(shift), shift, 0.0)
        total = o.segment(o.exp(x - o.take(shift, bucket)), bucket, R + 1, "sum")
        full = total > 0
        per_exit = o.where(full, o.log(o.where(full, total, 1.0)) + shift, tiny)[:, :R]
        return _cumulative_logsumexp(per_exit, reverse=True)

    def sum_over_races(self, log_v):
        o = ops(log_v)
        if self.R == 0:                            # no race ran
            return o.full(self.exit_race.shape, o.tiny(log_v), log_v)
        prefix = _cumulative_logsumexp(log_v)                                     # [B, R]
        at = o.take(prefix, o.where(self.exit_race >= 0, self.exit_race, 0))
        return o.where(self.exit_race >= 0, at, o.tiny(log_v))

    def softmax_sum(self, x, lse):
        """``sum_{r <= exit(i)} exp(x_i - lse_r)`` = ``exp(x_i) * sum_{r <= exit(i)} exp(-lse_r)``."""
        o = ops(x)
        s = self.sum_over_races(-lse)
        return o.where(self.exit_race >= 0, o.exp(o.where(self.exit_race >= 0, x, 0.0) + s), 0.0)


def _cumulative_logsumexp(x, reverse=False):
    """Running ``logaddexp`` along axis 1 (``R`` columns: a handful of ops each)."""
    o = ops(x)
    cols = [x[:, r] for r in range(x.shape[1])]
    order = range(len(cols) - 1, -1, -1) if reverse else range(len(cols))
    acc, out = None, [None] * len(cols)
    for r in order:
        acc = cols[r] if acc is None else o.logaddexp(acc, cols[r])
        out[r] = acc
    return o.stack(out, 1)


# ---- a trace ---------------------------------------------------------------------------------
def log_prob(x, trace, races, possible=None):
    """``log p(T)`` ``[B]``: the sum over the races run of ``x[winner] - log total rate``;
    ``-inf`` where ``possible`` (bool ``[B]``, the replay's verdict) is False."""
    o = ops(x)
    used = trace >= 0
    lse = races.race_log_rates(x)
    gain = o.take(x, o.where(used, trace, 0)) - lse
    logp = o.where(used, gain, 0.0).sum(1)
    return logp if possible is None else o.where(possible, logp, -math.inf)


def trace_score(x, trace, races, possible=None):
    """``d log p(T) / d x`` ``[B, A]`` in closed form: ``[i won a race] - sum over the races
    ``r`` with ``i`` in ``M_r`` of ``softmax(x[M_r])_i``; 0 where ``possible`` is False."""
    o = ops(x)
    used = trace >= 0
    lse = races.race_log_rates(x)
    won = o.mark(x.shape, o.where(used, trace, 0), used)
    grad = o.where(won, 1.0, 0.0) - races.softmax_sum(x, lse)
    return grad if possible is None else o.where(possible[:, None], grad, 0.0)


def noise_given_trace(x, trace, races, u, live):
    """``E | T`` ``[B, A]`` (``+inf`` at atoms that cannot race), reparameterised by the
    uniforms ``u`` ``[B, R + A]``: differentiable, twice, in ``x`` on tensors."""
    o = ops(x)
    R = trace.shape[1]
    used = trace >= 0
    lse = races.race_log_rates(x)
    log_min = o.where(used, log_race_minimum(u[:, :R], o.where(used, lse, 0.0)), o.tiny(x))
    return noise_from_sums(x, trace, races.sum_over_races(log_min), u, live)


def noise_from_sums(x, trace, log_sum, u, live):
    """``E | T`` from each atom's log-sum of the minima of the races it ran in (``tiny``:
    none): plus a fresh ``Exp(exp(x))`` (uniform ``u[:, R + i]``) for an atom that never won."""
    o = ops(x)
    R = trace.shape[1]
    used = trace >= 0
    won = o.mark(x.shape, o.where(used, trace, 0), used)
    fresh = live & ~won
    log_fresh = o.where(fresh, log_race_minimum(u[:, R:], o.where(fresh, x, 0.0)), o.tiny(x))
    log_noise = o.logaddexp(log_sum, log_fresh)
    return o.where(live, o.exp(o.where(live, log_noise, 0.0)), math.inf)


# ---- the noise ------------------------------------------------------------------------------
def noise_log_prob(x, noise, live):
    """``log`` density of independent ``Exp(exp(x))`` noise, summed over the last axis's live
    atoms (``[B, A]`` -> ``[B]``)."""
    o = ops(x)
    xl = o.where(live, x, 0.0)
    return o.where(live, xl - o.exp(xl) * o.where(live, noise, 0.0), 0.0).sum(-1)


def noise_score(x, log_noise):
    """``d/dx log p(E)`` at ``E = exp(log_noise)``: ``1 - exp(x) E``, 0 where nothing races
    (``log_noise`` not finite)."""
    o = ops(x)
    ok = o.isfinite(log_noise)
    return o.where(ok, -o.expm1(o.where(ok, x, 0.0) + o.where(ok, log_noise, 0.0)), 0.0)


def exact_probability(weights, trace, members):
    """``p(T)`` as a ``Fraction`` from exact rates ``weights`` (object ``[A]``) and one
    trace's member sets (bool ``[R, A]``): the product over its races of the winner's rate
    over the members' total."""
    p = Fraction(1)
    for w, m in zip(trace, members):
        if w < 0:
            break
        p = p * weights[w] / sum(weights[m])
    return p
