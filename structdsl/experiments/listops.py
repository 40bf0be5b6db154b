"""Experiment 2: unsupervised parsing on ListOps with an arborescence latent, every estimator
with the same parser, reader, data, optimiser and budget.

``python -m structdsl.experiments listops --estimator t_reinforce+ --seed 0`` trains one run;
``--all`` trains every estimator (and the reference rows) for every seed, then writes the
table and figures.  ``docs/experiments-listops.md`` states the whole setup; :class:`Config`
holds every hyperparameter.

The model: a BiLSTM over the tokens scores every edge ``head u -> dependent v`` (``[B, L, L]``
float64 logits, ``-inf`` at padding and at edges into the root, the first token); the latent
is a spanning arborescence rooted at token 0 (the ``arborescence`` spec, Chu-Liu/Edmonds); a
GNN with a fixed number of message passes (parent -> child and child -> parent, separate
linear maps) reads the tokens over the sampled (or relaxed) tree; an MLP classifies the root
token's final state into the 10 values.  The only path from the other tokens to the classifier
is the tree.  The loss is the cross-entropy of the label; no prior, no KL.

Estimators (``ESTIMATORS``), all with ``K = num_samples`` latent trees per sentence and step:

* ``t_reinforce+``, ``e_reinforce+``, ``relax``: :mod:`structdsl.estimators` on the
  ``arborescence`` :class:`~structdsl.torch.RaceDistribution` of the parser's logits (the
  GNN gets the pathwise gradient of the mean sampled loss);
* ``sst_soft``, ``sst_st``: SST's arborescence relaxation (directed matrix-tree marginals of
  the Gumbel-perturbed scores at temperature ``t``), soft or straight-through (the hard
  maximum-weight arborescence of the perturbed scores, Chu-Liu/Edmonds, forward);
* ``imle``: I-MLE with the spec's solver (Chu-Liu/Edmonds) as MAP oracle.

Reference rows (``REFERENCES``, not estimators: the parser is not trained): ``gold`` (the GNN
on the gold parse: the upper bound), ``flat`` (every token attached to the root: a bag of
tokens) and ``random_tree`` (a tree from the race distribution at zero logits, redrawn every
step and every evaluation).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import structdsl
from structdsl import estimators, specs

from . import baselines as B
from . import runs
from .listops_data import CLOSE, NUM_CLASSES, PAD, VOCAB, make_splits

__all__ = ["Config", "ESTIMATORS", "REFERENCES", "ListOpsModel", "edge_mask",
           "training_loss", "evaluate", "make_data", "train", "run_all", "summarise", "plot_curves"]

ESTIMATORS = ("t_reinforce+", "e_reinforce+", "relax", "sst_soft", "sst_st", "imle")
REFERENCES = ("gold", "flat", "random_tree")
LABELS = {"t_reinforce+": "T-REINFORCE+", "e_reinforce+": "E-REINFORCE+", "relax": "RELAX",
          "sst_soft": "SST (soft)", "sst_st": "SST (straight-through)", "imle": "I-MLE",
          "gold": "gold tree (upper bound)", "flat": "flat tree (all on the root)",
          "random_tree": "random tree (zero logits)"}


@dataclass
class Config(runs.TrainingConfig):
    """Experiment 2 (the shared fields: :class:`.runs.TrainingConfig`)."""
    num_test: int = 1000
    max_len: int = 30                   # tokens per sentence (every batch is padded to it)
    max_depth: int = 3                  # operator nesting depth (the root alone is depth 1)
    min_depth: int = 2
    max_args: int = 4                   # arguments per operator: uniform in [2, max_args]
    p_op: float = 0.3                   # an argument is a nested operator with this probability
    embed: int = 64                     # token embedding of the parser
    hidden: int = 64                    # BiLSTM units per direction, edge scorer and GNN width
    passes: int = 4                     # GNN message passes (>= max_depth reaches the root)
    out: str = "experiment-results/listops"

    def data_kwargs(self):
        return dict(max_len=self.max_len, max_depth=self.max_depth, min_depth=self.min_depth,
                    max_args=self.max_args, p_op=self.p_op)


# ---- trees as adjacency matrices --------------------------------------------------------------
def parents_of(adjacency):
    """``[..., n, n]`` hard edge indicators -> ``parent`` ``[..., n]`` (-1 where no edge enters)."""
    a = adjacency.detach()
    return torch.where(a.sum(-2) > 0.5, a.argmax(-2), -1)


def edge_mask(lengths, n):
    """bool ``[B, n, n]``: the edges ``u -> v`` between present tokens, ``u != v``, ``v != 0``."""
    present = torch.arange(n)[None] < torch.as_tensor(lengths)[:, None]
    ok = present[:, :, None] & present[:, None, :] & ~torch.eye(n, dtype=torch.bool)
    ok[:, :, 0] = False
    return ok


def flat_tree(lengths, n):
    """Every present token's parent is the root."""
    present = torch.arange(n)[None] < torch.as_tensor(lengths)[:, None]
    return torch.where(present & (torch.arange(n) > 0), 0, -1)


# ---- the model ------------------------------------------------------------------------------------
class Parser(nn.Module):
    """Embedding, BiLSTM (packed: padding never enters), head and dependent MLPs and a
    biaffine scorer ``s_uv = h_u^T W d_v + a . h_u + b . d_v``."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden
        self.emb = nn.Embedding(len(VOCAB), cfg.embed, padding_idx=PAD)
        self.lstm = nn.LSTM(cfg.embed, H, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Linear(2 * H, H), nn.ReLU())
        self.dep = nn.Sequential(nn.Linear(2 * H, H), nn.ReLU())
        self.W = nn.Parameter(torch.randn(H, H) / H)
        self.a = nn.Linear(H, 1, bias=False)
        self.b = nn.Linear(H, 1, bias=False)

    def forward(self, tokens, lengths):
        n = tokens.shape[1]
        x = self.emb(tokens)
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.as_tensor(lengths).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        y, _ = self.lstm(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=n)
        h, d = self.head(y), self.dep(y)
        s = h @ self.W @ d.transpose(-1, -2) + self.a(h) + self.b(d).transpose(-1, -2)
        return torch.where(edge_mask(lengths, n), s.to(torch.float64), -math.inf)


class TreeGNN(nn.Module):
    """``passes`` rounds over a hard or relaxed tree ``A`` (``A[u, v]``: ``u`` parent of
    ``v``): ``h <- LayerNorm(h + MLP([h, A (U h), A^T (D h)]))`` (sums over the children and
    over the parent, separate linear maps ``U``, ``D``), from a token embedding of its own;
    an MLP on the root's (token 0's) final state gives the 10 class logits."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden
        self.passes = cfg.passes
        self.emb = nn.Embedding(len(VOCAB), H, padding_idx=PAD)
        self.up = nn.Linear(H, H, bias=False)
        self.down = nn.Linear(H, H, bias=False)
        self.update = nn.Sequential(nn.Linear(3 * H, H), nn.ReLU(), nn.Linear(H, H))
        self.norm = nn.LayerNorm(H)
        self.classify = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, NUM_CLASSES))

    def forward(self, tokens, adjacency):
        """tokens ``[B, n]``, adjacency ``[*lead, B, n, n]`` -> class logits ``[*lead, B, 10]``."""
        Bn, n = tokens.shape
        lead = adjacency.shape[:-3]
        A = adjacency.reshape(-1, n, n).to(torch.float32)
        h = self.emb(tokens).expand(lead + (Bn, n, -1)).reshape(A.shape[0], n, -1)
        At = A.transpose(-1, -2)
        for _ in range(self.passes):
            m = torch.cat([h, A @ self.up(h), At @ self.down(h)], -1)
            h = self.norm(h + self.update(m))
        return self.classify(h[:, 0]).reshape(lead + (Bn, NUM_CLASSES))


class ListOpsModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.parser = Parser(cfg)
        self.reader = TreeGNN(cfg)

    def logits(self, tokens, lengths):
        return self.parser(tokens, lengths)

    def class_logits(self, tokens, adjacency):
        return self.reader(tokens, adjacency)

    def loss(self, tokens, adjacency, labels):
        """Cross-entropy per tree ``[*lead, B]`` and the predictions."""
        out = self.reader(tokens, adjacency)
        y = labels.expand(out.shape[:-1])
        ce = F.cross_entropy(out.reshape(-1, NUM_CLASSES), y.reshape(-1), reduction="none").reshape(y.shape)
        return ce, out.argmax(-1)


class _Parts:
    """What a run needs beside the model: the race program, the MAP oracle."""

    def __init__(self, cfg):
        from structdsl.torch import RaceDistribution
        self.RaceDistribution = RaceDistribution
        self.prog = structdsl.compile(specs.arborescence, backend="torch")
        self.solver_prog = B.compile_numba_or_numpy(specs.arborescence)
        self.solve = B.map_solver(self.solver_prog, embed=B.arborescence_embed)

    def prior(self, lengths, n):
        """The race distribution at zero logits on the present tokens."""
        x = torch.where(edge_mask(lengths, n), 0.0, -math.inf).to(torch.float64)
        return self.RaceDistribution(self.prog, logits=x)


def _batch(data, idx):
    t = lambda a: torch.as_tensor(a[idx])            # noqa: E731
    return t(data.tokens), t(data.lengths), t(data.labels), t(data.parents)


def training_loss(cfg, model, parts, batch, relax=None):
    """One step's loss (a scalar to call ``backward`` on) and its logged parts: the mean
    cross-entropy and the training accuracy of the trees it was computed on."""
    tokens, lengths, labels, gold = batch
    n, K, est = tokens.shape[1], cfg.num_samples, cfg.estimator
    seen = {}

    def f(structure):                                 # [K, B] cross-entropies of sampled trees
        ce, pred = model.loss(tokens, B.arborescence_embed(structure), labels)
        seen["acc"] = float((pred == labels).double().mean())
        return ce

    if est in ("gold", "flat"):
        parent = gold if est == "gold" else flat_tree(lengths, n)
        ce, pred = model.loss(tokens, B.arborescence_embed(parent), labels)
        return ce.mean(), {"loss": float(ce.detach().mean()), "acc": float((pred == labels).double().mean())}
    if est == "random_tree":
        parent = parts.prior(lengths, n).sample_with_structure((K,)).structure.parent
        ce = f(parent)
        return ce.mean(), {"loss": float(ce.detach().mean()), "acc": seen["acc"]}
    theta = model.logits(tokens, lengths)                                          # [B, n, n]
    if est in ("t_reinforce+", "e_reinforce+", "relax"):
        dist = parts.RaceDistribution(parts.prog, logits=theta)
        if est == "t_reinforce+":
            loss = estimators.t_reinforce(dist, f, num_samples=K)
        elif est == "e_reinforce+":
            loss = estimators.e_reinforce(dist, f, num_samples=K)
        else:
            loss = relax(dist, f, num_samples=K)
        return loss, {"loss": float(loss.detach()), "acc": seen["acc"]}
    th = theta.expand((K,) + theta.shape)
    if est in ("sst_soft", "sst_st"):
        z, _ = B.sst_arborescence(th, cfg.sst_temperature, hard=est == "sst_st", solve=parts.solve)
    elif est == "imle":
        k = max(1, int(round(float(lengths.double().mean()))) - 1)      # edges of a tree, batch mean
        z = B.imle(th, parts.solve, lam=cfg.imle_lambda, noise=cfg.imle_noise, k=k, tau=cfg.imle_temperature)
    else:
        raise ValueError(f"unknown estimator {est!r}; choose from {', '.join(ESTIMATORS + REFERENCES)}")
    ce, pred = model.loss(tokens, z, labels)
    return ce.mean(), {"loss": float(ce.detach().mean()), "acc": float((pred == labels).double().mean())}


# ---- evaluation ------------------------------------------------------------------------------------
def attachment(pred, gold, tokens, lengths):
    """Per sentence: the fraction of non-root tokens whose predicted head is the gold head
    (``all``; = edge precision = edge recall, both trees having one edge into every present
    non-root token), the same over the operators' arguments only (``args``: closing brackets
    left out), and undirected (``undirected``: the edge counts when it or its reverse is
    gold)."""
    n = tokens.shape[-1]
    idx = torch.arange(n)
    m = (idx[None] < lengths[:, None]) & (idx[None] > 0)
    hit = (pred == gold) & m
    rev = (gold.gather(-1, pred.clamp_min(0)) == idx) & (pred >= 0) & m       # gold has v -> pred[v]
    ma = m & (tokens != CLOSE)
    f = lambda a, b: a.sum(-1).double() / b.sum(-1).clamp_min(1).double()     # noqa: E731
    return {"all": f(hit, m), "args": f(hit & ma, ma), "undirected": f(hit | rev, m)}


@torch.no_grad()
def evaluate(cfg, model, parts, data, generator=None):
    """Test metrics (means over the test sentences):

    * ``acc``: accuracy of the classifier on one sampled tree per sentence, drawn from the
      model's own law: the race distribution of the parser's logits (score-function
      estimators), the maximum-weight arborescence of the Gumbel-perturbed logits (SST and
      I-MLE: perturb-and-MAP), the gold / flat tree, a zero-logit race sample (random tree);
    * ``acc_map``: on the MAP tree, the maximum-weight arborescence of the logits
      (Chu-Liu/Edmonds; the reference rows: their own tree);
    * ``precision``: the sampled tree's edges that are gold (= recall: both trees have one
      edge into each non-root token); ``precision_args``: the same over the arguments' edges
      (closing brackets left out); ``precision_undirected``: an edge counts when it or its
      reverse is gold; ``*_map``: of the MAP tree."""
    model.eval()
    sums, count = {}, 0
    n = data.tokens.shape[1]
    for start in range(0, len(data), cfg.eval_batch):
        idx = np.arange(start, min(start + cfg.eval_batch, len(data)))
        tokens, lengths, labels, gold = _batch(data, idx)
        est = cfg.estimator
        if est in REFERENCES:
            if est == "gold":
                sample = gold
            elif est == "flat":
                sample = flat_tree(lengths, n)
            else:
                sample = parts.prior(lengths, n).sample_with_structure(generator=generator).structure.parent
            mapt = sample
        else:
            theta = model.logits(tokens, lengths)
            if est in ("sst_soft", "sst_st", "imle"):
                sample = parents_of(parts.solve(theta + B.gumbel(theta.shape, generator)))
            else:
                dist = parts.RaceDistribution(parts.prog, logits=theta)
                sample = dist.sample_with_structure(generator=generator).structure.parent
            mapt = parents_of(parts.solve(theta))
        vals = {}
        for key, tree in (("", sample), ("_map", mapt)):
            out = model.class_logits(tokens, B.arborescence_embed(tree))
            vals["acc" + key] = (out.argmax(-1) == labels).double()
            for k, v in attachment(tree, gold, tokens, lengths).items():
                vals[("precision" if k == "all" else f"precision_{k}") + key] = v
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        count += len(idx)
    model.train()
    return {k: v / count for k, v in sums.items()}


CSV_FIELDS = ("step", "train_seconds", "ms_per_step", "train_loss", "train_acc",
              "test_acc", "test_acc_map", "test_precision", "test_precision_map",
              "test_precision_args", "test_precision_args_map",
              "test_precision_undirected", "test_precision_undirected_map")


def make_data(cfg):
    """The training and test sets of ``cfg`` (generated from ``cfg.data_seed``)."""
    return make_splits(cfg.num_train, cfg.num_test, cfg.data_seed, **cfg.data_kwargs())


def num_examples(train_set):
    return len(train_set)


def batch(train_set, idx):
    """``(tokens, lengths, labels, gold parents)`` of the examples ``idx``."""
    return _batch(train_set, idx.numpy())


def relax_atoms(cfg):
    return (cfg.max_len, cfg.max_len)


def headline(row):
    return (f"test accuracy {row['test_acc']:.3f} (MAP {row['test_acc_map']:.3f}), "
            f"precision {row['test_precision']:.3f} (MAP {row['test_precision_map']:.3f})")


Model, Parts = ListOpsModel, _Parts


train, run_all = runs.entry_points(__name__, ESTIMATORS + REFERENCES)


def summarise(out):
    """A markdown table of the final evaluation: mean ± standard deviation over seeds (the
    spread over seeds is the point: it is what "more stable" is about)."""
    cols = (("test_acc", "accuracy (sample)", 3), ("test_acc_map", "accuracy (MAP)", 3),
            ("test_precision", "edge P = R (sample)", 3), ("test_precision_map", "edge P = R (MAP)", 3),
            ("test_precision_args_map", "argument edges (MAP)", 3),
            ("test_precision_undirected_map", "undirected (MAP)", 3),
            ("ms_per_step", "ms / step", 1))
    return runs.summary_table(runs.load_runs(out), ESTIMATORS + REFERENCES, LABELS, cols)


def plot_curves(out, path=None):
    """Test accuracy and edge precision of one sampled tree against steps and against
    training seconds (mean over seeds, min..max band; reference rows dotted)."""
    panels = (("test_acc", "test accuracy (one sampled tree)", (1 / NUM_CLASSES, "chance (0.1)"), False, False),
              ("test_precision", "test edge precision = recall", None, False, False))
    return runs.plot_curves(runs.load_runs(out), ESTIMATORS + REFERENCES, LABELS, panels,
                            "ListOps (MIN, MAX, MED), K = 4: mean over seeds, band = min..max",
                            path or os.path.join(out, "learning_curves.png"), references=REFERENCES)
