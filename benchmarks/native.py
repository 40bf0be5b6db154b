"""The generic compiler against a kernel written by hand for one structure (issue "native
speed"): spanning-tree sampling and scoring at n = 32 and 64, batch 1024, in one run.

    python benchmarks/native.py [--sizes 32,64] [--batch 1024] [--repeat 7] [--threads 2]

Rows (``--repeat`` rounds, interleaved so that the VM's drift hits every row alike; in each
round a row runs three calls back to back and keeps the fastest, the best over rounds is
shown): the numba backend's ``sample(seed=...)`` (its lanes draw the Philox
stream inside the compiled driver), ``log_prob_and_grad`` of those traces, the hand-written
heap-Kruskal kernel of ``benchmarks/yardstick.py`` (uniforms drawn inside its parallel
loop), and the noise floor: NumPy's ``standard_exponential`` for the valid atoms, one
thread.  Before timing, the yardstick's edge frequencies are checked against the
backend's at n = 6 (20000 draws each), so that the bar is the same law.  A second table
times ``seed=`` (each lane draws the Philox stream inside the driver) against NumPy drawing
the uniforms first (``uniforms=``), for four specs, interleaved in one process.

Why three calls a round: the first call after another row's work pays for faulting in
fresh pages of the ``[B, A]`` arrays it returns (the sample's noise: 8 MB at n = 32),
which the hand-written kernel, returning no noise, does not; ``--cold`` times one call a
round instead, to show that cost.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _best(fn, repeat):
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def same_law(prog, yardstick, n=6, draws=20000):
    """Largest difference of edge frequencies between the two samplers (should be noise,
    about ``4 / sqrt(draws)`` at most)."""
    x = np.random.default_rng(0).normal(size=(n, n))
    logits = np.broadcast_to(x, (draws, n, n)).copy()
    a = prog.sample(logits, seed=1).structure.adjacency.mean(0)
    _, adj = yardstick.sample(logits, 2)
    return float(np.abs(a - adj.mean(0)).max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cold", action="store_true", help="one call a round (see the module docstring)")
    args = p.parse_args(argv)
    import numba
    if args.threads:
        numba.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import yardstick

    import structdsl
    from structdsl import specs
    prog = structdsl.compile(specs.spanning_tree, backend="numba")
    gap = same_law(prog, yardstick)
    print(f"same law: largest edge-frequency gap {gap:.4f} at n = 6 (20000 draws each; 4 standard errors: 0.020)")
    rng = np.random.default_rng(0)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        x = rng.normal(size=(args.batch, n, n))
        upper = np.triu(np.ones((n, n), bool), 1)
        valid = int(upper.sum())
        s = prog.sample(x, seed=0)
        prog.log_prob_and_grad(s.trace, x)
        yardstick.sample(x, 0)
        cells = {"numba sample(seed=)": lambda: prog.sample(x, seed=3),
                 "numba log_prob_and_grad": lambda: prog.log_prob_and_grad(s.trace, x),
                 "hand-written heap kernel": lambda: yardstick.sample(x, 3),
                 "noise floor (1 thread)": lambda: np.random.default_rng(3).standard_exponential((args.batch, valid))}
        best = {k: np.inf for k in cells}
        for _ in range(args.repeat):                   # interleaved rounds
            for k, fn in cells.items():
                best[k] = min(best[k], _best(fn, 1 if args.cold else 3))
        rows.append((n, best))
    threads = numba.get_num_threads()
    print(f"\nspanning tree, batch {args.batch}, {threads} numba threads, best of {args.repeat} (ms)\n")
    heads = ["n"] + list(rows[0][1]) + ["sample / hand-written", "log_prob_and_grad / floor"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "|".join("---:" for _ in heads) + "|")
    for n, best in rows:
        ms = [f"{best[k] * 1e3:.1f}" for k in best]
        r1 = best["numba sample(seed=)"] / best["hand-written heap kernel"]
        r2 = best["numba log_prob_and_grad"] / best["noise floor (1 thread)"]
        print(f"| {n} | " + " | ".join(ms) + f" | {r1:.2f} | {r2:.2f} |")
    seeded_draw_table(lambda name: structdsl.compile(getattr(specs, name), backend="numba"),
                      [int(s) for s in args.sizes.split(",")], (64, args.batch), args.repeat * 3)


def seeded_draw_table(prog_for, sizes, batches, repeat):
    """``sample(seed=)`` (each lane draws the Philox stream inside the compiled driver)
    against ``sample(uniforms=default_rng(seed).random(shape))`` (NumPy draws a ``[B, A]``
    array on one thread first: what ``seed=`` did before), interleaved in one process."""
    print("\nseed= (Philox inside the lanes) against uniforms= drawn by NumPy first, "
          f"best of {repeat} interleaved calls; ratio > 1: seed= is faster\n")
    print("| spec | n | batch | seed= (ms) | NumPy draw + uniforms= (ms) | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ndim in (("categorical", 1), ("binary_tree", 1), ("spanning_tree", 2), ("matching", 2)):
        prog = prog_for(name)
        for n in sizes:
            for batch in batches:
                shape = (batch,) + (n,) * ndim
                x = np.random.default_rng(0).normal(size=shape)
                a = lambda: prog.sample(x, seed=3)                                    # noqa: E731
                b = lambda: prog.sample(x, uniforms=np.random.default_rng(3).random(shape))  # noqa: E731
                a(), b()
                ta = tb = np.inf
                for _ in range(repeat):
                    ta, tb = min(ta, _best(a, 1)), min(tb, _best(b, 1))
                print(f"| {name} | {n} | {batch} | {ta * 1e3:.2f} | {tb * 1e3:.2f} | {tb / ta:.2f} |")


if __name__ == "__main__":
    main()
