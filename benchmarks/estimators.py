"""Gradient estimators: step time of every toy and per-coordinate variance of every estimator.

    python benchmarks/estimators.py            # both tables (~3 minutes on 2 cores)
    python benchmarks/estimators.py --quick    # fewer steps and draws (~1 minute)
    python benchmarks/estimators.py --markdown

Step time: one training step of a toy (sample 3 structures, the estimator's surrogate,
backward, Adam) at n = 10, one thread, after a warm-up, best of 3 rounds; beside it the
step time of the paper authors' public code on this kind of machine (2-core CPU) and the
ratio (target: at most 0.5).

Spec vs program: the same toy step with ``RaceDistribution`` built from the spec every step
and from a compiled program (the compile cache makes them cost the same; target ratio <= 1.2).

Variance: at fixed random logits (seed 0) and a fixed random loss of the structure, the
variance of each estimator per coordinate (mean over the valid coordinates), from many
independent estimates (one batch element per estimate); RELAX with its default critic
after training the critic alone for a few hundred steps at those logits.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the authors' public code, one step of 3 samples at n = 10 on a 2-core CPU (ms)
AUTHORS_MS = {"spanning_tree": (4.2, 9.7), "arborescence": (0.99, 3.5), "binary_tree": (1.3, 2.2),
              "matching": (1.3, 2.5)}
SIZES = {"categorical": (8,), "top_k": (8,), "permutation": (6,), "spanning_tree": (6, 6),
         "arborescence": (5, 5), "binary_tree": (7,), "matching": (5, 5), "clustering": (6, 6)}
STATIC = {"top_k": {"k": 3}, "clustering": {"c": 2}}


def step_times(rounds, steps):
    from structdsl import toys
    rows = []
    for s in toys.STRUCTURES:
        row = {"toy": s}
        for e in ("t_reinforce", "t_reinforce+", "relax"):
            toys.train(s, e, steps=30, eval_every=10**9, eval_samples=10, progress=False)   # warm up
            best = min(toys.train(s, e, steps=steps, eval_every=10**9, eval_samples=10, progress=False)[-1]
                       ["seconds"] for _ in range(rounds))
            row[e] = 1000 * best / steps
        rows.append(row)
    return rows


def spec_vs_program(rounds, steps, n=10):
    """The spanning-tree toy's T-REINFORCE+ step (3 samples, Adam, one thread) with the
    distribution built every step from the spec (``RaceDistribution(specs.spanning_tree,
    logits)``, which compiles through the compile cache) and from a compiled program; ms per
    step, the best of ``rounds`` short blocks of ``steps`` steps, the two alternating block by
    block (so that a change in the machine's load hits both)."""
    import time
    import torch
    from structdsl import compile as compile_spec, estimators, specs, toys
    from structdsl.torch import RaceDistribution
    prog = compile_spec(specs.spanning_tree, backend="torch")
    f = toys.TOYS["spanning_tree"].make_loss(n, torch.device("cpu"))
    sources = {"spec": lambda: specs.spanning_tree, "program": lambda: prog}

    def run(source, count):
        logits = torch.zeros((n, n), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=0.01, fused=True)
        t0 = time.perf_counter()
        for _ in range(count):
            logits.grad = None
            estimators.t_reinforce(RaceDistribution(source(), logits), f, num_samples=3).backward()
            opt.step()
        return (time.perf_counter() - t0) / count

    with toys._threads(1):                       # torch and numba, as the toys' step table
        for how in sources.values():
            run(how, 20)                          # warm up (the first spec step compiles)
        best = {k: math.inf for k in sources}
        for _ in range(rounds):
            for k, how in sources.items():
                best[k] = min(best[k], run(how, steps))
    return {k: 1000 * v for k, v in best.items()}


def variances(draws, critic_steps):
    import numpy as np
    import torch
    from structdsl import compile as compile_spec, estimators, specs
    from structdsl.torch import RaceDistribution
    torch.set_num_threads(2)
    out = []
    for name, shape in SIZES.items():
        prog = compile_spec(getattr(specs, name), backend="torch", **STATIC.get(name, {}))
        inst = prog.instance(shape)
        valid = torch.as_tensor(np.array(inst.valid))
        dims = [len(inst.types.outputs[o].shape) for o in prog.ir.outputs]
        width = sum(math.prod(d.value for d in inst.types.outputs[o].shape) for o in prog.ir.outputs)
        rng = np.random.default_rng(0)
        x0 = torch.as_tensor(rng.normal(size=shape))
        w = torch.as_tensor(rng.normal(size=width))

        def f(s):
            flat = torch.cat([v.reshape(v.shape[:v.dim() - d] + (-1,)).double() for v, d in zip(s, dims)], -1)
            return torch.cos(2.0 * (flat @ w)) + 0.3 * (flat @ w)

        relax = estimators.RELAX(atom_shape=shape).double()
        opt = torch.optim.Adam(relax.parameters(), lr=0.01)
        for _ in range(critic_steps):          # train the critic alone at these logits
            x = x0.expand((16,) + shape).clone().requires_grad_(True)
            opt.zero_grad()
            relax(RaceDistribution(prog, x), f).backward()
            opt.step()
        row = {"spec": name, "atoms": "x".join(map(str, shape))}
        for label, est in [("E-REINFORCE", estimators.e_reinforce), ("T-REINFORCE", estimators.t_reinforce),
                           ("E-REINFORCE+", lambda d, f: estimators.e_reinforce(d, f, num_samples=3)),
                           ("T-REINFORCE+", lambda d, f: estimators.t_reinforce(d, f, num_samples=3)),
                           ("RELAX", relax)]:
            x = x0.expand((draws,) + shape).clone().requires_grad_(True)
            est(RaceDistribution(prog, x), f).backward()
            g = x.grad * draws
            row[label] = float(g.var(0)[valid].mean())
        out.append(row)
    return out


def table(header, rows, markdown):
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)), "-" * (sum(widths) + 2 * len(widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--only", choices=["steps", "variance"])
    args = p.parse_args(argv)
    import platform
    import torch
    print(f"# {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, "
          f"torch {torch.__version__}")
    if args.only != "variance":
        rows = step_times(rounds=2 if args.quick else 3, steps=100 if args.quick else 300)
        out = []
        for r in rows:
            a = AUTHORS_MS.get(r["toy"])
            out.append([r["toy"], f"{r['t_reinforce']:.2f}", f"{r['t_reinforce+']:.2f}", f"{r['relax']:.2f}",
                        f"{a[0]:.2f}" if a else "-", f"{a[1]:.2f}" if a else "-",
                        f"{r['t_reinforce'] / a[0]:.2f}" if a else "-", f"{r['relax'] / a[1]:.2f}" if a else "-"])
        print("\nStep time per toy (ms; n = 10, 3 samples, 1 thread; ratio = ours / authors', target <= 0.5)")
        print(table(["toy", "T-REINFORCE", "T-REINFORCE+", "RELAX", "authors T", "authors RELAX",
                     "ratio T", "ratio RELAX"], out, args.markdown))
        sp = spec_vs_program(rounds=20 if args.quick else 60, steps=25)
        print("\nDistribution from the spec every step vs from a compiled program (spanning_tree toy, "
              "T-REINFORCE+, n = 10, 3 samples, 1 thread; ms per step; target: ratio <= 1.2)")
        print(table(["toy", "from spec", "from program", "ratio"],
                    [["spanning_tree", f"{sp['spec']:.2f}", f"{sp['program']:.2f}",
                      f"{sp['spec'] / sp['program']:.2f}"]], args.markdown))
    if args.only != "steps":
        rows = variances(draws=1000 if args.quick else 4000, critic_steps=100 if args.quick else 400)
        labels = ["E-REINFORCE", "T-REINFORCE", "E-REINFORCE+", "T-REINFORCE+", "RELAX"]
        out = [[r["spec"], r["atoms"]] + [f"{r[k]:.4g}" for k in labels] + [f"{r['T-REINFORCE'] / r['E-REINFORCE']:.2f}"]
               for r in rows]
        print("\nGradient variance per coordinate (mean over valid atoms; fixed logits and loss, seed 0; "
              "one sample per estimate, '+' = one leave-one-out group of 3)")
        print(table(["spec", "atoms"] + labels + ["T / E"], out, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
