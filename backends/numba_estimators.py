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
def _jt(P, rho, phi, v, y, out):
    """``out = J^T v`` for one lane's ``J = rho^T P + diag(phi)`` (``y``: scratch ``[R]``)."""
    R, A = P.shape
    for r in range(R):
        acc = 0.0
        for a in range(A):
            acc += rho[r, a] * v[a]
        y[r] = acc
    for b in range(A):
        acc = phi[b] * v[b]
        for r in range(R):
            acc += P[r, b] * y[r]
        out[b] = acc


@njit(cache=True)
def _jv(P, rho, phi, v, y, out):
    """``out = J v`` for one lane's ``J = rho^T P + diag(phi)``: :func:`_jt` with the roles
    of ``rho`` and ``P`` exchanged."""
    _jt(rho, P, phi, v, y, out)


@njit(cache=True)
def relax_mlp(x, live, members, trace, score, losses, log_noise, u, W1, b1, w2, b2, K):
    """One RELAX estimate per lane (lane ``l = k * nb + b``: sample ``k`` of batch element
    ``b``), averaged over the ``K`` samples of each element.

    x, live, score, log_noise: ``[L, A]`` (logits, live mask, d log p(T)/dx, log E);
    members ``[L, R, A]``; trace ``[L, R]``; losses ``[L]``; u ``[L, R + A]`` (uniforms
    of E | T, as ``conditional_noise`` takes them); W1 ``[H, A]``, b1 ``[H]``, w2 ``[H]``,
    b2 a float.  Returns ``(G [nb, A], gW1, gb1, gw2, gb2)``: ``G`` each element's estimate
    and the gradient of the critic loss ``sum_b |G_b|^2 / nb`` in the critic's parameters.
    A non-finite ``G`` is returned as is (the caller raises)."""
    L, R, A = members.shape
    H = b1.size
    nb = L // K
    z_e = np.zeros((L, A))
    z_t = np.zeros((L, A))
    rho = np.zeros((L, R, A))
    P = np.zeros((L, R, A))
    phi = np.zeros((L, A))
    h_e = np.empty((L, H))
    h_t = np.empty((L, H))
    g = np.zeros((L, A))
    lse = np.empty(R)
    log_m = np.empty(R)
    won = np.zeros(A, np.bool_)
    gz_e = np.empty(A)
    gz_t = np.empty(A)
    y = np.empty(R)
    jt = np.empty(A)
    for l in range(L):
        # E | T: race r's minimum m_r = -log u_r / sum of its members' rates (log space)
        for r in range(R):
            top = -np.inf
            for a in range(A):
                if members[l, r, a] and x[l, a] > top:
                    top = x[l, a]
            if top == -np.inf:
                lse[r] = -np.inf
                log_m[r] = -np.inf
                continue
            acc = 0.0
            for a in range(A):
                if members[l, r, a]:
                    acc += math.exp(x[l, a] - top)
            lse[r] = top + math.log(acc)
            log_m[r] = math.log(-math.log(u[l, r])) - lse[r] if trace[l, r] >= 0 else -np.inf
            for a in range(A):
                if members[l, r, a]:
                    P[l, r, a] = math.exp(x[l, a] - lse[r])
        won[:] = False
        for r in range(R):
            if trace[l, r] >= 0:
                won[trace[l, r]] = True
        for a in range(A):
            if not live[l, a]:
                continue
            log_s = -np.inf
            for r in range(R):
                if members[l, r, a]:
                    log_s = _logaddexp(log_s, log_m[r])
            log_f = -np.inf if won[a] else math.log(-math.log(u[l, R + a])) - x[l, a]
            log_et = _logaddexp(log_s, log_f)
            z_t[l, a] = -log_et
            z_e[l, a] = -log_noise[l, a]
            if log_f > -np.inf:
                phi[l, a] = math.exp(log_f - log_et)
            for r in range(R):
                if members[l, r, a] and log_m[r] > -np.inf:
                    rho[l, r, a] = math.exp(log_m[r] - log_et)
        # the critic at z and z~, and its input gradients
        c_t = b2
        for j in range(H):
            pe = b1[j]
            pt = b1[j]
            for a in range(A):
                pe += W1[j, a] * z_e[l, a]
                pt += W1[j, a] * z_t[l, a]
            h_e[l, j] = math.tanh(pe)
            h_t[l, j] = math.tanh(pt)
            c_t += w2[j] * h_t[l, j]
        gz_e[:] = 0.0
        gz_t[:] = 0.0
        for j in range(H):
            ke = w2[j] * (1.0 - h_e[l, j] ** 2)
            kt = w2[j] * (1.0 - h_t[l, j] ** 2)
            for a in range(A):
                gz_e[a] += ke * W1[j, a]
                gz_t[a] += kt * W1[j, a]
        # g = (f - c(z~)) score + d c(z) - J^T grad c(z~)
        _jt(P[l], rho[l], phi[l], gz_t, y, jt)
        for b in range(A):
            g[l, b] = (losses[l] - c_t) * score[l, b] + (gz_e[b] if live[l, b] else 0.0) - jt[b]
    G = np.zeros((nb, A))
    for l in range(L):
        for a in range(A):
            G[l % nb, a] += g[l, a] / K
    # the critic loss's gradient: (2 / (nb K)) sum_l G_b . d g_l / d params
    alpha = 2.0 / (nb * K)
    gW1 = np.zeros((H, A))
    gb1 = np.zeros(H)
    gw2 = np.zeros(H)
    gb2 = 0.0
    d_t = np.empty(A)
    for l in range(L):
        v = G[l % nb]
        beta = 0.0
        for a in range(A):
            beta += v[a] * score[l, a]
        beta *= -alpha                                  # coefficient of d c(z~)
        gb2 += beta
        _jv(P[l], rho[l], phi[l], v, y, d_t)            # the direction z~ moves in; z moves by v
        for j in range(H):
            qe = 0.0
            qt = 0.0
            for a in range(A):
                if live[l, a]:
                    qe += W1[j, a] * v[a]
                qt += W1[j, a] * d_t[a]
            he, ht = h_e[l, j], h_t[l, j]
            dhe, dht = 1.0 - he * he, 1.0 - ht * ht
            ke = w2[j] * (-2.0 * he * dhe) * qe         # D(z, d_e) through the pre-activation
            kt = w2[j] * (-2.0 * ht * dht) * qt
            at = beta * w2[j] * dht                     # d c(z~) through the pre-activation
            gw2[j] += beta * ht + alpha * (dhe * qe - dht * qt)
            gb1[j] += at + alpha * (ke - kt)
            se = alpha * w2[j] * dhe
            st = alpha * w2[j] * dht
            for a in range(A):
                w = (at - alpha * kt) * z_t[l, a] + alpha * ke * z_e[l, a] - st * d_t[a]
                if live[l, a]:
                    w += se * v[a]
                gW1[j, a] += w
    return G, gW1, gb1, gw2, gb2
