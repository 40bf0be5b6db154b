"""Training-step time of this tree against an earlier commit, both trees at once.

    python benchmarks/step_ab.py a182337                           # every toy, T+ and RELAX
    python benchmarks/step_ab.py HEAD~1 --toys spanning_tree --estimators t_reinforce+ --rounds 12

``compare.py`` alternates whole benchmark runs, and on a shared VM the load changes between
two runs more than a refactor changes a step.  Here each round runs the two trees *at the
same time*, each process pinned to its own core (``taskset``; the cores swap every round),
so that a neighbour's load hits both; each process times, per cell (toy, estimator), the
best of ``--blocks`` blocks of ``--steps`` training steps of ``structdsl.toys.train`` (n =
10, 3 samples, Adam, one thread, after a warm-up), the step of ``benchmarks/estimators.py``.
The table gives each cell's median step time over the rounds for both trees and the median
of the per-round ratios (< 1: this tree is faster).  Needs 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict

from compare import two_trees

CHILD = """
import sys, json
from structdsl import toys
toy_names, estimators, blocks, steps = sys.argv[1].split(","), sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
out = {}
for s in toy_names:
    for e in estimators:
        toys.train(s, e, steps=steps, eval_every=10**9, eval_samples=10, progress=False)      # warm up
        out[s + " " + e] = min(toys.train(s, e, steps=steps, eval_every=10**9, eval_samples=10,
                                          progress=False)[-1]["seconds"] for _ in range(blocks)) / steps * 1e6
print(json.dumps(out))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the earlier commit")
    p.add_argument("--toys", default="spanning_tree,arborescence,binary_tree,matching,top_k,permutation")
    p.add_argument("--estimators", default="t_reinforce+,relax")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    pin = shutil.which("taskset") is not None
    times = defaultdict(lambda: defaultdict(list))
    with two_trees(a.rev) as views:
        for r in range(a.rounds):
            print(f"round {r + 1} of {a.rounds}", file=sys.stderr, flush=True)
            procs = {}
            for core, side in enumerate(("head", "base") if r % 2 == 0 else ("base", "head")):
                cmd = [sys.executable, "-c", CHILD, a.toys, a.estimators, str(a.blocks), str(a.steps)]
                procs[side] = subprocess.Popen((["taskset", "-c", str(core)] if pin else []) + cmd,
                                               env={**os.environ, "PYTHONPATH": str(views[side])}, cwd=views[side],
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for side, proc in procs.items():
                out, err = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"{side} failed:\n{err[-2000:]}")
                for cell, us in json.loads(out.strip().splitlines()[-1]).items():
                    times[cell][side].append(us)
    print(f"# us per training step, this tree vs {a.rev}: {a.rounds} rounds, both trees at once "
          f"({'pinned to one core each' if pin else 'unpinned'}); medians")
    print("\n| toy estimator | this tree | earlier | median of ratios |")
    print("|---|---:|---:|---:|")
    for cell, sides in times.items():
        ratios = [h / b for h, b in zip(sides["head"], sides["base"])]
        print(f"| {cell} | {statistics.median(sides['head']):.0f} | {statistics.median(sides['base']):.0f} | "
              f"{statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
