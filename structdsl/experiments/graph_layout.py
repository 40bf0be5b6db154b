"""Experiment 1: graph layout with a spanning-tree latent (SST's NRI setup), every estimator
with the same encoder, decoder, data, optimiser and budget.

``python -m structdsl.experiments graph-layout --estimator t_reinforce+ --seed 0`` trains one
run; ``--all`` trains every estimator for every seed, then writes the table and figures.
``docs/experiments.md`` states the whole setup; :class:`Config` holds every hyperparameter.

Estimators (``ESTIMATORS``), all with ``K = num_samples`` latent samples per graph and step:

* ``t_reinforce+``, ``e_reinforce+``, ``relax``: :mod:`structdsl.estimators` on the
  ``spanning_tree`` :class:`~structdsl.torch.RaceDistribution` of the encoder's logits (the
  reconstruction term; the decoder gets the pathwise gradient), plus the trace KL to the
  zero-logit prior from :func:`~.baselines.trace_kl` (``K`` fresh traces, leave-one-out,
  scored with the trace, or for ``e_reinforce+`` the noise).  Objective: the negative ELBO.
* ``sst_soft``, ``sst_st``: SST's spanning-tree relaxation (Gibbs marginals at temperature
  ``t``), soft or straight-through (the hard tree from the spec's solver), plus SST's Gumbel
  KL (the utilities' KL, an upper bound on the tree's).
* ``imle``: I-MLE with the spec's solver as MAP oracle, Sum-of-Gamma noise (``k = n - 1``),
  target ``theta - lambda dL/dz``; its loss is the reconstruction NLL plus the same Gumbel KL
  as SST (as torch-adaptive-imle's NRI code trains it); it has no ELBO of its own.
* ``bernoulli``: independent Bernoulli edges (unstructured), leave-one-out REINFORCE with
  ``K`` samples, exact KL to Bernoulli(1/2).

Every run is evaluated the same way on the held-out test set (``evaluate``): the encoder's
logits define the tree law ``q`` (the race distribution) for every tree-based estimator, so
one ELBO (one sampled tree per graph, teacher-forced Gaussian NLL, trace KL) is reported for
all of them; the Bernoulli model has its own.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import structdsl
from structdsl import estimators, specs

from . import baselines as B
from .graph_layout_data import make_splits
from .nri import Decoder, Encoder, edge_logits, edge_types_from_adjacency, gaussian_nll

__all__ = ["Config", "ESTIMATORS", "GraphLayoutModel", "make_data", "train", "evaluate", "run_all",
           "summarise", "plot_curves"]

ESTIMATORS = ("t_reinforce+", "e_reinforce+", "relax", "sst_soft", "sst_st", "imle", "bernoulli")
LABELS = {"t_reinforce+": "T-REINFORCE+", "e_reinforce+": "E-REINFORCE+", "relax": "RELAX",
          "sst_soft": "SST (soft)", "sst_st": "SST (straight-through)", "imle": "I-MLE",
          "bernoulli": "Bernoulli edges"}


@dataclass
class Config:
    estimator: str = "t_reinforce+"
    seed: int = 0                       # model and estimator randomness
    data_seed: int = 0                  # the data: the same for every run
    n: int = 10
    frames: int = 10
    num_train: int = 10000
    num_test: int = 500
    hidden: int = 64
    batch_size: int = 32
    steps: int = 1500
    lr: float = 1e-3
    skip_first: bool = True             # NRI's decoder option: "no edge" sends no message
    variance: float = 5e-5              # the Gaussian likelihood's fixed output variance
    num_samples: int = 4                # K latent samples per graph and step (every estimator)
    sst_temperature: float = 1.0
    imle_lambda: float = 10.0
    imle_noise: str = "sog"
    imle_temperature: float = 1.0
    relax_hidden: int = 64
    eval_every: int = 250
    eval_batch: int = 500
    threads: int = 1
    out: str = "experiment-results/graph-layout"

    def run_name(self):
        return f"{self.estimator}-seed{self.seed}"


class GraphLayoutModel(nn.Module):
    """Encoder (one logit per undirected edge) and decoder (two edge types)."""

    def __init__(self, cfg):
        super().__init__()
        self.n = cfg.n
        self.encoder = Encoder(cfg.n, cfg.frames * 2, cfg.hidden)
        self.decoder = Decoder(cfg.n, 2, cfg.hidden, skip_first=cfg.skip_first)

    def logits(self, x):
        """``[B, n, n]`` float64 symmetric edge logits (read at ``u < v`` by the spec)."""
        return edge_logits(self.encoder(x), self.n).to(torch.float64)

    def nll(self, adjacency, x, variance, teacher_forcing=False):
        """Gaussian NLL per graph (SST's units: divided by n) of ``x`` ``[B, n, T, 2]`` given
        symmetric edge indicators ``adjacency`` ``[*lead, B, n, n]`` (hard or relaxed):
        rolled out from the first frame, or one step from every true frame."""
        z = adjacency.to(x.dtype)
        n = self.n
        lead = z.shape[:-3]
        rel = edge_types_from_adjacency(z.reshape(-1, n, n))             # [L * B, n (n - 1), 2]
        xs = x.expand(lead + x.shape).reshape((-1,) + x.shape[1:])      # [L * B, n, T, 2]
        if teacher_forcing:
            pred = self.decoder.teacher_forced(xs, rel)
        else:
            pred = self.decoder.rollout(xs[:, :, 0], rel, x.shape[2] - 1)
        return gaussian_nll(pred, xs[:, :, 1:], variance).reshape(lead + x.shape[:1])


def _symmetric(z):
    return z + z.transpose(-1, -2)


class _Parts:
    """What a run needs beside the model: programs, prior, solver, valid mask."""

    def __init__(self, cfg):
        from structdsl.torch import RaceDistribution
        self.RaceDistribution = RaceDistribution
        self.prog = structdsl.compile(specs.spanning_tree, backend="torch")
        self.solver_prog = B.compile_numba_or_numpy(specs.spanning_tree)
        self.solve = B.map_solver(self.solver_prog)
        self.valid = torch.as_tensor(B.valid_mask(self.prog, (cfg.n, cfg.n)).copy())
        self.prior = RaceDistribution(self.prog, logits=torch.zeros(cfg.n, cfg.n, dtype=torch.float64))


def training_loss(cfg, model, parts, x, relax=None):
    """One step's loss (a scalar to call ``backward`` on) and its logged parts: ``nll`` and
    ``kl`` per graph (SST units) and ``elbo = -(nll + kl)`` where the estimator has one."""
    n, K, var = cfg.n, cfg.num_samples, cfg.variance
    theta = model.logits(x)                                          # [B, n, n]
    est = cfg.estimator
    if est in ("t_reinforce+", "e_reinforce+", "relax"):
        dist = parts.RaceDistribution(parts.prog, logits=theta)
        f = lambda s: model.nll(s.adjacency, x, var)                     # noqa: E731  [K, B]
        if est == "t_reinforce+":
            rec = estimators.t_reinforce(dist, f, num_samples=K)
        elif est == "e_reinforce+":
            rec = estimators.e_reinforce(dist, f, num_samples=K)
        else:
            rec = relax(dist, f, num_samples=K)
        kl_sur, kl = B.trace_kl(dist, parts.prior, K, score="noise" if est == "e_reinforce+" else "trace")
        loss = rec + kl_sur / n
        nll, klv = float(rec.detach()), float(kl.mean()) / n
        return loss, {"nll": nll, "kl": klv, "elbo": -(nll + klv)}
    if est in ("sst_soft", "sst_st"):
        th = theta.expand((K,) + theta.shape)
        z, _ = B.sst_spanning_tree(th, cfg.sst_temperature, hard=est == "sst_st", solve=parts.solve)
        nll = model.nll(_symmetric(z), x, var)
        kl = B.gumbel_kl(theta, parts.valid) / n
        loss = nll.mean() + kl.mean()
        return loss, {"nll": float(nll.detach().mean()), "kl": float(kl.detach().mean()), "elbo": math.nan}
    if est == "imle":
        th = theta.expand((K,) + theta.shape)
        z = B.imle(th, parts.solve, lam=cfg.imle_lambda, noise=cfg.imle_noise, k=n - 1, tau=cfg.imle_temperature)
        nll = model.nll(_symmetric(z), x, var)
        kl = B.gumbel_kl(theta, parts.valid) / n
        loss = nll.mean() + kl.mean()
        return loss, {"nll": float(nll.detach().mean()), "kl": float(kl.detach().mean()), "elbo": math.nan}
    if est == "bernoulli":
        q = B.IndependentBernoulli(theta, parts.valid)
        z = q.sample(K)
        nll = model.nll(_symmetric(z), x, var)
        kl = q.kl_to_uniform() / n
        loss = estimators.score_surrogate(nll, q.log_prob(z)) + kl.mean()
        nv, kv = float(nll.detach().mean()), float(kl.detach().mean())
        return loss, {"nll": nv, "kl": kv, "elbo": -(nv + kv)}
    raise ValueError(f"unknown estimator {est!r}; choose from {', '.join(ESTIMATORS)}")


def _precision(pred, gold, complement=False):
    """Edge precision per graph: |pred ∩ gold| / |pred| over undirected edges (u < v); with
    ``complement`` the precision of the edges *not* in ``pred``."""
    n = pred.shape[-1]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    p, g = pred.bool() & upper, gold.bool() & upper
    if complement:
        p = upper & ~p
    tp = (p & g).sum((-1, -2)).to(torch.float64)
    return tp / p.sum((-1, -2)).clamp_min(1).to(torch.float64)


@torch.no_grad()
def evaluate(cfg, model, parts, data, generator=None):
    """Test metrics (means over the test graphs; NLL, KL and ELBO per graph in SST's units,
    i.e. divided by n):

    * ``elbo``: ``-(nll_tf + kl)``: one tree sampled from ``q`` per graph, the teacher-forced
      NLL, and the KL estimate ``log q(T) - log p0(T)`` of that sample (tree models), or the
      exact Bernoulli KL (Bernoulli model);
    * ``elbo_sst``: SST's reported quantity: the same NLL, with SST's Gumbel KL of the logits
      (summed over both directions of every edge, as SST's ``kl_gumbel``), at the shift of
      the logits that minimises it (the tree law is shift-invariant; models trained with the
      trace KL leave the logits' level free, and the unshifted Gumbel KL can be arbitrarily
      large for them);
    * ``nll_tf``, ``nll_rollout``: teacher-forced / rolled-out NLL of the sampled tree;
      ``nll_tf_map``: teacher-forced NLL of the MAP tree (maximum spanning tree of the logits;
      Bernoulli: logits > 0);
    * ``precision``: edge precision of the sampled tree (= recall for trees), ``precision_map``
      of the MAP tree; ``precision_complement``: of the edges the sample leaves out.  SST's
      reported metric (``sampling_edge_metrics``) is the larger of the mean ``precision`` and
      the mean ``precision_complement``, since with two message-passing edge types either
      type may end up meaning "edge" (:func:`summarise` shows it)."""
    model.eval()
    x_all = torch.as_tensor(data.positions, dtype=torch.float32)
    gold_all = torch.as_tensor(data.adjacency)
    sums, count = {}, 0
    for start in range(0, x_all.shape[0], cfg.eval_batch):
        x, gold = x_all[start:start + cfg.eval_batch], gold_all[start:start + cfg.eval_batch]
        theta = model.logits(x)
        if cfg.estimator == "bernoulli":
            q = B.IndependentBernoulli(theta, parts.valid)
            z = _symmetric(q.sample(1, generator)[0])
            zmap = _symmetric(q.map())
            kl = q.kl_to_uniform()
        else:
            dist = parts.RaceDistribution(parts.prog, logits=theta)
            trace = dist.sample(generator=generator)
            z = dist.structure(trace).adjacency
            kl = dist.log_prob(trace) - parts.prior.log_prob(trace)
            zmap = _symmetric(parts.solve(theta))
        n = cfg.n
        nll_tf = model.nll(z, x, cfg.variance, teacher_forcing=True)
        vals = {
            "nll_tf": nll_tf,
            "nll_rollout": model.nll(z, x, cfg.variance),
            "nll_tf_map": model.nll(zmap, x, cfg.variance, teacher_forcing=True),
            "kl": kl / n,
            "elbo": -(nll_tf.double() + kl / n),
            "elbo_sst": (-(nll_tf.double() + 2 * B.gumbel_kl(theta, parts.valid, shift=True) / n)
                         if cfg.estimator != "bernoulli" else torch.full_like(kl, math.nan)),
            "precision": _precision(z, gold),
            "precision_complement": _precision(z, gold, complement=True),
            "precision_map": _precision(zmap, gold),
        }
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + float(v.double().sum())
        count += x.shape[0]
    model.train()
    return {k: v / count for k, v in sums.items()}


def _set_threads(k):
    if k:
        torch.set_num_threads(k)
        try:
            import numba
            numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))
        except ImportError:          # pragma: no cover
            pass


CSV_FIELDS = ("step", "train_seconds", "ms_per_step", "train_loss", "train_nll", "train_kl", "train_elbo",
              "test_elbo", "test_elbo_sst", "test_nll_tf", "test_nll_rollout", "test_nll_tf_map", "test_kl",
              "test_precision", "test_precision_map", "test_precision_complement")


def make_data(cfg):
    """The training and test sets of ``cfg`` (generated from ``cfg.data_seed``)."""
    return make_splits(cfg.num_train, cfg.num_test, cfg.data_seed, cfg.n, cfg.frames)


def train(cfg, data=None, progress=True, log=print):
    """Train one run; writes ``<out>/<estimator>-seed<seed>.csv`` (one row per evaluation),
    ``.json`` (the config and the final row) and ``.pt`` (the final weights).  Returns the
    list of rows."""
    _set_threads(cfg.threads)
    if cfg.estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {cfg.estimator!r}; choose from {', '.join(ESTIMATORS)}")
    if data is None:
        data = make_data(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    parts = _Parts(cfg)
    model = GraphLayoutModel(cfg)
    params = list(model.parameters())
    relax = None
    if cfg.estimator == "relax":
        relax = estimators.RELAX(atom_shape=(cfg.n, cfg.n), hidden=cfg.relax_hidden)
        params += list(relax.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, cfg.run_name() + ".csv")
    x_train = torch.as_tensor(data["train"].positions, dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed + 1000)
    eval_gen = torch.Generator().manual_seed(12345)
    rows, seconds, since, acc = [], 0.0, 0, {"loss": 0.0, "nll": 0.0, "kl": 0.0, "elbo": 0.0}
    perm, pos = torch.randperm(x_train.shape[0], generator=gen), 0

    def record(step):
        ev = evaluate(cfg, model, parts, data["test"], eval_gen)
        row = {"step": step, "train_seconds": seconds,
               "ms_per_step": 1000 * seconds / step if step else math.nan}
        for k in ("loss", "nll", "kl", "elbo"):
            row[f"train_{k}"] = acc[k] / since if since else math.nan
        row.update({f"test_{k}": v for k, v in ev.items()})
        rows.append(row)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
        return row

    record(0)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, desc=cfg.run_name(), leave=False, dynamic_ncols=True)
        except ImportError:          # pragma: no cover
            bar = None
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > x_train.shape[0]:
            perm, pos = torch.randperm(x_train.shape[0], generator=gen), 0
        x = x_train[perm[pos:pos + cfg.batch_size]]
        pos += cfg.batch_size
        t0 = time.perf_counter()
        loss, parts_logged = training_loss(cfg, model, parts, x, relax)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - t0
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"{cfg.run_name()}: non-finite loss {lv} at step {step}")
        acc["loss"] += lv
        for k in ("nll", "kl", "elbo"):
            acc[k] += parts_logged[k]
        since += 1
        if bar is not None:
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(nll=f"{parts_logged['nll']:.0f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = record(step)
            acc, since = {k: 0.0 for k in acc}, 0
            if bar is not None:
                bar.set_postfix(test_elbo=f"{row['test_elbo']:.0f}", prec=f"{row['test_precision']:.3f}")
    if bar is not None:
        bar.close()
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)},
               os.path.join(cfg.out, cfg.run_name() + ".pt"))           # for re-evaluation
    with open(os.path.join(cfg.out, cfg.run_name() + ".json"), "w") as fh:
        json.dump({"config": dataclasses.asdict(cfg), "final": rows[-1], "torch": torch.__version__}, fh, indent=1)
    if log:
        r = rows[-1]
        log(f"{cfg.run_name()}: test ELBO {r['test_elbo']:.1f}, precision {r['test_precision']:.3f} "
            f"(MAP {r['test_precision_map']:.3f}), {r['ms_per_step']:.1f} ms/step")
    return rows


def run_all(base, estimators_=ESTIMATORS, seeds=(0, 1, 2), log=print, progress=True):
    """Every estimator for every seed on one dataset; then the summary table and figures."""
    data = make_data(base)
    for est in estimators_:
        for seed in seeds:
            train(dataclasses.replace(base, estimator=est, seed=seed), data, progress=progress, log=log)
    table = summarise(base.out)
    with open(os.path.join(base.out, "results.md"), "w") as fh:
        fh.write(table + "\n")
    if log:
        log(table)
    try:
        plot_curves(base.out)
    except ImportError:              # pragma: no cover - matplotlib is optional
        if log:
            log("matplotlib not installed: no figures")
    return table


def _load_runs(out):
    runs = {}
    for name in sorted(os.listdir(out)):
        if not name.endswith(".csv") or "-seed" not in name:
            continue
        est = name[:name.rindex("-seed")]
        with open(os.path.join(out, name)) as fh:
            rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
                    for r in csv.DictReader(fh)]
        runs.setdefault(est, []).append(rows)
    return runs


def summarise(out):
    """A markdown table of the final evaluation: mean ± standard deviation over seeds."""
    runs = _load_runs(out)
    cols = (("test_elbo", "test ELBO", 1), ("test_elbo_sst", "ELBO, SST's KL", 1),
            ("test_nll_tf_map", "NLL (MAP tree)", 1),
            ("test_precision", "edge precision", 3), ("by_seed", "precision by seed", 2),
            ("precision_sst", "SST's metric", 3),
            ("test_precision_map", "precision (MAP)", 3),
            ("ms_per_step", "ms / step", 1))
    lines = ["| estimator | seeds | steps | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---:|---:|" + "---:|" * len(cols)]
    for est in [e for e in ESTIMATORS if e in runs] + [e for e in runs if e not in ESTIMATORS]:
        finals = [dict(r[-1]) for r in runs[est]]
        for f in finals:                 # SST's metric: the better of the two edge-type readings
            comp = f.get("test_precision_complement", math.nan)
            f["precision_sst"] = max(f["test_precision"], comp) if math.isfinite(comp) else f["test_precision"]
        cells = []
        for key, _, digits in cols:
            if key == "by_seed":         # the seeds can disagree on which mode they find
                cells.append(" / ".join(f"{f['test_precision']:.{digits}f}" for f in finals))
                continue
            v = np.array([f[key] for f in finals], dtype=float)
            if np.isnan(v).all():
                cells.append("n/a")
            elif len(v) > 1:
                cells.append(f"{np.nanmean(v):.{digits}f} ± {np.nanstd(v, ddof=1):.{digits}f}")
            else:
                cells.append(f"{v[0]:.{digits}f}")
        lines.append(f"| {LABELS.get(est, est)} | {len(finals)} | {int(finals[0]['step'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(out, path=None):
    """Learning curves (test ELBO and edge precision) against steps and against training
    wall-clock seconds: the mean over seeds, a band from the smallest to the largest seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = _load_runs(out)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    later = []                       # ELBO values after the first evaluation (the y range)
    for est, seeds in runs.items():
        m = min(len(r) for r in seeds)
        for row, key in enumerate(("test_elbo", "test_precision")):
            for col, xkey in enumerate(("step", "train_seconds")):
                ax = axes[row, col]
                xs = np.array([[r[i][xkey] for i in range(m)] for r in seeds])
                ys = np.array([[r[i][key] for i in range(m)] for r in seeds])
                if key == "test_elbo" and m > 1:
                    later.extend(ys[:, 1:].ravel().tolist())
                xm = xs.mean(0)
                line, = ax.plot(xm, ys.mean(0), label=f"{LABELS.get(est, est)} ({len(seeds)})")
                if len(seeds) > 1:
                    ax.fill_between(xm, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    for (row, col), ax in np.ndenumerate(axes):
        ax.set_xlabel(("training steps", "training wall-clock seconds")[col])
        ax.set_ylabel(("test ELBO (per graph / n)", "test edge precision")[row])
        ax.grid(alpha=0.3)
    later = [v for v in later if math.isfinite(v)]
    if later:                        # the first evaluation (untrained decoder) is far below
        lo, hi = min(later), max(later)
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        for ax in axes[0]:
            ax.set_ylim(lo - pad, hi + pad)
    axes[1, 1].axhline(0.2, color="grey", ls=":", lw=1)
    axes[1, 0].axhline(0.2, color="grey", ls=":", lw=1, label="random tree (0.2)")
    axes[1, 0].legend(fontsize=8)
    fig.suptitle("Graph layout (n = 10, T = 10): mean over seeds, band = min..max")
    fig.tight_layout()
    path = path or os.path.join(out, "learning_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
