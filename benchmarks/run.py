"""Throughput of every backend on every built-in spec, measured in one run.

    python benchmarks/run.py                       # all specs, sizes 8..64, batches 1..1024
    python benchmarks/run.py --quick               # smoke test: sizes 8,16, batches 1,64
    python benchmarks/run.py --backend numba --specs spanning_tree --sizes 32 --batches 1024
    python benchmarks/run.py --markdown > table.md

For each spec, size n and batch it prints lanes per second (batch elements per second) of
``sample``, ``log_prob_and_grad`` and ``conditional_noise`` on each backend, the ratio
numba / numpy measured in the same run, and the *noise-draw floor*: the rate at which
NumPy's Generator alone draws the noise of that shape (``-log(rng.random(shape))``), with
numba's sample rate as a fraction of it.

Timing: ``time.perf_counter``, best of ``--repeat`` calls.  Every program is compiled and
called once per size before it is timed, so compilation (and the per-size specialisation)
is excluded.  The NumPy reference backend runs one lane at a time in Python: it is timed
on at most ``--numpy-lanes`` lanes (and as many as fit in about ``--numpy-budget`` seconds
per cell) and its rate is extrapolated from the lanes actually run; a semantics whose
single lane takes more than ``--numpy-skip-ms`` is skipped ("skip").

Sizes: spanning_tree, arborescence, matching and clustering take atoms [n, n];
categorical, top_k, permutation and binary_tree take atoms [n]; top_k uses k = n // 4
(at least 1), clustering c = 2.  Logits are standard normal (seed 0).

``--check-cost`` times the numba backend twice in the same run, interleaved: as compiled
(every int64 operation that can overflow is checked, as the DSL requires) and compiled with
the checks off (a private flag of the code generator that only this benchmark sets; such a
program wraps on overflow).  It prints one table of lanes/s, on and off, and their ratio.

Finally the numba compile time of one spec (``--compile-spec``) is measured in fresh
subprocesses: truly cold (fresh STRUCTDSL_CACHE_DIR and NUMBA_CACHE_DIR), cold for the spec
only (fresh STRUCTDSL_CACHE_DIR; Numba's cache of the shared kernels module as found in
the package's __pycache__), and cached (a second process reusing the first one's caches).
The subprocesses write and read Python's bytecode as a user's Python does, even where the
environment sets PYTHONDONTWRITEBYTECODE (compiling structdsl's own modules from source
again costs every process about 0.06 s).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

import structdsl
from structdsl import specs

# name -> (number of atom dims, static parameters as a function of n)
SPECS = {
    "categorical": (1, lambda n: {}),
    "top_k": (1, lambda n: {"k": max(1, n // 4)}),
    "permutation": (1, lambda n: {}),
    "spanning_tree": (2, lambda n: {}),
    "arborescence": (2, lambda n: {}),
    "binary_tree": (1, lambda n: {}),
    "matching": (2, lambda n: {}),
    "clustering": (2, lambda n: {"c": 2}),
}
SEMANTICS = {"sample": "sample", "log_prob_and_grad": "lp+grad",
             "conditional_noise": "cond_noise", "solve": "solve"}
DEFAULT_SEMANTICS = ["sample", "log_prob_and_grad", "conditional_noise"]
NUMPY_MEMORY_ELEMS = 1 << 23    # numpy replay keeps [lanes, races, atoms] temporaries: cap them


def numba_available():
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def atom_shape(name, n):
    return (n,) * SPECS[name][0]


def statics(name, n):
    return SPECS[name][1](n)


def csv(kind, choices=None):
    def parse(text):
        items = [kind(x) for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


# ---- timing -------------------------------------------------------------------------------
def measure(fn, repeat, budget):
    """Best of up to ``repeat`` calls of ``fn`` (at least one; no new call once ``budget``
    seconds have been spent).  Returns (best seconds, result of the last call)."""
    best, spent, out = math.inf, 0.0, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent >= budget:
            break
    return best, out


class Programs:
    """Compiled programs of one spec, one per (backend, static parameters)."""

    def __init__(self, name):
        self.name, self.cache, self.setup = name, {}, {}

    def get(self, backend, n):
        key = (backend, tuple(sorted(statics(self.name, n).items())))
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = structdsl.compile(getattr(specs, self.name), backend=compiled_as(backend),
                                                **statics(self.name, n))
            if backend == "cuda-eager":      # a private copy: compile() shares one program per arguments
                self.cache[key] = copy.copy(self.cache[key])
                self.cache[key].cuda_graphs = False
            self.setup[backend] = self.setup.get(backend, 0.0) + time.perf_counter() - t0
        return self.cache[key]


def compiled_as(backend):
    """The compile() backend of a benchmark column: 'cuda' is the torch backend on CUDA
    tensors (replaying CUDA graphs), 'cuda-eager' the same without graphs."""
    return "torch" if backend.startswith("cuda") else backend


def on_device(backend, logits):
    """The logits as the column takes them: NumPy, or a torch tensor on its device (moved
    once per cell, outside the timed calls)."""
    if compiled_as(backend) != "torch":
        return logits
    import torch
    return torch.as_tensor(logits, device="cuda" if backend.startswith("cuda") else "cpu")


def call(prog, semantic, logits, trace=None, weights=None):
    if prog.backend == "torch":          # tensors in, tensors out; log_prob_and_grad = forward + backward
        import torch
        x = torch.as_tensor(logits)
        gen = torch.Generator(device=x.device)
        if semantic == "sample":
            out = prog.sample(x, generator=gen.manual_seed(1))
        elif semantic == "log_prob_and_grad":
            out = prog.log_prob_and_grad(trace, x)
        elif semantic == "conditional_noise":
            out = prog.conditional_noise(trace, x, generator=gen.manual_seed(2))
        else:
            out = prog.solve(weights)
        if x.is_cuda:                    # the work is done when the device is done
            torch.cuda.synchronize(x.device)
        return out
    if semantic == "sample":
        return prog.sample(logits, seed=1)
    if semantic == "log_prob_and_grad":
        return prog.log_prob_and_grad(trace, logits)
    if semantic == "conditional_noise":
        return prog.conditional_noise(trace, logits, seed=2)
    return prog.solve(weights)


def run_semantics(prog, semantics, logits, repeat, budget):
    """{semantic: best seconds} over the whole of ``logits``; the first sample provides the
    trace (and noise, for solve) of the others.  A program that replays CUDA graphs makes
    two untimed calls first (the eager one and the capture)."""
    out, s = {}, None
    graphs = getattr(prog, "cuda_graphs", False) and getattr(logits, "is_cuda", False)
    for sem in ["sample"] + [x for x in semantics if x != "sample"]:
        for _ in range(2 if graphs else 0):
            res = call(prog, sem, logits, s and s.trace, s and s.noise)
            s = res if sem == "sample" else s
        t, res = measure(lambda: call(prog, sem, logits, s and s.trace, s and s.noise),
                         repeat if sem in semantics else 1, budget)
        if sem == "sample":
            s = res
        if sem in semantics:
            out[sem] = t
    return out


def warm_up(prog, semantics, logits):
    """One call of every semantics on one lane (compiles numba code, specialises the size).
    Returns {semantic: seconds} of that call."""
    t, s = {}, None
    for sem in ["sample"] + [x for x in semantics if x != "sample"]:
        t0 = time.perf_counter()
        res = call(prog, sem, logits[:1], s and s.trace, s and s.noise)
        t[sem] = time.perf_counter() - t0
        if sem == "sample":
            s = res
    return t


def bench_cell_numpy(prog, semantics, logits, probe, args, race_atoms):
    """NumPy reference: lanes/s from at most ``--numpy-lanes`` lanes and about
    ``--numpy-budget`` s; ``probe`` is {semantic: seconds of one lane} (None: skipped)."""
    rates, lanes = {}, {}
    live = [s for s in semantics if probe.get(s) is not None]
    if not live:
        return {s: None for s in semantics}, {}
    per_sem = args.numpy_budget / len(live)
    mem_cap = max(1, NUMPY_MEMORY_ELEMS // max(1, race_atoms))
    L = {}
    for sem in live:
        cap = mem_cap if sem in ("log_prob_and_grad", "conditional_noise") else len(logits)
        L[sem] = int(min(len(logits), args.numpy_lanes, cap, max(1, per_sem / args.repeat / max(probe[sem], 1e-9))))
    s = None
    if "sample" in L:
        t, s = measure(lambda: call(prog, "sample", logits[:L["sample"]]), args.repeat, per_sem)
        rates["sample"], lanes["sample"] = L["sample"] / t, L["sample"]
    need = max([L[x] for x in L if x != "sample"], default=0)
    if need and (s is None or len(s.trace) < need):
        s = call(prog, "sample", logits[:need])               # untimed: a trace for the others
    for sem in live:
        if sem == "sample":
            continue
        k = L[sem]
        t, _ = measure(lambda: call(prog, sem, logits[:k], s.trace[:k], s.noise[:k]), args.repeat, per_sem)
        rates[sem], lanes[sem] = k / t, k
    return {k: rates.get(k) for k in semantics}, lanes


def noise_floor(shape, repeat):
    rng = np.random.default_rng(0)
    t, _ = measure(lambda: -np.log(rng.random(shape)), repeat, 1.0)
    return shape[0] / t


def _brief(exc):
    lines = [x for x in str(exc).splitlines() if x.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text[:400]}"


def _load():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


# ---- formatting ---------------------------------------------------------------------------
def fmt_rate(x):
    if x is None:
        return "skip"
    if math.isnan(x):
        return "error"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)):
        if x >= scale or scale == 1.0:
            v = x / scale
            digits = max(0, 2 - int(math.floor(math.log10(v)))) if v > 0 else 0
            return f"{v:.{digits}f}{unit}"
    return str(x)


def fmt_ratio(x, pct=False):
    if x is None:
        return "-"
    if pct:
        v = 100 * x
        return f"{v:.0f}%" if v >= 9.95 else f"{v:.1f}%" if v >= 0.995 else f"{v:.2g}%"
    return f"{x:.0f}x" if x >= 99.5 else f"{x:.1f}x" if x >= 9.95 else f"{x:.2f}x"


def render(title, groups, rows, markdown):
    """groups: [(group title, [column titles])]; rows: [[key cells..., group cells...]]."""
    keys = ["n", "batch"]
    cols = keys + [c for _, cs in groups for c in cs]
    if markdown:
        head = keys + [f"{g} {c}".strip() for g, cs in groups for c in cs]
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join("---:" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for (g, cs), (a, _) in zip(groups, _spans(groups)):      # room for the group's title
        short = len(g) - (sum(widths[a:a + len(cs)]) + len(cs) - 1)
        if short > 0:
            widths[a + len(cs) - 1] += short
    line1, line2, i = [" " * (widths[0] + widths[1] + 1)], [f"{'n':>{widths[0]}} {'batch':>{widths[1]}}"], 2
    for g, cs in groups:
        w = sum(widths[i:i + len(cs)]) + len(cs) - 1
        line1.append(f"{g:^{w}}" if g else " " * w)
        line2.append(" ".join(f"{c:>{widths[i + j]}}" for j, c in enumerate(cs)))
        i += len(cs)
    sep = " | "
    body = [sep.join([" ".join(f"{r[j]:>{widths[j]}}" for j in range(2))] +
                     [" ".join(f"{r[j]:>{widths[j]}}" for j in range(a, a + len(cs)))
                      for a, cs in _spans(groups)]) for r in rows]
    out = [title, sep.join(line1).rstrip(), sep.join(line2)]
    out.append("-" * len(out[-1]))
    return "\n".join(out + body) + "\n"


def _spans(groups):
    a = 2
    for _, cs in groups:
        yield a, cs
        a += len(cs)


# ---- compile time -------------------------------------------------------------------------
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import numba
import structdsl
from structdsl import specs
t1 = time.perf_counter()
name, n, statics, ndim = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
prog = structdsl.compile(getattr(specs, name), backend="numba", **statics)
t2 = time.perf_counter()
logits = np.random.default_rng(0).normal(size=(4,) + (n,) * ndim)
s = prog.sample(logits, seed=1)
t3 = time.perf_counter()
prog.log_prob_and_grad(s.trace, logits)
t4 = time.perf_counter()
prog.conditional_noise(s.trace, logits, seed=2)
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "compile": t2 - t1, "sample": t3 - t2, "log_prob_and_grad": t4 - t3,
                  "conditional_noise": t5 - t4, "total": t5 - t0}))
"""


def compile_times(name, n, threads, quick=False):
    """Subprocess timings of a fresh process's first calls under three cache states."""
    results = []
    with tempfile.TemporaryDirectory(prefix="structdsl-bench-") as tmp:
        drop = ("STRUCTDSL_CACHE_DIR", "NUMBA_CACHE_DIR", "PYTHONDONTWRITEBYTECODE")
        env0 = {k: v for k, v in os.environ.items() if k not in drop}
        if threads:
            env0["NUMBA_NUM_THREADS"] = str(threads)
        both = {"STRUCTDSL_CACHE_DIR": os.path.join(tmp, "a", "structdsl"),
                "NUMBA_CACHE_DIR": os.path.join(tmp, "a", "numba")}
        spec_only = {"STRUCTDSL_CACHE_DIR": os.path.join(tmp, "b", "structdsl")}
        cases = [("truly cold: fresh STRUCTDSL_CACHE_DIR + NUMBA_CACHE_DIR", both),
                 ("spec cold: kernels' cache as found in backends/__pycache__", spec_only),
                 ("cached: 2nd process, same caches as truly cold", both)]
        if quick:
            del cases[1]
        argv = [sys.executable, "-c", CHILD, name, str(n), json.dumps(statics(name, n)), str(SPECS[name][0])]
        for label, extra in cases:
            t0 = time.perf_counter()
            p = subprocess.run(argv, env={**env0, **extra}, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                lines = p.stderr.strip().splitlines() or ["?"]
                errs = [x.strip() for x in lines if "Error" in x][:2]
                results.append((label, None, wall, [" / ".join(errs + [lines[-1].strip()])]))
                continue
            results.append((label, json.loads(p.stdout.strip().splitlines()[-1]), wall, None))
    return results


def print_compile_times(name, n, results, markdown):
    cols = ["import", "compile", "sample", "log_prob_and_grad", "conditional_noise", "total"]
    title = (f"numba first-call times of {name}, atoms {list(atom_shape(name, n))}, batch 4, in fresh "
             f"subprocesses (seconds; 'compile' is structdsl.compile, the code compiles on each "
             f"semantics' first call; 'total' includes importing numpy, numba and structdsl)")
    heads = ["cache state"] + cols + ["process wall"]
    rows = []
    for label, r, wall, err in results:
        if r is None:
            rows.append([label] + ["error"] * len(cols) + [f"{wall:.2f}"])
            print(f"  {label}: child failed: {err[0]}", file=sys.stderr)
        else:
            rows.append([label] + [f"{r[c]:.2f}" for c in cols] + [f"{wall:.2f}"])
    if markdown:
        print(f"**{title}**\n")
        print("| " + " | ".join(heads) + " |")
        print("|---|" + "|".join("---:" for _ in heads[1:]) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        print(title)
        w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
        print(f"{heads[0]:<{w[0]}}  " + " ".join(f"{h:>{w[i + 1]}}" for i, h in enumerate(heads[1:])))
        for r in rows:
            print(f"{r[0]:<{w[0]}}  " + " ".join(f"{x:>{w[i + 1]}}" for i, x in enumerate(r[1:])))
    print()


def print_compile_summary(table, n, markdown):
    """One row per spec: a fresh process's first sample + log_prob_and_grad +
    conditional_noise, seconds (import excluded), under each cache state."""
    labels = [label for label, _, _, _ in table[0][1]]
    short = [label.split(":")[0] for label in labels]
    heads = ["spec (n = %d)" % n] + [f"{s} (s)" for s in short]
    rows = []
    for name, results in table:
        cells = []
        for _, r, _, _ in results:
            cells.append("error" if r is None else f"{r['total'] - r['import']:.2f}")
        rows.append([name] + cells)
    print("numba compile table: seconds from structdsl.compile to the end of the first three calls "
          "(import excluded), per cache state")
    if markdown:
        print("| " + " | ".join(heads) + " |")
        print("|---|" + "|".join("---:" for _ in heads[1:]) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
        for r in [heads] + rows:
            print(f"{r[0]:<{w[0]}}  " + " ".join(f"{x:>{w[i + 1]}}" for i, x in enumerate(r[1:])))
    print()


def _spec_list(text):
    names = list(SPECS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in SPECS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown spec(s) {bad}; choose from {', '.join(SPECS)} or 'all'")
    return names


# ---- what the numba backend's overflow checks cost -----------------------------------------
def unchecked(name, n):
    """Spec ``name`` compiled for numba with its int64 overflow checks off (wrapping
    arithmetic, as before the checks existed): only for measuring their cost."""
    from structdsl.backends import numba_backend

    class Unchecked(numba_backend.Program):
        check_overflow = False
    return Unchecked(getattr(specs, name), **statics(name, n))


def check_cost(names, sizes, batches, semantics, repeat, markdown):
    """lanes/s of the numba backend with its overflow checks on and off, same run.  The two
    programs alternate (best of ``repeat`` timings each, a timing being as many calls as take
    about 50 ms), so a change of the machine's load hits both.  A spec with nothing to check
    compiles to the same code both ways (marked ``=``): its ratio shows the noise."""
    cols = [SEMANTICS[s] for s in semantics]
    out = []
    for name in names:
        rows = []
        for n in sizes:
            try:
                on = structdsl.compile(getattr(specs, name), backend="numba", **statics(name, n))
                off = unchecked(name, n)
            except Exception as exc:
                print(f"{name} n={n}: compile failed: {_brief(exc)}", file=sys.stderr)
                continue
            one = np.random.default_rng(0).normal(size=(1,) + atom_shape(name, n))
            for prog in (on, off):
                warm_up(prog, semantics, one)
            for batch in batches:
                logits = np.random.default_rng(0).normal(size=(batch,) + atom_shape(name, n))
                s = call(on, "sample", logits)
                best = {(p, sem): math.inf for p in ("on", "off") for sem in semantics}
                calls = {}
                for sem in semantics:                       # calls per timing: about 50 ms
                    t, _ = measure(lambda: call(on, sem, logits, s.trace, s.noise), 3, 1.0)
                    calls[sem] = max(1, min(1000, int(0.05 / max(t, 1e-6))))
                for _ in range(repeat):
                    for sem in semantics:
                        for label, prog in (("on", on), ("off", off)):
                            t0 = time.perf_counter()
                            for _ in range(calls[sem]):
                                call(prog, sem, logits, s.trace, s.noise)
                            best[label, sem] = min(best[label, sem], (time.perf_counter() - t0) / calls[sem])
                row = [str(n), str(batch)]
                for sem in semantics:
                    a, b = batch / best["on", sem], batch / best["off", sem]
                    row += [fmt_rate(a), fmt_rate(b), f"{100 * (a / b - 1):+.1f}%" + ("=" if on.source == off.source else "")]
                rows.append(row)
        if rows:
            dims = "[n, n]" if SPECS[name][0] == 2 else "[n]"
            out.append(render(f"{name} (atoms {dims}): numba lanes/s with int64 overflow checks on / off, "
                              f"interleaved, best of {repeat}" + (" (identical code: '=')" if on.source == off.source
                                                                  else ""),
                              [(c, ["on", "off", "on/off-1"]) for c in cols], rows, markdown))
    return "\n".join(out)


# ---- one training step through the distribution -------------------------------------------
def reinforce_steps(sizes, batch, repeat, markdown, fast=True, cpu=True, cuda=False):
    """Milliseconds of one T-REINFORCE step on spanning trees through
    ``structdsl.torch.RaceDistribution``.  With ``fast`` (the numba backend is timed):
    ``estimators.t_reinforce`` on the CPU fast path (one native call draws and scores, one
    autograd node injects the analytic score) and the same step written by hand (sample,
    log_prob, backward) on the fast path; with ``cpu``: t_reinforce on the lock-step torch
    path; with ``cuda``: t_reinforce on CUDA tensors (lock-step on the device), timed up to
    ``torch.cuda.synchronize``."""
    import torch

    from structdsl import estimators
    from structdsl.torch import RaceDistribution
    hows = ((["estimator", "by hand"] if fast else []) + (["lock-step"] if cpu else [])
            + (["cuda-eager", "cuda"] if cuda else []))
    names = {"estimator": "t_reinforce", "by hand": "by hand (fast)", "lock-step": "lock-step",
             "cuda-eager": "cuda eager", "cuda": "cuda graphs"}
    rows = []
    for n in sizes:
        row = [str(n), str(batch)]
        for how in hows:
            if how in ("estimator", "by hand") and not numba_available():
                row.append("-")
                continue
            device = "cuda" if how.startswith("cuda") else "cpu"
            logits = torch.randn((batch, n, n), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            logits = logits.to(device).requires_grad_(True)
            weights = torch.randn((n, n), generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
            prog = copy.copy(structdsl.compile(specs.spanning_tree, backend="torch"))
            prog.cuda_graphs = how == "cuda"
            dist = RaceDistribution(prog, logits=logits, fast_cpu=how != "lock-step")

            def f(s):
                return (s.adjacency * weights).sum((-1, -2))

            def step():
                logits.grad = None
                if how == "by hand":
                    s = dist.sample_with_structure()
                    (dist.log_prob(s.trace) * f(s.structure)).mean().backward()
                else:
                    estimators.t_reinforce(dist, f).backward()
                if device == "cuda":
                    torch.cuda.synchronize()
            for _ in range(2 if how == "cuda" else 1):     # graphs: the eager call, the capture
                step()
            t, _ = measure(step, repeat, 5.0)
            row.append(f"{t * 1e3:.1f}")
        rows.append(row)
    where = f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if cuda else "")
    return render(f"T-REINFORCE step on spanning_tree, ms per batch (torch {torch.__version__}, {where})",
                  [("ms per step", [names[h] for h in hows])], rows, markdown)


# ---- main ---------------------------------------------------------------------------------
@dataclass
class Plan:
    """What one run measures, resolved from the command line."""
    args: argparse.Namespace
    sizes: list
    batches: list
    backends: list                 # the timed columns, in the order given
    semantics: list
    gpu: bool                      # a cuda column is timed
    ratios: list                   # (fast, slow) columns whose ratio is printed
    floor_of: str                  # the column whose sample rate is set against the noise floor
    progress: bool                 # progress lines on a terminal's stderr
    header_printed: bool = False


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", type=csv(str, ["numpy", "numba", "torch", "cuda", "cuda-eager"]), default=None,
                        help="comma list (default: numpy,numba if numba is importable, else numpy)")
    parser.add_argument("--specs", type=csv(str, list(SPECS)), default=list(SPECS),
                        help="comma list (default: all 8)")
    parser.add_argument("--sizes", type=csv(int), default=None, help="comma list of n (default 8,16,32,64)")
    parser.add_argument("--batches", type=csv(int), default=None, help="comma list (default 1,64,1024)")
    parser.add_argument("--batch", type=int, default=None, help="one batch size (same as --batches B)")
    parser.add_argument("--semantics", type=csv(str, list(SEMANTICS)), default=DEFAULT_SEMANTICS,
                        help=f"comma list of {', '.join(SEMANTICS)} (default: the first three)")
    parser.add_argument("--quick", action="store_true", help="smoke test: sizes 8,16 and batches 1,64 "
                        "(unless given), numpy budget 0.5 s, compile times cold and cached only")
    parser.add_argument("--threads", type=int, default=None, help="numba.set_num_threads(N)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many calls (default 3)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--numpy-lanes", type=int, default=256, help="most lanes per numpy call (256)")
    parser.add_argument("--numpy-budget", type=float, default=None,
                        help="about this many seconds of numpy timing per cell (1.0; 0.5 with --quick)")
    parser.add_argument("--numpy-skip-ms", type=float, default=50.0,
                        help="skip a numpy semantics whose single lane takes longer (50 ms)")
    parser.add_argument("--numba-budget", type=float, default=2.0,
                        help="no further repeat once a numba semantics has used this many seconds (2.0)")
    parser.add_argument("--compile-spec", default="spanning_tree", type=_spec_list,
                        help="comma-separated specs (or 'all') whose numba compile times are measured, "
                             "one table each and a summary row per spec (default spanning_tree)")
    parser.add_argument("--compile-size", type=int, default=8, help="n for the compile-time runs (8)")
    parser.add_argument("--no-steps", action="store_true",
                        help="skip the T-REINFORCE step table (printed when torch or cuda is timed)")
    parser.add_argument("--no-compile-time", action="store_true", help="skip the compile-time subprocesses")
    parser.add_argument("--check-cost", action="store_true",
                        help="only time numba with its int64 overflow checks on and off (interleaved, "
                             "same run) on the chosen specs, sizes and batches")
    parser.add_argument("--omp-wait-policy", choices=["active", "passive"], default=None,
                        help="set OMP_WAIT_POLICY before numba loads (see benchmarks/README.md)")
    parser.add_argument("--threading-layer", choices=["omp", "tbb", "workqueue", "default", "safe",
                                                      "threadsafe", "forksafe"], default=None,
                        help="set NUMBA_THREADING_LAYER before numba loads")
    return parser


def parse_args(argv):
    """The command line as a :class:`Plan`.  Sets the environment numba reads when it loads
    and the thread counts; exits through ``parser.error`` on a request that cannot run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # the environment numba reads when it loads (its OpenMP pool loads on the first parallel call)
    for value, var in ((args.omp_wait_policy, "OMP_WAIT_POLICY"), (args.threading_layer, "NUMBA_THREADING_LAYER")):
        if value:
            if "numba" in sys.modules and os.environ.get(var) != value:
                print(f"warning: numba is already loaded; {var}={value} may not take effect", file=sys.stderr)
            os.environ[var] = value
    if args.numpy_budget is None:
        args.numpy_budget = 0.5 if args.quick else 1.0
    have_numba = numba_available()
    if args.backend is None:
        args.backend = ["numpy", "numba"] if have_numba else ["numpy"]
    sizes = args.sizes or ([8, 16] if args.quick else [8, 16, 32, 64])
    batches = args.batches or ([args.batch] if args.batch else None) or ([1, 64] if args.quick else [1, 64, 1024])
    backends = list(dict.fromkeys(args.backend))
    semantics = [s for s in SEMANTICS if s in args.semantics]
    if "numba" in backends:
        if not have_numba:
            parser.error("--backend numba: numba is not importable")
        import numba
        if args.threads:
            if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
                parser.error(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}] "
                             f"(NUMBA_NUM_THREADS); set NUMBA_NUM_THREADS for more")
            numba.set_num_threads(args.threads)
    gpu = "cuda" in backends or "cuda-eager" in backends
    if "torch" in backends or gpu:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        if gpu and not torch.cuda.is_available():
            parser.error("--backend cuda: torch sees no CUDA device")
    if args.threads and "numba" not in backends and "torch" not in backends:
        print("note: --threads affects the numba and torch backends", file=sys.stderr)
    if args.check_cost and not have_numba:
        parser.error("--check-cost: numba is not importable")
    ratios = [(a, b) for a, b in (("numba", "numpy"), ("cuda", "torch"), ("cuda", "cuda-eager"))
              if a in backends and b in backends]
    floor_of = next(b for b in ("numba", "numpy", "torch", "cuda", "cuda-eager") if b in backends)
    return Plan(args, sizes, batches, backends, semantics, gpu, ratios, floor_of, progress=sys.stderr.isatty())


def run_check_cost(plan):
    """``--check-cost``: only the cost of numba's overflow checks, in a table of its own."""
    args = plan.args
    t0 = time.perf_counter()
    import numba
    print(f"structdsl {structdsl.__version__}, numba {numba.__version__}: {numba.get_num_threads()} "
          f"threads; load average {_load()} (other processes' load skews the figures)")
    print(check_cost(args.specs, plan.sizes, plan.batches, plan.semantics, max(args.repeat, 5), args.markdown))
    print(f"({time.perf_counter() - t0:.0f} s in all; load average at the end {_load()})")


def print_header(plan):
    """Versions, threads and how to read the tables, printed once before the first table."""
    if plan.header_printed:
        return
    plan.header_printed = True
    args, backends, ratios = plan.args, plan.backends, plan.ratios
    lines = [f"structdsl {structdsl.__version__}, numpy {np.__version__}, python "
             f"{sys.version.split()[0]}; os.cpu_count() = {os.cpu_count()}; load average "
             f"{_load()} (other processes' load skews the figures)"]
    if "numba" in backends:
        import numba
        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = "not yet chosen"
        lines.append(f"numba {numba.__version__}: {numba.get_num_threads()} threads "
                     f"(NUMBA_NUM_THREADS {numba.config.NUMBA_NUM_THREADS}), threading layer {layer}, "
                     f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
        if layer == "not yet chosen":
            layer = numba.config.THREADING_LAYER
        if layer == "omp" and "OMP_WAIT_POLICY" not in os.environ:
            lines.append("note: OpenMP's default (spinning) wait policy: while another process holds a "
                         "core, each parallel call can cost 10-25 ms (compare --omp-wait-policy passive)")
    lines.append(f"lanes/s (batch elements per second), best of {args.repeat} (time.perf_counter), "
                 f"compilation and first calls excluded.")
    if "numpy" in backends:
        lines.append(f"numpy: timed on min(batch, {args.numpy_lanes}, what fits ~{args.numpy_budget:g} s "
                     f"per cell) lanes and extrapolated (column 'np lanes'); 'skip': one lane took "
                     f"> {args.numpy_skip_ms:g} ms.")
    if "torch" in backends or plan.gpu:
        import torch
        lines.append(f"torch {torch.__version__}: {torch.get_num_threads()} CPU threads"
                     + (f"; cuda: the torch backend on {torch.cuda.get_device_name()}, replaying CUDA "
                        f"graphs captured in two untimed calls (cuda-eager: without graphs), timed up "
                        f"to torch.cuda.synchronize" if plan.gpu else ""))
    for fast, slow in ratios:
        label = f"{fast}/{slow}" if len(ratios) > 1 else "ratio"
        lines.append(f"{label}: {fast} lanes/s / {slow} lanes/s, same run.")
    lines.append(f"floor: lanes/s of -log(rng.random((batch, *atoms))) alone (numpy Generator); "
                 f"smp/floor: {plan.floor_of} sample rate as a fraction of it.")
    for line in lines:
        print(("> " if args.markdown else "") + line + ("  " if args.markdown else ""))
    print()


def warm_up_backends(plan, progs, name, n, skipped):
    """First calls of every backend on one lane at size ``n``.  Returns (probe, broken):
    ``probe`` the numpy reference's {semantic: seconds of one warm lane, or None when skipped},
    ``broken`` the backends whose first call failed.  ``skipped``: (spec, semantic) -> the n
    at which numpy was first skipped (no larger n is tried)."""
    args, semantics = plan.args, plan.semantics
    one = np.random.default_rng(0).normal(size=(1,) + atom_shape(name, n))
    probe, broken = {}, set()
    for b in plan.backends:
        prog = progs.get(b, n)
        t0 = time.perf_counter()
        try:
            if b == "numpy":
                todo = [s for s in semantics if skipped.get((name, s), math.inf) > n]
                first = warm_up(prog, todo, one) if todo else {}
                # no second call of a semantics whose first was > 20x the limit
                live = [s for s in todo if first[s] * 1e3 <= 20 * args.numpy_skip_ms]
                again = warm_up(prog, live, one) if live else {}   # warm: one lane's cost
                for s in semantics:
                    if s in live and again[s] * 1e3 <= args.numpy_skip_ms:
                        probe[s] = again[s]
                    else:
                        probe[s] = None
                        skipped.setdefault((name, s), n)
            else:
                warm_up(prog, semantics, on_device(b, one))
                progs.setup[b] = progs.setup.get(b, 0.0) + time.perf_counter() - t0
        except Exception as exc:
            print(f"{name} n={n} {b}: first call failed: {_brief(exc)}", file=sys.stderr)
            broken.add(b)
            probe = {s: None for s in semantics} if b == "numpy" else probe
    return probe, broken


def bench_row(plan, progs, name, n, batch, probe, broken, race_atoms):
    """One row of a spec's table: lanes/s of every backend and semantics at size ``n`` and
    ``batch``, their ratios, the numpy lanes actually timed and the noise floor."""
    args, semantics, backends = plan.args, plan.semantics, plan.backends
    shape = atom_shape(name, n)
    logits = np.random.default_rng(0).normal(size=(batch,) + shape)
    res, lanes = {}, {}
    for b in backends:
        if b in broken:
            res[b] = {s: math.nan for s in semantics}
            continue
        try:
            if b == "numpy":
                res[b], lanes = bench_cell_numpy(progs.get(b, n), semantics, logits, probe, args, race_atoms)
            else:
                t = run_semantics(progs.get(b, n), semantics, on_device(b, logits), args.repeat,
                                  args.numba_budget)
                res[b] = {s: batch / t[s] for s in semantics}
        except Exception as exc:
            print(f"{name} n={n} batch={batch} {b}: {_brief(exc)}", file=sys.stderr)
            res[b] = {s: math.nan for s in semantics}
    floor = noise_floor((batch,) + shape, args.repeat)
    row = [str(n), str(batch)]
    for s in semantics:
        for b in backends:
            row.append(fmt_rate(res[b][s]))
        for fast, slow in plan.ratios:
            a, c = res[slow][s], res[fast][s]
            row.append(fmt_ratio(c / a if a and c and not math.isnan(a + c) else None))
    if "numpy" in backends:
        ls = [lanes.get(s) for s in semantics]
        ls = [x for x in ls if x is not None]
        row.append("-" if not ls else str(ls[0]) if len(set(ls)) == 1 else "/".join(map(str, ls)))
    smp = res[plan.floor_of].get("sample")
    row += [fmt_rate(floor), fmt_ratio(smp / floor if smp and not math.isnan(smp) else None, pct=True)]
    return row


def bench_spec(plan, index, name, skipped, t_start):
    """Every size and batch of spec ``name`` (the ``index``-th) on every backend: its
    :class:`Programs` and the rows of its table (none when nothing could run)."""
    progs = Programs(name)
    rows = []
    for n in plan.sizes:
        shape = atom_shape(name, n)
        try:
            for b in plan.backends:
                progs.get(b, n)
        except Exception as exc:                   # e.g. a size the spec does not allow
            print(f"{name} n={n}: compile failed: {_brief(exc)}", file=sys.stderr)
            continue
        probe, broken = warm_up_backends(plan, progs, name, n, skipped)
        if len(broken) == len(plan.backends):
            continue
        print_header(plan)
        prog_np = progs.get("numpy", n) if "numpy" in plan.backends else None
        race_atoms = prog_np.max_races(shape) * math.prod(shape) if prog_np else 0
        for batch in plan.batches:
            if plan.progress:
                print(f"[{index + 1}/{len(plan.args.specs)}] {name} n={n} batch={batch} "
                      f"({time.perf_counter() - t_start:.0f} s)   ", end="\r", file=sys.stderr, flush=True)
            rows.append(bench_row(plan, progs, name, n, batch, probe, broken, race_atoms))
    if plan.progress:
        print(" " * 70, end="\r", file=sys.stderr, flush=True)
    return progs, rows


def spec_table(plan, name, progs, rows):
    """One spec's table, titled with its atoms, static parameters and numba setup time."""
    backends, ratios = plan.backends, plan.ratios
    groups = [(SEMANTICS[s], backends + [f"{fast}/{slow}" if len(ratios) > 1 else "ratio"
                                         for fast, slow in ratios]) for s in plan.semantics]
    if "numpy" in backends:
        groups.append(("", ["np lanes"]))
    groups.append(("noise", ["floor", "smp/floor"]))
    kw = ", ".join(f"{k}={v}" for k, v in statics(name, plan.sizes[0]).items())
    if name == "top_k":
        kw = "k=n//4"
    setup = ""
    if "numba" in backends and "numba" in progs.setup:
        setup = f"; numba setup {progs.setup['numba']:.2f} s (compile + first calls, caches as found)"
    dims = "[n, n]" if SPECS[name][0] == 2 else "[n]"
    title = f"{name} (atoms {dims}{', ' + kw if kw else ''}){setup}"
    return render(title, groups, rows, plan.args.markdown)


def print_extras(plan):
    """The T-REINFORCE step table (when torch or cuda is timed) and numba's compile times."""
    args, backends, progress = plan.args, plan.backends, plan.progress
    if ("torch" in backends or plan.gpu) and not args.no_steps:
        print(reinforce_steps(plan.sizes, max(plan.batches), args.repeat, args.markdown, fast="numba" in backends,
                              cpu="torch" in backends, cuda="cuda" in backends))
    if "numba" in backends and not args.no_compile_time:
        n = min(args.compile_size, 8) if args.quick else args.compile_size
        table = []
        for name in args.compile_spec:
            if progress:
                print(f"compile times of {name} (fresh subprocesses)...", end="\r", file=sys.stderr, flush=True)
            results = compile_times(name, n, args.threads, args.quick)
            if progress:
                print(" " * 70, end="\r", file=sys.stderr, flush=True)
            print_compile_times(name, n, results, args.markdown)
            table.append((name, results))
        if len(table) > 1:
            print_compile_summary(table, n, args.markdown)


def main(argv=None):
    plan = parse_args(argv)
    if plan.args.check_cost:
        run_check_cost(plan)
        return
    if "numba" not in plan.backends:
        print_header(plan)     # with numba: after its first calls, which choose its threading layer
    skipped = {}     # (spec, semantic) -> n at which numpy was skipped
    t_start = time.perf_counter()
    for index, name in enumerate(plan.args.specs):
        progs, rows = bench_spec(plan, index, name, skipped, t_start)
        if rows:
            print(spec_table(plan, name, progs, rows))
            sys.stdout.flush()
    print_extras(plan)
    print(f"({time.perf_counter() - t_start:.0f} s in all; load average at the end {_load()})")


if __name__ == "__main__":
    main()
