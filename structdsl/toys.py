"""The toy problems: free logits trained with the gradient estimators (filled in below)."""
from __future__ import annotations


def add_arguments(parser):
    """The ``toy`` subcommand's options (argparse only; nothing heavy is imported)."""
    parser.add_argument("--structure", action="append")


def run_cli(args):
    raise SystemExit("not built yet")
