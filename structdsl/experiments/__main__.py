"""Command line of the latent-structure experiments.

    python -m structdsl.experiments graph-layout --estimator t_reinforce+ --seed 0
    python -m structdsl.experiments graph-layout --all [--seeds 0 1 2] [--estimators a,b]
    python -m structdsl.experiments graph-layout --summarise DIR      # table and figures again
    python -m structdsl.experiments listops --estimator sst_st --seed 0
    python -m structdsl.experiments listops --all [--seeds 0 1 2] [--estimators a,b]
    python -m structdsl.experiments listops --summarise DIR           # table and figures again
    python -m structdsl.experiments bias-variance [--draws 20000]
    python -m structdsl.experiments all [--quick]                     # all three, every estimator

``--quick`` shrinks everything to a smoke run (seconds).  Outputs (CSV per run, JSON,
``results.md``, ``learning_curves.png``; ``bias_variance.md/.csv/.png``) go to ``--out``.
Experiment 1 (``graph-layout``) is described in ``docs/experiments.md``, experiment 2
(``listops``: unsupervised parsing with an arborescence latent) in
``docs/experiments-listops.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

__all__ = ["main", "build_parser"]


def _experiment_parser(sub, name, help, Config, choices, default_all):
    """A subcommand training one experiment: one run, ``--all`` runs, or ``--summarise``; every
    field of its ``Config`` is a flag."""
    d = Config()
    g = sub.add_parser(name, help=help)
    g.add_argument("--estimator", choices=choices, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--all", action="store_true", help="every estimator (or --estimators) for every --seeds")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--estimators", default=",".join(default_all), help="comma-separated, with --all")
    g.add_argument("--summarise", metavar="DIR", help="only write the table and figures of the runs in DIR")
    for f in dataclasses.fields(Config):
        if f.name in ("estimator", "seed"):
            continue
        kind = type(getattr(d, f.name))
        g.add_argument("--" + f.name.replace("_", "-"), type=_boolean if kind is bool else kind, default=None,
                       metavar="true|false" if kind is bool else None, help=f"default {getattr(d, f.name)}")
    g.add_argument("--quick", action="store_true", help="a smoke run: tiny data, a few steps")
    g.add_argument("--no-progress", action="store_true")
    return g


def _boolean(text):
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``): ``bool("false")`` is True."""
    t = text.strip().lower()
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser(prog="python -m structdsl.experiments"):
    from . import graph_layout as gl
    from . import listops as lo
    p = argparse.ArgumentParser(prog=prog,
                                description="latent-structure experiments (docs/experiments.md, "
                                            "docs/experiments-listops.md)")
    sub = p.add_subparsers(dest="command", required=True)
    _experiment_parser(sub, "graph-layout", "experiment 1: NRI graph layout with a spanning-tree latent",
                       gl.Config, gl.ESTIMATORS, gl.ESTIMATORS)
    _experiment_parser(sub, "listops", "experiment 2: unsupervised parsing on ListOps with an arborescence "
                       "latent (the reference rows gold, flat, random_tree are estimators here too)",
                       lo.Config, lo.ESTIMATORS + lo.REFERENCES, lo.ESTIMATORS + lo.REFERENCES)
    b = sub.add_parser("bias-variance", help="experiment 3: bias and variance against the exact gradient")
    b.add_argument("--draws", type=int, default=20000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--critic-steps", type=int, default=300)
    b.add_argument("--instances", default="spanning_tree,arborescence,top_k,permutation")
    b.add_argument("--out", default="experiment-results/bias-variance")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("time-steps", help="ms per training step of every estimator, interleaved in one process")
    t.add_argument("experiment", choices=("graph-layout", "listops"))
    t.add_argument("--estimators", default=None, help="comma-separated (default: all of the experiment)")
    t.add_argument("--steps", type=int, default=30, help="steps per run (30)")
    t.add_argument("--rounds", type=int, default=3, help="rounds, estimators interleaved in each (3)")
    t.add_argument("--threads", type=int, default=1, help="torch and numba threads (1, as the table's runs)")
    t.add_argument("--no-progress", action="store_true")
    a = sub.add_parser("all", help="the three experiments")
    a.add_argument("--quick", action="store_true")
    a.add_argument("--out", default="experiment-results")
    return p


QUICK = dict(num_train=256, num_test=64, steps=4, batch_size=16, eval_every=2, eval_batch=64)


def _config(args, Config=None):
    if Config is None:
        from .graph_layout import Config
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
          if f.name not in ("estimator", "seed") and getattr(args, f.name, None) is not None}
    if args.quick:
        kw = {**QUICK, **kw}
    return Config(**kw)


def _run_experiment(module, args, choices):
    """``graph-layout`` / ``listops``: the table again, every run, or one run."""
    if args.summarise:                   # the table (also written to results.md) and figure again
        import os
        table = module.summarise(args.summarise)
        with open(os.path.join(args.summarise, "results.md"), "w") as fh:
            fh.write(table + "\n")
        print(table)
        print(module.plot_curves(args.summarise))
        return 0
    cfg = _config(args, module.Config)
    if args.all:
        ests = [e.strip() for e in args.estimators.split(",") if e.strip()]
        bad = [e for e in ests if e not in choices]
        if bad:
            raise SystemExit(f"unknown estimator(s) {bad}; choose from {', '.join(choices)}")
        module.run_all(cfg, ests, tuple(args.seeds), progress=not args.no_progress)
        return 0
    if args.estimator is None:
        raise SystemExit("give --estimator NAME (or --all)")
    module.train(dataclasses.replace(cfg, estimator=args.estimator, seed=args.seed), progress=not args.no_progress)
    return 0


def main(argv=None, prog="python -m structdsl.experiments"):
    args = build_parser(prog).parse_args(argv)
    if args.command == "graph-layout":
        from . import graph_layout as gl
        return _run_experiment(gl, args, gl.ESTIMATORS)
    if args.command == "listops":
        from . import listops as lo
        return _run_experiment(lo, args, lo.ESTIMATORS + lo.REFERENCES)
    if args.command == "time-steps":
        from . import graph_layout as gl
        from . import listops as lo
        from .timing import format_times, time_steps
        module = gl if args.experiment == "graph-layout" else lo
        choices = module.ESTIMATORS + getattr(module, "REFERENCES", ())
        ests = [e.strip() for e in args.estimators.split(",")] if args.estimators else list(choices)
        bad = [e for e in ests if e not in choices]
        if bad:
            raise SystemExit(f"unknown estimator(s) {bad}; choose from {', '.join(choices)}")
        if args.steps < 1 or args.rounds < 1:
            raise SystemExit("--steps and --rounds must be positive")
        base = module.Config(threads=args.threads)
        times = time_steps(module, base, ests, args.steps, args.rounds, progress=not args.no_progress)
        print(format_times(times, module.LABELS, f"{args.experiment}: {args.steps} steps x {args.rounds} "
                                                 f"rounds, {args.threads} thread(s), default configuration"))
        return 0
    if args.command == "bias-variance":
        from . import bias_variance as bv
        draws, critic = (500, 20) if args.quick else (args.draws, args.critic_steps)
        bv.run(args.out, tuple(k.strip() for k in args.instances.split(",")), draws, args.seed, critic,
               progress=not args.no_progress)
        return 0
    if args.command == "all":
        import os
        from . import bias_variance as bv
        from . import graph_layout as gl
        from . import listops as lo
        from .graph_layout import Config
        cfg = Config(**QUICK) if args.quick else Config()
        cfg = dataclasses.replace(cfg, out=os.path.join(args.out, "graph-layout"))
        gl.run_all(cfg, seeds=(0,) if args.quick else (0, 1, 2))
        lcfg = lo.Config(**QUICK) if args.quick else lo.Config()
        lcfg = dataclasses.replace(lcfg, out=os.path.join(args.out, "listops"))
        lo.run_all(lcfg, seeds=(0,) if args.quick else (0, 1, 2))
        bv.run(os.path.join(args.out, "bias-variance"), draws=500 if args.quick else 20000,
               critic_steps=20 if args.quick else 300)
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
