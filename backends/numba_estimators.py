"""Native kernels of the estimators' CPU fast path (spec-independent: they see a trace only
through its races' member sets).

``weigh_scores`` turns a draw's trace scores into T-REINFORCE's estimate; ``relax_mlp`` is
RELAX with the default critic (:class:`structdsl.estimators.MLPCritic`,
``c(z) = w2 . tanh(W1 z + b1) + b2``) in closed form; the derivation is in the docstring of
``structdsl.estimators._NativeRelax``, and tests hold it to the autograd path.
"""
import math

import numpy as np
from numba import njit

from .numba_kernels import _logaddexp


@njit(cache=True)
def weigh_scores(losses, grad, loo):
    """T-REINFORCE's estimate from the draw's trace scores: ``losses`` ``[K, nb]`` (sample
    ``k`` of batch element ``b``), ``grad`` ``[K * nb, A]`` (row ``k * nb + b``: the score
    of that sample's trace).  Returns ``(G [nb, A], mean loss, finite)``: ``G_b = sum_k
    w[k, b] grad[k * nb + b] / (K nb)`` with ``w = f`` or, with ``loo``, the leave-one-out
    advantage ``f_k - mean_{j != k} f_j = (K f_k - sum_j f_j) / (K - 1)``; ``finite`` is
    False if a loss is NaN or infinite (or their sum overflows)."""
    K, nb = losses.shape
    A = grad.shape[1]
    n = K * nb
    total = 0.0
    for k in range(K):
        for b in range(nb):
            total += losses[k, b]
    G = np.zeros((nb, A))
    if n == 0:
        return G, np.nan, True
    finite = math.isfinite(total)
    for b in range(nb):
        s = 0.0
        for k in range(K):
            s += losses[k, b]
        for k in range(K):
            w = (K * losses[k, b] - s) / ((K - 1) * n) if loo else losses[k, b] / n
            if w != 0.0:
                row = k * nb + b
                for a in range(A):
                    G[b, a] += w * grad[row, a]
    return G, total / n, finite


@njit(cache=True)
def _member_lists(members, ptr, idx):
    """One lane's member sets ``members`` ``[R, A]`` as lists: race ``r``'s members are
    ``idx[ptr[r]:ptr[r + 1]]`` in increasing order (one sequential pass over the bools)."""
    R, A = members.shape
    n = 0
    for r in range(R):
        ptr[r] = n
        for a in range(A):
            if members[r, a]:
                idx[n] = a
                n += 1
    ptr[R] = n


@njit(cache=True)
def _race_weights(ptr, idx, x, lse, log_m, log_et, live, P, rho):
    """The lane's ``P[r, a] = exp(x_a - lse_r)`` and ``rho[r, a] = m_r / E~_a`` (0 where
    ``m_r = 0`` or ``a`` cannot race) at its members, in the order of ``idx``."""
    R = lse.size
    for r in range(R):
        for n in range(ptr[r], ptr[r + 1]):
            a = idx[n]
            P[n] = math.exp(x[a] - lse[r]) if lse[r] > -np.inf else 0.0
            rho[n] = math.exp(log_m[r] - log_et[a]) if (live[a] and log_m[r] > -np.inf) else 0.0


@njit(cache=True)
def _apply(ptr, idx, left, right, phi, v, y, out):
    """``out = (left^T right + diag(phi))^T v`` for member-list matrices ``left``, ``right``
    (values at the members, in the order of ``idx``): ``y_r = sum_{a in M_r} left[r, a] v_a``,
    then ``out_b = phi_b v_b + sum_{r: b in M_r} right[r, b] y_r``.  With ``(left, right) =
    (rho, P)`` it is ``J^T v``, with ``(P, rho)`` it is ``J v``, for ``J = rho^T P + diag(phi)``.
    Sums run in increasing ``a`` and ``r``, as over the dense matrices."""
    R = y.size
    for r in range(R):
        acc = 0.0
        for n in range(ptr[r], ptr[r + 1]):
            acc += left[n] * v[idx[n]]
        y[r] = acc
    for b in range(out.size):
        out[b] = phi[b] * v[b]
    for r in range(R):
        for n in range(ptr[r], ptr[r + 1]):
            out[idx[n]] += right[n] * y[r]


@njit(cache=True)
def _exit_races(members, exit_race):
    """``(nested, count)``: whether one lane's member sets ``members`` ``[R, A]`` are nested
    (every atom ran in races ``0 .. exit_race[a]`` and no other; -1: none), writing
    ``exit_race`` ``[A]``, and how many memberships there are."""
    R, A = members.shape
    exit_race[:] = -1
    count = 0
    for r in range(R):
        for a in range(A):
            if members[r, a]:
                exit_race[a] = r
                count += 1
    total = 0
    for a in range(A):
        total += exit_race[a] + 1
    return total == count, count


@njit(cache=True)
def _exit_lse(exit_race, x, lse, bucket):
    """``lse_r = log sum_{a: exit_race[a] >= r} exp(x_a)`` ``[R]`` (-inf: no member), as a
    suffix log-sum over the atoms' exit races (``bucket``: scratch ``[R]``)."""
    R = lse.size
    bucket[:] = -np.inf
    for a in range(exit_race.size):
        if exit_race[a] >= 0 and x[a] > bucket[exit_race[a]]:
            bucket[exit_race[a]] = x[a]
    top = -np.inf
    for r in range(R - 1, -1, -1):                # the largest logit of each race's members
        top = max(top, bucket[r])
        lse[r] = top
    bucket[:] = 0.0
    for a in range(exit_race.size):
        e = exit_race[a]
        if e >= 0:
            bucket[e] += math.exp(x[a] - lse[e])
    acc = 0.0
    for r in range(R - 1, -1, -1):
        if lse[r] == -np.inf:
            continue
        if r + 1 < R and lse[r + 1] > -np.inf:
            acc *= math.exp(lse[r + 1] - lse[r])      # rescale the later races' sum
        else:
            acc = 0.0
        acc += bucket[r]
        bucket[r] = acc                               # sum_{a in M_r} exp(x_a - top_r)
    for r in range(R):
        if lse[r] > -np.inf:
            lse[r] += math.log(bucket[r])


@njit(cache=True)
def _exit_jt(exit_race, live, x, lse, log_m, log_cum, log_et, phi, v, y, out):
    """``out = J^T v`` for nested races (``J = rho^T P + diag(phi)``, see ``_apply``) in
    ``O(A + R)``: ``y_r = m_r sum_{a in M_r} v_a / E~_a`` as a suffix sum, then
    ``out_b = phi_b v_b + sum_{r <= exit(b)} exp(x_b - lse_r) y_r`` as a prefix sum; every
    factor is at most 1 (``log_cum``: the log of the running sum of the race minima)."""
    R = y.size
    y[:] = 0.0
    for a in range(x.size):
        e = exit_race[a]
        if e >= 0 and live[a] and log_cum[e] > -np.inf:
            y[e] += math.exp(log_cum[e] - log_et[a]) * v[a]
    acc = 0.0
    for r in range(R - 1, -1, -1):                # T_r = sum_{exit >= r} exp(log_cum_r - log_et) v
        if log_cum[r] == -np.inf:
            y[r] = 0.0
            acc = 0.0
            continue
        if r + 1 < R and log_cum[r + 1] > -np.inf:
            acc *= math.exp(log_cum[r] - log_cum[r + 1])
        else:
            acc = 0.0
        acc += y[r]
        y[r] = math.exp(log_m[r] - log_cum[r]) * acc if log_m[r] > -np.inf else 0.0
    acc = 0.0
    for r in range(R):                            # Q_r = sum_{r' <= r} exp(lse_r - lse_r') y_r'
        if lse[r] == -np.inf:
            acc = 0.0
        else:
            if r > 0 and lse[r - 1] > -np.inf:
                acc *= math.exp(lse[r] - lse[r - 1])
            acc += y[r]
        y[r] = acc
    for b in range(x.size):
        e = exit_race[b]
        out[b] = phi[b] * v[b]
        if e >= 0 and lse[e] > -np.inf:
            out[b] += math.exp(x[b] - lse[e]) * y[e]


@njit(cache=True)
def _exit_jv(exit_race, live, x, lse, log_m, log_cum, log_et, phi, v, y, out):
    """``out = J v`` for nested races in ``O(A + R)`` (the transpose of :func:`_exit_jt`):
    ``y_r = sum_{b in M_r} exp(x_b - lse_r) v_b`` as a suffix sum, then ``out_a = phi_a v_a +
    sum_{r <= exit(a)} (m_r / E~_a) y_r`` as a prefix sum."""
    R = y.size
    y[:] = 0.0
    for b in range(x.size):
        e = exit_race[b]
        if e >= 0 and lse[e] > -np.inf:
            y[e] += math.exp(x[b] - lse[e]) * v[b]
    acc = 0.0
    for r in range(R - 1, -1, -1):
        if lse[r] == -np.inf:
            y[r] = 0.0
            acc = 0.0
            continue
        if r + 1 < R and lse[r + 1] > -np.inf:
            acc *= math.exp(lse[r + 1] - lse[r])
        else:
            acc = 0.0
        acc += y[r]
        y[r] = acc
    acc = 0.0
    for r in range(R):                            # V_r = sum_{r' <= r} exp(log_m_r' - log_cum_r) y_r'
        if log_cum[r] == -np.inf:
            acc = 0.0
        else:
            if r > 0 and log_cum[r - 1] > -np.inf:
                acc *= math.exp(log_cum[r - 1] - log_cum[r])
            if log_m[r] > -np.inf:
                acc += math.exp(log_m[r] - log_cum[r]) * y[r]
        y[r] = acc
    for a in range(x.size):
        e = exit_race[a]
        out[a] = phi[a] * v[a]
        if e >= 0 and live[a] and log_cum[e] > -np.inf:
            out[a] += math.exp(log_cum[e] - log_et[a]) * y[e]


@njit(cache=True)
def _lane_races(nested, members, x, trace, u, ptr, idx, exit_race, bucket, lse, log_m, log_cum):
    """One lane's races, from its exit races (``nested``, see :func:`_exit_races`) or else
    its member sets (their lists go to ``ptr``/``idx``, which must hold them all): each
    race's log total rate ``lse``, the log of its minimum ``log_m`` (``m_r = -log u_r /
    exp(lse_r)``; -inf for a race not run) and the running log-sum of the minima ``log_cum``."""
    R = lse.size
    if nested:
        _exit_lse(exit_race, x, lse, bucket)
    else:
        _member_lists(members, ptr, idx)
        for r in range(R):
            top = -np.inf
            for n in range(ptr[r], ptr[r + 1]):
                if x[idx[n]] > top:
                    top = x[idx[n]]
            if top == -np.inf:
                lse[r] = -np.inf
                continue
            acc = 0.0
            for n in range(ptr[r], ptr[r + 1]):
                acc += math.exp(x[idx[n]] - top)
            lse[r] = top + math.log(acc)
    acc = -np.inf
    for r in range(R):
        log_m[r] = math.log(-math.log(u[r])) - lse[r] if (trace[r] >= 0 and lse[r] > -np.inf) else -np.inf
        acc = _logaddexp(acc, log_m[r])
        log_cum[r] = acc


@njit(cache=True)
def _critic(W1, b1, w2, b2, z_e, z_t, h_e, h_t, gz_e, gz_t):
    """The default critic ``c(z) = w2 . tanh(W1 z + b1) + b2`` at ``z`` (``z_e``) and ``z~``
    (``z_t``): fills the hidden activations ``h_e``, ``h_t`` ``[H]`` and the input gradients
    ``gz_e``, ``gz_t`` ``[A]``; returns ``c(z~)``."""
    H, A = W1.shape
    c_t = b2
    for j in range(H):
        pe = b1[j]
        pt = b1[j]
        for a in range(A):
            pe += W1[j, a] * z_e[a]
            pt += W1[j, a] * z_t[a]
        h_e[j] = math.tanh(pe)
        h_t[j] = math.tanh(pt)
        c_t += w2[j] * h_t[j]
    gz_e[:] = 0.0
    gz_t[:] = 0.0
    for j in range(H):
        ke = w2[j] * (1.0 - h_e[j] ** 2)
        kt = w2[j] * (1.0 - h_t[j] ** 2)
        for a in range(A):
            gz_e[a] += ke * W1[j, a]
            gz_t[a] += kt * W1[j, a]
    return c_t


@njit(cache=True)
def relax_mlp(x, live, members, trace, score, losses, log_noise, u, W1, b1, w2, b2, K):
    """One RELAX estimate per lane (lane ``l = k * nb + b``: sample ``k`` of batch element
    ``b``), averaged over the ``K`` samples of each element.

    x, live, score, log_noise: ``[L, A]`` (logits, live mask, d log p(T)/dx, log E);
    members ``[L, R, A]``; trace ``[L, R]``; losses ``[L]`` (the coefficient of the score:
    the losses, or their leave-one-out advantages); u ``[L, R + A]`` (uniforms of E | T, as
    ``conditional_noise`` takes them); W1 ``[H, A]``, b1 ``[H]``, w2 ``[H]``, b2 a float.
    Returns ``(G [nb, A], gW1, gb1, gw2, gb2)``: ``G`` each element's estimate and the
    gradient of the critic loss ``sum_b |G_b|^2 / nb`` in the critic's parameters.  A
    non-finite ``G`` is returned as is (the caller raises).

    Cost: batch elements one at a time, so memory is ``O(K (A + R + H))`` beyond the inputs
    (no ``[L, R, A]`` float array).  A lane whose member sets are nested (a nested spec's
    plain races: each atom runs in a prefix of the races) has its Jacobian products as
    prefix and suffix sums over its atoms' exit races, ``O(A + R)``; any other lane visits
    its races' members only (member lists).  With the critic's ``O(H A)``, a lane costs
    ``O(R A / 8 + H A)`` (the first term one pass over the member bools)."""
    L, R, A = members.shape
    H = b1.size
    nb = L // K
    G = np.zeros((nb, A))
    alpha = 2.0 / (nb * K)
    gW1 = np.zeros((H, A))
    gb1 = np.zeros(H)
    gw2 = np.zeros(H)
    gb2 = 0.0
    # per element: its K lanes' state (what the critic-loss gradient needs, after G_b)
    z_e = np.zeros((K, A))
    z_t = np.zeros((K, A))
    phi = np.zeros((K, A))
    log_et = np.zeros((K, A))
    exit_race = np.empty((K, A), np.int64)
    nested = np.zeros(K, np.bool_)
    lse = np.empty((K, R))
    log_m = np.empty((K, R))
    log_cum = np.empty((K, R))
    h_e = np.empty((K, H))
    h_t = np.empty((K, H))
    g = np.zeros((K, A))
    ptr = np.empty(R + 1, np.int64)
    idx = np.empty(0, np.int64)             # member lists of a lane that is not nested (grown on demand)
    P = np.empty(0)
    rho = np.empty(0)
    bucket = np.empty(R)
    won = np.zeros(A, np.bool_)
    log_s = np.empty(A)
    gz_e = np.empty(A)
    gz_t = np.empty(A)
    y = np.empty(R)
    jt = np.empty(A)
    d_t = np.empty(A)
    for b in range(nb):
        for k in range(K):
            l = k * nb + b
            nested[k], count = _exit_races(members[l], exit_race[k])
            if not nested[k] and count > idx.size:
                idx, P, rho = np.empty(count, np.int64), np.empty(count), np.empty(count)
            # E | T: race r's minimum m_r = -log u_r / sum of its members' rates (log space)
            _lane_races(nested[k], members[l], x[l], trace[l], u[l], ptr, idx, exit_race[k], bucket,
                        lse[k], log_m[k], log_cum[k])
            won[:] = False
            for r in range(R):
                if trace[l, r] >= 0:
                    won[trace[l, r]] = True
            if nested[k]:                              # the minima of races 0 .. exit(a)
                for a in range(A):
                    log_s[a] = log_cum[k, exit_race[k, a]] if exit_race[k, a] >= 0 else -np.inf
            else:
                log_s[:] = -np.inf
                for r in range(R):                     # each atom's races in increasing order
                    for n in range(ptr[r], ptr[r + 1]):
                        log_s[idx[n]] = _logaddexp(log_s[idx[n]], log_m[k, r])
            for a in range(A):
                z_t[k, a] = 0.0
                z_e[k, a] = 0.0
                phi[k, a] = 0.0
                log_et[k, a] = 0.0
                if not live[l, a]:
                    continue
                log_f = -np.inf if won[a] else math.log(-math.log(u[l, R + a])) - x[l, a]
                log_et[k, a] = _logaddexp(log_s[a], log_f)
                z_t[k, a] = -log_et[k, a]
                z_e[k, a] = -log_noise[l, a]
                if log_f > -np.inf:
                    phi[k, a] = math.exp(log_f - log_et[k, a])
            c_t = _critic(W1, b1, w2, b2, z_e[k], z_t[k], h_e[k], h_t[k], gz_e, gz_t)
            # g = (f - c(z~)) score + d c(z) - J^T grad c(z~)
            if nested[k]:
                _exit_jt(exit_race[k], live[l], x[l], lse[k], log_m[k], log_cum[k], log_et[k], phi[k],
                         gz_t, y, jt)
            else:
                _race_weights(ptr, idx, x[l], lse[k], log_m[k], log_et[k], live[l], P, rho)
                _apply(ptr, idx, rho, P, phi[k], gz_t, y, jt)
            for a in range(A):
                g[k, a] = (losses[l] - c_t) * score[l, a] + (gz_e[a] if live[l, a] else 0.0) - jt[a]
        for k in range(K):
            for a in range(A):
                G[b, a] += g[k, a] / K
        # the critic loss's gradient: (2 / (nb K)) sum_l G_b . d g_l / d params
        v = G[b]
        for k in range(K):
            l = k * nb + b
            beta = 0.0
            for a in range(A):
                beta += v[a] * score[l, a]
            beta *= -alpha                                  # coefficient of d c(z~)
            gb2 += beta
            # the direction z~ moves in (z moves by v)
            if nested[k]:
                _exit_jv(exit_race[k], live[l], x[l], lse[k], log_m[k], log_cum[k], log_et[k], phi[k],
                         v, y, d_t)
            else:
                _member_lists(members[l], ptr, idx)
                _race_weights(ptr, idx, x[l], lse[k], log_m[k], log_et[k], live[l], P, rho)
                _apply(ptr, idx, P, rho, phi[k], v, y, d_t)
            for j in range(H):
                qe = 0.0
                qt = 0.0
                for a in range(A):
                    if live[l, a]:
                        qe += W1[j, a] * v[a]
                    qt += W1[j, a] * d_t[a]
                he, ht = h_e[k, j], h_t[k, j]
                dhe, dht = 1.0 - he * he, 1.0 - ht * ht
                ke = w2[j] * (-2.0 * he * dhe) * qe         # D(z, d_e) through the pre-activation
                kt = w2[j] * (-2.0 * ht * dht) * qt
                at = beta * w2[j] * dht                     # d c(z~) through the pre-activation
                gw2[j] += beta * ht + alpha * (dhe * qe - dht * qt)
                gb1[j] += at + alpha * (ke - kt)
                se = alpha * w2[j] * dhe
                st = alpha * w2[j] * dht
                for a in range(A):
                    w = (at - alpha * kt) * z_t[k, a] + alpha * ke * z_e[k, a] - st * d_t[a]
                    if live[l, a]:
                        w += se * v[a]
                    gW1[j, a] += w
    return G, gW1, gb1, gw2, gb2
