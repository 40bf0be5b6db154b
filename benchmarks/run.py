"""Throughput of the generic semantics on every built-in spec, measured in one run.

    python benchmarks/run.py [--batch 256] [--repeat 3]

Prints, per spec and size, microseconds per lane for sample, log_prob, conditional_noise
and solve on the NumPy reference backend, and each one's ratio to sample (replay-based
semantics should cost about as much as sampling: they re-run the same program).  The last
column compares solve with an independent textbook solver on the same weights, where the
test extras (networkx, scipy) are installed.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import structdsl
from structdsl import specs

CASES = [
    ("categorical", (64,), {}),
    ("top_k", (64,), {"k": 8}),
    ("permutation", (32,), {}),
    ("spanning_tree", (16, 16), {}),
    ("arborescence", (8, 8), {}),
    ("binary_tree", (32,), {}),
    ("matching", (8, 8), {}),
    ("clustering", (16, 16), {"c": 4}),
]


def _reference_solvers():
    """Independent solvers, when the test extras are installed (else an empty dict)."""
    try:
        import networkx as nx
    except ImportError:
        return {}

    def mst(w):
        n = len(w)
        g = nx.Graph()
        g.add_weighted_edges_from((u, v, w[u, v]) for u in range(n) for v in range(u + 1, n))
        return nx.minimum_spanning_tree(g)

    def arb(w):
        n = len(w)
        g = nx.DiGraph()
        g.add_weighted_edges_from((u, v, w[u, v]) for u in range(n) for v in range(1, n) if u != v)
        return nx.minimum_spanning_arborescence(g)

    return {"spanning_tree": mst, "arborescence": arb,
            "permutation": np.argsort, "categorical": np.argmin}


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    B = args.batch
    refs = _reference_solvers()
    rng = np.random.default_rng(0)
    print(f"structdsl {structdsl.__version__}, numpy backend, batch {B}, best of {args.repeat}; "
          f"us per lane (ratio to sample)")
    head = (f"{'spec':14s} {'atoms':>6s} {'sample':>9s} {'log_prob':>16s} {'cond. noise':>16s} "
            f"{'solve':>16s} {'textbook solver':>22s}")
    print(head)
    print("-" * len(head))
    for i, (name, shape, statics) in enumerate(CASES):
        if sys.stderr.isatty():
            print(f"[{i + 1}/{len(CASES)}] {name}", end="\r", file=sys.stderr, flush=True)
        prog = structdsl.compile(getattr(specs, name), **statics)
        logits = rng.normal(size=(B,) + shape)
        s = prog.sample(logits, seed=1)
        noise = prog.conditional_noise(s.trace, logits, seed=2)
        t = {
            "sample": best_of(lambda: prog.sample(logits, seed=1), args.repeat),
            "log_prob": best_of(lambda: prog.log_prob(s.trace, logits), args.repeat),
            "cond": best_of(lambda: prog.conditional_noise(s.trace, logits, seed=2), args.repeat),
            "solve": best_of(lambda: prog.solve(noise), args.repeat),
        }
        us = {k: v / B * 1e6 for k, v in t.items()}
        ratio = lambda k: f"{us[k]:8.1f} ({us[k] / us['sample']:4.2f})"
        ref = "n/a"
        if name in refs:
            tr = best_of(lambda: [refs[name](w) for w in noise], args.repeat) / B * 1e6
            ref = f"{tr:8.1f} (solve/ref {us['solve'] / tr:5.2f})"
        print(f"{name:14s} {'x'.join(map(str, shape)):>6s} {us['sample']:9.1f} {ratio('log_prob'):>16s} "
              f"{ratio('cond'):>16s} {ratio('solve'):>16s} {ref:>22s}")
    prog = structdsl.compile(specs.spanning_tree)
    t = best_of(lambda: prog.sample(np.zeros((16, 16)), sample_shape=(1024,), seed=0), args.repeat)
    print(f"\n1024 spanning trees on 16 nodes: {t:.2f} s (sample, numpy reference backend)")


if __name__ == "__main__":
    main()
