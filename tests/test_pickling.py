"""Compile once, pickle by reference (issue 21, items 1 and 2; docs/design.md §4.2.2).

``structdsl.compile`` returns one program per (spec, backend, parameter values) from a
bounded process-wide cache; specs, programs and ``RaceDistribution`` pickle by reference
(module and name, or a spec's source) and rebuild through that cache, in this process, after
``cache_clear()`` (a rebuild from scratch), and in spawn-started processes."""
import copy
import io
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import structdsl
from structdsl import atoms, cache, full, race, spec
from structdsl.specs import spanning_tree, top_k

torch = pytest.importorskip("torch")
from structdsl.torch import RaceDistribution  # noqa: E402

BACKENDS = ["numpy", "numba", "torch"]
SHAPE = (5, 5)


@spec
def allowed_pick(n, allowed):
    """One race among the items a data parameter allows."""
    item = atoms(n, valid=lambda i: allowed[i])
    w = race(item)
    return w


def local_spec():
    """A spec defined in a function (not importable by name): pickled by its source, with
    the closure's constants."""
    K = 2
    TABLE = (1, 0, 1, 1, 1)

    @spec(nested=True)
    def first_allowed(n):
        """The first K allowed items to fire."""
        item = atoms(n, valid=lambda i: TABLE[i] == 1)
        order = full(K, -1)
        for j in range(K):
            w = race(item)
            order[j] = w
        return order
    return first_allowed


class TreeModel(torch.nn.Module):
    """A module holding a compiled program, as a user's model does."""

    def __init__(self, program):
        super().__init__()
        self.program = program
        self.encoder = torch.nn.Linear(3, SHAPE[0] * SHAPE[1], dtype=torch.float64)

    def forward(self, x):
        return RaceDistribution(self.program, self.encoder(x).reshape(x.shape[:-1] + SHAPE))


@pytest.fixture(autouse=True)
def fresh_cache():
    structdsl.cache_clear()
    yield
    structdsl.cache_clear()


def inputs(batch=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch,) + SHAPE), rng.uniform(0.01, 0.99, size=(batch,) + SHAPE)


def as_numpy(x):
    return x.numpy() if torch.is_tensor(x) else np.asarray(x)


def drawn(prog, logits, u):
    """What a program computes from fixed uniforms: traces, structure, log p."""
    s = prog.sample(logits, uniforms=u)
    logp = prog.log_prob(s.trace, logits)
    return [as_numpy(s.trace), *(as_numpy(f) for f in s.structure), as_numpy(logp)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ---- compile once ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_arguments_compile_once(backend):
    prog = structdsl.compile(spanning_tree, backend=backend)
    assert structdsl.compile(spanning_tree, backend=backend) is prog
    assert structdsl.compile(spanning_tree, backend="numpy" if backend != "numpy" else "torch") is not prog
    k3 = structdsl.compile(top_k, backend=backend, k=3)
    assert structdsl.compile(top_k, backend=backend, k=np.int64(3)) is k3     # by value, not by type
    assert structdsl.compile(top_k, backend=backend, k=2) is not k3
    info = structdsl.cache_info()
    assert (info.hits, info.misses, info.currsize) == (2, 4, 4)
    structdsl.cache_clear()
    assert structdsl.compile(spanning_tree, backend=backend) is not prog       # cleared: compiled anew


def test_data_parameters_are_keyed_by_content():
    a = structdsl.compile(allowed_pick, allowed=np.array([True, False, True]))
    assert structdsl.compile(allowed_pick, allowed=np.array([True, False, True])) is a   # another array
    assert structdsl.compile(allowed_pick, allowed=[True, False, True]) is a             # a list of it
    assert structdsl.compile(allowed_pick, allowed=np.array([True, True, True])) is not a
    assert structdsl.compile(allowed_pick, allowed=np.array([True, False])) is not a     # shape
    with pytest.raises(structdsl.SpecError, match="must give a bool"):
        structdsl.compile(allowed_pick, allowed=np.array([1, 0, 1]))    # another dtype: compiled, refused
    assert a.sample(np.zeros((50, 3)), seed=0).structure.w.tolist().count(1) == 0


def test_refused_parameters_still_raise_after_an_equal_valued_program_is_cached():
    structdsl.compile(top_k, k=1)
    with pytest.raises(TypeError, match="must be an int"):
        structdsl.compile(top_k, k=True)                 # True == 1, but a bool is refused
    with pytest.raises(TypeError, match="must be an int"):
        structdsl.compile(top_k, k=1.0)
    with pytest.raises(TypeError, match="no parameter"):
        structdsl.compile(top_k, k=1, q=2)
    assert structdsl.cache_info().currsize == 1          # failures are not cached


def test_a_defaulted_parameter_given_or_not_is_one_program():
    @spec
    def with_default(n, k=2):
        item = atoms(n)
        order = full(k, -1)
        for j in range(k):
            w = race(item)
            order[j] = w
        return order
    assert structdsl.compile(with_default) is structdsl.compile(with_default, k=2)
    assert structdsl.compile(with_default, k=1) is not structdsl.compile(with_default)


def test_the_cache_is_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(cache, "MAXSIZE", 2)
    a = structdsl.compile(top_k, k=1)
    b = structdsl.compile(top_k, k=2)
    assert structdsl.compile(top_k, k=1) is a            # a is now the most recent
    structdsl.compile(top_k, k=3)                         # evicts b
    assert structdsl.cache_info().currsize == 2
    assert structdsl.compile(top_k, k=1) is a
    assert structdsl.compile(top_k, k=2) is not b


def test_two_specs_with_one_source_are_two_keys():
    """The key is the spec's identity (and its source's hash): a copy made to be modified
    gets programs of its own."""
    twin = copy.copy(spanning_tree)
    assert twin is not spanning_tree and twin.ir is spanning_tree.ir
    assert structdsl.compile(twin) is not structdsl.compile(spanning_tree)
    assert structdsl.compile(twin) is structdsl.compile(twin)


def test_a_distribution_from_the_spec_reuses_the_compiled_program_and_its_specialisation():
    """RaceDistribution(spec, ...) compiles through the cache: built per step, it finds the
    same torch program, its per-shape Instance and its numba twin; nothing compiles again."""
    logits = torch.zeros((4,) + SHAPE, dtype=torch.float64)
    first = RaceDistribution(spanning_tree, logits)
    first.sample()
    misses = structdsl.cache_info().misses
    for _ in range(20):
        d = RaceDistribution(spanning_tree, logits)
        assert d.program is first.program and d.instance is first.instance
        assert d._numba is first._numba is first.program.numba_twin()
    assert structdsl.cache_info().misses == misses
    # a non-torch program is compiled for torch once, through the same cache
    numpy_prog = structdsl.compile(spanning_tree, backend="numpy")
    assert RaceDistribution(numpy_prog, logits).program is first.program
    assert structdsl.cache_info().misses == misses + 1   # the numpy program itself


# ---- pickling specs --------------------------------------------------------------------------
def test_a_built_in_spec_pickles_by_reference():
    data = pickle.dumps(spanning_tree)
    assert b"structdsl.specs.spanning_tree" in data and b"race(" not in data   # a name, no source
    assert pickle.loads(data) is spanning_tree
    assert copy.deepcopy(spanning_tree) is spanning_tree
    assert pickle.loads(pickle.dumps(allowed_pick)) is allowed_pick                 # this module's


def test_a_local_spec_pickles_by_source_and_rebuilds_verified():
    s = local_spec()
    data = pickle.dumps(s)
    assert b"race(item)" in data                                   # the source travels
    assert pickle.loads(data) is s                                 # in this process: itself
    assert copy.deepcopy(s) is s
    logits, u = np.zeros((2, 5)), np.random.default_rng(1).uniform(size=(2, 5))
    before = drawn(structdsl.compile(s), logits, u)
    structdsl.cache_clear()                                        # forget it: rebuild from the text
    r = pickle.loads(data)
    assert r is not s and r.name == s.name and r.nested and r.__doc__ == s.__doc__
    assert r.ir.constants == s.ir.constants == {"TABLE": (1, 0, 1, 1, 1), "K": 2}
    assert r.ir.atoms.line == s.ir.atoms.line                      # errors name the user's lines
    assert r.ir.file.endswith(f"from {s.ir.file} #{r.ir.file.rsplit('#', 1)[1]}")
    assert_same(drawn(structdsl.compile(r), logits, u), before)
    assert pickle.loads(data) is r                                 # one object per source
    assert pickle.loads(pickle.dumps(r)) is r                      # pickled again: the same source


def test_a_source_spec_s_parameter_defaults_and_bad_lines_survive():
    @spec
    def bad_default(n, k=3):
        item = atoms(n)
        order = full(k, -1)
        w = race(item)
        order[k] = w                   # out of bounds: the error names this line
        return order
    line = bad_default.fn.__code__.co_firstlineno + 5
    data = pickle.dumps(bad_default)
    structdsl.cache_clear()
    r = pickle.loads(data)
    assert r is not bad_default and r.fn.__defaults__ == (3,)
    for s in (bad_default, r):
        with pytest.raises(structdsl.RaceError) as info:
            structdsl.compile(s).sample(np.zeros(4), seed=0)
        assert info.value.line == line


# ---- pickling programs and distributions -------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_program_round_trips_through_pickle_deepcopy_and_torch_save(backend):
    prog = structdsl.compile(top_k, backend=backend, k=3)
    logits, u = np.random.default_rng(0).normal(size=(4, 6)), np.random.default_rng(1).uniform(size=(4, 6))
    expected = drawn(prog, logits, u)
    data = pickle.dumps(prog)
    assert len(data) < 1000                          # a reference, not generated code or arrays
    assert pickle.loads(data) is prog and copy.deepcopy(prog) is prog
    copied = copy.copy(prog)                         # a private shallow copy
    assert copied is not prog and type(copied) is type(prog) and copied.static_params == {"k": 3}
    for load in (lambda: pickle.loads(data), lambda: copy.deepcopy(prog), lambda: _torch_round_trip(prog)):
        structdsl.cache_clear()
        again = load()
        assert again is not prog and again.backend == backend and again.static_params == {"k": 3}
        assert_same(drawn(again, logits, u), expected)


def _torch_round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_a_program_with_data_parameters_round_trips():
    prog = structdsl.compile(allowed_pick, backend="numba", allowed=np.array([False, True, True, False]))
    logits, u = np.zeros((3, 4)), np.random.default_rng(2).uniform(size=(3, 4))
    expected = drawn(prog, logits, u)
    structdsl.cache_clear()
    again = pickle.loads(pickle.dumps(prog))
    assert again is not prog and again.data["allowed"].tolist() == [False, True, True, False]
    assert_same(drawn(again, logits, u), expected)


def _dist_outputs(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = d.sample_with_structure((2,), generator=g)
    return [s.trace.numpy(), s.structure.adjacency.numpy(), d.log_prob(s.trace).detach().numpy()]


@pytest.mark.parametrize("fast_cpu", [True, False])
def test_a_distribution_round_trips(fast_cpu):
    x, _ = inputs()
    d = RaceDistribution(spanning_tree, torch.as_tensor(x), fast_cpu=fast_cpu)
    expected = _dist_outputs(d)
    for load in (lambda: pickle.loads(pickle.dumps(d)), lambda: copy.deepcopy(d), lambda: _torch_round_trip(d)):
        structdsl.cache_clear()
        again = load()
        assert type(again) is RaceDistribution and again.program is not d.program
        assert again.batch_shape == d.batch_shape and again.event_shape == d.event_shape
        assert again.fast_cpu is fast_cpu and (again._numba is None) is (not fast_cpu)
        assert_same(_dist_outputs(again), expected)


def test_a_module_holding_a_program_round_trips_through_torch_save():
    model = TreeModel(structdsl.compile(spanning_tree, backend="torch"))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = _dist_outputs(model(x))
    structdsl.cache_clear()
    again = _torch_round_trip(model)
    assert again.program is not model.program and again.program.backend == "torch"
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))
    assert_same(_dist_outputs(again(x)), expected)
    twin = copy.deepcopy(model)                 # a model copy shares the (immutable) program
    assert twin.program is again.program and twin.encoder.weight is not model.encoder.weight


# ---- spawn-started processes ---------------------------------------------------------------------
def _in_a_spawned_process(payload):
    """Runs in a fresh interpreter: unpickles programs, a distribution and a model, and
    returns what they compute."""
    progs, dist, model, logits, u, x = payload
    out = {b: drawn(p, logits, u) for b, p in progs.items()}
    out["dist"] = _dist_outputs(dist)
    out["model"] = _dist_outputs(model(x))
    out["pid"] = os.getpid()
    return out


def test_programs_distributions_and_models_work_in_spawned_processes():
    logits, u = inputs()
    progs = {b: structdsl.compile(spanning_tree, backend=b) for b in BACKENDS}
    dist = RaceDistribution(spanning_tree, torch.as_tensor(logits))
    model = TreeModel(progs["torch"])
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = {b: drawn(p, logits, u) for b, p in progs.items()}
    expected["dist"], expected["model"] = _dist_outputs(dist), _dist_outputs(model(x))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_in_a_spawned_process, ((progs, dist, model, logits, u, x),))
    assert got.pop("pid") != os.getpid()
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert_same(got[k], expected[k])


MAIN_SCRIPT = '''
import json
import multiprocessing

import numpy as np

import structdsl
from structdsl import atoms, race, spec

LIMIT = 2


@spec
def at_top_level(n):
    item = atoms(n)
    w = race(item)
    return w


def work(prog, top):
    """In the spawned child: the spec below was never defined here (it sits under the
    __main__ guard), so it must come from its pickled source; the top-level one is defined
    again here (the child runs the file's top level), and the unpickled program uses it."""
    import __main__
    assert not hasattr(__main__, "pick_two")
    assert top.spec is __main__.at_top_level and top is structdsl.compile(__main__.at_top_level)
    return prog.sample(np.zeros((3, 4)), uniforms=np.full((3, 4), 0.5) ** np.arange(1, 5)).trace.tolist()


if __name__ == "__main__":
    @spec
    def pick_two(n):
        item = atoms(n)
        a = race(item)
        b = race(item, lambda i: i != a and i < n - LIMIT + 2)
        return a, b

    prog = structdsl.compile(pick_two)
    here = prog.sample(np.zeros((3, 4)), uniforms=np.full((3, 4), 0.5) ** np.arange(1, 5)).trace.tolist()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        there = pool.apply(work, (prog, structdsl.compile(at_top_level)))
    print(json.dumps({"here": here, "there": there}))
'''


def test_a_spec_defined_under_the_main_guard_works_in_spawned_workers(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["here"] == out["there"] and len(out["here"]) == 3
