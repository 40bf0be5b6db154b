"""What the training experiments share: one run (the training loop, its CSV log, JSON and
weights), the table of runs, reading the logs back, the mean ± spread table and the
learning-curve figure.

An experiment is a module (:mod:`.graph_layout`, :mod:`.listops`) that provides

* ``Config`` (a dataclass with at least ``estimator``, ``seed``, ``steps``, ``batch_size``,
  ``lr``, ``eval_every``, ``threads``, ``relax_hidden``, ``out`` and ``run_name()``);
* ``ESTIMATORS`` (and optionally ``REFERENCES``), ``LABELS``, ``CSV_FIELDS``;
* ``make_data(cfg)`` -> ``{"train": ..., "test": ...}``, ``num_examples(train)``,
  ``batch(train, idx)`` (``idx`` a LongTensor of example indices);
* ``Parts(cfg)`` (programs, solver, prior), ``Model(cfg)``, ``relax_atoms(cfg)`` (the
  latent's atom shape, for RELAX's critic);
* ``training_loss(cfg, model, parts, batch, relax)`` -> ``(loss, {name: float})``, logged
  as ``train_<name>`` (``train_loss`` is the loss's value unless it logs its own);
* ``evaluate(cfg, model, parts, test, generator)`` -> ``{name: float}``, logged as
  ``test_<name>``; ``headline(row)``: a short summary of a logged row.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from structdsl import estimators

__all__ = ["TrainingConfig", "set_threads", "train", "run_all", "entry_points", "load_runs", "ordered", "summary_table", "plot_curves"]


@dataclass
class TrainingConfig:
    """The fields every experiment's ``Config`` shares; an experiment's ``Config`` subclasses
    it, adds its data and model fields and may change a default (``steps``, ``num_test``,
    ``out``)."""
    estimator: str = "t_reinforce+"
    seed: int = 0                       # model and estimator randomness
    data_seed: int = 0                  # the data: the same for every run
    num_train: int = 10000
    num_test: int = 500
    batch_size: int = 32
    steps: int = 1000
    lr: float = 1e-3                    # Adam
    num_samples: int = 4                # K latent samples per example and step (every estimator)
    sst_temperature: float = 1.0
    imle_lambda: float = 10.0
    imle_noise: str = "sog"
    imle_temperature: float = 1.0
    relax_hidden: int = 64
    eval_every: int = 250
    eval_batch: int = 500
    threads: int = 1                    # torch and numba threads
    out: str = "experiment-results"

    def run_name(self):
        return f"{self.estimator}-seed{self.seed}"


def set_threads(k):
    """``k`` torch threads and (at most the pool's size) numba threads; 0 leaves both."""
    if k:
        torch.set_num_threads(k)
        try:
            import numba
            numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))
        except ImportError:          # pragma: no cover
            pass


def _bar(total, desc, progress):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:              # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def train(exp, cfg, data=None, progress=True, log=print):
    """Train one run of experiment ``exp``; writes ``<out>/<estimator>-seed<seed>.csv`` (one
    row per evaluation, every ``eval_every`` steps and at the end), ``.json`` (the config and
    the final row) and ``.pt`` (the final weights).  Returns the list of rows.  Randomness:
    model and estimators from ``torch.manual_seed(seed)``, the batches from a generator
    seeded ``seed + 1000`` (reshuffled every epoch), evaluation from one seeded 12345."""
    set_threads(cfg.threads)
    names = exp.ESTIMATORS + getattr(exp, "REFERENCES", ())
    if cfg.estimator not in names:
        raise ValueError(f"unknown estimator {cfg.estimator!r}; choose from {', '.join(names)}")
    if data is None:
        data = exp.make_data(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    parts = exp.Parts(cfg)
    model = exp.Model(cfg)
    params = list(model.parameters())
    relax = None
    if cfg.estimator == "relax":
        relax = estimators.RELAX(atom_shape=exp.relax_atoms(cfg), hidden=cfg.relax_hidden)
        params += list(relax.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, cfg.run_name() + ".csv")
    train_set, num = data["train"], exp.num_examples(data["train"])
    gen = torch.Generator().manual_seed(cfg.seed + 1000)
    eval_gen = torch.Generator().manual_seed(12345)
    rows, seconds, since, sums = [], 0.0, 0, {}
    perm, pos = torch.randperm(num, generator=gen), 0

    def record(step):
        row = {"step": step, "train_seconds": seconds, "ms_per_step": 1000 * seconds / step if step else math.nan}
        row.update({f"train_{k}": v / since for k, v in sums.items()} if since else {})
        row.update({f"test_{k}": v for k, v in exp.evaluate(cfg, model, parts, data["test"], eval_gen).items()})
        rows.append(row)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=exp.CSV_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in exp.CSV_FIELDS})
        return row

    record(0)
    bar = _bar(cfg.steps, cfg.run_name(), progress)
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > num:
            perm, pos = torch.randperm(num, generator=gen), 0
        batch = exp.batch(train_set, perm[pos:pos + cfg.batch_size])
        pos += cfg.batch_size
        t0 = time.perf_counter()
        loss, logged = exp.training_loss(cfg, model, parts, batch, relax)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - t0
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{cfg.run_name()}: non-finite loss {value} at step {step}")
        for k, v in {"loss": value, **logged}.items():
            sums[k] = sums.get(k, 0.0) + v
        since += 1
        if bar is not None:
            bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = record(step)
            sums, since = {}, 0
            if bar is not None:
                bar.set_postfix_str(exp.headline(row))
    if bar is not None:
        bar.close()
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)},
               os.path.join(cfg.out, cfg.run_name() + ".pt"))           # for re-evaluation
    with open(os.path.join(cfg.out, cfg.run_name() + ".json"), "w") as fh:
        json.dump({"config": dataclasses.asdict(cfg), "final": rows[-1], "torch": torch.__version__}, fh, indent=1)
    if log:
        log(f"{cfg.run_name()}: {exp.headline(rows[-1])}, {rows[-1]['ms_per_step']:.1f} ms/step")
    return rows


def run_all(exp, base, estimators_, seeds=(0, 1, 2), log=print, progress=True):
    """Every estimator for every seed on one dataset; then ``results.md`` (the table) and
    ``learning_curves.png`` in ``base.out``."""
    data = exp.make_data(base)
    for est in estimators_:
        for seed in seeds:
            exp.train(dataclasses.replace(base, estimator=est, seed=seed), data, progress=progress, log=log)
    table = exp.summarise(base.out)
    with open(os.path.join(base.out, "results.md"), "w") as fh:
        fh.write(table + "\n")
    if log:
        log(table)
    try:
        exp.plot_curves(base.out)
    except ImportError:              # pragma: no cover - matplotlib is optional
        if log:
            log("matplotlib not installed: no figures")
    return table


def entry_points(module_name, default_estimators):
    """``(train, run_all)`` of the experiment module named ``module_name``: :func:`train` and
    :func:`run_all` bound to it (``run_all``'s estimators default to ``default_estimators``)."""
    def train_one(cfg, data=None, progress=True, log=print):
        return train(sys.modules[module_name], cfg, data, progress, log)

    def run_table(base, estimators_=default_estimators, seeds=(0, 1, 2), log=print, progress=True):
        return run_all(sys.modules[module_name], base, estimators_, seeds, log, progress)

    train_one.__doc__, run_table.__doc__ = train.__doc__, run_all.__doc__
    return train_one, run_table


def load_runs(out):
    """``{estimator: [rows of each seed's CSV]}`` from ``<estimator>-seed<k>.csv`` in ``out``
    (seeds in file-name order; values as floats, NaN where empty)."""
    runs = {}
    for name in sorted(os.listdir(out)):
        if not name.endswith(".csv") or "-seed" not in name:
            continue
        with open(os.path.join(out, name)) as fh:
            rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
                    for r in csv.DictReader(fh)]
        if rows:
            runs.setdefault(name[:name.rindex("-seed")], []).append(rows)
    return runs


def ordered(runs, known):
    """The estimators of ``runs``: the ``known`` ones in their order, then any others."""
    return [e for e in known if e in runs] + [e for e in runs if e not in known]


def summary_table(runs, known, labels, cols, derive=None):
    """A markdown table of each estimator's final evaluation over seeds: ``cols`` are
    ``(key, header, digits)``; a cell is ``mean ± standard deviation`` (ddof 1), a key
    ``"by_seed:<key>"`` lists each seed's value instead.  ``derive(est, final_row)`` may add
    keys first."""
    lines = ["| estimator | seeds | steps | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---:|---:|" + "---:|" * len(cols)]
    for est in ordered(runs, known):
        finals = [dict(r[-1]) for r in runs[est]]
        if derive is not None:
            for f in finals:
                derive(est, f)
        cells = []
        for key, _, digits in cols:
            if key.startswith("by_seed:"):
                cells.append(" / ".join(f"{f.get(key[8:], math.nan):.{digits}f}" for f in finals))
                continue
            v = np.array([f.get(key, math.nan) for f in finals], dtype=float)
            if np.isnan(v).all():
                cells.append("n/a")
            elif len(v) > 1:
                cells.append(f"{np.nanmean(v):.{digits}f} ± {np.nanstd(v, ddof=1):.{digits}f}")
            else:
                cells.append(f"{v[0]:.{digits}f}")
        lines.append(f"| {labels.get(est, est)} | {len(finals)} | {int(finals[0]['step'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs, known, labels, panels, title, path, references=()):
    """One row of panels per ``(key, ylabel, hline, skip_first, each_seed)`` in ``panels``,
    against training steps (left) and training wall-clock seconds (right): the mean over
    seeds and a band from the lowest to the highest seed, or with ``each_seed`` one thin line
    per seed (when seeds land in different modes, a band hides it); ``hline = (value,
    label)`` draws a reference level; ``skip_first`` sets the y range from the evaluations
    after step 0 (an untrained model's first value can be far off); estimators in
    ``references`` are dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4 * len(panels)), squeeze=False)
    later = {row: [] for row in range(len(panels))}
    for est in ordered(runs, known):
        seeds = runs[est]
        m = min(len(r) for r in seeds)
        for row, (key, _, _, _, each_seed) in enumerate(panels):
            for col, xkey in enumerate(("step", "train_seconds")):
                xs = np.array([[r[i][xkey] for i in range(m)] for r in seeds])
                ys = np.array([[r[i][key] for i in range(m)] for r in seeds])
                later[row].extend(ys[:, 1:].ravel().tolist())
                xm = xs.mean(0)
                style = ":" if est in references else "-"
                label = f"{labels.get(est, est)} ({len(seeds)})"
                if each_seed:
                    color = None             # the first seed's line picks it, the others share it
                    for i in range(len(seeds)):
                        seed_line, = axes[row, col].plot(xs[i], ys[i], style, lw=1, color=color,
                                                         label=label if i == 0 else None)
                        color = seed_line.get_color()
                    continue
                line, = axes[row, col].plot(xm, ys.mean(0), style, label=label)
                if len(seeds) > 1:
                    axes[row, col].fill_between(xm, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    for row, (_, ylabel, hline, skip_first, _) in enumerate(panels):
        vals = [v for v in later[row] if math.isfinite(v)]
        for col in range(2):
            ax = axes[row, col]
            ax.set_xlabel(("training steps", "training wall-clock seconds (evaluation excluded)")[col])
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if hline is not None:
                ax.axhline(hline[0], color="grey", ls="--", lw=1, label=hline[1] if col == 0 else None)
            if skip_first and vals:
                lo, hi = min(vals), max(vals)
                pad = 0.05 * (hi - lo or abs(hi) or 1.0)
                ax.set_ylim(lo - pad, hi + pad)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
