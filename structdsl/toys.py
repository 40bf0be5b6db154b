"""Toy problems: free logits of one structure trained by a gradient estimator.

Each toy is a built-in spec at ``n = 10`` with a loss whose optimum is known; the logits
start at zero and Adam (lr 0.01) follows the estimator's gradient.  Every ``eval_every``
steps the run records the mean loss over ``eval_samples`` fresh samples and the gradient
standard deviation per coordinate over ``grad_draws`` independent estimates (averaged over the
coordinates), at the current logits.

    python -m structdsl toy --structure spanning_tree --estimator t_reinforce+ --steps 2000
    python -m structdsl toy --all --quick          # every toy, every estimator, one seed
    python -m structdsl toy --all                  # the full runs: 15000 steps, 3 seeds

Losses (``structure`` fields have leading dims ``[samples, *batch]``):

============== =========================================== ===========
toy            loss                                        optimum
============== =========================================== ===========
spanning_tree  edges not incident to node 0                0
arborescence   minus the largest out-degree (root 0)       -(n - 1)
binary_tree    minus the height (nodes on the longest path) -n
matching       minus the number of diagonal cells           -n
top_k          chosen items outside the first k (k = 3)     0
permutation    Spearman footrule to the identity            0
============== =========================================== ===========
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

ESTIMATORS = ["e_reinforce", "t_reinforce", "e_reinforce+", "t_reinforce+", "relax"]
STRUCTURES = ["spanning_tree", "arborescence", "binary_tree", "matching", "top_k", "permutation"]


# ---- the losses (torch, vectorised over the leading dims) -----------------------------------
# Each is built once per run, for its size and device (its constants made once), and returns
# float64 per-sample losses: a training step at n = 10 costs a few dozen torch ops in all.
def _edges_off_root(n, device):
    import torch

    def loss(s):
        return s.adjacency[..., 1:, 1:].sum((-1, -2), dtype=torch.float64) / 2
    return loss


def _minus_max_out_degree(n, device):
    import torch
    nodes = torch.arange(n, device=device)[:, None]

    def loss(s):
        deg = (s.parent[..., None, :] == nodes).sum(-1, dtype=torch.float64)   # [*, n]
        return -deg.amax(-1)
    return loss


def _minus_height(n, device):
    import torch
    nodes = torch.arange(n, device=device)

    def loss(s):
        p = s.parent
        up = torch.where(p >= 0, p, nodes)                   # a root points to itself
        edges = (p >= 0).long()              # edges from v towards the root, 2^k steps at a time
        for _ in range(max(1, (n - 1).bit_length())):        # pointer jumping: 2^k >= n - 1
            edges = edges + edges.gather(-1, up)
            up = up.gather(-1, up)
        return -(edges.amax(-1) + 1).to(torch.float64)
    return loss


def _minus_diagonal(n, device):
    import torch
    nodes = torch.arange(n, device=device)

    def loss(s):
        return -(s.match == nodes).sum(-1, dtype=torch.float64)
    return loss


def _outside_first_k(n, device):
    import torch

    def loss(s):
        return s.subset[..., 3:].sum(-1, dtype=torch.float64)
    return loss


def _footrule(n, device):
    import torch
    nodes = torch.arange(n, device=device)

    def loss(s):
        return (s.rank - nodes).abs().sum(-1, dtype=torch.float64)
    return loss


@dataclass(frozen=True)
class Toy:
    spec_name: str
    make_loss: object              # (n, device) -> (structure -> float64 per-sample losses)
    optimum: object                # n -> the known optimum
    static: tuple = ()             # the spec's static parameters

    def atom_shape(self, n):
        from . import specs
        return (n,) * len(getattr(specs, self.spec_name).ir.atoms.dims)


TOYS = {
    "spanning_tree": Toy("spanning_tree", _edges_off_root, lambda n: 0),
    "arborescence": Toy("arborescence", _minus_max_out_degree, lambda n: -(n - 1)),
    "binary_tree": Toy("binary_tree", _minus_height, lambda n: -n),
    "matching": Toy("matching", _minus_diagonal, lambda n: -n),
    "top_k": Toy("top_k", _outside_first_k, lambda n: 0, (("k", 3),)),
    "permutation": Toy("permutation", _footrule, lambda n: 0),
}


def make_estimator(name, atom_shape, num_samples=3):
    """``(dist, f) -> surrogate loss`` for an estimator name of :data:`ESTIMATORS`, and the
    modules whose parameters train with the logits (RELAX's critic)."""
    from . import estimators
    if name == "relax":
        relax = estimators.RELAX(atom_shape=atom_shape).double()
        return (lambda d, f: relax(d, f, num_samples=num_samples)), [relax]
    base = {"e_reinforce": estimators.e_reinforce, "t_reinforce": estimators.t_reinforce}[name.rstrip("+")]
    loo = name.endswith("+")
    return (lambda d, f: base(d, f, num_samples=num_samples, leave_one_out=loo)), []


def train(structure, estimator, steps=15000, n=10, lr=0.01, num_samples=3, eval_every=500,
          eval_samples=1000, grad_draws=10, seed=0, progress=None, threads=1):
    """Train one toy; returns the log: a list of ``{step, objective, grad_std, seconds}``
    (seconds: training time so far, evaluations excluded).  ``threads``: torch and numba
    threads during the run (restored after): a batch of 3 gains nothing from more, and
    separate runs can go in parallel processes."""
    with _threads(threads):
        return _train(structure, estimator, steps, n, lr, num_samples, eval_every, eval_samples,
                      grad_draws, seed, progress)


@contextlib.contextmanager
def _threads(k):
    import torch
    try:
        import numba
    except ImportError:                      # pragma: no cover - numba is in the toys extra
        numba = None
    before = torch.get_num_threads(), numba and numba.get_num_threads()
    torch.set_num_threads(k)
    if numba:
        numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        if numba:
            numba.set_num_threads(before[1])


def _train(structure, estimator, steps, n, lr, num_samples, eval_every, eval_samples, grad_draws, seed,
           progress):
    import torch
    from . import compile as compile_spec, specs
    from .torch import RaceDistribution
    toy = TOYS[structure]
    torch.manual_seed(seed)
    prog = compile_spec(getattr(specs, toy.spec_name), backend="torch", **dict(toy.static))
    shape = toy.atom_shape(n)
    logits = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    surrogate, modules = make_estimator(estimator, shape, num_samples)
    params = [logits] + [p for m in modules for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr, fused=True)     # one native kernel per step

    f = toy.make_loss(n, logits.device)

    def evaluate(step, seconds):
        with torch.no_grad():
            d = RaceDistribution(prog, logits.detach())
            s = d.sample_with_structure((eval_samples,))
            objective = float(f(s.structure).mean())
        # grad_draws independent estimates at once: one batch element per draw
        x = logits.detach().expand((grad_draws,) + shape).clone().requires_grad_(True)
        surrogate(RaceDistribution(prog, x), f).backward()
        g = x.grad * grad_draws                  # each element's own estimate (the loss is a batch mean)
        for m in modules:
            m.zero_grad(set_to_none=True)
        valid = prog.atom_mask(prog.instance(shape), torch.device("cpu")).reshape(shape)
        std = float(g.std(0)[valid].mean())
        return {"step": step, "objective": objective, "grad_std": std, "seconds": seconds}

    log = [evaluate(0, 0.0)]
    clock = 0.0
    bar = _bar(steps, f"{structure} {estimator}", progress)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        for p in params:                     # zero_grad(set_to_none=True) without its profiler hook
            p.grad = None
        loss = surrogate(RaceDistribution(prog, logits), f)
        loss.backward()
        opt.step()
        clock += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            log.append(evaluate(step, clock))
            if bar is not None:
                bar.set_postfix(objective=f"{log[-1]['objective']:.3f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return log


def _bar(total, desc, progress):
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:                       # tqdm is in the toys extra; run without a bar
        return None
    return tqdm(total=total, desc=desc, leave=False, mininterval=0.5)


# ---- outputs ----------------------------------------------------------------------------------
FIELDS = ["structure", "estimator", "seed", "n", "num_samples", "eval_samples", "step", "objective", "grad_std",
          "seconds", "optimum", "start"]


def write_csv(rows, path):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def read_csv(path):
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in FIELDS[2:]:
            r[k] = float(r[k])
        r["seed"] = int(r["seed"])
    return rows


def _runs(rows, structure):
    """``{estimator: [rows of one seed sorted by step, ...]}`` of one structure."""
    out = {}
    for est in ESTIMATORS:
        seeds = sorted({r["seed"] for r in rows if r["structure"] == structure and r["estimator"] == est})
        out[est] = [sorted((r for r in rows if r["structure"] == structure and r["estimator"] == est
                            and r["seed"] == sd), key=lambda r: r["step"]) for sd in seeds]
    return {e: runs for e, runs in out.items() if runs}


def _band(runs, key):
    """Per evaluation (aligned by index over seeds): the mean, the min and the max of ``key``."""
    k = min(len(r) for r in runs)
    values = [[run[i][key] for run in runs] for i in range(k)]
    return ([sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def plot(rows, structure, path):
    """Four panels, one line per estimator (the mean over seeds, a band from the lowest to the
    highest seed): the objective against steps and against training seconds (the optimum
    dashed), its distance to the optimum (log scale) and the gradient std per coordinate (log
    scale; an exactly zero std, which a converged run can reach, is drawn as a marker on the
    axis rather than as a value)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = _runs(rows, structure)
    first = next(iter(runs.values()))[0][0]
    optimum, n, K = first["optimum"], int(first["n"]), int(first["num_samples"])
    evals, seeds = int(first["eval_samples"]), max(len(r) for r in runs.values())
    steps_total = int(max(r["step"] for rs in runs.values() for run in rs for r in run))
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.9))
    ax1, ax2, ax3, ax4 = axes
    for i, (est, rs) in enumerate(runs.items()):
        color = f"C{i}"
        steps = [r["step"] for r in rs[0]][:min(len(r) for r in rs)]
        mean, lo, hi = _band(rs, "objective")
        secs = _band(rs, "seconds")[0]
        ax1.plot(steps, mean, color=color, label=est)
        ax1.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
        ax2.plot(secs, mean, color=color, label=est)
        ax2.fill_between(secs, lo, hi, color=color, alpha=0.2, lw=0)
        gap = [max(m - optimum, 1e-4) for m in mean]
        ax3.plot(steps, gap, color=color, label=est)
        std, slo, shi = _band(rs, "grad_std")
        positive = [(x, v, a, b) for x, v, a, b in zip(steps, std, slo, shi) if v > 0]
        if positive:
            xs, v, a, b = zip(*positive)
            ax4.plot(xs, v, color=color, label=est)
            ax4.fill_between(xs, [max(t, min(v) / 10) for t in a], b, color=color, alpha=0.2, lw=0)
        zeros = [x for x, v in zip(steps, std) if v == 0]
        if zeros:
            ax4.plot(zeros, [0] * len(zeros), "v", color=color, clip_on=False, transform=ax4.get_xaxis_transform(),
                     label=f"{est}: std exactly 0")
    ax1.axhline(optimum, ls="--", color="k", lw=1, label=f"optimum {optimum:g}")
    ax2.axhline(optimum, ls="--", color="k", lw=1)
    band = f", band: min-max over {seeds} seeds" if seeds > 1 else " (one seed)"
    ax1.set(xlabel="step", ylabel=f"mean loss ({evals} samples)", title=f"{structure}: objective")
    ax2.set(xlabel="training seconds (evaluations excluded)", ylabel=f"mean loss ({evals} samples)",
            title="objective against wall-clock")
    ax3.set(yscale="log", xlabel="step", ylabel="objective - optimum (floor 1e-4)", title="distance to the optimum")
    ax4.set(yscale="log", xlabel="step", ylabel="std per coordinate", title="gradient std (10 estimates)")
    ax1.legend(fontsize=7)
    if any(h.get_label().endswith("exactly 0") for h in ax4.get_lines()):
        ax4.legend(fontsize=6)
    fig.suptitle(f"{structure}, n = {n}: free logits from 0, Adam lr 0.01, {steps_total} steps, K = {K} samples "
                 f"per step ('+': one leave-one-out group of K; else K independent), mean over seeds{band}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    drawn = {"ylabel": ax1.get_ylabel(), "title": fig._suptitle.get_text(), "xlabel_time": ax2.get_xlabel(),
             "zero_std_markers": sum(len(h.get_xdata()) for h in ax4.get_lines() if h.get_label().endswith("exactly 0"))}
    plt.close(fig)
    return drawn                    # what the figure says, for tests


def summary(rows):
    """Per (structure, estimator), over seeds: the final objective (mean, min, max), the share
    of the start-to-optimum gap left (of the mean), the final grad std (mean), ms per step."""
    out = []
    for s in STRUCTURES:
        for e, runs in _runs(rows, s).items():
            lasts = [run[-1] for run in runs]
            final = sum(r["objective"] for r in lasts) / len(lasts)
            start, opt = lasts[0]["start"], lasts[0]["optimum"]
            remaining = (final - opt) / (start - opt) if start != opt else float("nan")
            out.append({"structure": s, "estimator": e, "seeds": len(runs), "steps": int(lasts[0]["step"]),
                        "start": start, "final": final, "final_min": min(r["objective"] for r in lasts),
                        "final_max": max(r["objective"] for r in lasts), "optimum": opt,
                        "remaining_gap_pct": 100 * remaining,
                        "grad_std": sum(r["grad_std"] for r in lasts) / len(lasts),
                        "ms_per_step": 1000 * sum(r["seconds"] / max(r["step"], 1) for r in lasts) / len(lasts),
                        "finite": all(math.isfinite(r["objective"]) and math.isfinite(r["grad_std"])
                                      for run in runs for r in run)})
    return out


# ---- command line -----------------------------------------------------------------------------
def add_arguments(parser):
    """The ``toy`` subcommand's options (argparse only; nothing heavy is imported)."""
    parser.add_argument("--structure", action="append", choices=STRUCTURES,
                        help="a toy (repeatable); default with --all: every toy")
    parser.add_argument("--estimator", action="append", choices=ESTIMATORS,
                        help="an estimator (repeatable); '+' = one leave-one-out group of 3; default: all")
    parser.add_argument("--all", action="store_true", help="every toy with every estimator")
    parser.add_argument("--quick", action="store_true",
                        help="shortened runs (1500 steps, evaluations of 300 samples every 250 steps)")
    parser.add_argument("--steps", type=int, help="training steps (default 15000, 1500 with --quick)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default 500, 250 with --quick)")
    parser.add_argument("--eval-samples", type=int, help="samples per evaluation (default 1000, 300 with --quick)")
    parser.add_argument("--n", type=int, default=10, help="size (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seeds", type=int, help="seeds per run: --seed, --seed + 1, ... "
                        "(default 3, 1 with --quick); figures draw their spread")
    parser.add_argument("--out", default="toy-results", help="output folder (default toy-results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args):
    structures = args.structure or (STRUCTURES if args.all else None)
    if not structures:
        raise SystemExit("toy: name a --structure (repeatable) or use --all")
    estimators = args.estimator or ESTIMATORS
    steps = args.steps or (1500 if args.quick else 15000)
    every = args.eval_every or (250 if args.quick else 500)
    samples = args.eval_samples or (300 if args.quick else 1000)
    for name, v in (("--steps", steps), ("--eval-every", every), ("--eval-samples", samples), ("--n", args.n)):
        if v < 1:
            raise SystemExit(f"toy: {name} must be positive, got {v}")
    seeds = args.seeds or (1 if args.quick else 3)
    if seeds < 1:
        raise SystemExit(f"toy: --seeds must be positive, got {seeds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in structures:
        opt = TOYS[s].optimum(args.n)
        for e in estimators:
            for seed in range(args.seed, args.seed + seeds):
                t0 = time.perf_counter()
                log = train(s, e, steps=steps, n=args.n, eval_every=every, eval_samples=samples,
                            seed=seed, progress=False if args.no_progress else None)
                rows += [{"structure": s, "estimator": e, "seed": seed, "n": args.n, "num_samples": 3,
                          "eval_samples": samples, "optimum": opt, "start": log[0]["objective"], **r} for r in log]
                print(f"{s:14s} {e:13s} seed {seed}: objective {log[0]['objective']:8.3f} -> "
                      f"{log[-1]['objective']:8.3f} (optimum {opt}), grad std {log[-1]['grad_std']:.3g}, "
                      f"{1000 * log[-1]['seconds'] / steps:.2f} ms/step, {time.perf_counter() - t0:.0f} s", flush=True)
        write_csv(rows, out / "toys.csv")
        try:
            plot(rows, s, out / f"{s}.png")
        except ImportError:
            print("(matplotlib is not installed: no figures; pip install -e '.[toys]')")
    table = summary(rows)
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    print(f"wrote {out / 'toys.csv'}, {out / 'summary.json'} and one PNG per structure in {out}/")
    return 0 if all(r["finite"] for r in table) else 1


def main(argv=None):                  # python -m structdsl.toys ...
    p = argparse.ArgumentParser(prog="python -m structdsl toy")
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
