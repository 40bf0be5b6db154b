"""Command line.

``python -m structdsl check`` runs the property battery on every built-in spec;
``python -m structdsl check path/to/spec.py [--spec NAME] [--exact N] [--param k=3]
[--data dag=dag.npy] [--shape 4,4] [--strict]`` checks the specs of your own file (verifier,
battery, ``reference=`` solver, symbolic certificates: :mod:`structdsl.check`);
``python -m structdsl toy`` trains the toy problems with the gradient estimators
(:mod:`structdsl.toys`).

The ``--help`` texts are the plain strings below (``DESCRIPTION`` and friends), not this
docstring: a terminal shows no Sphinx markup."""
from __future__ import annotations

import argparse
import sys
import time

DESCRIPTION = """\
structdsl: structured discrete latent variables by the recursive Gumbel-max
trick.  'python -m structdsl COMMAND --help' describes each command."""

CHECK_DESCRIPTION = """\
Without PATH: run the property battery on every built-in spec; print a table.

With PATH (a Python file with @spec functions): check each spec of the file: the
verifier, the property battery (exact enumeration, goodness of fit of the sampler,
conditional noise), the spec's reference solver if it names one, and with --exact N
symbolic proofs (sympy) at size N.

Parameters: --param NAME=INT for an int, --data NAME=FILE for an array (a data
parameter).  Each goes to every spec of the file that takes a parameter of that name
(the report says which did not); SPEC.NAME=... gives it to one spec only.  A
parameter a spec needs and was not given is a usage error naming the flag to add.

Size: the battery checks one atoms' shape per spec, --shape if given, else the size
the data parameters fix, else the largest size n <= 6 whose enumeration has at
most 200 traces.  The report says which size it used and why; a law with fewer
than 3 structures at that size gets a warning (a failure with --strict)."""

CHECK_EPILOG = """\
examples:
  python -m structdsl check
  python -m structdsl check my_specs.py --spec my_tree --exact 3
  python -m structdsl check my_specs.py --param k=2 --shape 5
  python -m structdsl check order.py --data dag=dag.npy
  python -m structdsl check two.py --param top_k.k=2 --data order.dag=dag.npz:dag

exit codes: 0 every check passes, 1 a check failed, 2 a usage error or a file
that cannot be checked."""

TOY_DESCRIPTION = """\
Train a toy problem's free logits with the gradient estimators (E- and
T-REINFORCE, their leave-one-out '+' forms, RELAX) and write the objective and the
gradient's standard deviation against the step as CSV and PNG."""

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


def check(samples, seed, out=None, progress=None, plot=None, backend="numpy", strict=False):
    """Run :func:`structdsl.testing.check_spec` on each built-in spec; print a table.
    strict: a law with fewer than 3 structures fails (else it is a warning)."""
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
                           raise_on_failure=False, strict=strict, **statics)
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
        for w in r.warnings if not strict else ():
            print(f"    warning: {w}", file=out)
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
    """``check PATH``: :func:`structdsl.check.check_file`, then the plot if asked for.  A
    parameter, data file or shape that does not fit is a usage error (exit code 2)."""
    from .check import CheckUsageError, check_file, parse_data, parse_param, parse_shape
    if args.exact is not None and args.exact < 1:
        parser.error(f"--exact wants a size N >= 1, got {args.exact}")
    params, sources, shapes = {}, {}, {}
    try:
        for flag, items, parse in (("--param", args.param, parse_param), ("--data", args.data, parse_data)):
            for item in items:
                scope, name, value = parse(item)
                key = f"{scope}.{name}" if scope else name
                if key in params:
                    parser.error(f"{flag} {item}: {key} is given twice")
                params[key], sources[key] = value, f"{flag} {item}"
        for item in args.shape:
            scope, shape = parse_shape(item)
            if scope in shapes:
                parser.error(f"--shape {item}: a shape for {scope or 'every spec'} is given twice")
            shapes[scope] = shape
        reports = []
        code = check_file(args.path, args.spec, exact=args.exact, backend=args.backend, samples=args.samples,
                          seed=args.seed, params=params, shape=shapes, strict=args.strict, reports=reports,
                          sources=sources)
    except CheckUsageError as exc:
        parser.error(str(exc))
    if args.plot and reports:
        plot_fits(reports, args.samples, args.plot)
        print(f"wrote {args.plot}")
    return code


def build_parser():
    """The argparse parser of ``python -m structdsl`` (plain-text help, no markup)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m structdsl", description=DESCRIPTION, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("check", help="check the built-in specs, or the specs of your own file",
                       description=CHECK_DESCRIPTION, epilog=CHECK_EPILOG, formatter_class=fmt)
    c.add_argument("path", nargs="?", help="a Python file with @spec functions (default: the built-in specs)")
    c.add_argument("--spec", metavar="NAME", help="with PATH: check only this spec of the file")
    c.add_argument("--exact", metavar="N", type=int, help="with PATH: also prove normalisation and the "
                   "reference certificate symbolically (sympy) with every size set to N")
    c.add_argument("--param", metavar="[SPEC.]NAME=INT", action="append", default=[],
                   help="with PATH: an int parameter, for every spec that takes NAME, or for SPEC "
                        "only (repeatable)")
    c.add_argument("--data", metavar="[SPEC.]NAME=FILE", action="append", default=[],
                   help="with PATH: an int or bool array parameter from FILE.npy, FILE.npz (one "
                        "array, or FILE.npz:KEY) or FILE.json (nested lists); scoped like --param "
                        "(repeatable)")
    c.add_argument("--shape", metavar="[SPEC=]N[,M...]", action="append", default=[],
                   help="with PATH: the atoms' shape the battery checks, e.g. 5 or 4,4 (default: "
                        "fixed by the data, else picked small enough to enumerate)")
    c.add_argument("--strict", action="store_true",
                   help="fail a spec whose law at the size checked has fewer than 3 structures "
                        "(by default a warning)")
    c.add_argument("--samples", type=int, default=4000, help="draws per sampling scenario (default 4000)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--plot", metavar="PNG", help="also draw sampled vs exact probabilities (needs matplotlib)")
    c.add_argument("--backend", default="numpy", choices=BACKENDS, metavar="BACKEND",
                   help="the backend the battery runs on: numpy (the reference, default), numba or torch "
                        "(the battery converts every backend's results to NumPy)")
    sub.add_parser("experiment", add_help=False,      # parsed by structdsl.experiments (see main)
                   help="the latent-structure experiments against SST and I-MLE (docs/experiments.md); "
                        "python -m structdsl experiment --help")
    t = sub.add_parser("toy", help="train the toy problems with the gradient estimators (CSV and PNG)",
                       description=TOY_DESCRIPTION, formatter_class=fmt)
    from .toys import add_arguments as add_toy_arguments      # argparse only; torch loads at run time
    add_toy_arguments(t)
    parser.subcommands = {"check": c, "toy": t}     # for usage errors that name the subcommand
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["experiment"]:    # its own parser: python -m structdsl experiment graph-layout ...
        from .experiments.__main__ import main as experiments_main
        return experiments_main(argv[1:], prog="python -m structdsl experiment")
    parser = build_parser()
    args = parser.parse_args(argv)
    parser = parser.subcommands.get(args.command, parser)      # its usage line in errors
    if args.command == "check":
        from .backends import program_class
        try:
            program_class(args.backend)              # a missing optional package: a usage error
        except ImportError as exc:
            parser.error(f"--backend {args.backend}: {exc}")
    if args.command == "check" and args.path is not None:
        return check_path(args, parser)
    if args.command == "check":
        if args.spec or args.exact is not None or args.param or args.data or args.shape:
            parser.error("--spec, --exact, --param, --data and --shape need a spec file: "
                         "python -m structdsl check PATH ...")
        extra = {"strict": True} if args.strict else {}
        return 1 if check(args.samples, args.seed, plot=args.plot, backend=args.backend, **extra) else 0
    if args.command == "toy":
        from .toys import run_cli
        return run_cli(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
