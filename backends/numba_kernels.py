"""Hand-written Numba kernels shared by every generated spec: race handlers and the checked
helpers the generated code calls.

Errors never raise inside compiled code (an exception inside a ``prange`` loop is lost, and
the process must never crash): a helper that finds an error writes its *code* into the
lane's status ``st[0]`` (first error wins) and returns a safe value; the generated code
returns at the next check, and Python raises the structdsl error the code stands for, with
the spec line and the batch element.  ``st[0] == IMPOSSIBLE`` marks a replayed trace that
the program cannot produce (probability zero), which is not an error.

Lane state (one row per lane): ``alive`` bool[A] (valid, rate > 0, not yet won); ``res``
float64[A] (solve: residual noise, in log space when ``log_space``; score: the logits);
``tr`` int64[R] (the trace: written by solve, read by score); ``st`` int64[4] (status, next
slot); ``fs`` float64[1] (log p); ``grad`` float64[A]; ``lsum`` float64[A] (log of the summed
race minima of each atom, for E | T; with ``WANT_MEMBERS`` instead float64[R * A], set to 1 at
``r * A + i`` when atom ``i`` is a member of race ``r``); ``u`` float64[R] (uniforms of the race minima);
``pkey`` int64[A] (the previous race's group of each atom, -1 outside it: the nesting check).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

SOLVE, SCORE, SAMPLE_SCORE = 0, 1, 2     # SAMPLE_SCORE: solve on the residuals, score on the logits
IMPOSSIBLE = -1
BAD_LOGIT = -2                   # a NaN or +inf logit met while drawing (trusted entry points)
_TINY = 2.2250738585072014e-308  # the smallest normal float64
WANT_GRAD, WANT_NOISE, WANT_MEMBERS = 1, 2, 4


@njit(cache=True)
def fail(st, code):
    if st[0] == 0:
        st[0] = code


@njit(cache=True)
def ck(i, n, st, code):
    """A checked index: ``i`` if ``0 <= i < n``, else records ``code`` and returns 0."""
    if i < 0 or i >= n:
        fail(st, code)
        return 0
    return i


@njit(cache=True)
def nonzero_s(b, st, code):
    if b == 0:
        fail(st, code)
        return 1
    return b


@njit(cache=True)
def nonzero_a(b, st, code):
    out = b.copy()
    flat = out.reshape(-1)
    for k in range(flat.size):
        if flat[k] == 0:
            fail(st, code)
            flat[k] = 1
    return out


@njit(cache=True)
def gather1(x, idx, st, code):
    """``x[idx]`` for a 1-d ``x`` and an int array ``idx`` of any shape, indices checked."""
    out = np.empty(idx.shape, x.dtype)
    o = out.reshape(-1)
    flat = idx.reshape(-1)
    n = x.shape[0]
    for k in range(flat.size):
        o[k] = x[ck(flat[k], n, st, code)]
    return out


@njit(cache=True)
def mask_set(x, mask, value):
    """``x[mask] = value`` for a mask of ``x``'s shape and a scalar value."""
    xf = x.reshape(-1)
    mf = mask.reshape(-1)
    for k in range(xf.size):
        if mf[k]:
            xf[k] = value


@njit(cache=True)
def extreme(x, largest, st, code):
    """``min(x)`` / ``max(x)``; an empty array records ``code``."""
    f = x.reshape(-1)
    if f.size == 0:
        fail(st, code)
        return np.zeros(1, x.dtype)[0]
    return f.max() if largest else f.min()


@njit(cache=True)
def arg_extreme(x, largest, st, code):
    """``argmin(x)`` / ``argmax(x)`` (first index); an empty array records ``code``."""
    if x.size == 0:
        fail(st, code)
        return 0
    return np.argmax(x) if largest else np.argmin(x)


@njit(cache=True)
def total(x):
    s = 0
    f = x.reshape(-1)
    for k in range(f.size):
        s += np.int64(f[k])
    return s


@njit(cache=True)
def _logaddexp(a, b):
    if a == -np.inf:
        return b
    if b == -np.inf:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


@njit(cache=True)
def _check_nested(mask, key, single, groups, pkey, st, code):
    """Every group of this race (``single``: the one member set) must lie inside one member
    set of the previous race."""
    first = np.full(max(groups, 1), -2, np.int64)
    for i in range(mask.size):
        if mask[i]:
            g = 0 if single else key[i]
            if pkey[i] < 0:
                fail(st, code)
                return
            if first[g] == -2:
                first[g] = pkey[i]
            elif first[g] != pkey[i]:
                fail(st, code)
                return


@njit(cache=True)
def _remember(mask, key, single, pkey):
    for i in range(mask.size):
        pkey[i] = (0 if single else key[i]) if mask[i] else -1


@njit(cache=True)
def race(mode, members, alive, res, x, tr, st, fs, grad, lsum, u, pkey, log_space, flags,
         allow_empty, code_empty, code_nest):
    """One race over ``members & alive`` (``members`` is overwritten with that mask);
    returns the flat winner (-1: empty and allowed).

    st[1]: next trace slot; st[2]: 1 when the spec is nested (check), 3 once there is a
    previous race to compare with."""
    A = alive.size
    count = 0
    for i in range(A):
        m = members[i] and alive[i]
        members[i] = m
        count += m
    if count == 0:
        if not allow_empty:
            fail(st, code_empty)
        return -1
    if st[2] == 3:
        _check_nested(members, pkey, True, 1, pkey, st, code_nest)
        if st[0] != 0:
            return -1
    w = _pick(mode, members, alive, res, x, tr, st, fs, grad, lsum, u, log_space, flags)
    if st[2] & 1:
        _remember(members, pkey, True, pkey)
        st[2] = 3
    return w


@njit(cache=True)
def _pick(mode, mask, alive, res, x, tr, st, fs, grad, lsum, u, log_space, flags):
    """SOLVE: the winner from the residuals ``res`` (updated); SCORE: the trace's winner
    scored against the logits (``res`` holds them); SAMPLE_SCORE: both, logits in ``x``."""
    A = alive.size
    slot = st[1]
    if slot >= tr.size:              # cannot happen: the bound is proven statically
        fail(st, IMPOSSIBLE)
        return -1
    if mode != SCORE:
        w = -1
        best = np.inf
        for i in range(A):
            if mask[i] and (w < 0 or res[i] < best):
                w = i
                best = res[i]
        lo = res[w]
        for i in range(A):
            if mask[i]:
                if log_space:
                    r = res[i]
                    res[i] = -np.inf if r == lo else r + math.log(-math.expm1(lo - r))
                else:
                    res[i] = res[i] - lo
        tr[slot] = w
        if mode == SAMPLE_SCORE:
            _score_race(mask, x, w, slot, fs, grad, lsum, u, flags)
    else:
        w = tr[slot]
        if w < 0 or w >= A or not mask[w]:
            fail(st, IMPOSSIBLE)
            return -1
        _score_race(mask, res, w, slot, fs, grad, lsum, u, flags)
    alive[w] = False
    st[1] = slot + 1
    return w


@njit(cache=True)
def _score_race(mask, res, w, slot, fs, grad, lsum, u, flags):
    """Race ``slot`` (members ``mask``, winner ``w``) scored against the logits ``res``."""
    A = mask.size
    top = -np.inf
    for i in range(A):
        if mask[i] and res[i] > top:
            top = res[i]
    e = np.empty(A)                  # the members' exp(x - top): the softmax reuses them
    s = 0.0
    for i in range(A):
        if mask[i]:
            e[i] = math.exp(res[i] - top)
            s += e[i]
    lse = top + math.log(s)
    fs[0] += res[w] - lse
    if flags & WANT_GRAD:
        grad[w] += 1.0
        inv = 1.0 / s
        for i in range(A):
            if mask[i]:
                grad[i] -= e[i] * inv
    if flags & WANT_NOISE:
        lm = math.log(-math.log(u[slot])) - lse
        for i in range(A):
            if mask[i]:
                lsum[i] = _logaddexp(lsum[i], lm)
    if flags & WANT_MEMBERS:
        for i in range(A):
            if mask[i]:
                lsum[slot * A + i] = 1.0


@njit(cache=True)
def race_groups(mode, keys, groups, alive, res, x, tr, st, fs, grad, lsum, u, pkey, log_space, flags,
                allow_empty, code_empty, code_nest, code_key):
    """One race per group (keys in [-1, groups)); returns winners per group (-1: empty).
    ``keys`` is the lane's scratch buffer: its retired atoms' keys become -1 here."""
    A = alive.size
    out = np.full(max(groups, 0), -1, np.int64)
    present = np.zeros(max(groups, 0), np.bool_)
    for i in range(A):
        k = keys[i]
        if k < -1 or k >= groups:
            fail(st, code_key)
            return out
        if not alive[i]:
            keys[i] = -1
        elif k >= 0:
            present[k] = True
    if not present.any():
        if not allow_empty:
            fail(st, code_empty)
        return out
    key = keys
    if st[2] == 3:
        _check_nested(key >= 0, key, False, groups, pkey, st, code_nest)
        if st[0] != 0:
            return out
    _pick_groups(mode, key, groups, present, alive, res, x, tr, st, fs, grad, lsum, u, log_space, flags, out)
    if st[0] != 0:
        return out
    if st[2] & 1:
        _remember(key >= 0, key, False, pkey)
        st[2] = 3
    return out


@njit(cache=True)
def _pick_groups(mode, key, groups, present, alive, res, x, tr, st, fs, grad, lsum, u, log_space, flags, out):
    """Every present group's race in one pass over the atoms (``key``: group, -1 outside),
    with the reference's arithmetic per group; winners recorded in group order."""
    A = alive.size
    slot = st[1]
    G = groups
    slot_of = np.full(G, -1, np.int64)
    k = slot
    for g in range(G):
        if present[g]:
            slot_of[g] = k
            k += 1
    if k > tr.size:                  # cannot happen: the bound is proven statically
        fail(st, IMPOSSIBLE)
        return
    if mode != SCORE:
        best = np.full(G, -1, np.int64)
        for i in range(A):
            g = key[i]
            if g >= 0 and (best[g] < 0 or res[i] < res[best[g]]):
                best[g] = i
        low = np.empty(G)
        for g in range(G):
            if best[g] >= 0:
                low[g] = res[best[g]]
        for i in range(A):
            g = key[i]
            if g >= 0:
                lo = low[g]
                if log_space:
                    r = res[i]
                    res[i] = -np.inf if r == lo else r + math.log(-math.expm1(lo - r))
                else:
                    res[i] = res[i] - lo
        for g in range(G):
            if best[g] >= 0:
                tr[slot_of[g]] = best[g]
        if mode == SAMPLE_SCORE:
            _score_groups(key, G, present, x, tr, slot_of, st, fs, grad, lsum, u, flags, out)
        for g in range(G):
            if best[g] >= 0:
                out[g] = best[g]
                alive[best[g]] = False
    else:
        _score_groups(key, G, present, res, tr, slot_of, st, fs, grad, lsum, u, flags, out)
        if st[0] != 0:
            return
        for g in range(G):
            if present[g]:
                alive[out[g]] = False
    st[1] = k


@njit(cache=True)
def _score_groups(key, G, present, res, tr, slot_of, st, fs, grad, lsum, u, flags, out):
    """Every present group's race (winners from the trace, written to ``out``) scored
    against the logits ``res``."""
    A = key.size
    top = np.full(G, -np.inf)
    for i in range(A):
        g = key[i]
        if g >= 0 and res[i] > top[g]:
            top[g] = res[i]
    e = np.empty(A)                  # the members' exp(x - top): the softmax reuses them
    s = np.zeros(G)
    for i in range(A):
        g = key[i]
        if g >= 0:
            e[i] = math.exp(res[i] - top[g])
            s[g] += e[i]
    lse = np.empty(G)
    for g in range(G):
        if present[g]:
            lse[g] = top[g] + math.log(s[g])
    for g in range(G):
        if present[g]:
            w = tr[slot_of[g]]
            if w < 0 or w >= A or key[w] != g:
                fail(st, IMPOSSIBLE)
                return
            fs[0] += res[w] - lse[g]
            out[g] = w
    if flags & WANT_GRAD:
        for g in range(G):
            if present[g]:
                s[g] = 1.0 / s[g]
        for i in range(A):
            g = key[i]
            if g >= 0:
                grad[i] -= e[i] * s[g]
        for g in range(G):
            if present[g]:
                grad[out[g]] += 1.0
    if flags & WANT_NOISE:
        lm = np.empty(G)
        for g in range(G):
            if present[g]:
                lm[g] = math.log(-math.log(u[slot_of[g]])) - lse[g]
        for i in range(A):
            g = key[i]
            if g >= 0:
                lsum[i] = _logaddexp(lsum[i], lm[g])
    if flags & WANT_MEMBERS:
        for i in range(A):
            g = key[i]
            if g >= 0:
                lsum[slot_of[g] * A + i] = 1.0


@njit(cache=True)
def finish_score(tr, st, lsum, logits, live, u_fresh, noise, flags):
    """After a replayed run: leftover winners make the trace impossible; E | T adds a fresh
    Exp(rate) to every live atom that never won (``live`` here is the initial mask)."""
    for k in range(st[1], tr.size):
        if tr[k] >= 0:
            fail(st, IMPOSSIBLE)
            return
    if flags & WANT_NOISE:
        won = np.zeros(live.size, np.bool_)
        for k in range(st[1]):
            won[tr[k]] = True
        for i in range(live.size):
            if not live[i]:
                noise[i] = np.inf
                continue
            fresh = -np.inf
            if not won[i]:
                fresh = math.log(-math.log(u_fresh[i])) - logits[i]
            noise[i] = math.exp(_logaddexp(lsum[i], fresh))


@njit(cache=True)
def take(w, alive, tr, st, allow_empty, code_empty):
    """The nested fast path's race: ``w`` (the first live member in the lane's sorted noise,
    or -1) is recorded and retired."""
    if w < 0:
        if not allow_empty:
            fail(st, code_empty)
        return -1
    slot = st[1]
    if slot >= tr.size:              # cannot happen: the bound is proven statically
        fail(st, IMPOSSIBLE)
        return -1
    tr[slot] = w
    st[1] = slot + 1
    alive[w] = False
    return w


# ---- the nested fast path's heap: atoms ordered by (noise, index) -------------------------------
@njit(cache=True)
def _before(ka, ia, kb, ib):
    """(key, index) pairs compared lexicographically: ties go to the lower index, as argmin."""
    return ka < kb or (ka == kb and ia < ib)


@njit(cache=True)
def _sift_down(hk, hi, n, k):
    key, idx = hk[k], hi[k]
    while True:
        child = 2 * k + 1
        if child >= n:
            break
        right = child + 1
        if right < n and _before(hk[right], hi[right], hk[child], hi[child]):
            child = right
        if not _before(hk[child], hi[child], key, idx):
            break
        hk[k], hi[k] = hk[child], hi[child]
        k = child
    hk[k], hi[k] = key, idx


@njit(cache=True)
def heap_init(alive, res, hk, hi, size):
    """A binary heap of the live atoms keyed by their raw noise (keys stored inline, no
    indirection): O(A) to build, O(log A) a pop, and a nested spec pops only the atoms its
    races examine."""
    n = 0
    for i in range(alive.size):
        if alive[i]:
            hk[n] = res[i]
            hi[n] = i
            n += 1
    size[0] = n
    for k in range(n // 2 - 1, -1, -1):
        _sift_down(hk, hi, n, k)


@njit(cache=True)
def heap_pop(hk, hi, size):
    n = size[0]
    if n == 0:
        return -1
    top = hi[0]
    n -= 1
    size[0] = n
    if n == 0:
        return top
    # bottom-up (Floyd): walk the hole down to a leaf along the smaller children (one
    # comparison a level), then sift the last element up from there (usually a step or two)
    k = 0
    while True:
        child = 2 * k + 1
        if child >= n:
            break
        right = child + 1
        if right < n and _before(hk[right], hi[right], hk[child], hi[child]):
            child = right
        hk[k], hi[k] = hk[child], hi[child]
        k = child
    key, idx = hk[n], hi[n]
    while k > 0:
        parent = (k - 1) // 2
        if not _before(key, idx, hk[parent], hi[parent]):
            break
        hk[k], hi[k] = hk[parent], hi[parent]
        k = parent
    hk[k], hi[k] = key, idx
    return top


@njit(cache=True)
def prepare_solve(valid, res, alive):
    """One lane of ``solve``: the atoms with finite weights can race."""
    for k in range(res.size):
        alive[k] = valid[k] and res[k] < np.inf


@njit(cache=True)
def prepare_sample(valid, uni, logits, alive, res, log_noise, st):
    """One lane's noise: ``log E = log(-log U) - logits`` at the atoms that can race (+inf
    elsewhere), as the reference computes it, into ``res`` (the races' residuals) and
    ``log_noise`` (kept for the caller; the same array when the races leave ``res`` alone).
    A uniform of 0 counts as the smallest normal float, as torch's draws are clamped; a NaN
    or +inf logit sets ``st[0] = BAD_LOGIT`` (the caller names the entry)."""
    for k in range(uni.size):
        if not logits[k] < np.inf:
            st[0] = BAD_LOGIT
        ok = valid[k] and logits[k] > -np.inf
        alive[k] = ok
        x = math.log(-math.log(max(uni[k], _TINY))) - logits[k] if ok else np.inf
        res[k] = x
        log_noise[k] = x


# ---- the nested fast path's score: exit races instead of per-race sums ------------------------
@njit(cache=True)
def score_nested(m, alive, tr, st, ex, allow_empty, code_empty):
    """A replayed race of a nested spec, after the generated loop compacted its ``m`` members
    into the candidate list and set ``ex[i] = r`` for each (see ``nested_members`` in the
    code generator).  Checks the winner and retires it; the sums over members are done once
    per lane, by :func:`finish_nested`."""
    if m == 0:
        if not allow_empty:
            fail(st, code_empty)
        return -1                    # an empty race changes nothing (no slot, same list)
    r = st[1]
    if r >= tr.size:
        fail(st, IMPOSSIBLE)
        return -1
    w = tr[r]
    if w < 0 or w >= alive.size or not alive[w] or ex[w] != r:
        fail(st, IMPOSSIBLE)
        return -1
    st[3] = m
    alive[w] = False
    st[1] = r + 1
    return w


@njit(cache=True)
def score_snap(w, member, any_member, alive, tr, st, ex, allow_empty, code_empty):
    """A replayed race of a nested spec scored through snapshots: ``w`` is the trace's entry
    for this race (-1 past its end), ``member`` whether it is a live member, ``any_member``
    whether the race has any.  Retires the winner, recording this race as its exit race;
    an empty race changes nothing (no slot).  The other atoms' exit races are found after
    the body, by binary search over the snapshots."""
    if not member:
        if any_member:
            fail(st, IMPOSSIBLE)     # the trace names a non-member, or stops while members race
        elif not allow_empty:
            fail(st, code_empty)
        return -1
    r = st[1]
    ex[w] = r
    alive[w] = False
    st[1] = r + 1
    return w


@njit(cache=True)
def finish_nested(tr, st, ex, logits, live, u, fs, grad, noise, lsum, flags):
    """log p, its gradient and E | T of a nested spec from the exit races: atom ``i`` took
    part in races ``0 .. ex[i]``, so race ``r``'s log-sum of rates is a suffix log-sum over
    exit races and every per-atom sum over its races is a prefix sum: O(atoms + races)."""
    R = st[1]
    for k in range(R, tr.size):
        if tr[k] >= 0:
            fail(st, IMPOSSIBLE)
            return
    # each exit race's log-sum of rates, shifted by its own largest logit: one exp per atom
    top = np.full(R, -np.inf)
    for i in range(ex.size):
        if ex[i] >= 0 and logits[i] > top[ex[i]]:
            top[ex[i]] = logits[i]
    acc_exp = np.zeros(R)
    for i in range(ex.size):
        if ex[i] >= 0:
            acc_exp[ex[i]] += math.exp(logits[i] - top[ex[i]])
    bucket = np.full(R, -np.inf)
    for r in range(R):
        if acc_exp[r] > 0.0:
            bucket[r] = top[r] + math.log(acc_exp[r])
    lse = np.empty(R)
    acc = -np.inf
    for r in range(R - 1, -1, -1):
        acc = _logaddexp(acc, bucket[r])
        lse[r] = acc
    total = 0.0
    for r in range(R):
        total += logits[tr[r]] - lse[r]
    fs[0] = total
    if flags & WANT_MEMBERS:                 # member of races 0 .. ex[i]
        A = ex.size
        for i in range(A):
            for r in range(ex[i] + 1):
                lsum[r * A + i] = 1.0
    if flags & WANT_GRAD:
        prefix = np.empty(R)
        acc = -np.inf
        for r in range(R):
            acc = _logaddexp(acc, -lse[r])
            prefix[r] = acc
        for i in range(ex.size):
            if ex[i] >= 0:
                grad[i] = -math.exp(logits[i] + prefix[ex[i]])
        for r in range(R):
            grad[tr[r]] += 1.0
    if flags & WANT_NOISE:
        prefix = np.empty(R)
        acc = -np.inf
        for r in range(R):
            acc = _logaddexp(acc, math.log(-math.log(u[r])) - lse[r])
            prefix[r] = acc
        won = np.zeros(live.size, np.bool_)
        for r in range(R):
            won[tr[r]] = True
        for i in range(live.size):
            if not live[i]:
                noise[i] = np.inf
                continue
            total_min = prefix[ex[i]] if ex[i] >= 0 else -np.inf
            fresh = -np.inf
            if not won[i]:
                fresh = math.log(-math.log(u[tr.size + i])) - logits[i]
            noise[i] = math.exp(_logaddexp(total_min, fresh))

