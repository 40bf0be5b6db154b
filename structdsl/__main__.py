"""Command line.

``python -m structdsl check`` runs the property battery on every built-in spec;
``python -m structdsl check path/to/spec.py [--spec NAME] [--exact N]`` checks the specs of
your own file (verifier, battery, ``reference=`` solver, symbolic certificates:
:mod:`structdsl.check`);
``python -m structdsl toy`` trains the toy problems with the gradient estimators
(:mod:`structdsl.toys`)."""
from __future__ import annotations

import argparse
import sys
import time

#: The backends ``check --backend`` accepts (every one the battery runs on).
BACKENDS = ("numpy", "numba", "torch")

# Small sizes at which every built-in spec is enumerated exactly: (spec name, atoms shape, statics).
BUILTIN_CASES = [
    ("categorical", (5,), {}),
    ("top_k", (5,), {"k": 3}),
    ("permutation", (4,), {}),
    ("spanning_tree", (4, 4), {}),
    ("arborescence", (4, 4), {}),
    ("binary_tree", (5,), {}),
    ("matching", (3, 3), {}),
    ("clustering", (4, 4), {"c": 2}),
]


def check(samples, seed, out=None, progress=None, plot=None, backend="numpy"):
    """Run :func:`structdsl.testing.check_spec` on each built-in spec; print a table."""
    from . import SpecError, specs
    from .testing import check_spec
    out = out or sys.stdout          # looked up per call (a test may have replaced it)

    header = (f"{'spec':14s} {'atoms':>7s} {'traces':>7s} {'structs':>7s} {'sum of p':>9s} "
              f"{'worst GOF p':>11s} {'worst E|T p':>11s} {'-inf':>5s} {'verifier':>9s} {'battery':>7s} {'time':>6s}")
    print(f"structdsl check ({backend} backend): {samples} samples per scenario, seed {seed}, alpha 1e-3", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    failed = 0
    reports = []
    progress = sys.stderr.isatty() if progress is None else progress
    for i, (name, shape, statics) in enumerate(BUILTIN_CASES):
        if progress:
            print(f"[{i + 1}/{len(BUILTIN_CASES)}] {name} ...", end="\r", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            r = check_spec(getattr(specs, name), shape, samples=samples, seed=seed, backend=backend,
                           raise_on_failure=False, **statics)
        except SpecError as exc:
            failed += 1
            print(f"{name:14s} verifier rejected it: {exc}", file=out)
            continue
        reports.append(r)
        verdict = "pass" if r.ok else "FAIL"
        failed += not r.ok
        atoms = "x".join(map(str, shape))
        print(f"{name:14s} {atoms:>7s} {r.traces:7d} {r.structures:7d} {str(r.total_probability):>9s} "
              f"{r.worst_gof_p:11.3f} {r.worst_marginal_p:11.3f} {'yes' if r.neg_inf_checked else 'n/a':>5s} "
              f"{'accepted':>9s} {verdict:>7s} {time.perf_counter() - t0:5.1f}s", file=out)
        for f in r.failures:
            print(f"    ! {f}", file=out)
    print(f"{len(BUILTIN_CASES) - failed}/{len(BUILTIN_CASES)} specs pass", file=out)
    if plot:
        plot_fits(reports, samples, plot)
        print(f"wrote {plot}", file=out)
    return failed


def plot_fits(reports, samples, path):
    """One panel per spec: sampled trace frequency against exact probability (log-log),
    with the +-3 standard-error band of a frequency estimated from ``samples`` draws."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[plot]'") from None
    import numpy as np

    cols = 4
    rows = -(-len(reports) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.1 * rows), squeeze=False)
    p = np.logspace(-5, 0, 200)
    se = 3 * np.sqrt(p * (1 - p) / samples)
    for ax, r in zip(axes.flat, reports):
        for (label, probs, freqs), marker in zip(r.fits, "os^"):
            ax.scatter(probs, np.maximum(freqs, 0.3 / samples), s=10, marker=marker, alpha=0.7, label=label)
        ax.plot(p, p, "k-", lw=0.8)
        ax.fill_between(p, np.maximum(p - se, 1e-6), p + se, color="0.85", zorder=0)
        ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(0.2 / samples, 1),
               title=f"{r.name} {'x'.join(map(str, r.atom_shape))}: {r.traces} traces")
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(reports):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.supxlabel("exact trace probability (enumeration)")
    fig.supylabel(f"sampled frequency ({samples} draws; zeros at the bottom edge)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def check_path(args, parser):
    """``check PATH``: :func:`structdsl.check.check_file`, then the plot if asked for."""
    from .check import check_file
    params = {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            params[name.strip()] = int(value)
        except ValueError:
            parser.error(f"--param wants NAME=INT, got {item!r}")
    if args.exact is not None and args.exact < 1:
        parser.error(f"--exact wants a size N >= 1, got {args.exact}")
    reports = []
    code = check_file(args.path, args.spec, exact=args.exact, backend=args.backend, samples=args.samples,
                      seed=args.seed, params=params, reports=reports)
    if args.plot and reports:
        plot_fits(reports, args.samples, args.plot)
        print(f"wrote {args.plot}")
    return code


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m structdsl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="verify, enumerate and goodness-of-fit test every built-in spec, "
                                     "or the specs of your own file")
    c.add_argument("path", nargs="?", help="a Python file with @spec functions (default: the built-in specs)")
    c.add_argument("--spec", metavar="NAME", help="with PATH: check only this spec of the file")
    c.add_argument("--exact", metavar="N", type=int, help="with PATH: also prove normalisation and the "
                   "reference certificate symbolically (sympy) with every size set to N")
    c.add_argument("--param", metavar="NAME=INT", action="append", default=[],
                   help="with PATH: a static parameter for compile (repeatable)")
    c.add_argument("--samples", type=int, default=4000, help="draws per sampling scenario (default 4000)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--plot", metavar="PNG", help="also draw sampled vs exact probabilities (needs matplotlib)")
    c.add_argument("--backend", default="numpy", choices=BACKENDS, metavar="BACKEND",
                   help="the backend the battery runs on: numpy (the reference, default), numba or torch "
                        "(the battery converts every backend's results to NumPy)")
    t = sub.add_parser("toy", help="train a toy problem's free logits with the gradient estimators "
                                   "(objective and gradient std vs step, CSV and PNG)")
    from .toys import add_arguments as add_toy_arguments      # argparse only; torch loads at run time
    add_toy_arguments(t)
    args = parser.parse_args(argv)
    if args.command == "check":
        from .backends import program_class
        try:
            program_class(args.backend)              # a missing optional package: a usage error
        except ImportError as exc:
            parser.error(f"--backend {args.backend}: {exc}")
    if args.command == "check" and args.path is not None:
        return check_path(args, parser)
    if args.command == "check":
        if args.spec or args.exact is not None or args.param:
            parser.error("--spec, --exact and --param need a spec file: python -m structdsl check PATH ...")
        return 1 if check(args.samples, args.seed, plot=args.plot, backend=args.backend) else 0
    if args.command == "toy":
        from .toys import run_cli
        return run_cli(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
