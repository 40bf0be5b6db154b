"""Hostile and careless specs that exist only in the tests (the conformance suite's own).

Each spec marks its offending line with ``# BAD``: a refused spec must be refused at that
line with a ``SpecError`` on every backend; a spec that fails at run time must fail there
with the same error class and batch element on every backend.  Specs without ``# BAD`` are
accepted, and every backend must give them the reference's values.
"""
from structdsl import arange, argmax, argmin, atoms, full, race, race_groups, spec, zeros

BIG = 4611686018427387904                   # 2**62
INT64_MIN = -9223372036854775807 - 1


# ==== refused at compile time: shadowing the DSL's own names =================================
@spec
def local_function_named_race(n):
    item = atoms(n)
    out = full(n, -1)

    def race(k):  # BAD
        return k

    def walk(k):
        w = race(k)
        out[k] = w
        walk(k + 1)
        return 0
    walk(0)
    return out


@spec
def variable_named_atoms(n):
    item = atoms(n)
    atoms = 3  # BAD
    w = race(item)
    return w


@spec
def parameter_named_range(n):
    item = atoms(n)
    out = zeros(n, int)

    def f(range):  # BAD
        out[0] = range
        return 0
    f(1)
    w = race(item)
    return out


@spec
def lambda_parameter_named_any(n):
    item = atoms(n)
    w = race(item, lambda any: any > 0)  # BAD
    return w


@spec
def loop_variable_named_min(n):
    item = atoms(n)
    x = 0
    for min in range(n):  # BAD
        x = x + 1
    w = race(item)
    return w


# ==== refused: local functions and recursion ==================================================
@spec
def bare_return_beside_a_value(n):
    item = atoms(n)

    def f(k):
        if k > 0:
            return k
        return  # BAD
    a = f(3)
    b = f(0)
    w = race(item)
    return b


@spec
def nonlocal_in_a_local_function(n):
    item = atoms(n)
    t = 0

    def f(k):
        nonlocal t  # BAD
        t = k
        return 0
    f(1)
    w = race(item)
    return w


@spec
def race_groups_in_a_local_function(n):
    item = atoms(n)
    out = full(n, -1)

    def f(k):
        ws = race_groups(item, lambda i: i % 2, groups=2)  # BAD
        out[0] = ws[0]
        return 0
    f(0)
    return out


@spec
def race_in_one_branch_is_no_guard(n):
    pos = atoms(n)
    order = full(n, -1)

    def f(k):
        if k < 2:
            r = race(pos, lambda i: i == k)
            order[k] = r
        f(k + 1)  # BAD
        return 0
    f(0)
    return order


@spec
def unguarded_mutual_recursion(n):
    pos = atoms(n)
    order = full(n, -1)

    def f(k):
        g(k + 1)
        return 0

    def g(k):
        f(k)  # BAD
        return 0
    f(0)
    w = race(pos)
    return order


@spec
def allow_empty_race_is_no_guard(n):
    pos = atoms(n)
    order = full(n, -1)

    def f(k):
        r = race(pos, lambda i: i >= k, allow_empty=True)
        order[0] = r
        f(k + 1)  # BAD
        return 0
    f(0)
    return order


@spec
def returns_a_two_dimensional_winner(n):
    edge = atoms(n, n)

    def pick(k):
        return race(edge, lambda u, v: u == k)  # BAD
    w = pick(0)
    return w


@spec
def noise_aliased_in_a_local_function(n):
    item = atoms(n)
    out = zeros(n, int)

    def f(k):
        e = item  # BAD
        return 0
    f(0)
    w = race(item)
    return out


@spec
def local_read_before_assignment(n):
    item = atoms(n)
    out = zeros(n, int)

    def f(k):
        if k > 0:
            y = k
        out[0] = y  # BAD
        return 0
    f(1)
    w = race(item)
    return out


@spec
def allow_empty_written_as_one(n):
    item = atoms(n)
    w = race(item, lambda i: i > 0, allow_empty=1)  # BAD
    return w


# ==== refused: stores and the type pass ========================================================
@spec
def scatter_through_augmented_assignment(n):
    item = atoms(n)
    x = zeros(n, int)
    idx = zeros(n, int)
    x[idx] += 1  # BAD
    w = race(item)
    return x


@spec
def scatter_through_a_tuple_of_arrays(n):
    item = atoms(n)
    g = zeros((n, n), int)
    idx = arange(n)
    g[idx, idx] -= 1  # BAD
    w = race(item)
    return g


@spec
def masked_update(n):
    item = atoms(n)
    flags = zeros(n, bool)
    flags[flags] |= True  # BAD
    w = race(item)
    return flags


@spec
def bool_and_int(n):
    item = atoms(n)
    w = race(item)
    b = w > 0
    y = b & 2  # BAD
    return y


@spec
def bool_or_int_update(n):
    item = atoms(n)
    w = race(item)
    y = 1
    y |= w > 0  # BAD
    return y


@spec
def scalar_or_array(n):
    item = atoms(n)
    w = race(item)
    a = zeros(n, int)
    x = 1 if w > 0 else a  # BAD
    return x


@spec
def not_of_an_array(n):
    item = atoms(n)
    m = zeros(n, bool)
    y = not m  # BAD
    w = race(item)
    return w


@spec
def one_index_too_many(n):
    item = atoms(n)
    a = zeros(n, int)
    y = a[0, 0]  # BAD
    w = race(item)
    return w


@spec
def leading_dims_broadcast(n, m):
    item = atoms(n)
    a = zeros((n, m), int)
    c = a + arange(n)  # BAD
    w = race(item)
    return c


# ==== accepted: every backend must agree with the reference ===================================
@spec
def returns_a_winner(n):
    """``return race(...)`` in a local function returns the winner (an int), not noise."""
    item = atoms(n)
    order = full(n, -1)

    def pick(k):
        return race(item, lambda i: i >= k or i == n - 1)

    for j in range(n - 1):
        w = pick(j)
        order[j] = w
    return order


@spec
def lambda_parameter_named_like_the_noise(n):
    """A lambda parameter shadows the outer name, as in Python: here ``item`` is an index."""
    item = atoms(n)
    w = race(item, lambda item: item > 0)
    return w


@spec
def trailing_dims_broadcast(n):
    """``[n, n + 1] + [n + 1]`` aligns the trailing dims (NumPy's rule)."""
    item = atoms(n)
    w = race(item)
    grid = zeros((n, n + 1), int) + arange(n + 1) * w
    rows = grid[w] - arange(n + 1)
    return grid, rows


@spec
def updates_through_rows_and_scalars(n):
    """Augmented stores through a scalar index, a row and a whole array."""
    edge = atoms(n, n)
    deg = zeros(n, int)
    seen = zeros((n, n), bool)
    for _ in range(n - 1):
        u, v = race(edge, lambda a, b: a != b and not seen[a, b], allow_empty=True)
        if u < 0:
            break
        deg[u] += 1
        deg[v] -= 2
        seen[u] |= arange(n) == v
        seen[v, u] ^= True
    deg *= 3
    return deg, seen


@spec
def every_reduction_and_conversion(n):
    """The primitives no built-in spec calls on state (``argmin``, ``argmax``, one-argument
    ``min``/``max``, ``abs``, ``int``, ``bool``) on winner-dependent values, inside a race's
    members too, so the differential harness compares each primitive on every backend."""
    item = atoms(n)
    order = full(n, -1)
    for t in range(n - n // 2):
        w = race(item, lambda i: order[i] < 0 and abs(i - t) >= min(order) + 1)
        order[w] = t
    spread = abs(order - n // 2)
    low, high = argmin(spread), argmax(order)
    score = int(order[low] >= 0) + min(spread) - max(order)
    flag = bool(score) and bool(max(order >= 0))
    last = race(item, lambda i: bool(i % 2) == (high % 2 == 0) or order[i] == -1, allow_empty=True)
    return order, spread, low, high, score, flag, last


# ==== accepted, failing at run time: the same error everywhere ================================
@spec
def floor_divides_the_minimum_by_minus_one(n):
    item = atoms(n)
    w = race(item)
    x = INT64_MIN + w * 0
    y = x // (w - 1 - w)  # BAD
    return y


@spec
def squares_past_int64(n):
    item = atoms(n)
    w = race(item)
    x = BIG + w
    y = x * x  # BAD
    return y


@spec
def negates_the_minimum(n):
    item = atoms(n)
    w = race(item)
    x = INT64_MIN + w * 0
    y = -x  # BAD
    return y


@spec
def abs_of_the_minimum(n):
    item = atoms(n)
    w = race(item)
    x = INT64_MIN + w * 0
    y = abs(x)  # BAD
    return y


@spec
def adds_past_int64_in_place(n):
    item = atoms(n)
    w = race(item)
    x = zeros(n, int) + BIG
    x += x + w  # BAD
    return x


@spec
def shifts_past_int64(n):
    item = atoms(n)
    w = race(item)
    y = (w + 1) << 63  # BAD
    return y


@spec
def subtracts_past_int64(n):
    item = atoms(n)
    w = race(item)
    y = INT64_MIN + w * 0 - (w + 1)  # BAD
    return y


@spec
def every_group_empty(n):
    item = atoms(n)
    ws = race_groups(item, lambda i: -1, groups=2)  # BAD
    return ws


@spec
def no_group_at_all(n):
    item = atoms(n)
    ws = race_groups(item, lambda i: -1, groups=0)  # BAD
    return ws


@spec
def every_group_empty_allowed(n):
    """allow_empty: all -1 and no trace slot; the race after it takes slot 0."""
    item = atoms(n)
    ws = race_groups(item, lambda i: -1, groups=2, allow_empty=True)
    w = race(item)
    return ws, w


@spec
def group_key_equal_to_groups(n):
    item = atoms(n)
    ws = race_groups(item, lambda i: 2 if i == n - 1 else i % 2, groups=2)  # BAD
    return ws


@spec(nested=True)
def group_outside_the_previous_race(n):
    item = atoms(n)
    first = race(item, lambda i: i < 2)
    rest = race_groups(item, lambda i: 0 if i >= 2 else -1, groups=1)  # BAD
    return first, rest


@spec
def minus_one_winner_in_a_local_function(n):
    item = atoms(n)
    out = zeros(n, int)

    def mark(k):
        w = race(item, lambda i: i > k, allow_empty=True)
        out[w] = 1  # BAD
        return w
    a = mark(n - 2)
    b = mark(n - 2)
    return out


@spec
def negative_shape(n, k):
    item = atoms(n)
    z = zeros(n - k, int)  # BAD
    w = race(item)
    return w


@spec
def reads_a_data_parameter(n, d):
    item = atoms(n)
    w = race(item)
    x = d[0] + w
    return x


@spec
def recursion_with_a_proven_bound(n):
    """Every frame races; the dispatch loop's bound is a proof (tests shrink it to see the
    loop fail loudly)."""
    pos = atoms(n)
    order = full(n, -1)
    count = zeros(1, int)

    def grow(lo, hi):
        if lo >= hi:
            return 0
        r = race(pos, lambda i: lo <= i < hi)
        order[count[0]] = r
        count[0] += 1
        grow(lo, r)
        grow(r + 1, hi)
        return 0
    grow(0, n)  # BAD
    return order


@spec
def three_races(n):
    item = atoms(n)
    a = race(item)
    b = race(item)
    c = race(item)
    return a, b, c


INT64_MIN_CONSTANT = -9223372036854775807 - 1


@spec
def negates_a_constant_minimum(n):
    """The negation of an inlined INT64_MIN constant overflows where it is written, not at
    the next operation (the reference once folded it into a Python int)."""
    item = atoms(n)
    w = race(item)
    y = -INT64_MIN_CONSTANT  # BAD
    z = y + w
    return z
