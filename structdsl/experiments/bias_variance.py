"""Experiment 3: bias and variance of every estimator against the exact gradient.

On small instances where :func:`structdsl.estimators.exact_gradient` enumerates every trace
(spanning trees n = 5, arborescences n = 4, top-3 of 6, permutations of 6), with fixed random
logits ``x ~ N(0, 1)`` at the valid atoms and a fixed random loss of the structure

    f(S) = 1/2 |A e(S) - y|^2,   A ~ N(0, 1/|valid|) [m = 4 x |valid|],  y ~ N(0, 1) [4],

where ``e(S)`` is the structure's embedding of the atoms' shape (spanning tree: its edge
indicator at ``u < v``; arborescence: the one-hot ``[parent[v], v]``; top-k: the subset;
permutation: ``n - 1 - rank``, the vector whose inner product with the logits the sorted order
maximises), every estimator draws ``N`` independent gradient estimates of
``d E[f] / d x`` (one per batch element of ``N`` identical copies of the logits), and we
report, over the valid atoms:

* ``bias = |mean - exact|`` and its noise floor ``se = sqrt(sum_j var_j / N)`` (what
  ``|mean - exact|`` is expected to be for an unbiased estimator), and ``bias2 = sqrt(max(0,
  |mean - exact|^2 - se^2))`` (the norm with the noise's share removed);
* ``cos``: the cosine between the mean estimate and the exact gradient; ``cos1``: the mean
  cosine of a single estimate;
* ``var``: the variance per coordinate (mean over the valid atoms);
* ``rel_bias = bias / |exact|``.

The relaxations (SST's matrix-tree marginals, undirected for spanning trees and directed for
arborescences, soft and straight-through, at t = 0.5 and 1) apply to those two; I-MLE (the spec's solver as MAP oracle, ``(z - z') /
lambda``, Sum-of-Gamma or Gumbel noise) applies to all four.  The exact gradient is that of
the race distribution's ``E[f]``; a relaxation or I-MLE that targets another quantity (a
relaxed loss, a perturb-and-MAP law with other noise, a finite difference) shows that as bias.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import structdsl
from structdsl import estimators, specs

from . import baselines as B

__all__ = ["Instance", "INSTANCES", "make_instance", "estimate_all", "run", "format_table", "plot"]


@dataclass
class Instance:
    name: str
    spec: object
    static: dict
    atom_shape: tuple
    imle_k: int                      # the structure's size (Sum-of-Gamma's k)
    embed: object = None             # structure record -> float [*lead, *atom_shape]
    relaxation: object = None        # SST's relaxed sample (baselines.sst_*), where one exists


def _permutation_embed(structure, atom_shape, valid=None):
    rank = structure.rank
    rank = rank if torch.is_tensor(rank) else torch.as_tensor(np.asarray(rank))
    return (atom_shape[-1] - 1 - rank).to(torch.float64)


INSTANCES = {
    "spanning_tree": Instance("spanning_tree (n=5)", specs.spanning_tree, {}, (5, 5), 4,
                              relaxation=B.sst_spanning_tree),
    "arborescence": Instance("arborescence (n=4)", specs.arborescence, {}, (4, 4), 3, B.arborescence_embed,
                             relaxation=B.sst_arborescence),
    "top_k": Instance("top_k (k=3 of 6)", specs.top_k, {"k": 3}, (6,), 3),
    "permutation": Instance("permutation (n=6)", specs.permutation, {}, (6,), 6, _permutation_embed),
}


def make_instance(inst, seed=0, m=4):
    """Fixed random logits, loss and the programs of one instance."""
    rng = np.random.default_rng(seed)
    prog = structdsl.compile(inst.spec, backend="torch", **inst.static)
    valid = B.valid_mask(prog, inst.atom_shape).copy()
    nv = int(valid.sum())
    logits = np.where(valid, rng.standard_normal(inst.atom_shape), 0.0)
    A = torch.as_tensor(rng.standard_normal((m, nv)) / math.sqrt(nv))
    y = torch.as_tensor(rng.standard_normal(m))
    vt = torch.as_tensor(valid)
    embed = inst.embed or B.default_embed

    def loss_of_embedding(e):
        """``f`` on embeddings ``[*lead, *atom_shape]`` (hard or relaxed) -> ``[*lead]``."""
        k = len(inst.atom_shape)
        flat = e.to(torch.float64)[..., vt] if k else e
        r = flat @ A.T - y
        return 0.5 * (r ** 2).sum(-1)

    def f(structure):
        return loss_of_embedding(embed(structure, inst.atom_shape, valid))

    solver = B.map_solver(B.compile_numba_or_numpy(inst.spec, **inst.static), embed=embed)
    return {"prog": prog, "valid": valid, "logits": torch.as_tensor(logits), "f": f,
            "loss_of_embedding": loss_of_embedding, "solve": solver, "embed": embed}


def _exact(setup):
    from structdsl.torch import RaceDistribution
    x = setup["logits"].clone().requires_grad_(True)
    loss = estimators.exact_gradient(RaceDistribution(setup["prog"], logits=x), setup["f"])
    loss.backward()
    return x.grad.detach(), float(loss.detach())


def _batched(setup, N):
    x = setup["logits"].expand((N,) + tuple(setup["logits"].shape)).clone().requires_grad_(True)
    return x


def estimators_for(inst_key):
    """(label, kind, options) of every estimator that applies to the instance."""
    out = [("T-REINFORCE", "t", {"K": 1}), ("T-REINFORCE+ (K=4)", "t", {"K": 4}),
           ("E-REINFORCE", "e", {"K": 1}), ("E-REINFORCE+ (K=4)", "e", {"K": 4}),
           ("RELAX", "relax", {"K": 1})]
    if INSTANCES[inst_key].relaxation is not None:
        for t in (0.5, 1.0):
            out.append((f"SST soft (t={t:g})", "sst", {"t": t, "hard": False}))
            out.append((f"SST ST (t={t:g})", "sst", {"t": t, "hard": True}))
    for lam in (1.0, 10.0):
        out.append((f"I-MLE SoG (λ={lam:g})", "imle", {"lam": lam, "noise": "sog"}))
    out.append(("I-MLE Gumbel (λ=1)", "imle", {"lam": 1.0, "noise": "gumbel"}))
    return out


def _draws(kind, opts, setup, inst, N, relax_module=None):
    """``N`` gradient estimates ``[N, *atom_shape]``."""
    from structdsl.torch import RaceDistribution
    x = _batched(setup, N)
    if kind in ("t", "e"):
        dist = RaceDistribution(setup["prog"], logits=x)
        fn = estimators.t_reinforce if kind == "t" else estimators.e_reinforce
        fn(dist, setup["f"], num_samples=opts["K"]).backward()
    elif kind == "relax":
        dist = RaceDistribution(setup["prog"], logits=x)
        relax_module(dist, setup["f"], num_samples=opts["K"]).backward()
    elif kind == "sst":
        z, _ = inst.relaxation(x, opts["t"], hard=opts["hard"], solve=setup["solve"])
        setup["loss_of_embedding"](z).sum().backward()          # each copy's own loss
        return x.grad.detach()
    elif kind == "imle":
        z = B.imle(x, setup["solve"], lam=opts["lam"], noise=opts["noise"], k=inst.imle_k, tau=1.0, scale=True)
        # the sum, not the mean: I-MLE's target theta - lambda dL/dz reads each copy's own dL/dz
        setup["loss_of_embedding"](z).sum().backward()
        return x.grad.detach()
    else:
        raise ValueError(kind)
    return x.grad.detach() * N              # the estimators' surrogates are batch means


def _train_critic(setup, steps=300, batch=256, lr=1e-2, hidden=64):
    """RELAX's critic trained at these logits (the logits stay fixed), as the README's
    variance table does."""
    from structdsl.torch import RaceDistribution
    relax = estimators.RELAX(atom_shape=tuple(setup["logits"].shape), hidden=hidden).double()
    opt = torch.optim.Adam(relax.parameters(), lr=lr)
    for _ in range(steps):
        x = _batched(setup, batch)
        loss = relax(RaceDistribution(setup["prog"], logits=x), setup["f"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in relax.parameters():
        p.grad = None
    return relax


def summarise_draws(g, exact, valid):
    g = g.numpy()[:, valid]
    e = exact.numpy()[valid]
    N = g.shape[0]
    mean = g.mean(0)
    var = g.var(0, ddof=1)
    diff = np.linalg.norm(mean - e)
    se = math.sqrt(var.sum() / N)
    en = np.linalg.norm(e)
    cos1 = ((g @ e) / (np.linalg.norm(g, axis=1).clip(1e-300) * en)).mean()
    return {"bias": diff, "se": se, "bias2": math.sqrt(max(0.0, diff ** 2 - se ** 2)),
            "rel_bias": diff / en, "cos": float(mean @ e / (np.linalg.norm(mean) * en + 1e-300)),
            "cos1": float(cos1), "var": float(var.mean()), "exact_norm": float(en), "draws": N}


def estimate_all(keys=tuple(INSTANCES), draws=20000, seed=0, critic_steps=300, log=print, progress=True):
    """Rows ``{instance, estimator, bias, se, bias2, rel_bias, cos, cos1, var, ...}``."""
    rows = []
    torch.manual_seed(seed)
    todo = [(k, est) for k in keys for est in estimators_for(k)]
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="bias/variance", leave=False, dynamic_ncols=True)
        except ImportError:              # pragma: no cover
            bar = None
    for key in keys:
        inst = INSTANCES[key]
        setup = make_instance(inst, seed)
        exact, value = _exact(setup)
        relax = None
        for label, kind, opts in estimators_for(key):
            t0 = time.perf_counter()
            if kind == "relax" and relax is None:
                relax = _train_critic(setup, critic_steps)
            g = _draws(kind, opts, setup, inst, draws, relax)
            row = {"instance": inst.name, "estimator": label, "seconds": time.perf_counter() - t0,
                   "loss": value, **summarise_draws(g, exact, setup["valid"])}
            rows.append(row)
            if bar is not None:
                bar.update(1)
        if log:
            log(f"{inst.name}: |exact gradient| = {np.linalg.norm(exact.numpy()[setup['valid']]):.4g}")
    if bar is not None:
        bar.close()
    return rows


def format_table(rows):
    lines = ["| instance | estimator | bias \\|mean - exact\\| | noise floor (se) | bias, noise removed | "
             "relative bias | cos(mean, exact) | mean cos(single, exact) | variance / coordinate |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['instance']} | {r['estimator']} | {r['bias']:.4f} | {r['se']:.4f} | {r['bias2']:.4f} | "
                     f"{r['rel_bias']:.3f} | {r['cos']:.4f} | {r['cos1']:.3f} | {r['var']:.4g} |")
    return "\n".join(lines)


def plot(rows, path):
    """Bias against variance per coordinate, log-log; the noise floor as an error bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    markers = {}
    colours = {}
    fig, ax = plt.subplots(figsize=(10, 7))
    cmap = plt.get_cmap("tab20")
    for r in rows:
        m = markers.setdefault(r["instance"], "osD^v<>"[len(markers) % 7])
        family = r["estimator"]
        c = colours.setdefault(family, cmap(len(colours) % 20))
        ax.errorbar(r["var"], max(r["bias"], 1e-6), yerr=[[0], [0]], fmt=m, color=c, ms=7, alpha=0.9)
        ax.plot([r["var"]], [r["se"]], marker="_", color=c, ms=12, alpha=0.6)
    for inst, m in markers.items():
        ax.plot([], [], m, color="black", label=inst, ls="")
    for fam, c in colours.items():
        ax.plot([], [], "s", color=c, label=fam, ls="")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("variance per coordinate (one estimate)")
    ax.set_ylabel("bias |mean - exact| (markers); '_' = noise floor sqrt(tr Cov / N)")
    ax.set_title("Gradient estimators against the exact gradient (small instances, fixed random loss)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out="experiment-results/bias-variance", keys=tuple(INSTANCES), draws=20000, seed=0, critic_steps=300,
        log=print, progress=True):
    """Estimate, write ``bias_variance.md`` and ``bias_variance.csv`` and the figure."""
    import csv
    os.makedirs(out, exist_ok=True)
    rows = estimate_all(keys, draws, seed, critic_steps, log, progress)
    table = format_table(rows)
    with open(os.path.join(out, "bias_variance.md"), "w") as fh:
        fh.write(f"{draws} draws per estimator, seed {seed}, RELAX critic trained {critic_steps} steps.\n\n")
        fh.write(table + "\n")
    with open(os.path.join(out, "bias_variance.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        plot(rows, os.path.join(out, "bias_variance.png"))
    except ImportError:                  # pragma: no cover
        pass
    if log:
        log(table)
    return rows
