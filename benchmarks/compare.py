"""Time this tree against an earlier commit, alternating runs, and print the ratios.

    python benchmarks/compare.py a182337                      # run.py's default rows
    python benchmarks/compare.py HEAD~3 --rounds 3 -- --backend numba --specs spanning_tree --sizes 32

A refactor that promises no speed change is timed against the commit before it on the same
machine in one sitting (this VM's noise hides 10 % between sittings): the earlier commit is
checked out into a temporary git worktree, and ``benchmarks/run.py`` (arguments after
``--``, default ``--backend numba,torch --sizes 16,32 --batches 1024``) and
``benchmarks/estimators.py --quick --only steps`` run alternately from each tree,
``--rounds`` times.  The table gives each cell's median rate over the rounds, for this tree
and the earlier one, and their ratio (> 1: this tree is faster; for the estimators' step
times, < 1).  Compilation is excluded as in ``run.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_DEFAULT = ["--backend", "numba,torch", "--sizes", "16,32", "--batches", "1024", "--no-compile-time",
               "--no-steps", "--repeat", "5"]


def package_view(tree: Path, into: Path) -> Path:
    """A directory whose ``structdsl`` package is ``tree``'s (with ``backends`` and ``specs``
    mapped in as the install does), to put first on ``PYTHONPATH``."""
    pkg = into / "structdsl"
    shutil.copytree(tree / "structdsl", pkg)
    for sub in ("backends", "specs"):
        (pkg / sub).symlink_to(tree / sub)
    shutil.copytree(tree / "benchmarks", into / "benchmarks")
    return into


@contextlib.contextmanager
def two_trees(rev: str):
    """``{"head": view of this tree, "base": view of ``rev``}`` (see :func:`package_view`),
    ``rev`` checked out into a temporary git worktree that is removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        worktree = tmp / "earlier"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), rev],
                       check=True, capture_output=True)
        try:
            yield {"head": package_view(ROOT, tmp / "head"), "base": package_view(worktree, tmp / "base")}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)


def run(view: Path, script: str, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(view)}
    out = subprocess.run([sys.executable, str(view / "benchmarks" / script), *args], env=env, cwd=view,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{script} failed in {view}:\n{out.stderr[-2000:]}")
    return out.stdout


def _rate(s: str) -> float:
    scale = {"k": 1e3, "M": 1e6}
    return float(s[:-1]) * scale[s[-1]] if s[-1] in scale else float(s)


def parse_run(text: str) -> dict:
    """``{(spec, n, batch, semantics, backend): lanes/s}`` from run.py's tables (their two
    header lines name the semantics and, under each, the backends)."""
    out, spec, groups, backends = {}, None, [], []
    for line in text.splitlines():
        m = re.match(r"([a-z_]+) \(atoms", line)
        if m:
            spec = m.group(1)
            continue
        cells = [c.split() for c in line.split("|")]
        if line.lstrip().startswith("|") and "sample" in line:
            groups = [" ".join(c) for c in cells[1:]]
        elif line.lstrip().startswith("n batch"):
            backends = cells[1:]
        m = re.match(r"\s*(\d+)\s+(\d+)\s*\|", line)
        if m and spec:
            for group, names, values in zip(groups, backends, cells[1:]):
                for name, v in zip(names, values):
                    if group != "noise" and re.fullmatch(r"[\d.]+[kM]?", v):
                        out[(spec, int(m.group(1)), int(m.group(2)), group, name)] = _rate(v)
    return out


def parse_steps(text: str) -> dict:
    """``{(toy, estimator): ms per step}`` from estimators.py's step table."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([a-z_]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            for est, v in zip(["T-REINFORCE", "T-REINFORCE+", "RELAX"], m.groups()[1:]):
                out[(m.group(1), est)] = float(v)
    return out


def table(title, cells, unit):
    print(f"\n{title}\n")
    print(f"| cell | this tree ({unit}) | earlier ({unit}) | this / earlier |")
    print("|---|---|---|---|")
    for key, sides in cells.items():
        if sides["head"] and sides["base"]:
            h, b = statistics.median(sides["head"]), statistics.median(sides["base"])
            print(f"| {' '.join(map(str, key))} | {h:.4g} | {b:.4g} | {h / b:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the earlier commit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-steps", action="store_true", help="skip estimators.py")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    run_args = argv[cut + 1:] or RUN_DEFAULT              # arguments for run.py, after --
    with two_trees(a.rev) as views:
        rates, steps = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list))
        for r in range(a.rounds):
            for side in ("head", "base") if r % 2 == 0 else ("base", "head"):
                print(f"round {r + 1}: {side}", file=sys.stderr, flush=True)
                for key, v in parse_run(run(views[side], "run.py", run_args)).items():
                    rates[key][side].append(v)
                if not a.no_steps:
                    for key, v in parse_steps(run(views[side], "estimators.py", ["--quick", "--only", "steps"])).items():
                        steps[key][side].append(v)
    print(f"# this tree vs {a.rev}, {a.rounds} alternating rounds; medians")
    table("lanes per second (benchmarks/run.py)", rates, "lanes/s")
    if steps:
        table("ms per training step (benchmarks/estimators.py)", steps, "ms")


if __name__ == "__main__":
    main()
