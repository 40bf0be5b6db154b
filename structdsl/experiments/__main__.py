"""Command line of the latent-structure experiments.

    python -m structdsl.experiments graph-layout --estimator t_reinforce+ --seed 0
    python -m structdsl.experiments graph-layout --all [--seeds 0 1 2] [--estimators a,b]
    python -m structdsl.experiments graph-layout --summarise DIR      # table and figures again
    python -m structdsl.experiments bias-variance [--draws 20000]
    python -m structdsl.experiments all [--quick]                     # both, every estimator

``--quick`` shrinks everything to a smoke run (seconds).  Outputs (CSV per run, JSON,
``results.md``, ``learning_curves.png``; ``bias_variance.md/.csv/.png``) go to ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

__all__ = ["main", "build_parser"]


def build_parser():
    from .graph_layout import ESTIMATORS, Config
    d = Config()
    p = argparse.ArgumentParser(prog="python -m structdsl.experiments",
                                description="latent-structure experiments (docs/experiments.md)")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("graph-layout", help="experiment 1: NRI graph layout with a spanning-tree latent")
    g.add_argument("--estimator", choices=ESTIMATORS, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--all", action="store_true", help="every estimator (or --estimators) for every --seeds")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--estimators", default=",".join(ESTIMATORS), help="comma-separated, with --all")
    g.add_argument("--summarise", metavar="DIR", help="only write the table and figures of the runs in DIR")
    for f in dataclasses.fields(Config):
        if f.name in ("estimator", "seed"):
            continue
        g.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=None,
                       help=f"default {getattr(d, f.name)}")
    g.add_argument("--quick", action="store_true", help="a smoke run: tiny data, a few steps")
    g.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("bias-variance", help="experiment 3: bias and variance against the exact gradient")
    b.add_argument("--draws", type=int, default=20000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--critic-steps", type=int, default=300)
    b.add_argument("--instances", default="spanning_tree,arborescence,top_k,permutation")
    b.add_argument("--out", default="experiment-results/bias-variance")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    a = sub.add_parser("all", help="both experiments")
    a.add_argument("--quick", action="store_true")
    a.add_argument("--out", default="experiment-results")
    return p


QUICK = dict(num_train=256, num_test=64, steps=4, batch_size=16, eval_every=2, eval_batch=64)


def _config(args):
    from .graph_layout import Config
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
          if f.name not in ("estimator", "seed") and getattr(args, f.name, None) is not None}
    if args.quick:
        kw = {**QUICK, **kw}
    return Config(**kw)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "graph-layout":
        from . import graph_layout as gl
        if args.summarise:
            print(gl.summarise(args.summarise))
            print(gl.plot_curves(args.summarise))
            return 0
        cfg = _config(args)
        if args.all:
            ests = [e.strip() for e in args.estimators.split(",") if e.strip()]
            bad = [e for e in ests if e not in gl.ESTIMATORS]
            if bad:
                raise SystemExit(f"unknown estimator(s) {bad}; choose from {', '.join(gl.ESTIMATORS)}")
            gl.run_all(cfg, ests, tuple(args.seeds), progress=not args.no_progress)
            return 0
        if args.estimator is None:
            raise SystemExit("give --estimator NAME (or --all)")
        gl.train(dataclasses.replace(cfg, estimator=args.estimator, seed=args.seed), progress=not args.no_progress)
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
        from .graph_layout import Config
        cfg = Config(**QUICK) if args.quick else Config()
        cfg = dataclasses.replace(cfg, out=os.path.join(args.out, "graph-layout"))
        gl.run_all(cfg, seeds=(0,) if args.quick else (0, 1, 2))
        bv.run(os.path.join(args.out, "bias-variance"), draws=500 if args.quick else 20000,
               critic_steps=20 if args.quick else 300)
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
