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

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

import structdsl
from structdsl import estimators, specs

from . import baselines as B
from . import runs
from .graph_layout_data import make_splits
from .nri import Decoder, Encoder, edge_logits, edge_types_from_adjacency, gaussian_nll

__all__ = ["Config", "ESTIMATORS", "GraphLayoutModel", "make_data", "train", "evaluate", "run_all",
           "summarise", "plot_curves"]

ESTIMATORS = ("t_reinforce+", "e_reinforce+", "relax", "sst_soft", "sst_st", "imle", "bernoulli")
LABELS = {"t_reinforce+": "T-REINFORCE+", "e_reinforce+": "E-REINFORCE+", "relax": "RELAX",
          "sst_soft": "SST (soft)", "sst_st": "SST (straight-through)", "imle": "I-MLE",
          "bernoulli": "Bernoulli edges"}


@dataclass
class Config(runs.TrainingConfig):
    """Experiment 1 (the shared fields: :class:`.runs.TrainingConfig`)."""
    n: int = 10
    frames: int = 10
    hidden: int = 64
    steps: int = 1500
    skip_first: bool = True             # NRI's decoder option: "no edge" sends no message
    variance: float = 5e-5              # the Gaussian likelihood's fixed output variance
    out: str = "experiment-results/graph-layout"


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


CSV_FIELDS = ("step", "train_seconds", "ms_per_step", "train_loss", "train_nll", "train_kl", "train_elbo",
              "test_elbo", "test_elbo_sst", "test_nll_tf", "test_nll_rollout", "test_nll_tf_map", "test_kl",
              "test_precision", "test_precision_map", "test_precision_complement")


def make_data(cfg):
    """The training and test sets of ``cfg`` (generated from ``cfg.data_seed``)."""
    return make_splits(cfg.num_train, cfg.num_test, cfg.data_seed, cfg.n, cfg.frames)


def num_examples(train_set):
    return train_set.positions.shape[0]


def batch(train_set, idx):
    """The positions ``[b, n, T, 2]`` (float32) of the examples ``idx``."""
    return torch.as_tensor(train_set.positions[idx.numpy()], dtype=torch.float32)


def relax_atoms(cfg):
    return (cfg.n, cfg.n)


def headline(row):
    return (f"test ELBO {row['test_elbo']:.1f}, precision {row['test_precision']:.3f} "
            f"(MAP {row['test_precision_map']:.3f})")


Model, Parts = GraphLayoutModel, _Parts


train, run_all = runs.entry_points(__name__, ESTIMATORS)


def _sst_metric(est, f):
    """SST's reported metric: the better of the two edge-type readings."""
    comp = f.get("test_precision_complement", math.nan)
    f["precision_sst"] = max(f["test_precision"], comp) if math.isfinite(comp) else f["test_precision"]


def summarise(out):
    """A markdown table of the final evaluation: mean ± standard deviation over seeds, and
    each seed's edge precision (the seeds can find different modes)."""
    cols = (("test_elbo", "test ELBO", 1), ("test_elbo_sst", "ELBO, SST's KL", 1),
            ("test_nll_tf_map", "NLL (MAP tree)", 1),
            ("test_precision", "edge precision", 3), ("by_seed:test_precision", "precision by seed", 2),
            ("precision_sst", "SST's metric", 3), ("test_precision_map", "precision (MAP)", 3),
            ("ms_per_step", "ms / step", 1))
    return runs.summary_table(runs.load_runs(out), ESTIMATORS, LABELS, cols, _sst_metric)


def plot_curves(out, path=None):
    """Test ELBO (mean over seeds, min..max band) and each seed's edge precision against
    steps and against training seconds."""
    panels = (("test_elbo", "test ELBO (per graph / n)", None, True, False),
              ("test_precision", "test edge precision (each seed)", (0.2, "random tree (0.2)"), False, True))
    return runs.plot_curves(runs.load_runs(out), ESTIMATORS, LABELS, panels,
                            "Graph layout (n = 10, T = 10, K = 4): ELBO mean over seeds (band: min..max), "
                            "precision per seed",
                            path or os.path.join(out, "learning_curves.png"))
