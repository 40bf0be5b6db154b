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
``tr`` int64[R] (the trace: written by solve, read by score); ``st`` int64[ST_WIDTH] (status,
next slot, nesting state, and the values an error's message names: see ``ST_A``); ``fs`` float64[1] (log p); ``grad`` float64[A]; ``lsum`` float64[A] (the summed
race minima of each atom, for E | T, in linear space: starting at 0; with ``WANT_MEMBERS`` instead float64[R * A], set to 1 at
``r * A + i`` when atom ``i`` is a member of race ``r``); ``u`` float64[R] (uniforms of the race minima);
``pkey`` int64[A] (the previous race's group of each atom, -1 outside it: the nesting check);
``pend`` float64[A] (the subtraction each loser of a solving race owes its residual, NaN:
none; see ``_subtract``).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange, types
from numba.core.extending import intrinsic

# The lane's mode (``__mode`` in the generated code, ``mode`` in the race kernels):
MODE_SOLVE = 0                   # solve given weights, or sample (the drivers draw the noise first)
MODE_SCORE = 1                   # replay a trace and score it against the logits
MODE_SAMPLE_SCORE = 2            # sample, scoring each race as it runs: solve on the residuals, score on the logits
MODE_SAMPLE_SCORE_NESTED = 3     # the nested fast path's sample and score: snapshots, then exit races
IMPOSSIBLE = -1
BAD_LOGIT = -2                   # a NaN or +inf logit met while drawing (trusted entry points)
_TINY = 2.2250738585072014e-308  # the smallest normal float64
WANT_GRAD, WANT_NOISE, WANT_MEMBERS = 1, 2, 4
I64_MIN, I64_MAX = np.int64(-2**63), np.int64(2**63 - 1)

# The lane status ``st``: st[ST_STATUS] the first error's code (0: none), st[ST_SLOT] the next
# trace slot, st[ST_NESTING] the nesting state, st[ST_CANDIDATES] the nested score's candidate
# count (the previous race's members); the first error also records the values its message
# names (an index and the dimension, an operation's operands, a group key...) in st[ST_A],
# st[ST_B], st[ST_C]; a predicate's error, the atom (+1) it was evaluated for in st[ST_ATOM];
# a nested spec's race, its line in st[ST_PREV] (the nesting message names the previous race);
# st[ST_BLOCKS], whether the lane raced through blocks (numba_races._nested_race).
# Python formats the message from them.
ST_STATUS, ST_SLOT, ST_NESTING, ST_CANDIDATES = 0, 1, 2, 3
ST_A, ST_B, ST_C, ST_ATOM, ST_PREV = 4, 5, 6, 7, 8
ST_BLOCKS = 9                    # the nested fast path: 1 once the lane left its heap for blocks
ST_WIDTH = 10


@njit(cache=True)
def fail(st, code):
    if st[0] == 0:
        st[0] = code


@njit(cache=True)
def fail_with(st, code, a, b):
    """``fail``, keeping the values ``a``, ``b`` the message names (first error only)."""
    if st[0] == 0:
        st[0] = code
        st[ST_A] = a
        st[ST_B] = b


@njit(cache=True)
def ck(i, n, st, code):
    """A checked index: ``i`` if ``0 <= i < n``, else records ``code`` (with ``i`` and
    ``n``) and returns 0."""
    if i < 0 or i >= n:
        fail_with(st, code, i, n)
        return 0
    return i


@njit(cache=True)
def ck2(i, j, n, m, st, code_i, code_j):
    """Two indices of one subscript, checked after both are evaluated (the reference
    evaluates the whole index before checking it)."""
    return ck(i, n, st, code_i), ck(j, m, st, code_j)


@njit(cache=True)
def ck3(i, j, k, n, m, o, st, code_i, code_j, code_k):
    return ck(i, n, st, code_i), ck(j, m, st, code_j), ck(k, o, st, code_k)


# ---- checked int64 arithmetic: the reference raises SpecOverflowError ---------------------------
# Scalars (``*_s``) record the operands (the message gives the exact result); arrays (``*_a``,
# either operand may be a scalar, NumPy broadcasting) record the code only, as the reference's
# array messages name no value.  The tests never look at a wrapped result: Numba marks its
# int64 ``+ - *`` "no signed wrap", so LLVM may assume such a test false and drop it.  LLVM's
# overflow intrinsics give the wrapped value and the flag instead (one instruction and a
# flag on x86); shifts are tested before they are made.
def _with_overflow(method):
    @intrinsic
    def op(typingctx, a, b):
        """``(a op b wrapped, 1 if the exact result is outside int64 else 0)``."""
        sig = types.UniTuple(types.int64, 2)(types.int64, types.int64)

        def codegen(context, builder, signature, args):
            res = getattr(builder, method)(args[0], args[1])
            value = builder.extract_value(res, 0)
            flag = builder.zext(builder.extract_value(res, 1), value.type)
            return context.make_tuple(builder, signature.return_type, [value, flag])
        return sig, codegen
    return op


_sadd = _with_overflow("sadd_with_overflow")
_ssub = _with_overflow("ssub_with_overflow")
_smul = _with_overflow("smul_with_overflow")


@njit(cache=True)
def add_s(a, b, st, code):
    r, o = _sadd(np.int64(a), np.int64(b))
    if o:
        fail_with(st, code, a, b)
    return r


@njit(cache=True)
def sub_s(a, b, st, code):
    r, o = _ssub(np.int64(a), np.int64(b))
    if o:
        fail_with(st, code, a, b)
    return r


@njit(cache=True)
def mul_s(a, b, st, code):
    r, o = _smul(np.int64(a), np.int64(b))
    if o:
        fail_with(st, code, a, b)
    return r


@njit(cache=True)
def floordiv_s(a, b, st, code_zero, code_over):
    """``a // b`` (floor): a zero divisor records ``code_zero`` (and divides by 1),
    ``INT64_MIN // -1`` records ``code_over``."""
    if b == 0:
        fail(st, code_zero)
        return a
    if b == -1 and a == I64_MIN:
        fail_with(st, code_over, a, b)
        return a
    return a // b


@njit(cache=True)
def mod_s(a, b, st, code_zero):
    if b == 0:
        fail(st, code_zero)
        return 0 * a
    return a % b


@njit(cache=True)
def _shl_overflows(a, s):
    """Whether the exact ``a * 2**s`` (``s >= 0``) is outside int64."""
    if a == 0:
        return False
    if s >= 63:
        return not (s == 63 and a == -1)
    return a > (I64_MAX >> s) or a < (I64_MIN >> s)


@njit(cache=True)
def lshift_s(a, s, st, code_count, code_over):
    """``a << s``: a negative count records ``code_count``; a result past int64 (the exact
    ``a * 2**s``) records ``code_over``."""
    if s < 0:
        fail(st, code_count)
        return 0 * a
    if _shl_overflows(a, s):
        fail_with(st, code_over, a, s)
        return 0 * a
    return a << min(s, 63)


@njit(cache=True)
def rshift_s(a, s, st, code_count):
    if s < 0:
        fail(st, code_count)
        return a
    return a >> min(s, 63)


@njit(cache=True)
def neg_s(a, st, code):
    if a == I64_MIN:
        fail_with(st, code, a, 0)
        return a
    return -a


@njit(cache=True)
def abs_s(a, st, code):
    if a == I64_MIN:
        fail_with(st, code, a, 0)
        return a
    return abs(a)


@njit(cache=True)
def sel(c, a, b):
    """``where(c, a, b)`` on scalars: both values evaluated, as the reference does."""
    return a if c else b


@njit(cache=True)
def add_a(a, b, st, code):
    r = a + b                        # the shape; the values come from the intrinsic
    x, y = np.broadcast_to(a, r.shape), np.broadcast_to(b, r.shape)
    for idx in np.ndindex(r.shape):
        v, o = _sadd(x[idx], y[idx])
        r[idx] = v
        if o:
            fail(st, code)
    return r


@njit(cache=True)
def sub_a(a, b, st, code):
    r = a - b
    x, y = np.broadcast_to(a, r.shape), np.broadcast_to(b, r.shape)
    for idx in np.ndindex(r.shape):
        v, o = _ssub(x[idx], y[idx])
        r[idx] = v
        if o:
            fail(st, code)
    return r


@njit(cache=True)
def mul_a(a, b, st, code):
    r = a * b
    x, y = np.broadcast_to(a, r.shape), np.broadcast_to(b, r.shape)
    for idx in np.ndindex(r.shape):
        v, o = _smul(x[idx], y[idx])
        r[idx] = v
        if o:
            fail(st, code)
    return r


@njit(cache=True)
def floordiv_a(a, b, st, code_zero, code_over):
    if np.any(b == 0):
        fail(st, code_zero)
        return a // np.where(b == 0, 1, b)
    if np.any((a == I64_MIN) & (b == -1)):
        fail(st, code_over)
    return a // b


@njit(cache=True)
def mod_a(a, b, st, code_zero):
    if np.any(b == 0):
        fail(st, code_zero)
        return a % np.where(b == 0, 1, b)
    return a % b


@njit(cache=True)
def lshift_a(a, s, st, code_count, code_over):
    if np.any(s < 0):
        fail(st, code_count)
        return a + 0 * s
    r = a << np.minimum(s, 63)
    x, y = np.broadcast_to(a, r.shape), np.broadcast_to(s, r.shape)
    for idx in np.ndindex(r.shape):
        if _shl_overflows(x[idx], y[idx]):
            fail(st, code_over)
            break
    return r


@njit(cache=True)
def rshift_a(a, s, st, code_count):
    if np.any(s < 0):
        fail(st, code_count)
        return a + 0 * s
    return a >> np.minimum(s, 63)


@njit(cache=True)
def neg_a(a, st, code):
    if np.any(a == I64_MIN):
        fail(st, code)
        return np.where(a == I64_MIN, 0, -a)
    return -a


@njit(cache=True)
def abs_a(a, st, code):
    if np.any(a == I64_MIN):
        fail(st, code)
        return np.where(a == I64_MIN, 0, np.abs(a))
    return np.abs(a)


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
def put(x, value):
    """``x[...] = value``: ``x`` a view whose trailing axes have ``value``'s shape (the type
    pass's rule for stores, checked with the sizes before a call runs), ``value`` repeated
    over the leading ones.  Element by element: NumPy's slice assignment would compile its
    shape-mismatch message (Numba's string formatting, 2-3 s per process and rank) for a
    path the type pass has ruled out."""
    v = np.ascontiguousarray(value).reshape(-1)
    k = 0
    for idx in np.ndindex(x.shape):
        x[idx] = v[k]
        k += 1
        if k == v.size:
            k = 0


@njit(cache=True)
def put_flat(row, at, value):
    """``value`` (an array of any shape), flattened in C order, into ``row`` from index
    ``at``; returns the index after it.  The lane writes its structure's fields one after the
    other into its output rows, int fields into one, bool fields into the other (the backend
    splits them)."""
    v = np.ascontiguousarray(value).reshape(-1)
    for k in range(v.size):
        row[at + k] = v[k]
    return at + v.size


# ---- NumPy's functions, as the generated code calls them ----------------------------------
# A NumPy function called in generated code is an overload that Numba types and lowers again
# inside every spec's chunk (0.02-0.2 s per signature, over 1 s for a spec with many array
# statements).
# The generated code calls these cached kernels instead (``numba_ast._np``): each signature
# compiles once per machine, then loads, and LLVM still inlines it into the chunk.
@njit(cache=True)
def copy_into(dst, src):
    """``dst[:] = src`` for 1-d arrays of one size, as a loop LLVM vectorises: a slice
    assignment would compile its shape-mismatch message (Numba's string formatting, about
    1.6 s) into every chunk."""
    for i in range(dst.size):
        dst[i] = src[i]


@njit(cache=True)
def fill(dst, value):
    """``dst[:] = value`` for a 1-d array (see :func:`copy_into`)."""
    for i in range(dst.size):
        dst[i] = value


@njit(cache=True)
def np_empty(shape, dtype):
    return np.empty(shape, dtype)


@njit(cache=True)
def np_zeros(shape, dtype):
    return np.zeros(shape, dtype)


@njit(cache=True)
def np_ones(shape, dtype):
    return np.ones(shape, dtype)


@njit(cache=True)
def np_full(shape, value, dtype):
    return np.full(shape, value, dtype)


@njit(cache=True)
def np_arange(n):
    return np.arange(n)


@njit(cache=True)
def np_copy(x):
    return x.copy()


@njit(cache=True)
def np_flatnonzero(x):
    return np.flatnonzero(x)


@njit(cache=True)
def np_any(x):
    return np.any(x)


@njit(cache=True)
def np_all(x):
    return np.all(x)


@njit(cache=True)
def np_where(c, a, b):
    return np.where(c, a, b)


@njit(cache=True)
def np_minimum(a, b):
    return np.minimum(a, b)


@njit(cache=True)
def np_maximum(a, b):
    return np.maximum(a, b)


@njit(cache=True)
def np_abs(x):
    return np.abs(x)


@njit(cache=True)
def smin(a, b):
    """Python's ``min(a, b)`` of two scalars (``a`` on a tie or a NaN ``b``)."""
    return b if b < a else a


@njit(cache=True)
def smax(a, b):
    """Python's ``max(a, b)`` of two scalars (``a`` on a tie or a NaN ``b``)."""
    return b if b > a else a


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
    """``sum`` of a bool array (a count: it cannot overflow)."""
    s = 0
    for v in x.flat:
        s += np.int64(v)
    return s


@njit(cache=True)
def total_ck(x, st, code):
    """``sum`` of an int array: wrapped partial sums and a count of the wraps, so only the
    exact total must fit in int64 (as the reference's); records the wrapped sum and the
    wraps (the exact total is ``a + b * 2**64``)."""
    s = np.int64(0)
    wraps = np.int64(0)
    for v in x.flat:
        s, o = _sadd(s, np.int64(v))
        if o:
            wraps += 1 if v > 0 else -1
    if wraps != 0:
        fail_with(st, code, s, wraps)
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
def _remember(mask, key, single, pkey, st, line):
    for i in range(mask.size):
        pkey[i] = (0 if single else key[i]) if mask[i] else -1
    st[ST_PREV] = line               # the nesting message names the previous race's line


@njit(cache=True)
def race(mode, members, alive, res, pend, x, tr, st, fs, grad, lsum, u, pkey, log_space, flags,
         allow_empty, code_empty, code_nest, code_bound, line):
    """One race over ``members & alive`` (``members`` is overwritten with that mask);
    returns the flat winner (-1: empty and allowed).  ``code_bound``: more races than the
    trace holds (the static bound, ``tr.size``); ``line``: the race's spec line.

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
    w = _pick(mode, members, alive, res, pend, x, tr, st, fs, grad, lsum, u, log_space, flags, code_bound)
    if w < 0:
        return -1
    if st[2] & 1:
        _remember(members, pkey, True, pkey, st, line)
        st[2] = 3
    return w


@njit(cache=True)
def _subtract(r, lo, log_space):
    """A loser's residual ``r`` less the race's minimum ``lo`` (the reference's arithmetic:
    ``log(exp(r) - exp(lo))`` in log space, exactly -inf for a tie), or ``r`` when ``lo`` is
    NaN (nothing owed).

    The races' losers do not subtract at once: each records the minimum it owes in ``pend``,
    and subtracts it when it is next a member of a race.  A residual is read only by the
    races it is a member of, and an atom owes at most one subtraction (it races again before
    it can lose again), so this is the same arithmetic on the same values as subtracting at
    once, but an atom that never races again (a spec's later races often take only a few of
    the earlier races' losers) never pays the log and the expm1."""
    if lo != lo:
        return r
    if log_space:
        return -np.inf if r == lo else r + math.log(-math.expm1(lo - r))
    return r - lo


@njit(cache=True)
def _pick(mode, mask, alive, res, pend, x, tr, st, fs, grad, lsum, u, log_space, flags, code_bound):
    """MODE_SOLVE: the winner from the residuals ``res`` (its losers owe the minimum, in
    ``pend``: :func:`_subtract`); MODE_SCORE: the trace's winner scored against the logits ``x``
    (``res`` unread); MODE_SAMPLE_SCORE: both."""
    A = alive.size
    slot = st[1]
    if slot >= tr.size:              # past the static bound (the reference raises too)
        fail_with(st, code_bound, tr.size, 0)
        return -1
    if mode != MODE_SCORE:
        w = -1
        best = np.inf
        for i in range(A):
            if mask[i]:
                r = _subtract(res[i], pend[i], log_space)
                res[i] = r
                pend[i] = np.nan
                if w < 0 or r < best:
                    w = i
                    best = r
        lo = res[w]
        for i in range(A):
            if mask[i]:
                pend[i] = lo
        tr[slot] = w
        if mode == MODE_SAMPLE_SCORE:
            _score_race(mask, x, w, slot, fs, grad, lsum, u, flags)
    else:
        w = tr[slot]
        if w < 0 or w >= A or not mask[w]:
            fail(st, IMPOSSIBLE)
            return -1
        _score_race(mask, x, w, slot, fs, grad, lsum, u, flags)
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
    if flags & WANT_NOISE:                   # the race's minimum, added to each member's sum
        m = math.exp(math.log(-math.log(u[slot])) - lse)
        for i in range(A):
            if mask[i]:
                lsum[i] += m
    if flags & WANT_MEMBERS:
        for i in range(A):
            if mask[i]:
                lsum[slot * A + i] = 1.0


@njit(cache=True)
def race_groups(mode, keys, groups, alive, res, pend, x, tr, st, fs, grad, lsum, u, pkey, log_space, flags,
                allow_empty, code_empty, code_nest, code_bound, line, code_key):
    """One race per group (keys in [-1, groups)); returns winners per group (-1: empty).
    ``keys`` is the lane's scratch buffer: its retired atoms' keys become -1 here.  A key
    out of range records ``code_key`` with the key, ``groups`` and the atom (the first in
    flat order, as the reference names it)."""
    A = alive.size
    out = np.full(max(groups, 0), -1, np.int64)
    present = np.zeros(max(groups, 0), np.bool_)
    for i in range(A):
        k = keys[i]
        if k < -1 or k >= groups:
            if st[0] == 0:
                fail_with(st, code_key, k, groups)
                st[ST_C] = i
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
    if not _pick_groups(mode, key, groups, present, alive, res, pend, x, tr, st, fs, grad, lsum, u, log_space,
                        flags, out, code_bound):
        return out
    if st[2] & 1:
        _remember(key >= 0, key, False, pkey, st, line)
        st[2] = 3
    return out


@njit(cache=True)
def _pick_groups(mode, key, groups, present, alive, res, pend, x, tr, st, fs, grad, lsum, u, log_space, flags,
                 out, code_bound):
    """Every present group's race in one pass over the atoms (``key``: group, -1 outside),
    with the reference's arithmetic per group; winners recorded in group order.  Returns
    False when the lane stops (past the static bound, or an impossible replayed winner)."""
    A = alive.size
    slot = st[1]
    G = groups
    slot_of = np.full(G, -1, np.int64)
    k = slot
    for g in range(G):
        if present[g]:
            slot_of[g] = k
            k += 1
    if mode != MODE_SCORE and k > tr.size:        # past the static bound (the reference raises too)
        fail_with(st, code_bound, tr.size, 0)
        return False
    if mode != MODE_SCORE:
        best = np.full(G, -1, np.int64)
        for i in range(A):
            g = key[i]
            if g >= 0:
                r = _subtract(res[i], pend[i], log_space)
                res[i] = r
                pend[i] = np.nan
                if best[g] < 0 or r < res[best[g]]:
                    best[g] = i
        for i in range(A):             # the losers owe their group's minimum (_subtract)
            g = key[i]
            if g >= 0:
                pend[i] = res[best[g]]
        for g in range(G):
            if best[g] >= 0:
                tr[slot_of[g]] = best[g]
        if mode == MODE_SAMPLE_SCORE:
            _score_groups(key, G, present, x, tr, slot_of, st, fs, grad, lsum, u, flags, out, code_bound)
        for g in range(G):
            if best[g] >= 0:
                out[g] = best[g]
                alive[best[g]] = False
    else:
        if not _score_groups(key, G, present, x, tr, slot_of, st, fs, grad, lsum, u, flags, out, code_bound):
            return False
        for g in range(G):
            if present[g]:
                alive[out[g]] = False
    st[1] = k
    return True


@njit(cache=True)
def _score_groups(key, G, present, res, tr, slot_of, st, fs, grad, lsum, u, flags, out, code_bound):
    """Every present group's race (winners from the trace, written to ``out``) scored
    against the logits ``res``.  As the reference's replay, group by group: a slot past the
    static bound stops the lane with ``code_bound``, a winner that is not a live member of
    its group makes the trace impossible, whichever comes first.  Returns False if so."""
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
            if slot_of[g] >= tr.size:
                fail_with(st, code_bound, tr.size, 0)
                return False
            w = tr[slot_of[g]]
            if w < 0 or w >= A or key[w] != g:
                fail(st, IMPOSSIBLE)
                return False
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
    if flags & WANT_NOISE:                   # each group's minimum, added to its members' sums
        m = np.empty(G)
        for g in range(G):
            if present[g]:
                m[g] = math.exp(math.log(-math.log(u[slot_of[g]])) - lse[g])
        for i in range(A):
            g = key[i]
            if g >= 0:
                lsum[i] += m[g]
    if flags & WANT_MEMBERS:
        for i in range(A):
            g = key[i]
            if g >= 0:
                lsum[slot_of[g] * A + i] = 1.0
    return True


@njit(cache=True)
def finish_score(tr, st, lsum, logits, live, u_fresh, noise, flags):
    """After a replayed run: leftover winners make the trace impossible; E | T adds a fresh
    Exp(rate), ``exp(log(-log V) - logit)``, to the sum of race minima ``lsum`` of every live
    atom that never won (``live`` here is the initial mask), the exps in one vectorised
    loop (an overflow gives inf, as the reference's exp of its log-sum does)."""
    for k in range(st[1], tr.size):
        if tr[k] >= 0:
            fail(st, IMPOSSIBLE)
            return
    if flags & WANT_NOISE:
        fresh_exponentials(u_fresh, logits, tr[:st[1]], noise)
        for i in range(live.size):
            noise[i] = noise[i] + lsum[i] if live[i] else np.inf


@njit(cache=True)
def take(w, alive, tr, st, allow_empty, code_empty, code_bound):
    """The nested fast path's race: ``w`` (the first live member in the lane's sorted noise,
    or -1) is recorded and retired."""
    if w < 0:
        if not allow_empty:
            fail(st, code_empty)
        return -1
    slot = st[1]
    if slot >= tr.size:              # past the static bound (the reference raises too)
        fail_with(st, code_bound, tr.size, 0)
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
def block_size(A):
    """The block length of a lane that left its heap: ceil(sqrt(A)) (as many blocks as atoms
    in a block; a d x d grid's rows)."""
    b = max(1, int(math.sqrt(A)))
    return b + 1 if b * b < A else b


@njit(cache=True)
def prepare_solve(valid, res, alive):
    """One lane of ``solve``: the atoms with finite weights can race."""
    for k in range(res.size):
        alive[k] = valid[k] and res[k] < np.inf


@njit(cache=True)
def prepare_replay(valid, logits, alive):
    """One lane of a replay: the atoms that can race are the valid ones whose logit is not
    -inf (computed here, in the lanes, rather than as a [B, A] NumPy pass before them)."""
    for k in range(logits.size):
        alive[k] = valid[k] and logits[k] != -np.inf


# log as a loop LLVM vectorises (libm's log is a call per element, about 4 ns; this, 1.4 ns):
# fdlibm's reduction x = 2**k * m with m in [sqrt(2)/2, sqrt(2)), f = m - 1, s = f / (2 + f),
# and its degree-14 polynomial in s (the published coefficients Lg1..Lg7), evaluated the
# same way for every input, no branch.  Within 1 ulp of libm's (which rounds correctly far
# more often): the noise a backend draws from given uniforms may differ in its last bit,
# as NumPy's own vectorised log already does from libm's.
_LG1, _LG2, _LG3, _LG4 = 6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01, \
    2.222219843214978396e-01
_LG5, _LG6, _LG7 = 1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_MANTISSA, _ONE_BITS = np.uint64(0x000FFFFFFFFFFFFF), np.uint64(0x3FF0000000000000)
_SQRT2_BITS, _UNIT_EXP = np.uint64(0x3FF6A09E667F3BCD), np.uint64(1 << 52)
_NORMAL_BITS, _INF_BITS, _S52 = np.uint64(0x0010000000000000), np.uint64(0x7FF0000000000000), np.uint64(52)


@intrinsic
def _bits(typingctx, x):
    """The bits of a float64, as a uint64 (a register move, no memory)."""
    if x != types.float64:
        return None
    from llvmlite import ir
    return types.uint64(types.float64), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(64))


@intrinsic
def _from_bits(typingctx, b):
    """The float64 whose bits are the uint64 ``b``."""
    if b != types.uint64:
        return None
    from llvmlite import ir
    return types.float64(types.uint64), lambda context, builder, sig, args: builder.bitcast(args[0], ir.DoubleType())


@njit(cache=True, inline="always", error_model="numpy")
def _log_normal(x):
    """log of a positive normal float64 (anything else: a meaningless number), no branch."""
    b = _bits(x)
    m = (b & _MANTISSA) | _ONE_BITS
    big = m >= _SQRT2_BITS
    f = _from_bits(m - _UNIT_EXP if big else m) - 1.0
    dk = np.float64(np.int64(b >> _S52) - 1023 + np.int64(big))
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = w * (_LG2 + w * (_LG4 + w * _LG6)) + z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    hfsq = 0.5 * f * f
    return dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)


# exp as a loop LLVM vectorises, the same way (libm's exp is a call, about 5 ns; this,
# inlined by LLVM with its fused multiply-adds, about 0.9 ns on AVX-512): fdlibm's reduction
# x = k ln2 + r, |r| <= ln2 / 2, its rational approximation of exp(r) (the published
# coefficients P1..P5) and the scaling by 2**k in two halves, so that a subnormal result is
# rounded once and a result near the largest float is not lost to an infinite 2**1024.
# Within 1 ulp of libm's.
_INVLN2 = 1.44269504088896338700e+00
_P1, _P2, _P3 = 1.66666666666666019037e-01, -2.77777777770155933842e-03, 6.61375632143793436117e-05
_P4, _P5 = -1.65339022054652515390e-06, 4.13813679705723846039e-08


@njit(cache=True, error_model="numpy", fastmath={"contract"})     # FMAs: 20 % fewer instructions
def _exp(x):
    """exp(x), no branch: below -746 (-inf included) 0, computed without the subnormal
    product, which costs a microcode assist; above 710 (+inf included) inf; NaN: a
    meaningless number."""
    zero = x < -746.0
    x = 0.0 if zero else min(x, 710.0)
    k = np.int64(math.floor(x * _INVLN2 + 0.5))          # round to nearest
    hi = x - np.float64(k) * _LN2_HI
    lo = np.float64(k) * _LN2_LO
    r = hi - lo
    t = r * r
    c = r - t * (_P1 + t * (_P2 + t * (_P3 + t * (_P4 + t * _P5))))
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    k1 = k >> 1                                # 2**k = 2**k1 * 2**(k - k1), each finite
    y = y * _from_bits(np.uint64(k1 + 1023) << _S52) * _from_bits(np.uint64(k - k1 + 1023) << _S52)
    return 0.0 if zero else y


@njit(cache=True, error_model="numpy")
def exp_into(x, out):
    """``out[i] = exp(x[i])`` (:func:`_exp`, vectorised); the entry point of its accuracy
    test (the lanes inline it)."""
    for i in range(x.size):
        out[i] = _exp(x[i])


@njit(cache=True, error_model="numpy")
def log_into(x, out):
    """``out[i] = log(x[i])``: :func:`_log_normal` in a vectorised loop, then libm's log for the
    inputs that are not positive normal floats (zero, subnormal, negative, infinite, NaN).
    The entry point of ``_log_normal``'s accuracy test (the lanes inline it)."""
    for i in range(x.size):
        out[i] = _log_normal(x[i])
    for i in range(x.size):
        b = _bits(x[i])
        if b < _NORMAL_BITS or b >= _INF_BITS:
            out[i] = math.log(x[i])


@njit(cache=True, error_model="numpy")
def gumbel_into(u, out):
    """``out[i] = log(-log(u[i]))`` (E | T's fresh noise, before its logit), both logs
    :func:`_log_normal` in a vectorised loop; a ``u`` outside [tiny, 1) (a subnormal: a given
    uniform can be one) goes to libm."""
    for i in range(u.size):
        out[i] = _log_normal(-_log_normal(u[i]))
    for i in range(u.size):
        b = _bits(u[i])
        if b < _NORMAL_BITS or b >= _ONE_BITS:
            out[i] = math.log(-math.log(u[i]))


@njit(cache=True, error_model="numpy")
def fresh_exponentials(u, logits, winners, out):
    """E | T's fresh draws: ``out[i] = exp(log(-log u[i]) - logits[i])``, an Exp(exp(logit))
    variable, and 0 at the ``winners`` (a winner's noise is its races' minima alone); the
    logs and exps in vectorised loops (an overflow gives inf)."""
    gumbel_into(u, out)
    for i in range(out.size):
        out[i] -= logits[i]
    for w in winners:
        out[w] = -np.inf
    for i in range(out.size):
        out[i] = _exp(out[i])


@njit(cache=True, error_model="numpy")
def prepare_sample(valid, uni, logits, alive, res, log_noise, st):
    """One lane's noise: ``log E = log(-log U) - logits`` at the atoms that can race (+inf
    elsewhere), the reference's formula with both logs :func:`_log_normal` (U lies in
    [tiny, 1], -log U in [0, 709), and a zero, from U = 1, gives -inf), into ``res`` (the races'
    residuals) and ``log_noise`` (kept for the caller; the same array when the races leave
    ``res`` alone).  A uniform of 0 counts as the smallest normal float, as torch's draws are
    clamped; a NaN or +inf logit sets ``st[0] = BAD_LOGIT`` (the caller names the entry)."""
    for k in range(uni.size):                       # vectorised: no call, no branch
        t = -_log_normal(max(uni[k], _TINY))
        res[k] = _log_normal(t) if t > 0.0 else -np.inf
    for k in range(uni.size):
        if valid[k] and not logits[k] < np.inf:   # invalid atoms: ignored, NaN included
            st[0] = BAD_LOGIT
        ok = valid[k] and logits[k] > -np.inf
        alive[k] = ok
        x = res[k] - logits[k] if ok else np.inf
        res[k] = x
        log_noise[k] = x


# Philox4x32-10, the stream of ``seed=`` (structdsl.philox holds its definition; the tests
# compare the two bit for bit)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LO32, _S32, _S6 = np.uint64(0xFFFFFFFF), np.uint64(32), np.uint64(6)
_S26 = np.uint64(1 << 26)
_EXP52 = np.uint64(0x4330000000000000)      # the bits of 2.0**52: | 52-bit x gives 2**52 + x
_TWO52 = 4503599627370496.0
_ULP52 = 2.220446049250313e-16              # 2**-52


@njit(cache=True, inline="always")
def _philox(c0, c1, c2, c3, k0, k1):
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (p1 >> _S32) ^ c1 ^ k0, p1 & _LO32, (p0 >> _S32) ^ c3 ^ k1, p0 & _LO32
        k0, k1 = (k0 + _W0) & _LO32, (k1 + _W1) & _LO32
    return c0, c1, c2, c3


@njit(cache=True, inline="always")
def _bits52(x, y):
    """Two Philox words as the bits of the double ``2**52 + 52-bit value``."""
    return ((x >> _S6) * _S26 + (y >> _S6)) | _EXP52


@njit(cache=True)
def philox_uniforms(k0, k1, lane, out):
    """``out[a]``: the uniform of atom ``a`` of flat lane ``lane`` under key ``(k0, k1)``
    (uint64; see structdsl.philox).  The words are written first as the bits of
    ``2**52 + x`` (a loop without branches, which LLVM vectorises: the 32 x 32-bit products
    are SIMD instructions; about 1 ns an atom), then turned into ``(x + 0.5) / 2**52``."""
    bits = out.view(np.uint64)
    c1, c2 = lane & _LO32, lane >> _S32
    A = out.size
    for p in range(A // 2):
        w0, w1, w2, w3 = _philox(np.uint64(p), c1, c2, np.uint64(0), k0, k1)
        bits[2 * p] = _bits52(w0, w1)
        bits[2 * p + 1] = _bits52(w2, w3)
    if A % 2:
        w0, w1, w2, w3 = _philox(np.uint64(A // 2), c1, c2, np.uint64(0), k0, k1)
        bits[A - 1] = _bits52(w0, w1)
    for a in range(A):
        out[a] = (out[a] - _TWO52 + 0.5) * _ULP52


@njit(cache=True)
def philox_rows(k0, k1, out):
    """Row ``b`` of ``out`` (float64 ``[lanes, width]``, C order): lane ``b``'s uniforms under
    key ``(k0, k1)``, as :func:`philox_uniforms` draws them (``Program.seeded_uniforms``:
    about 1 ns a value, where NumPy's uint64 arithmetic takes 55)."""
    for b in range(out.shape[0]):
        philox_uniforms(k0, k1, np.uint64(b), out[b])


@njit(cache=True)
def prepare_seeded(valid, key, lane, logits, alive, res, log_noise, st):
    """:func:`prepare_sample` on the lane's uniforms of the Philox stream of ``key`` (uint64
    ``[2]``), drawn here into a scratch array (drawn into ``log_noise`` itself, the noise
    loop ran half as fast)."""
    u = np.empty(logits.size)
    philox_uniforms(key[0], key[1], np.uint64(lane), u)
    prepare_sample(valid, u, logits, alive, res, log_noise, st)


# ---- the nested fast path's score: exit races instead of per-race sums ------------------------
@njit(cache=True)
def score_nested(m, alive, tr, st, ex, allow_empty, code_empty, code_bound):
    """A replayed race of a nested spec, after the generated loop compacted its ``m`` members
    into the candidate list and set ``ex[i] = r`` for each (see ``nested_members`` in the
    code generator).  Checks the winner and retires it; the sums over members are done once
    per lane, by :func:`finish_nested`."""
    if m == 0:
        if not allow_empty:
            fail(st, code_empty)
        return -1                    # an empty race changes nothing (no slot, same list)
    r = st[1]
    if r >= tr.size:                 # past the static bound (the reference raises too)
        fail_with(st, code_bound, tr.size, 0)
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
def score_snap(w, member, any_member, alive, tr, st, ex, allow_empty, code_empty, code_bound):
    """A replayed race of a nested spec scored through snapshots: ``w`` is the trace's entry
    for this race (-1 past its end), ``member`` whether it is a live member, ``any_member``
    whether the race has any.  Retires the winner, recording this race as its exit race;
    an empty race changes nothing (no slot).  The other atoms' exit races are found after
    the body, by binary search over the snapshots."""
    if not member:
        if any_member and st[1] >= tr.size:
            fail_with(st, code_bound, tr.size, 0)    # past the static bound (the reference raises too)
        elif any_member:
            fail(st, IMPOSSIBLE)     # the trace names a non-member, or stops while members race
        elif not allow_empty:
            fail(st, code_empty)
        return -1
    r = st[1]
    ex[w] = r
    alive[w] = False
    st[1] = r + 1
    return w


@intrinsic
def _unpredictable(typingctx, c, a, b):
    """``a if c else b`` as an LLVM select marked ``!unpredictable`` (clang's
    ``__builtin_unpredictable``), which LLVM keeps a conditional move.  Unmarked, a select
    whose condition compares loaded values becomes a branch, which mispredicts half the time
    when the outcome is a coin flip, as in a binary search."""
    if not isinstance(c, types.Boolean) or a != b:
        return None

    def codegen(context, builder, signature, args):
        chosen = builder.select(*args)
        chosen.set_metadata("unpredictable", builder.module.add_metadata([]))
        return chosen
    return a(c, a, b), codegen


@njit(cache=True, inline="always")
def step_if(c, x, step):
    """``x + step`` if ``c`` else ``x``, without a branch on ``c`` (:func:`_unpredictable`)."""
    return _unpredictable(c, x + step, x)


_MAGNITUDE = np.int64(0x7FFFFFFFFFFFFFFF)
# finish_nested's one shift serves a lane whose live logits lie within this of the largest:
# exp(-600) is a normal float, and (R + 1) * exp(600) is finite for any number of races
_SPREAD = 600.0


@njit(cache=True, inline="always")
def _order_key(b):
    """The bits ``b`` of a float64 as an int64 ordered as the floats are (NaN aside), and
    back: negative floats get their magnitude bits flipped."""
    return b ^ ((b >> 63) & _MAGNITUDE)


@njit(cache=True, error_model="numpy")
def _live_range(x, live):
    """``(max, min)`` of ``x`` over ``live`` (``(-inf, inf)`` if none), as integer
    reductions on ordered bit keys, which LLVM vectorises (a float max needs fast-math)."""
    hi, lo = I64_MIN, I64_MAX
    for i in range(x.size):
        k = _order_key(np.int64(_bits(x[i])))
        hi = max(hi, k if live[i] else I64_MIN)
        lo = min(lo, k if live[i] else I64_MAX)
    if hi == I64_MIN:
        return -np.inf, np.inf
    return _from_bits(np.uint64(_order_key(hi))), _from_bits(np.uint64(_order_key(lo)))


@njit(cache=True, error_model="numpy")
def finish_nested(tr, st, ex, logits, live, u, fs, grad, noise, lsum, flags):
    """log p, its gradient and E | T of a nested spec from the exit races: atom ``i`` took
    part in races ``0 .. ex[i]``, so race ``r``'s log-sum of rates is a suffix log-sum over
    exit races and every per-atom sum over its races is a prefix sum: O(atoms + races)."""
    R = st[1]
    for k in range(R, tr.size):
        if tr[k] >= 0:
            fail(st, IMPOSSIBLE)
            return
    # each exit race's sum of rates, relative to a shift top[r]: one exp per atom, kept in grad
    # (the gradient below is that exp times a factor per exit race).  Atom i's exit race
    # ex[i] has slot ex[i] + 1, slot 0 gathers the atoms of no race (ex = -1).  The shift is
    # the lane's largest live logit when every live logit lies within _SPREAD of it (then
    # every exp(l - top) is a normal float and the per-atom loops need no gather: the exp
    # loop vectorises), else each exit race's own largest logit (logits of any spread)
    want_grad = (flags & WANT_GRAD) != 0
    A = ex.size
    hi, lo = _live_range(logits, live)
    e = grad if want_grad else np.empty(A)
    one_shift = hi - lo <= _SPREAD
    top = np.full(R + 1, -np.inf)
    if one_shift:
        for i in range(A):
            e[i] = _exp(logits[i] - hi if ex[i] >= 0 else -np.inf)
    else:
        for i in range(A):
            if ex[i] >= 0 and logits[i] > top[ex[i] + 1]:
                top[ex[i] + 1] = logits[i]
        for i in range(A):
            e[i] = logits[i] - top[ex[i] + 1] if ex[i] >= 0 else -np.inf
        for i in range(A):
            e[i] = _exp(e[i])
    acc_exp = np.zeros(R + 1)
    for i in range(A):
        if ex[i] >= 0:
            acc_exp[ex[i] + 1] += e[i]
    # lse[r] = log of the sum of rates over exit races >= r = M + log(S): with one shift, M =
    # hi and S a suffix sum; else S in linear space relative to the running largest top M.
    # log p: with one shift, race r adds -log(S / e[winner]), exactly 0 for a race of one
    lse = np.empty(R)
    acc_exp[0] = 1.0
    m, sm, total = (hi, 0.0, 0.0) if one_shift else (-np.inf, 0.0, 0.0)
    for r in range(R - 1, -1, -1):
        t, a = top[r + 1], acc_exp[r + 1]
        if one_shift:
            sm += a
        elif a > 0.0:
            if t > m:
                sm = sm * math.exp(m - t) + a
                m = t
            else:
                sm += a * math.exp(t - m)
        acc_exp[r + 1] = sm                  # S, kept for the gradient (slot 0: 1, unused)
        lse[r] = m + math.log(sm) if sm > 0.0 else -np.inf
        total += -math.log(sm / e[tr[r]]) if one_shift else logits[tr[r]] - lse[r]
    fs[0] = total
    if flags & WANT_MEMBERS:                 # member of races 0 .. ex[i]
        for i in range(A):
            for r in range(ex[i] + 1):
                lsum[r * A + i] = 1.0
    if want_grad:
        # d log p / d logit_i = [i won] - exp(logit_i) * sum over its races of exp(-lse[r]),
        # as e[i] = exp(logit_i - shift) times scale[exit race].  With one shift, scale[r] =
        # sum over s <= r of exp(hi - lse[s]) = sum of 1 / S[s] = q[r] / S[r]; else scale[r] =
        # sum over s <= r of exp(top[r] - lse[s]) = exp(top[r] - lse[r]) * q[r].  Either way
        # q[r] = sum over s <= r of exp(lse[r] - lse[s]) (each term <= 1: lse only grows
        # towards earlier races)
        scale = np.zeros(R + 1)              # slot 0: no race, no gradient
        won_grad = np.empty(R)               # the winners' gradients
        q = 0.0
        for r in range(R):
            if one_shift:                    # q[r] = S[r] * (sum over s <= r of 1 / S[s])
                q = q * (acc_exp[r + 1] / acc_exp[r] if r > 0 else 0.0) + 1.0
                scale[r + 1] = q / acc_exp[r + 1]
                won_grad[r] = 1.0 - e[tr[r]] * q / acc_exp[r + 1]     # exactly 0 for a race of one
            else:
                q = q * (math.exp(lse[r] - lse[r - 1]) if r > 0 else 0.0) + 1.0
                if top[r + 1] > -np.inf:
                    scale[r + 1] = math.exp(top[r + 1] - lse[r]) * q
                won_grad[r] = 1.0 - e[tr[r]] * scale[r + 1]
        for i in range(A):                   # 0.0 - x: +0.0 at atoms of no race
            grad[i] = 0.0 - grad[i] * scale[ex[i] + 1]
        for r in range(R):
            grad[tr[r]] = won_grad[r]
    if flags & WANT_NOISE:
        # race r's minimum m_r = exp(log(-log U_r) - lse_r), summed over races 0 .. r in
        # linear space (slot r + 1; slot 0: no race); atom i's noise is that sum at its exit
        # race plus, if it never won, a fresh exp(log(-log V_i) - l_i), the exps in one
        # vectorised loop (an overflow gives inf, as the reference's exp of its log-sum does)
        prefix = np.zeros(R + 1)
        acc = 0.0
        for r in range(R):
            acc += math.exp(math.log(-math.log(u[r])) - lse[r])
            prefix[r + 1] = acc
        fresh_exponentials(u[tr.size:], logits, tr[:R], noise)
        for i in range(A):
            noise[i] = noise[i] + prefix[ex[i] + 1] if live[i] else np.inf


# ---- the drivers: every spec's lanes run through these ----------------------------------------
# The generated module holds one function, ``chunk``: the spec's lane, inlined into a loop over a
# range of lanes.  The backend compiles it as a C callback (``numba.cfunc``) of its exact
# signature, and a driver calls it at its address.  So the lane is compiled and optimised once: a
# Numba function that calls another links the callee's LLVM module into its own and optimises and
# emits it again.  Every chunk has the same signature but for the spec's data parameters, so each
# driver compiles once per machine (Numba's cache), not once per spec.  For the same reason each
# lane's noise and score (the LANE_KERNELS below) are C callbacks too, compiled once per machine,
# which chunk calls at the addresses the backend passes it (``lane_kernels``).
def _emit_call(context, builder, address, args_type, args_value):
    """Call the C function at ``address`` on the values of the tuple ``args_value``; arrays go
    in borrowed: the caller's arrays outlive the call, and without a meminfo the views the
    callee takes of them count no references (atomics that threads on the same buffers would
    fight over)."""
    from llvmlite import ir
    from numba.core import cgutils
    fnty = ir.FunctionType(context.get_value_type(types.none), [context.get_value_type(t) for t in args_type.types])
    fn = builder.inttoptr(address, fnty.as_pointer())
    values = []
    for i, t in enumerate(args_type.types):
        v = builder.extract_value(args_value, i)
        if isinstance(t, types.Array):
            a = cgutils.create_struct_proxy(t)(context, builder, value=v)
            a.meminfo = cgutils.get_null_value(a.meminfo.type)
            a.parent = cgutils.get_null_value(a.parent.type)
            v = a._getvalue()
        values.append(v)
    builder.call(fn, values)
    return context.get_dummy_value()


def _caller(signature=None):
    """An intrinsic ``call(address, args)``: a C call of the function at ``address`` (an int64)
    on the values of the tuple ``args``, the ABI of a ``numba.cfunc`` of ``args``' types.  With
    a ``signature``, arguments of any other type are a typing error (a bug in the generated
    code), never a call with the wrong layout; without one, the caller checks (the backend
    compares chunk's arguments with its signature before each kind of call first runs)."""
    @intrinsic
    def call(typingctx, address, args):
        if not isinstance(address, types.Integer) or not isinstance(args, types.BaseTuple):
            return None
        if signature is not None and tuple(args.types) != tuple(signature.args):
            from numba.core.errors import TypingError
            raise TypingError(f"a lane kernel of signature {signature} called on {args}")
        return types.none(address, args), lambda context, builder, sig, ll: _emit_call(context, builder, ll[0],
                                                                                       args, ll[1])
    return call


_call_at = _caller()


def _row(dtype, readonly=False):
    return types.Array(dtype, 1, "C", readonly=readonly)


_F, _FR, _I = _row(types.float64), _row(types.float64, True), _row(types.int64)
_B, _BR = _row(types.boolean), _row(types.boolean, True)


# Each lane's noise and score as C callbacks (own functions: a cfunc and a jitted function of
# the same Python function would share a Numba cache entry)
def _c_prepare_seeded(valid, key, lane, logits, alive, res, log_noise, st):
    prepare_seeded(valid, key, lane, logits, alive, res, log_noise, st)


def _c_prepare_sample(valid, uni, logits, alive, res, log_noise, st):
    prepare_sample(valid, uni, logits, alive, res, log_noise, st)


def _c_prepare_solve(valid, res, alive):
    prepare_solve(valid, res, alive)


def _c_prepare_replay(valid, logits, alive):
    prepare_replay(valid, logits, alive)


def _c_finish_nested(tr, st, ex, logits, live, u, fs, grad, noise, lsum, flags):
    finish_nested(tr, st, ex, logits, live, u, fs, grad, noise, lsum, flags)


def _c_finish_score(tr, st, lsum, logits, live, u_fresh, noise, flags):
    finish_score(tr, st, lsum, logits, live, u_fresh, noise, flags)


#: Each lane's noise and score, compiled as C callbacks once per machine (see ``lane_kernels``):
#: name -> (function, signature); chunk calls kernel ``k`` at ``addresses[k]`` through ``call_<name>``.
LANE_KERNELS = {
    "prepare_seeded": (_c_prepare_seeded, types.void(_BR, _row(types.uint64, True), types.int64, _FR, _B, _F, _F, _I)),
    "prepare_sample": (_c_prepare_sample, types.void(_BR, _FR, _FR, _B, _F, _F, _I)),
    "prepare_solve": (_c_prepare_solve, types.void(_BR, _F, _B)),
    "prepare_replay": (_c_prepare_replay, types.void(_BR, _FR, _B)),
    "finish_nested": (_c_finish_nested, types.void(_I, _I, _I, _FR, _B, _FR, _F, _F, _F, _F, types.int64)),
    "finish_score": (_c_finish_score, types.void(_I, _I, _F, _FR, _B, _FR, _F, types.int64)),
}
call_prepare_seeded, call_prepare_sample, call_prepare_solve, call_prepare_replay, call_finish_nested, \
    call_finish_score = (_caller(sig) for _, sig in LANE_KERNELS.values())
LANE_KERNEL_INDEX = {name: k for k, name in enumerate(LANE_KERNELS)}


def lane_kernels():
    """The addresses of :data:`LANE_KERNELS` as C callbacks, int64 ``[K]`` read-only, in its
    order; compiled (or loaded from Numba's cache) on the first call in a process."""
    return _lane_callbacks()[1]


@functools.cache
def _lane_callbacks():
    """``(callbacks, addresses)``: the callbacks stay alive as long as their addresses."""
    from numba import cfunc
    callbacks = [cfunc(sig, cache=True, error_model="numpy")(fn) for fn, sig in LANE_KERNELS.values()]
    addresses = np.array([c.address for c in callbacks], dtype=np.int64)
    addresses.flags.writeable = False
    return callbacks, addresses


@njit(cache=True)
def run_lanes(chunk, args, first, stop):
    """Lanes ``first`` to ``stop - 1`` one after the other (small batches: no threads to
    start): the C function at ``chunk`` on ``args + (first, stop)``."""
    _call_at(chunk, args + (first, stop))


@njit(parallel=True, cache=True)
def run_lanes_parallel(chunk, args, first, stop, threads):
    """:func:`run_lanes` over ``threads`` equal ranges of lanes (``numba.get_num_threads()``:
    ``prange``'s own static schedule, one range a thread)."""
    n = stop - first
    parts = max(1, min(threads, n))
    for c in prange(parts):
        _call_at(chunk, args + (first + c * n // parts, first + (c + 1) * n // parts))
