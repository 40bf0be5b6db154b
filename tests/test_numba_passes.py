"""The numba code generator's optional rewrites (``numba_lowering.PASSES``: loop fusion, the
nested heap sampler, the snapshot scorer, the block race) against the generic lowering: a
program compiled with a rewrite turned off must give the same traces, structures, log-noise,
log p, gradient, E | T and errors from identical uniforms, on finite and on ``-inf`` logits."""
import pytest

pytest.importorskip("numba")

import regression_fixture as R
import shared_specs
from conformance import Runner, assert_same_values
from structdsl.backends import numba_backend
from structdsl.backends.numba_lowering import PASSES, Codegen

from test_conformance import _case


def _without(*off):
    class Variant(numba_backend.Program):
        passes = tuple(p for p in PASSES if p not in off)
    return Variant


# each spec with the rewrites it exercises (the generated source is checked to differ)
CASES = [
    ("spanning_tree", ("nested_heap", "snapshot_scorer", "loop_fusion")),   # nested, predicates
    ("spanning_tree", ("snapshot_scorer",)),      # the heap with the generic nested scorer
    ("matching", ("block_race",)),               # the heap alone
    ("top_k", ("nested_heap", "snapshot_scorer")),
    ("nested_sites", ("nested_heap", "snapshot_scorer")),
    ("arborescence", ("loop_fusion",)),
    ("every_reduction_and_conversion", ("loop_fusion",)),
]


@pytest.mark.parametrize("name, off", CASES, ids=[f"{n}-without-{'+'.join(o)}" for n, o in CASES])
def test_rewrite_means_what_the_generic_lowering_means(name, off):
    spec, (lo, hi), statics, shape_of = _case(name)
    fast = Runner(spec, "numba", **statics)
    generic = Runner(spec, "numba", **statics)
    generic.prog = _without(*off)(spec, **statics)
    assert generic.prog.source != fast.prog.source, f"turning off {off} changed nothing on {name}"
    for n in sorted({lo, hi}):
        shape = tuple(shape_of(n))
        want = R.program_outputs(generic, name, shape)
        got = R.program_outputs(fast, name, shape)
        assert set(got) == set(want), (name, n)
        for key in sorted(want):
            if key.endswith("/error"):
                assert str(got[key]) == str(want[key]), key
            else:
                assert_same_values(got[key], want[key])


def test_a_program_compiled_without_rewrites_is_the_generic_lowering():
    spec, _, statics, _ = _case("spanning_tree")
    prog = _without(*PASSES)(spec, **statics)
    assert prog.checks_nesting            # the nested promise is checked off the heap path
    assert "__heap_pop(" not in prog.source and "__score_snap(" not in prog.source


def test_an_unknown_pass_is_refused():
    spec, _, statics, _ = _case("top_k")
    prog = numba_backend.Program(spec, **statics)
    with pytest.raises(ValueError, match="unknown passes"):
        Codegen(prog.ir, prog.types, passes=("loop_fusion", "vectorize"))


def _parallel_from(lanes):
    class Variant(numba_backend.Program):
        parallel_from = lanes
    return Variant


@pytest.mark.parametrize("name", sorted(shared_specs.SPECS))
def test_the_parallel_driver_means_what_the_serial_one_means(name):
    """``run_lanes`` (a plain loop, batches under ``parallel_from`` lanes) and
    ``run_lanes_parallel`` (``prange``) run the same lane: the same outputs and errors."""
    spec, (lo, hi), statics, shape_of = _case(name)
    serial, parallel = Runner(spec, "numba", **statics), Runner(spec, "numba", **statics)
    serial.prog = _parallel_from(10 ** 9)(spec, **statics)
    parallel.prog = _parallel_from(1)(spec, **statics)
    shape = tuple(shape_of(hi))
    want = R.program_outputs(serial, name, shape)
    got = R.program_outputs(parallel, name, shape)
    assert set(got) == set(want) and any(k.endswith("/logp") for k in want), name
    for key in sorted(want):
        if key.endswith("/error"):
            assert str(got[key]) == str(want[key]), key
        else:
            assert_same_values(got[key], want[key])
    assert {k[0] for k in parallel.prog._called} == {"run_lanes_parallel"}
    assert {k[0] for k in serial.prog._called} == {"run_lanes"}
