"""The numba backend beyond the conformance suite (tests/test_conformance.py holds it to the
reference on every spec): its flat fast-path entry points, finite-difference gradients,
compile errors, the generated source and its cache."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structdsl
from structdsl import arange, atoms, race, spec, where, zeros
from structdsl import specs as builtin
from structdsl.testing import uniforms as uniforms_st
from shared_specs import DAG, SIZES, SPECS, atom_shape, bad_line, compiled
from shared_specs import topological_order as topological

pytest.importorskip("numba")


def programs(name):
    """(numba, reference) programs, compiled once per test session."""
    return compiled(name, "numba"), compiled(name, "numpy")


def outcome(fn):
    try:
        return fn(), None
    except structdsl.RaceError as exc:
        return None, exc


def assert_same_error(a, b):
    assert type(a) is type(b) and a.line == b.line and a.lane == b.lane, (a, b)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(sorted(SPECS)))
def test_the_training_steps_entry_points_agree_with_the_program_api(data, name):
    """The flat entry points the CPU fast path uses (one draw-and-score call, member sets)
    against this backend's own Program API, which tests/test_conformance.py holds to the
    reference."""
    fast, _ = programs(name)
    lo, hi = SIZES[name]
    n = data.draw(st.integers(lo, hi), label="n")
    shape = atom_shape(name, n)
    batch = data.draw(st.sampled_from([(3,), (2, 2)]), label="batch")
    logits = np.array(data.draw(st.lists(st.floats(-4, 4), min_size=int(np.prod(batch + shape)),
                                         max_size=int(np.prod(batch + shape))), label="logits"))
    logits = logits.reshape(batch + shape)
    if data.draw(st.booleans(), label="-inf atoms"):
        drop = data.draw(st.lists(st.booleans(), min_size=logits.size, max_size=logits.size))
        logits = np.where(np.array(drop).reshape(logits.shape), -np.inf, logits)
    u = data.draw(uniforms_st(batch + shape), label="uniforms")
    a, err = outcome(lambda: fast.sample(logits, uniforms=u))
    if err is not None:
        return
    lp_a, g_a = fast.log_prob_and_grad(a.trace, logits)
    inst, A = fast.instance(shape), int(np.prod(shape))
    (t2, f2, ln2), scores = fast.draw_and_score_flat(inst, np.asarray(u, dtype=float).reshape(-1, A),
                                                     logits.reshape(-1, A), members=True)
    lp2, g2, m2 = scores.logp, scores.grad, scores.replay.races.members
    assert np.array_equal(t2, a.trace.reshape(t2.shape))
    for x, y in zip(f2, a.structure):
        assert np.array_equal(x, y.reshape(x.shape))
    np.testing.assert_array_equal(ln2, a.log_noise.reshape(ln2.shape))
    np.testing.assert_allclose(lp2, lp_a.reshape(-1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g2, g_a.reshape(g2.shape), rtol=1e-12, atol=1e-12)
    t, x, _, _ = fast.check_trace(a.trace, logits)
    assert np.array_equal(m2, fast.replay_flat(inst, t, x).races.members)


def test_gradient_matches_finite_differences_on_both_backends():
    rng = np.random.default_rng(3)
    for name in ("spanning_tree", "arborescence", "binary_tree", "top_k"):
        for prog in programs(name):
            shape = atom_shape(name, 5)
            logits = rng.normal(size=(4,) + shape)
            trace = prog.sample(logits, seed=1).trace
            _, grad = prog.log_prob_and_grad(trace, logits)
            eps = 1e-6
            fd = np.zeros_like(logits)
            for idx in np.ndindex(*shape):
                up, down = logits.copy(), logits.copy()
                up[(slice(None),) + idx] += eps
                down[(slice(None),) + idx] -= eps
                fd[(slice(None),) + idx] = (prog.log_prob(trace, up) - prog.log_prob(trace, down)) / (2 * eps)
            np.testing.assert_allclose(grad, fd, atol=1e-6)


def test_bad_input_is_refused_before_the_compiled_code():
    fast, _ = programs("spanning_tree")
    with pytest.raises(ValueError, match="NaN"):
        fast.sample(np.full((4, 4), np.nan), seed=0)
    with pytest.raises(ValueError, match=r"trace must have shape"):
        fast.log_prob(np.zeros((2, 7), int), np.zeros((4, 4)))


def test_enumerate_delegates_to_the_reference_and_source_is_readable():
    fast, ref = programs("binary_tree")
    a = fast.enumerate(rates=np.array([1, 2, 3, 4], dtype=object))
    b = ref.enumerate(rates=np.array([1, 2, 3, 4], dtype=object))
    assert np.array_equal(a.traces, b.traces) and list(a.probs) == list(b.probs)
    assert "def chunk(" in fast.source and "CHUNK_SIGNATURE = " in fast.source


def test_check_spec_runs_on_the_numba_backend():
    from structdsl.testing import check_spec
    report = check_spec(builtin.spanning_tree, backend="numba", samples=1000)
    assert report.ok and report.total_probability == 1
    report = check_spec(topological, backend="numba", samples=1000, dag=DAG)
    assert report.ok and report.traces == 2          # the DAG has two linear extensions


def test_the_cli_takes_a_backend(monkeypatch):
    from structdsl import __main__ as cli
    seen = {}
    monkeypatch.setattr(cli, "check", lambda samples, seed, plot=None, backend="numpy": seen.setdefault("b", backend) and 0)
    assert cli.main(["check", "--backend", "numba"]) == 0 and seen["b"] == "numba"


@spec
def gathers_rows(n):
    item = atoms(n)
    table = zeros((n, n), int)
    w = race(item)
    rows = table[zeros(n, int)]  # BAD
    return rows


def test_a_construct_the_numba_backend_cannot_lower_is_refused_at_its_line():
    structdsl.compile(gathers_rows).sample(np.zeros(3), seed=0)     # the reference lowers it
    with pytest.raises(structdsl.SpecError) as info:
        structdsl.compile(gathers_rows, backend="numba")
    assert info.value.line == bad_line(gathers_rows)
    assert "numba backend cannot lower" in str(info.value)


def test_the_generated_source_lives_in_the_cache_directory(tmp_path, monkeypatch):
    from structdsl.backends import numba_backend
    monkeypatch.setenv("STRUCTDSL_CACHE_DIR", str(tmp_path))
    assert numba_backend.cache_dir() == tmp_path / "numba"
    fast, _ = programs("categorical")
    source = fast.source + "\n# a variant only this test writes\n"
    module = numba_backend.load(source)
    import hashlib
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    files = [f for f in (tmp_path / "numba").glob("structdsl_gen_*.py") if f.read_text() == source]
    assert [f.name for f in files] == [f"structdsl_gen_{digest}.py"]   # written once, named by its hash
    assert numba_backend.load(source) is module                     # and imported once
    assert f"# kernels {numba_backend._kernels_hash()}" in fast.source


@spec(nested=True)
def forest_only_the_compile_test_compiles(n):
    """Kruskal, as the built-in spanning tree, under a name of its own."""
    edge = atoms(n, n, valid=lambda u, v: u < v)
    comp = arange(n)
    links = zeros((n, n), bool)
    for _ in range(n - 1):
        u, v = race(edge, lambda u, v: comp[u] != comp[v], allow_empty=True)
        if u < 0:
            break
        links[u, v] = True
        comp = where(comp == comp[v], comp[u], comp)
    return links


def test_a_chunk_compiles_no_string_formatting(tmp_path, monkeypatch):
    """Numba compiles the error messages of some constructs (a slice assignment's shape
    mismatch, str() of an int) with its string machinery, which costs every spec's chunk
    about 1.6 s of compilation.  The generated code avoids them (numba_kernels.put,
    copy_into, fill): the module of a chunk compiled afresh holds none of that machinery."""
    import re
    monkeypatch.setenv("STRUCTDSL_CACHE_DIR", str(tmp_path))
    prog = structdsl.compile(forest_only_the_compile_test_compiles, backend="numba")   # a chunk no other test loads
    x = np.random.default_rng(0).normal(size=(4, 5, 5))
    s = prog.sample(x, seed=1)
    prog.log_prob_and_grad(s.trace, x)
    prog.conditional_noise(s.trace, x, seed=2)
    module = prog._chunk.inspect_llvm()            # compiled afresh: its LLVM module is at hand
    assert "chunk" in module
    assert not set(re.findall(r"shape_context|unicode|str_generic|integer_str", module))


def test_a_numba_compile_failure_becomes_a_clear_error(monkeypatch):
    from numba.core.errors import TypingError
    from structdsl.backends import numba_kernels
    from structdsl.backends.numba_backend import LoweringError
    fast = structdsl.compile(builtin.categorical, backend="numba")

    def rejects(*args):
        raise TypingError("Cannot unify array(int64, 1d, C) and bool for 'x'")
    monkeypatch.setattr(numba_kernels, "run_lanes", rejects)
    with pytest.raises(LoweringError, match=r"could not compile spec 'categorical' \(TypingError: Cannot unify") as info:
        fast.solve(np.ones(3))
    assert info.value.file.endswith("categorical.py") and "backend='numpy'" in str(info.value)


def test_a_zero_uniform_draws_as_the_smallest_normal_float():
    """torch's uniforms can be exactly 0; draw_flat counts 0 as the smallest normal
    float64, as the lock-step path clamps it, on the nested fast path and off it."""
    for name in ("spanning_tree", "arborescence"):
        prog = compiled(name, "numba")
        shape = atom_shape(name, 4)
        rng = np.random.default_rng(0)
        u = rng.uniform(size=(3,) + shape)
        u[:, 0, 1] = 0.0
        x = rng.normal(size=(3,) + shape)
        inst, flat = prog.instance(shape), (3, -1)
        a = prog.draw_flat(inst, u.reshape(flat).copy(), x.reshape(flat).copy())
        b = prog.draw_flat(inst, np.maximum(u, np.finfo(np.float64).tiny).reshape(flat), x.reshape(flat).copy())
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])
        assert np.isfinite(a[2][:, 1]).all()


def test_array_layouts_do_not_compile_the_driver_again():
    """Numba types a Fortran-ordered, strided or read-only array as a new signature, and a
    new signature compiles a driver again (seconds): transposed logits, read-only data and
    F-ordered traces must run on the signature a C-ordered call compiled (the backend checks
    every argument against the compiled chunk's signature, so a stray type would raise)."""
    from structdsl.backends import numba_kernels
    dag = np.asfortranarray(DAG)
    dag.flags.writeable = False
    prog = structdsl.compile(SPECS["topological"], backend="numba", dag=dag)
    ref = compiled("topological", "numpy")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4))
    trace = prog.sample(x, seed=1).trace
    R = trace.shape[-1]
    u, v = rng.uniform(size=(6, 4)), rng.uniform(size=(6, R + 4))

    def run(x, t, u, v):
        return [prog.log_prob(t, x), *prog.log_prob_and_grad(t, x), prog.conditional_noise(t, x, uniforms=v),
                prog.solve(x).trace, prog.sample(x, uniforms=u).trace, prog.sample(x, uniforms=u).noise]

    want = run(x, trace, u, v)                                     # the C-ordered signature
    drivers = (numba_kernels.run_lanes, numba_kernels.run_lanes_parallel)
    before = [len(d.signatures) for d in drivers]

    def odd(a, how):
        if how == "F":
            return np.asfortranarray(a)
        if how == "strided":
            return np.repeat(a, 2, axis=0)[::2]
        a = a.copy()
        a.flags.writeable = False
        return a

    for how in ("F", "strided", "read-only"):
        assert not odd(x, how).flags.c_contiguous or not odd(x, how).flags.writeable
        got = run(odd(x, how), odd(trace, how), odd(u, how), odd(v, how))
        for g, w in zip(got, want):
            assert np.array_equal(g, w), how
    assert [len(d.signatures) for d in drivers] == before, "\n".join(map(str, drivers[0].signatures))
    assert np.allclose(want[0], ref.log_prob(trace, x))


def _stacked(d, rng, ties=False):
    """Uniforms of a ``d x d`` lane at logit 0 whose noise grows row by row (every cell of
    row r before any of row r + 1; shuffled within a row, or all equal with ``ties``): the
    matching's heap pops each row's cells after its first winner as wasted pops."""
    order = np.stack([np.zeros(d) if ties else rng.permutation(d) for _ in range(d)]) + d * np.arange(d)[:, None]
    return np.exp(-(order + 1) / (d * d + 1.0))          # E = -log U = (rank + 1) / (A + 1)


@pytest.mark.parametrize("probe_from", [10 ** 9, 1])
def test_a_heap_race_and_a_block_race_find_the_reference_winner(probe_from, monkeypatch):
    """The nested fast path races from a heap, leaves it for blocks once its pops are mostly
    wasted, and a batch whose first lanes (the probe, from PROBE_FROM lanes on) both left it
    starts its other lanes in blocks.  Lanes made to take each way (no wasted pop: the
    diagonal first; rows stacked: wasted pops from the first rows on), with exact ties among
    them, sample and solve the reference's traces, with and without the probe."""
    from structdsl.backends import numba_backend
    monkeypatch.setattr(numba_backend, "PROBE_FROM", probe_from)
    fast, ref = programs("matching")
    d, rng = 8, np.random.default_rng(3)
    diagonal = np.full((d, d), 0.5)
    diagonal[np.arange(d), np.arange(d)] = 0.99           # the diagonal's cells win, in order
    tied = np.full((d, d), 0.5)
    lanes = {"stacked": _stacked(d, rng), "stacked ties": _stacked(d, rng, ties=True), "diagonal": diagonal,
             "tied": tied, "random": rng.random((d, d))}
    for first in (["stacked", "stacked"], ["diagonal", "stacked"]):  # blocks from the start, or not
        names = first + ["tied", "stacked ties", "random", "diagonal", "stacked"]
        u = np.stack([lanes[x] for x in names])
        logits = np.zeros_like(u)
        a, b = fast.sample(logits, uniforms=u), ref.sample(logits, uniforms=u)
        np.testing.assert_array_equal(a.trace, b.trace, err_msg=str(first))
        w = -np.log(u)                                     # the same races on given weights
        np.testing.assert_array_equal(fast.solve(w).trace, ref.solve(w).trace, err_msg=str(first))
        np.testing.assert_array_equal(fast.solve(np.round(4 * w) / 4).trace, ref.solve(np.round(4 * w) / 4).trace)


@pytest.mark.parametrize("name, d, absent", [("matching", 16, False), ("spanning_tree", 24, True),
                                             ("clustering", 12, True)])
def test_the_block_race_finds_the_heap_race_winner_on_large_lanes(name, d, absent, monkeypatch):
    """The block race against the heap alone (the generic nested sampler, ``block_race``
    off): the same traces from the same uniforms on
    lanes that leave the heap mid-way or start in blocks (the probe), with exact ties
    (uniforms on a coarse grid) and, where the spec allows them, absent atoms (-inf logits;
    a greedy matching can run out of cells)."""
    from structdsl.backends import numba_backend
    from structdsl.backends.numba_lowering import PASSES

    class HeapOnly(numba_backend.Program):
        passes = tuple(p for p in PASSES if p != "block_race")
    monkeypatch.setattr(numba_backend, "PROBE_FROM", 1)
    statics = {"c": 3} if name == "clustering" else {}
    fast = structdsl.compile(getattr(builtin, name), backend="numba", **statics)
    heap = HeapOnly(getattr(builtin, name), **statics)
    assert "__barg" in fast.source and "__barg" not in heap.source
    started_in_blocks, run = [], fast._run
    monkeypatch.setattr(fast, "_run", lambda *args: (started_in_blocks.append(args[-1]), run(*args))[1])
    rng = np.random.default_rng(7)
    B = 300
    logits = rng.normal(size=(B, d, d))
    if absent:
        logits[rng.random((B, d, d)) < 0.05] = -np.inf
    for u in (rng.random((B, d, d)), np.ceil(rng.random((B, d, d)) * 50) / 51):
        for x in (logits, np.zeros_like(logits)):
            a, b = fast.sample(x, uniforms=u), heap.sample(x, uniforms=u)
            np.testing.assert_array_equal(a.trace, b.trace)
    if name == "matching":            # its probe's lanes left the heap: the others started in blocks
        assert True in started_in_blocks


def test_the_vectorised_log_is_within_one_ulp_of_libm():
    """``numba_kernels.log_into`` (the lanes' noise's log, in a loop LLVM vectorises) against Python's
    ``math.log`` over uniforms, exponentials and the whole positive normal range, the
    reduction's edges (1, sqrt(2) and their neighbours), and the inputs it hands to libm
    (zero, subnormals, negatives, infinities, NaN), which must come out exactly libm's."""
    import math
    from structdsl.backends.numba_kernels import log_into
    rng = np.random.default_rng(5)
    edges = [np.finfo(float).tiny, 1.0, np.nextafter(1.0, 0), np.nextafter(1.0, 2), 2.0, math.sqrt(2),
             np.nextafter(math.sqrt(2), 0), np.nextafter(math.sqrt(2), 2), np.finfo(float).max, 1.1e-16]
    x = np.concatenate([rng.random(100_000), -np.log(rng.random(100_000)), np.exp(rng.uniform(-708, 709, 100_000)),
                        edges])
    out = np.empty_like(x)
    log_into(x, out)
    want = np.array([math.log(v) for v in x])
    ulps = np.abs(out - want) / np.spacing(np.abs(want))
    assert ulps.max() <= 1.0, x[np.argmax(ulps)]
    assert out[np.flatnonzero(x == 1.0)[0]] == 0.0
    special = np.array([0.0, -0.0, -1.0, np.inf, -np.inf, np.nan, 5e-324, 1e-310, -1e-310])
    out = np.empty_like(special)
    log_into(special, out)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(out, np.log(special))
    # E | T's fresh noise log(-log u): uniforms, the stream's extremes, subnormal uniforms (libm's)
    from structdsl.backends.numba_kernels import gumbel_into
    u = np.concatenate([rng.random(100_000), [0.5 / 2 ** 52, 1 - 0.5 / 2 ** 52, 5e-324, 1e-310, np.finfo(float).tiny]])
    out = np.empty_like(u)
    gumbel_into(u, out)
    want = np.array([math.log(-math.log(v)) for v in u])
    # a 1-ulp difference in -log u moves log(-log u) by ~eps absolutely (where it is near 0,
    # many of its own ulps): bounded absolutely, as the two libm calls are
    assert (np.abs(out - want) <= 2 * np.finfo(float).eps * np.maximum(1.0, np.abs(want))).all()
    np.testing.assert_array_equal(out[-3:-1], want[-3:-1])


def test_the_vectorised_exp_is_within_one_ulp_of_libm():
    """``numba_kernels.exp_into`` (the nested score's and E | T's exp, in a loop LLVM
    vectorises) against Python's ``math.exp``: the reduction's edges (multiples of ln 2 / 2),
    the subnormal range (rounded once), results near the largest float, exactly 1 at 0, 0 at
    -inf and below -746, inf at +inf and past the largest float."""
    import math
    from structdsl.backends.numba_kernels import exp_into
    rng = np.random.default_rng(6)
    half = math.log(2) / 2 * np.arange(-2150, 2048)
    x = np.concatenate([-rng.exponential(3.0, 100_000), rng.uniform(-746, 709.78, 100_000),
                        rng.uniform(-1e-8, 1e-8, 1000), half, np.nextafter(half, -np.inf), np.nextafter(half, np.inf),
                        [-708.39, -709.0, -744.44, -745.13, 709.0, 709.78, 709.782712893384]])
    x = x[(x >= -746.0) & (x <= 709.782712893384)]
    out = np.empty_like(x)
    exp_into(x, out)
    want = np.array([math.exp(v) for v in x])
    tiny = want < np.finfo(float).tiny                       # subnormal: an ulp is 5e-324
    ulps = np.abs(out - want) / np.where(tiny, 5e-324, np.spacing(want))
    assert ulps.max() <= 1.0, x[np.argmax(ulps)]
    special = np.array([0.0, -0.0, -746.5, -1e4, -np.inf, 709.8, 1e4, np.inf])
    exp_into(special, out[:8])
    assert out[:8].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, np.inf, np.inf, np.inf]


@pytest.mark.parametrize("scale", [0.5, 60.0, 3000.0])
@pytest.mark.parametrize("name", ["permutation", "spanning_tree", "matching", "clustering", "nested_sites"])
def test_the_nested_score_is_the_references_at_any_logit_spread(name, scale):
    """The nested score shifts its exps by the lane's largest live logit when every live logit
    lies within 600 nats of it, else by each exit race's own largest logit (scale 3000: the
    spreads are thousands of nats); either way log p, its gradient and E | T are the
    reference's (with absent atoms, -inf, in some lanes of the specs that allow them), up to
    the rounding of logits of that size (both compute l_w - lse by cancellation)."""
    tol = 1e-13 * max(1.0, scale)
    fast, ref = programs(name)
    rng = np.random.default_rng(int(scale))
    shape = atom_shape(name, SIZES[name][1])
    logits = rng.normal(size=(24,) + shape) * scale
    if name in ("spanning_tree", "clustering"):                  # their races may run empty
        logits[::3].reshape(8, -1)[:, ::5] = -np.inf
    flat = logits.reshape(24, -1)[:, ref.instance(shape).valid.ravel()]
    spread = np.where(np.isfinite(flat), flat, np.nan)
    spread = np.nanmax(spread, 1) - np.nanmin(spread, 1)
    assert (spread <= 600).all() if scale < 100 else (spread > 600).all()   # one shift, or a shift per race
    trace = ref.sample(logits, seed=2).trace
    u = rng.random((24, ref.instance(shape).max_races + int(np.prod(shape))))
    with np.errstate(over="ignore", under="ignore"):
        for got, want in ((fast.log_prob_and_grad(trace, logits), ref.log_prob_and_grad(trace, logits)),
                          ([fast.conditional_noise(trace, logits, uniforms=u)],
                           [ref.conditional_noise(trace, logits, uniforms=u)])):
            for g, w in zip(got, want):
                assert g.shape == w.shape
                np.testing.assert_array_equal(g[~np.isfinite(w)], w[~np.isfinite(w)])
                np.testing.assert_allclose(g[np.isfinite(w)], w[np.isfinite(w)], rtol=tol, atol=tol)


def test_the_nested_score_writes_every_gradient_entry(monkeypatch):
    """The nested fast path gives its lanes an uninitialised gradient buffer (no [B, A]
    memset): every entry must be written, at invalid and absent atoms and in lanes whose
    trace is impossible too.  With the backend's np.empty filling floats with NaN, any entry
    left unwritten would show."""
    from structdsl.backends import numba_backend

    class NaNEmpty:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(shape, dtype=float):
            return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype)

    monkeypatch.setattr(numba_backend, "np", NaNEmpty())
    rng = np.random.default_rng(8)
    for name in ("spanning_tree", "matching", "permutation", "clustering"):
        fast, ref = programs(name)
        shape = atom_shape(name, SIZES[name][1])
        logits = rng.normal(size=(6,) + shape)
        if name in ("spanning_tree", "clustering"):
            logits[1].reshape(-1)[::4] = -np.inf
        trace = ref.sample(logits, seed=3).trace
        trace[2, 1] = trace[2, 0]                 # a winner that already won: impossible
        got, want = fast.log_prob_and_grad(trace, logits), ref.log_prob_and_grad(trace, logits)
        assert np.isneginf(want[0][2])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("logit", [0.0, 37.5, -640.0])
def test_a_race_of_one_member_scores_exactly_zero(logit):
    """A lane whose every race has one member has probability 1: log p and its gradient are
    exactly 0 on every backend, whatever the logit (one live atom, or a spanning tree of two
    nodes)."""
    cat = [compiled("categorical", b) for b in ("numba", "numpy")]
    tree = [compiled("spanning_tree", b) for b in ("numba", "numpy")]
    x = np.full(5, -np.inf)
    x[3] = logit
    y = np.full((2, 2), logit)
    for prog in cat:
        logp, grad = prog.log_prob_and_grad(np.array([3]), x)
        assert logp == 0.0 and (grad == 0.0).all()
    for prog in tree:
        logp, grad = prog.log_prob_and_grad(np.array([1]), y)
        assert logp == 0.0 and (grad == 0.0).all()


def test_a_chunk_or_lane_kernel_is_never_called_on_other_types(monkeypatch):
    """The drivers call the generated ``chunk`` and the lane kernels at their addresses, where
    Numba cannot check types: the backend compares the arguments with ``CHUNK_SIGNATURE``
    before a kind of call first runs, and each lane kernel's caller refuses other types when
    the caller compiles."""
    from numba import njit
    from numba.core.errors import TypingError
    from structdsl.backends import numba_kernels
    prog = structdsl.compile(builtin.categorical, backend="numba")
    seen, run = [], numba_kernels.run_lanes
    monkeypatch.setattr(numba_kernels, "run_lanes", lambda address, args, *bounds: (seen.append(args),
                                                                                  run(address, args, *bounds)))
    prog.sample(np.zeros((2, 3)), seed=0)
    args = list(seen[0])
    prog._compile_chunk(tuple(args))                          # the very arguments pass
    args[0] = args[0].astype(np.int32)                        # int parameters as int32
    with pytest.raises(AssertionError, match=r"chunk of 'categorical' takes .* \(argument 0\)"):
        prog._compile_chunk(tuple(args))
    with pytest.raises(AssertionError, match=r"would be called on .* \(argument None\)"):
        prog._compile_chunk(tuple(args[:-1]))

    @njit
    def calls_with_a_float32_row(address, valid, res, alive):
        numba_kernels.call_prepare_solve(address, (valid, res.astype(np.float32), alive))
    valid = np.ones(3, dtype=bool)
    valid.flags.writeable = False
    with pytest.raises(TypingError, match="a lane kernel of signature"):
        address = numba_kernels.lane_kernels()[numba_kernels.LANE_KERNEL_INDEX["prepare_solve"]]
        calls_with_a_float32_row(address, valid, np.zeros(3), np.zeros(3, dtype=bool))
