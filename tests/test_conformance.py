"""One meaning on every backend, by test: each rule runs on every backend that imports here
(``conformance.BACKENDS``) and is compared with the NumPy reference: values from identical
uniforms, or the same error class, spec line and batch element.

* refused specs are refused at their ``# BAD`` line with the reference's message;
* run-time rules (checked arithmetic, empty and out-of-range races, run-time bounds) fail
  at their ``# BAD`` line in the same batch element;
* the differential harness draws sizes, batches, logits (finite and ``-inf``) and uniforms
  with hypothesis and compares sample, log p, its gradient and E | T on every built-in spec
  and every test-only spec.
"""
import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structdsl
from structdsl import (EmptyRaceError, NestingError, RaceError, SpecError, SpecIndexError,
                       SpecOverflowError, SpecValueError, SpecZeroDivisionError)
from structdsl.testing import uniforms as uniforms_st

import hostile_specs as H
import shared_specs as S
from shared_specs import bad_line
from conformance import (BACKENDS, assert_conforms, assert_same_error, assert_same_values, outcome,
                         runner)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ==== refused at compile time, on every backend, at the user's line ============================
REFUSED = [
    (H.local_function_named_race, "a local function named 'race' would shadow the DSL's race()"),
    (H.variable_named_atoms, "a variable named 'atoms' would shadow"),
    (H.parameter_named_range, "a parameter named 'range' would shadow"),
    (H.lambda_parameter_named_any, "a parameter named 'any' would shadow"),
    (H.loop_variable_named_min, "a variable named 'min' would shadow"),
    (H.bare_return_beside_a_value, "return a value on every path"),
    (H.nonlocal_in_a_local_function, "`nonlocal` is outside the DSL"),
    (H.race_groups_in_a_local_function, "race_groups() inside the local function f()"),
    (H.race_in_one_branch_is_no_guard, "f() can reach itself through this call without a race"),
    (H.unguarded_mutual_recursion, "g() can reach itself through this call without a race"),
    (H.allow_empty_race_is_no_guard, "f() can reach itself through this call without a race"),
    (H.returns_a_two_dimensional_winner, "whose winner is a tuple of indices"),
    (H.noise_aliased_in_a_local_function, "noise 'item' stored or aliased"),
    (H.local_read_before_assignment, "local 'y' of f() may be unbound here"),
    (H.allow_empty_written_as_one, "allow_empty= must be written literally as True or False"),
    (H.scatter_through_augmented_assignment, "writing through an index array (a scatter)"),
    (H.scatter_through_a_tuple_of_arrays, "writing through an index array (a scatter)"),
    (H.masked_update, "`x[mask] |= value` is outside the DSL"),
    (H.bool_and_int, "`&` mixes a bool and an int64"),
    (H.bool_or_int_update, "`|` mixes a bool and an int64"),
    (H.scalar_or_array, "both branches of `a if c else b` must have the same shape"),
    (H.not_of_an_array, "`not` takes one bool"),
    (H.one_index_too_many, "too many indices"),
    (H.leading_dims_broadcast, "shapes [n=4, m=3] and [n=4] do not match"),
]


def _statics(bad):
    return {"m": 3} if bad is H.leading_dims_broadcast else {}


@pytest.mark.parametrize("bad, fragment", REFUSED, ids=lambda x: getattr(x, "name", ""))
def test_refused_at_the_users_line_on_every_backend(bad, fragment, backend):
    with pytest.raises(SpecError) as info:
        prog = structdsl.compile(bad, backend=backend.partition(":")[0], **_statics(bad))
        prog.instance((4,))                      # shapes are checked once the sizes are known
    err = info.value
    assert (err.file, err.line) == (H.__file__, bad_line(bad)), str(err)
    assert fragment in err.reason, err.reason
    assert "__" not in err.reason, f"a generated name leaks into the message: {err.reason}"


def test_messages_never_show_generated_names():
    """Specs refused inside local functions (where the recursion pass has rewritten the
    code into stacks and temporaries) speak of the user's names only."""
    for bad, _ in REFUSED:
        with pytest.raises(SpecError) as info:
            structdsl.compile(bad, **_statics(bad)).instance((4,))
        assert "__" not in str(info.value), str(info.value)


# ==== run-time rules: the same error, line and batch element ==================================
def _lanes(n=4, lanes=3):
    """Logits and uniforms where item 0 wins the first race in every lane but the last,
    where item 2 does."""
    u = np.tile(np.linspace(0.9, 0.3, n), (lanes, 1))
    u[-1] = np.roll(u[-1], 2)
    return np.zeros((lanes, n)), u


RUN_TIME = [
    (H.floor_divides_the_minimum_by_minus_one, SpecOverflowError, {}),
    (H.squares_past_int64, SpecOverflowError, {}),
    (H.negates_the_minimum, SpecOverflowError, {}),
    (H.abs_of_the_minimum, SpecOverflowError, {}),
    (H.adds_past_int64_in_place, SpecOverflowError, {}),
    (H.shifts_past_int64, SpecOverflowError, {}),
    (H.subtracts_past_int64, SpecOverflowError, {}),
    (H.negates_a_constant_minimum, SpecOverflowError, {}),
    (H.every_group_empty, EmptyRaceError, {}),
    (H.no_group_at_all, EmptyRaceError, {}),
    (H.group_key_equal_to_groups, SpecValueError, {}),
    (H.minus_one_winner_in_a_local_function, SpecIndexError, {}),
    (S.careless, SpecIndexError, {}),
    (S.careless_vector, SpecIndexError, {}),
    (S.careless_reduction, SpecIndexError, {}),
    (S.divides, SpecZeroDivisionError, {}),
    (S.empty, EmptyRaceError, {}),
]


@pytest.mark.parametrize("bad, cls, statics", RUN_TIME, ids=lambda x: getattr(x, "name", ""))
def test_run_time_errors_are_the_references(bad, cls, statics, backend):
    logits, u = _lanes()
    _, err = assert_conforms(backend, bad, lambda r: r.sample(logits, uniforms=u), statics)
    assert type(err) is cls and err.line == bad_line(bad), err
    assert f"{err.file}:{err.line}: " in str(err) and f"(batch element {err.lane})" in str(err)


def test_an_error_in_one_lane_names_that_lane(backend):
    logits = np.zeros((3, 4))
    u = np.full((3, 4), 0.5)
    u[:, 0] = 0.1                              # item 0 loses every first race...
    logits[2, 1:] = -np.inf                    # ...but in lane 2, where it is alone
    _, err = assert_conforms(backend, S.divides, lambda r: r.sample(logits, uniforms=u))
    assert type(err) is SpecZeroDivisionError and err.lane == (2,)


def test_same_errors_from_replay_and_solve(backend):
    """The same checks fire when the program is replayed and solved, not only sampled."""
    logits = np.zeros((3, 4))
    trace = np.array([[1], [0], [2]])
    weights = np.array([[2.0, 1.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 4.0]])
    for s in (S.divides, H.squares_past_int64, H.negates_the_minimum):
        _, err = assert_conforms(backend, s, lambda r: r.log_prob(trace, logits))
        assert err is not None and err.line == bad_line(s)
        _, err = assert_conforms(backend, s, lambda r: r.solve(weights))
        assert err is not None and err.line == bad_line(s)


def test_every_group_empty_with_allow_empty_takes_no_slot(backend):
    logits, u = _lanes()
    ref, _ = assert_conforms(backend, H.every_group_empty_allowed, lambda r: r.sample(logits, uniforms=u))
    assert (ref.structure.ws == -1).all() and (ref.trace[:, 0] == ref.structure.w).all()
    assert (ref.trace[:, 1:] == -1).all()


def test_negative_static_shapes_are_refused_at_their_line(backend):
    with pytest.raises(SpecError) as info:
        runner(H.negative_shape, backend, k=9).sample(np.zeros((1, 4)), seed=0)
    assert info.value.line == bad_line(H.negative_shape) and "k=9, n=4" in info.value.reason
    assert runner(H.negative_shape, backend, k=2).sample(np.zeros((1, 4)), seed=0).trace.shape == (1, 1)


def test_parameters_int64_cannot_hold_are_refused(backend):
    name = backend.partition(":")[0]
    with pytest.raises(ValueError, match=r"data parameter 'd' .* 9223372036854775813 at index \(1,\)"):
        structdsl.compile(H.reads_a_data_parameter, backend=name,
                          d=np.array([1, 2 ** 63 + 5], dtype=np.uint64))
    with pytest.raises(ValueError, match="static parameter 'k' .* cannot hold"):
        structdsl.compile(H.negative_shape, backend=name, k=2 ** 63)
    # the largest value int64 holds is accepted, and overflows only where the spec adds to it
    d = {"d": np.array([2 ** 63 - 1, 0], dtype=np.uint64)}
    logits = np.array([[0.0, -np.inf, -np.inf], [-np.inf, 0.0, -np.inf]])
    _, err = assert_conforms(backend, H.reads_a_data_parameter, lambda r: r.sample(logits, seed=1), d)
    assert type(err) is SpecOverflowError and err.lane == (1,)


# ==== boundaries of the run-time checks ========================================================
def test_a_trace_entry_equal_to_the_number_of_atoms_is_refused(backend):
    r = runner(H.three_races, backend)
    for entry, ok in ((3, True), (4, False), (-1, True), (-2, False)):
        trace = np.array([[0, 1, entry]])
        if ok:
            assert_conforms(backend, H.three_races, lambda r: r.log_prob(trace, np.zeros((1, 4))))
        else:
            with pytest.raises(ValueError, match=r"trace entries must be flat atom indices in \[0, 4\)"):
                r.log_prob(trace, np.zeros((1, 4)))


def test_an_extra_winner_after_the_last_race_is_impossible(backend):
    logits, u = _lanes()
    ref, _ = assert_conforms(backend, H.every_group_empty_allowed, lambda r: r.sample(logits, uniforms=u))
    extra = ref.trace.copy()
    extra[:, 1] = 3                           # a winner where the program has no race left
    lp, _ = assert_conforms(backend, H.every_group_empty_allowed, lambda r: r.log_prob(extra, logits))
    assert (lp == -np.inf).all()
    lp, _ = assert_conforms(backend, H.every_group_empty_allowed, lambda r: r.log_prob(ref.trace, logits))
    assert np.isfinite(lp).all()


@pytest.mark.parametrize("bad", [H.group_outside_the_previous_race, S.false_promise],
                         ids=lambda s: s.name)
def test_a_race_outside_the_previous_one_breaks_the_nesting_promise(bad, backend):
    """Sampling and replay raise NestingError on every backend that checks the promise;
    a backend whose nested fast path trusts it (docs/design.md 4.4) may give any answer but
    must not crash, and check_spec, which replays on the reference, catches it there."""
    logits, u = _lanes()
    trace = np.array([[0, 2]] * 3)
    r = runner(bad, backend)
    if not r.prog.checks_nesting:
        for run in (lambda: r.sample(logits, uniforms=u), lambda: r.log_prob(trace, logits)):
            outcome(run)
        from structdsl.testing import check_spec
        with pytest.raises(NestingError):
            check_spec(bad, backend=backend.partition(":")[0], samples=100)
        return
    for call in (lambda r: r.sample(logits, uniforms=u), lambda r: r.log_prob(trace, logits)):
        _, err = assert_conforms(backend, bad, call)
        assert type(err) is NestingError and err.line == bad_line(bad)


@pytest.fixture
def fresh_compiles():
    """A test that monkeypatches the compiler must not get, nor leave, a cached program."""
    structdsl.cache_clear()
    yield
    structdsl.cache_clear()


def test_a_run_past_the_static_race_bound_raises(backend, monkeypatch, fresh_compiles):
    """The bound on the number of races is proven; if the proof were wrong, every backend
    must raise rather than return a truncated trace."""
    import structdsl.program as program
    from conformance import Runner
    monkeypatch.setattr(program, "_race_bound", lambda *args: 2)
    logits, u = _lanes()
    errors = []
    for b in ("numpy", backend):
        r = Runner(H.three_races, b)
        assert r.max_races((4,)) == 2
        for call in (lambda: r.sample(logits, uniforms=u), lambda: r.log_prob(np.array([[0, 1]] * 3), logits),
                     lambda: r.conditional_noise(np.array([[0, 1]] * 3), logits, seed=0)):
            with pytest.raises(RaceError, match="more races than the static bound 2") as info:
                call()
            errors.append(info.value)
    for got, want in zip(errors[3:], errors[:3]):
        assert_same_error(got, want)


def test_a_recursion_that_outruns_its_proven_bound_raises(backend, monkeypatch, fresh_compiles):
    """The dispatch loop's step bound is proven (docs/design.md 3.10); with a wrong proof
    (simulated by shrinking it) frames are left on the stack, and every backend raises at
    the call instead of returning a truncated result."""
    from structdsl import recursion
    from conformance import Runner
    monkeypatch.setattr(recursion._Desugarer, "bounds", lambda self: (1, 0))
    fresh = structdsl.spec(H.recursion_with_a_proven_bound.fn)
    logits, u = np.zeros((3, 7)), np.random.default_rng(0).random((3, 7))
    errs = []
    for b in ("numpy", backend):
        with pytest.raises(RaceError, match=r"did not finish within the proven bound") as info:
            Runner(fresh, b).sample(logits, uniforms=u)
        errs.append(info.value)
    assert errs[0].line == bad_line(H.recursion_with_a_proven_bound)
    assert_same_error(errs[1], errs[0])
    monkeypatch.undo()
    structdsl.cache_clear()
    ok = Runner(structdsl.spec(H.recursion_with_a_proven_bound.fn), backend).sample(logits, uniforms=u)
    assert sorted(ok.structure.order[0].tolist()) == list(range(7))


# ==== the differential harness ===================================================================
def _test_only_specs():
    """Every accepted spec that exists only in the tests (no ``# BAD`` line, no static
    parameter): the modules below are the ones that define specs and import with numpy
    alone.  ``{name: (spec, (lo, hi) sizes)}``."""
    import importlib
    out = {}
    for module in ("hostile_specs", "shared_specs", "law_specs", "test_one_meaning", "test_inputs",
                   "test_recursion", "test_data_and_padding", "test_race_forms", "test_verifier",
                   "test_refused_forms"):
        m = importlib.import_module(module)
        for name, s in vars(m).items():
            if not isinstance(s, structdsl.Spec) or s.fn.__module__ != module or name in S.SPECS \
                    or "# BAD" in inspect.getsource(s.fn) or s.ir.statics:
                continue
            out[name] = (s, (1, 6) if len(s.ir.atoms.dims) == 1 else (1, 4))
    return out


TEST_ONLY = _test_only_specs()
SPECS = sorted(S.SPECS) + sorted(TEST_ONLY)


def _case(name):
    if name in TEST_ONLY:
        s, sizes = TEST_ONLY[name]
        return s, sizes, {}, lambda n: (n,) * len(s.ir.atoms.dims)
    statics = dict(S.STATICS.get(name, {}))
    if name == "topological":
        statics["dag"] = S.DAG
    return S.SPECS[name], S.SIZES[name], statics, lambda n: S.atom_shape(name, n)


@pytest.mark.parametrize("name", SPECS)
def test_differential(name, backend):
    """numpy against ``backend`` from identical uniforms, finite logits and -inf atoms:
    trace, structure, noise, log p, its gradient, E | T, solve on E | T, and the -inf
    verdict on a perturbed trace."""
    spec_, (lo, hi), statics, shape_of = _case(name)
    runner(spec_, "numpy", **statics)              # an accepted spec: refusing it is a failure

    @settings(max_examples=4 if name in TEST_ONLY else 10, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def check(data):
        n = data.draw(st.integers(lo, hi), label="n")
        shape = shape_of(n)
        batch = data.draw(st.sampled_from([(), (3,), (2, 2)]), label="batch")
        size = int(np.prod(batch + shape))
        logits = np.array(data.draw(st.lists(st.floats(-4, 4), min_size=size, max_size=size),
                                    label="logits")).reshape(batch + shape)
        if data.draw(st.booleans(), label="-inf atoms"):
            drop = data.draw(st.lists(st.booleans(), min_size=size, max_size=size))
            logits = np.where(np.array(drop).reshape(logits.shape), -np.inf, logits)
        u = data.draw(uniforms_st(batch + shape), label="uniforms")
        ref, err = assert_conforms(backend, spec_, lambda r: r.sample(logits, uniforms=u), statics)
        if err is not None:
            return
        assert_conforms(backend, spec_, lambda r: r.log_prob_and_grad(ref.trace, logits), statics)
        R, A = runner(spec_, "numpy", **statics).max_races(shape), int(np.prod(shape))
        v = data.draw(uniforms_st(batch + (R + A,)), label="E|T uniforms")
        noise, _ = assert_conforms(backend, spec_, lambda r: r.conditional_noise(ref.trace, logits, uniforms=v),
                                   statics)
        again = runner(spec_, backend, **statics).solve(noise)
        assert_same_values(again.trace, ref.trace)
        if R > 1:                              # a perturbed trace: the same -inf verdicts
            t = np.array(ref.trace)
            t[..., [0, 1]] = t[..., [1, 0]]
            assert_conforms(backend, spec_, lambda r: r.log_prob(t, logits), statics)
    check()


@pytest.mark.parametrize("name", SPECS)
def test_exact_ties(name, backend):
    """Every atom with the same logit and uniform: ties break the reference's way."""
    spec_, (lo, hi), statics, shape_of = _case(name)
    runner(spec_, "numpy", **statics)              # an accepted spec: refusing it is a failure
    shape = shape_of(hi)
    rng = np.random.default_rng(1)                 # a lane of ties beside an ordinary one
    logits = np.stack([np.zeros(shape), rng.normal(size=shape)])
    u = np.stack([np.full(shape, 0.5), rng.random(shape)])
    ref, err = assert_conforms(backend, spec_, lambda r: r.sample(logits, uniforms=u), statics)
    if err is None:
        assert_conforms(backend, spec_, lambda r: r.log_prob_and_grad(ref.trace, logits), statics)


def test_a_seed_means_the_same_draw_on_every_backend(backend):
    """``seed=`` is the reference's NumPy draw on every backend (torch's own stream is
    ``generator=``): one seed, one sample, for sample and for E | T."""
    logits = np.random.default_rng(5).normal(size=(3, 5, 5))
    name = backend.partition(":")[0]
    device = backend.partition(":")[2] or "cpu"
    ref = structdsl.compile(S.SPECS["spanning_tree"])
    prog = structdsl.compile(S.SPECS["spanning_tree"], backend=name)
    x = logits
    if name == "torch":
        import torch
        x = torch.as_tensor(logits, device=device)
    a, b = ref.sample(logits, sample_shape=(2,), seed=7), prog.sample(x, sample_shape=(2,), seed=7)
    assert_same_values(np.asarray(b.trace.cpu() if hasattr(b.trace, "cpu") else b.trace), a.trace)
    na = ref.conditional_noise(a.trace, logits, seed=8)
    nb = prog.conditional_noise(b.trace, x, seed=8)
    assert_same_values(np.asarray(nb.detach().cpu() if hasattr(nb, "cpu") else nb), na)
