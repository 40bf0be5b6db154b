"""Probe: the lock-step torch body captured as one CUDA graph vs run eagerly (sampling, and
log_prob forward+backward through torch.cuda.make_graphed_callables).  Exploratory."""
import math
import sys
import time

import torch

import structdsl
from structdsl import specs

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def best(fn, k=3):
    fn()
    sync()
    out = math.inf
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        sync()
        out = min(out, time.perf_counter() - t0)
    return out


def probe(name, shape, B):
    prog = structdsl.compile(getattr(specs, name), backend="torch")
    inst = prog.instance(shape)
    A = inst.num_atoms
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn((B,) + shape, device=dev, dtype=torch.float64, generator=g)
    u = torch.rand((B,) + shape, device=dev, dtype=torch.float64, generator=g)
    eager = best(lambda: prog.sample(x, uniforms=u))
    ref = prog.sample(x, uniforms=u)
    xb = x.reshape(B, A)
    live = prog._valid(inst, dev) & ~torch.isneginf(xb)
    res_in = torch.where(live, torch.log(-torch.log(u.reshape(B, A))) - xb, math.inf)

    def body():
        m = prog._machine(inst, "solve", live, dev)
        m.res, m.log_space = res_in.clone(), True
        m.trace = torch.full((m.B, inst.max_races), -1, dtype=torch.int64, device=dev)
        with torch.no_grad():
            m.run(prog.ir.body)
        return m.trace, m.err
    body_eager = best(body)
    line = f"{name} {shape} B={B}: sample eager {eager * 1e3:.1f} ms, body eager {body_eager * 1e3:.1f} ms"
    if dev.type == "cuda":
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                body()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            t0 = time.perf_counter()
            with torch.cuda.graph(graph):
                trace, err = body()
            cap = time.perf_counter() - t0
            rep = best(graph.replay)
            same = torch.equal(trace, ref.trace.reshape(B, -1)) and not bool((err > 0).any())
            line += f"; graph capture {cap * 1e3:.0f} ms, replay {rep * 1e3:.2f} ms (x{body_eager / rep:.0f}), same trace {same}"
        except Exception as exc:                      # report, go on
            line += f"; graph failed: {type(exc).__name__}: {str(exc)[:300]}"
    print(line, flush=True)
    # log_prob forward + backward
    t = ref.trace.reshape(B, -1)

    def lp_eager():
        xg = xb.detach().clone().requires_grad_(True)
        prog.log_prob(t, xg.reshape((B,) + shape)).sum().backward()
    lpe = best(lp_eager)

    def replay_logp(xg):
        logp, m, _ = _replay_nofinish(prog, t, xg, inst)
        return logp
    line = f"    log_prob fwd+bwd eager {lpe * 1e3:.1f} ms"
    if dev.type == "cuda":
        try:
            xs = xb.detach().clone().requires_grad_(True)
            t0 = time.perf_counter()
            fn = torch.cuda.make_graphed_callables(replay_logp, (xs,))
            cap = time.perf_counter() - t0

            def lp_graph():
                fn(xs).sum().backward()
            rep = best(lp_graph)
            xs.grad = None
            lp_graph()
            xa = xb.detach().clone().requires_grad_(True)
            prog.log_prob(t, xa.reshape((B,) + shape)).sum().backward()
            ok = torch.allclose(xs.grad, xa.grad, rtol=1e-12, atol=1e-12)
            line += f"; graphed capture {cap * 1e3:.0f} ms, fwd+bwd {rep * 1e3:.2f} ms (x{lpe / rep:.0f}), same grad {ok}"
        except Exception as exc:
            line += f"; graphed failed: {type(exc).__name__}: {str(exc)[:300]}"
    else:
        xs = xb.detach().clone().requires_grad_(True)
        replay_logp(xs).sum().backward()
    print(line, flush=True)


def _replay_nofinish(prog, t, x, inst):
    """``_replay_t`` without its error check (the one host sync)."""
    import contextlib

    _exit_scores = sys.modules[type(prog).__module__]._exit_scores
    live = prog._valid(inst, x.device) & ~torch.isneginf(x.detach())
    m = prog._machine(inst, "replay", live, x.device)
    m.trace, m.logits, m.u = t, x, None
    m.logp = torch.zeros(m.B, dtype=x.dtype, device=x.device)
    m.log_sum = torch.full((m.B, inst.num_atoms), -math.inf, dtype=x.dtype, device=x.device)
    m.exit = torch.full((m.B, inst.num_atoms), -1, dtype=torch.int64, device=x.device) if prog._exit_races else None
    with torch.no_grad() if prog._exit_races else contextlib.nullcontext():
        m.run(prog.ir.body)
    if m.exit is not None:
        m.logp, m.log_sum = _exit_scores(x, t, m.slot, m.exit, None, inst.max_races)
    return m.logp, m, live


if __name__ == "__main__":
    sizes = [int(a) for a in sys.argv[1:]] or [16, 32]
    for n in sizes:
        for name, shape in [("spanning_tree", (n, n)), ("matching", (n, n))] + [("binary_tree", (n,))] * (n <= 16):
            try:
                probe(name, shape, 1024 if dev.type == "cuda" else 8)
            except Exception as exc:
                print(f"{name} n={n}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
