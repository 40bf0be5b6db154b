"""The torch backend, the distribution and the estimators on a CUDA device: every result on
the device, equal to the CPU lock-step path from identical uniforms (which the parity tests
hold to the reference), host synchronisations bounded per call (not per race), and the
estimators unbiased there too.

Skipped without a GPU.  ``STRUCTDSL_TEST_DEVICE=cpu`` runs the same checks with CPU tensors
(the device-specific sync test excepted), a dry run of this file on a machine without one."""
import math
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import structdsl  # noqa: E402
from shared_specs import (SIZES, SPECS, STATICS, atom_shape, bad_line, careless, careless_vector, compiled,  # noqa: E402
                          divides, empty, false_promise, structure_loss)
from structdsl import EmptyRaceError, NestingError, SpecIndexError, SpecZeroDivisionError, specs  # noqa: E402
from structdsl import estimators  # noqa: E402
from structdsl.backends import program_class  # noqa: E402
from structdsl.torch import RaceDistribution  # noqa: E402

DEV = torch.device(os.environ.get("STRUCTDSL_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEV.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


def on_dev(t):
    return torch.is_tensor(t) and t.device.type == DEV.type


def case(name, seed, batch=3, drop=0.2, dtype=torch.float64):
    """(logits, uniforms) on the CPU for spec ``name`` at its largest parity size, some atoms
    masked by -inf."""
    shape = atom_shape(name, SIZES[name][1])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + shape, generator=g, dtype=torch.float64) * 1.5
    x = torch.where(torch.rand(x.shape, generator=g, dtype=torch.float64) < drop, -math.inf, x)
    u = torch.rand((batch,) + shape, generator=g, dtype=torch.float64).clamp_min(1e-300)
    return x.to(dtype), u.to(dtype)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_semantics_on_the_device_equals_the_cpu(name):
    prog = compiled(name, "torch")
    x, u = case(name, 0)
    try:
        cpu = prog.sample(x, uniforms=u)
    except structdsl.RaceError:              # -inf masks left some race empty: a dense case
        x, u = case(name, 0, drop=0.0)
        cpu = prog.sample(x, uniforms=u)
    dev = prog.sample(x.to(DEV), uniforms=u.to(DEV))
    assert on_dev(dev.trace) and torch.equal(dev.trace.cpu(), cpu.trace)
    fin = torch.isfinite(cpu.noise)
    torch.testing.assert_close(dev.noise.cpu()[fin], cpu.noise[fin], rtol=1e-12, atol=0)
    for a, b in zip(dev.structure, cpu.structure):
        assert on_dev(a) and torch.equal(a.cpu(), b)
    # log p and its autograd gradient, against the CPU's analytic score
    xd = x.to(DEV).requires_grad_(True)
    lp = prog.log_prob(dev.trace, xd)
    (g,) = torch.autograd.grad(lp.sum(), xd)
    lp_cpu, g_cpu = prog.log_prob_and_grad(cpu.trace, x)
    assert on_dev(lp) and on_dev(g)
    torch.testing.assert_close(lp.detach().cpu(), lp_cpu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.cpu(), g_cpu, rtol=1e-12, atol=1e-12)
    # E | T from the same uniforms, and its reparameterised gradient
    R, A = prog.max_races(x.shape[1:]), math.prod(x.shape[1:])
    v = torch.rand((x.shape[0], R + A), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    xc = x.clone().requires_grad_(True)
    n_cpu = prog.conditional_noise(cpu.trace, xc, uniforms=v)
    n_dev = prog.conditional_noise(dev.trace, xd, uniforms=v.to(DEV))
    assert on_dev(n_dev)
    fin = torch.isfinite(n_cpu)
    assert torch.equal(torch.isfinite(n_dev).cpu(), fin)
    torch.testing.assert_close(n_dev.detach().cpu()[fin], n_cpu.detach()[fin], rtol=1e-12, atol=1e-300)
    (gc,) = torch.autograd.grad(torch.where(fin, n_cpu * c, 0.0).sum(), xc)
    (gd,) = torch.autograd.grad(torch.where(fin.to(DEV), n_dev * c.to(DEV), 0.0).sum(), xd)
    torch.testing.assert_close(gd.cpu(), gc, rtol=1e-10, atol=1e-12)
    assert torch.equal(prog.solve(n_dev.detach()).trace.cpu(), cpu.trace)


def test_float32_on_the_device_is_exact_to_1e5_even_100_nats_apart():
    prog, ref = compiled("spanning_tree", "torch"), compiled("spanning_tree", "numpy")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 6, 6)) * 3
    logits[:, 0, 1] += 100.0
    x32 = torch.as_tensor(logits, dtype=torch.float32, device=DEV)
    s = prog.sample(x32, generator=torch.Generator(device=DEV).manual_seed(0))
    assert on_dev(s.trace) and s.noise.dtype == torch.float32
    lp32 = prog.log_prob(s.trace, x32)
    lp64 = ref.log_prob(s.trace.cpu().numpy(), logits.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(lp32.cpu().numpy(), lp64, rtol=1e-5, atol=1e-5)
    assert bool(s.structure.adjacency[:, 0, 1].all())


@pytest.mark.parametrize("bad, cls", [(careless, SpecIndexError), (careless_vector, SpecIndexError),
                                      (divides, SpecZeroDivisionError), (false_promise, NestingError),
                                      (empty, EmptyRaceError)],
                         ids=["index", "vector-index", "zero-division", "nesting", "empty-race"])
def test_errors_on_the_device_name_the_reference_line_and_lane(bad, cls):
    fast, ref = (structdsl.compile(bad, backend=b) for b in ("torch", "numpy"))
    logits = np.zeros((3, 4))
    u = np.tile(np.array([0.9, 0.5, 0.4, 0.3]), (3, 1))
    u[2] = [0.1, 0.2, 0.9, 0.3]
    with pytest.raises(cls) as want:
        ref.sample(logits, uniforms=u)
    with pytest.raises(cls) as got:
        fast.sample(torch.as_tensor(logits, device=DEV), uniforms=torch.as_tensor(u, device=DEV))
    assert got.value.line == want.value.line == bad_line(bad)
    assert got.value.lane == want.value.lane


def count_syncs(fn):
    """Host synchronisations of ``fn()``, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


@pytest.mark.skipif(DEV.type != "cuda", reason="sync debug mode exists on CUDA only")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("name", ["spanning_tree", "binary_tree", "matching"])
def test_host_syncs_per_call_do_not_grow_with_the_number_of_races(name, graphs):
    """The lock-step program never asks the device per race or per loop step: only its
    argument and error checks synchronise, at most 4 per call, at 8 and at 16 atoms a side
    (a per-race or per-constant sync would count in the tens), eagerly and replaying graphs."""
    prog = fresh(name, graphs)
    for n in (8, 16):
        x = torch.randn((4,) + atom_shape(name, n), device=DEV, dtype=torch.float64).requires_grad_(True)
        gen = torch.Generator(device=DEV).manual_seed(0)
        s = [None]

        def sample():
            s[0] = prog.sample(x.detach(), generator=gen)

        def score():
            prog.log_prob(s[0].trace, x).sum().backward()

        def noise():
            prog.conditional_noise(s[0].trace, x, generator=gen)
        for _ in range(2):                   # first calls: caches, graph capture
            for fn in (sample, score, noise):
                fn()
        counts = tuple(count_syncs(fn) for fn in (sample, score, noise))
        assert max(counts) <= 4, (n, counts)


def test_the_distribution_stays_on_the_device():
    x = torch.randn(2, 5, 5, device=DEV, dtype=torch.float64).requires_grad_(True)
    d = RaceDistribution(specs.spanning_tree, logits=x, validate_args=True)
    assert d._numba is None or DEV.type == "cpu"
    gen = torch.Generator(device=DEV).manual_seed(3)
    t = d.sample((4,), generator=gen)
    assert on_dev(t) and t.shape == (4, 2, 4)
    lp = d.log_prob(t)
    assert on_dev(lp) and lp.shape == (4, 2) and bool(torch.isfinite(lp).all())
    assert bool(d.support.check(t).all())
    bad = t.clone()
    bad[..., 1] = bad[..., 0]
    assert not bool(d.support.check(bad).any())
    with pytest.raises(ValueError, match="support"):
        d.log_prob(bad)
    s = d.structure(t)
    assert on_dev(s.adjacency) and bool((s.adjacency.sum((-1, -2)) == 8).all())
    trace, noise = d.sample_with_noise((3,), generator=gen)
    assert on_dev(noise) and noise.shape == (3, 2, 5, 5)
    assert torch.equal(d.program.solve(noise.detach()).trace, trace)
    e = d.conditional_noise(trace, generator=gen)
    assert on_dev(e) and torch.equal(d.program.solve(e.detach()).trace, trace)
    nl = d.noise_log_prob(noise)
    assert on_dev(nl) and nl.shape == (3, 2)
    assert d.expand((7, 2)).sample(generator=gen).shape == (7, 2, 4)
    with pytest.raises(ValueError):
        RaceDistribution(specs.spanning_tree, logits=torch.full((5, 5), math.nan, device=DEV), validate_args=True)


@pytest.mark.parametrize("name", ["spanning_tree", "arborescence", "binary_tree"])
def test_estimators_on_the_device_are_unbiased(name):
    """Mean of 4000 estimates (one batch element each) within 4 standard errors of the exact
    gradient, every coordinate; every gradient on the device, the critic's too."""
    torch.manual_seed(0)
    torch.cuda.manual_seed_all(0) if DEV.type == "cuda" else None
    prog = compiled(name, "torch")
    x0 = torch.as_tensor(np.random.default_rng(4).normal(size=atom_shape(name, 4)), device=DEV)
    f = structure_loss(name, 4, 5, DEV)
    xe = x0.clone().requires_grad_(True)
    estimators.exact_gradient(RaceDistribution(prog, xe), f).backward()
    truth = xe.grad
    assert on_dev(truth)
    valid = torch.as_tensor(np.array(compiled(name, "numpy").instance(tuple(x0.shape)).valid), device=DEV)
    draws = 4000
    relax = estimators.RELAX(atom_shape=x0.shape).to(DEV, torch.float64)
    with torch.no_grad():                   # a random critic: RELAX unbiased for every critic
        for p in relax.critic.parameters():
            p.copy_(torch.randn(p.shape, device=DEV, dtype=p.dtype) * 0.3)
    for est, fn in {"t_reinforce+": lambda d: estimators.t_reinforce(d, f, num_samples=3),
                    "e_reinforce": lambda d: estimators.e_reinforce(d, f),
                    "relax": lambda d: relax(d, f)}.items():
        x = x0.expand((draws,) + x0.shape).clone().requires_grad_(True)
        relax.zero_grad()
        fn(RaceDistribution(prog, x)).backward()
        g = x.grad * draws
        assert on_dev(g) and bool(torch.isfinite(g).all()), est
        mean, se = g.mean(0), g.std(0) / math.sqrt(draws)
        z = ((mean - truth) / se.clamp_min(1e-12))[valid]
        assert z.abs().max() < 4, (est, z.abs().max().item())
        if est == "relax":
            assert all(on_dev(p.grad) and bool(p.grad.abs().sum() > 0) for p in relax.critic.parameters())


def fresh(name, graphs):
    # a new program, not compile()'s shared one: its own graphs, its own cuda_graphs setting
    prog = program_class("torch")(SPECS[name], **STATICS.get(name, {}))
    prog.cuda_graphs = graphs
    return prog


@pytest.mark.parametrize("name", ["spanning_tree", "binary_tree", "top_k", "clustering"])
def test_graph_replays_equal_eager_calls(name):
    """Repeated calls replay CUDA graphs (the second call captures, later ones replay): each
    call's results equal an eager program's, outputs are fresh tensors (not the graph's
    buffers), and the graphed log_prob's backward, once and twice differentiated, equals
    autograd through the eager replay."""
    graphed, eager = fresh(name, True), fresh(name, False)
    held = []
    for call in range(4):
        x, u = case(name, 10 + call, drop=0.0)
        x, u = x.to(DEV), u.to(DEV)
        a, b = graphed.sample(x, uniforms=u), eager.sample(x, uniforms=u)
        assert torch.equal(a.trace, b.trace) and all(torch.equal(p, q) for p, q in zip(a.structure, b.structure))
        held.append((a.trace, b.trace))
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        la, lb = graphed.log_prob(a.trace, xa), eager.log_prob(b.trace, xb)
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
        c = torch.randn(la.shape, device=DEV, dtype=la.dtype)
        (ga,) = torch.autograd.grad((la * c).sum(), xa, create_graph=True)
        (gb,) = torch.autograd.grad((lb * c).sum(), xb, create_graph=True)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
        if ga.requires_grad:                                 # second order: the eager recomputation
            (ha,) = torch.autograd.grad((ga ** 2).sum(), xa, allow_unused=True)
            (hb,) = torch.autograd.grad((gb ** 2).sum(), xb, allow_unused=True)
            if hb is not None:
                torch.testing.assert_close(ha, hb, rtol=1e-10, atol=1e-12)
        xa.grad = None
        graphed.log_prob(a.trace, xa).sum().backward()      # a plain backward: the replayed gradient
        _, g_ref = eager.log_prob_and_grad(b.trace, x)
        torch.testing.assert_close(xa.grad, g_ref, rtol=1e-12, atol=1e-12)
        lpa, gra = graphed.log_prob_and_grad(a.trace, x)
        torch.testing.assert_close(gra, g_ref, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(graphed.log_prob(a.trace, x), lb.detach(), rtol=1e-12, atol=1e-12)
        sa, sb = graphed.decode(a.trace, x), eager.decode(b.trace, x)
        assert all(torch.equal(p, q) for p, q in zip(sa, sb))
        v = torch.rand((x.shape[0], graphed.max_races(x.shape[1:]) + math.prod(x.shape[1:])), device=DEV,
                       dtype=x.dtype)
        torch.testing.assert_close(graphed.conditional_noise(a.trace, x, uniforms=v),
                                   eager.conditional_noise(b.trace, x, uniforms=v), rtol=1e-12, atol=0)
    for ta, tb in held:                                      # no later replay overwrote them
        assert torch.equal(ta, tb)
    if DEV.type == "cuda":
        assert any(v != "seen" for v in graphed._graph_cache.values())


def test_a_replayed_graph_still_raises_the_first_lanes_error():
    graphed, eager = (program_class("torch")(careless) for _ in range(2))
    eager.cuda_graphs = False
    logits = torch.zeros((3, 4), device=DEV, dtype=torch.float64)
    fine = torch.full((3, 4), 0.5, device=DEV, dtype=torch.float64)
    fine[:, 1] = 0.9                                          # item 1 wins everywhere: no error
    for _ in range(3):
        graphed.sample(logits, uniforms=fine)
    bad = fine.clone()
    bad[2] = torch.tensor([0.9, 0.2, 0.1, 0.3])               # lane 2: item 0 wins, out[-1]
    with pytest.raises(SpecIndexError) as got:
        graphed.sample(logits, uniforms=bad)
    assert got.value.lane == (2,) and got.value.line == bad_line(careless)


def test_graphs_made_in_inference_mode_do_not_serve_normal_calls():
    """A graph captured under inference mode holds inference tensors, which a normal call
    could not refill: the two modes keep separate graphs."""
    prog, eager = fresh("spanning_tree", True), fresh("spanning_tree", False)
    x, u = case("spanning_tree", 3, drop=0.0)
    x, u = x.to(DEV), u.to(DEV)
    with torch.inference_mode():
        for _ in range(3):
            a = prog.sample(x, uniforms=u)
    for _ in range(3):
        b = prog.sample(x, uniforms=u)
    assert torch.equal(a.trace, b.trace) and torch.equal(b.trace, eager.sample(x, uniforms=u).trace)
