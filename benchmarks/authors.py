"""A structdsl backend against the paper authors' public PyTorch code, in one run.

    python benchmarks/authors.py --authors DIR      # DIR: a checkout of the authors' code
    python benchmarks/authors.py --authors DIR --backend numba --markdown

The authors' code is the public repository RakitinDen/pytorch-recursive-gumbel-max-trick
(pure PyTorch; its arborescence needs a C++ extension and is left out).  It is imported
from ``DIR``, never shipped here.  Each row times, on the same inputs and threads, batch
1024 by default:

* ``sample``: their ``*_struct(uniform_to_exp(logits, u))`` against ``prog.sample(logits,
  uniforms=u)`` of ``--backend`` (``torch``, the default, or ``numba`` on the same numbers as
  NumPy arrays; their logits are log-means, ours log-rates: the inputs are negated for them,
  so both sample the same distribution);
* ``lp fwd+bwd``: their ``*_log_prob`` of a sampled trace, summed, then ``backward()``,
  against ``prog.log_prob(trace, logits).sum().backward()`` (torch) or
  ``prog.log_prob_and_grad(trace, logits)`` (numba).

In float32 (their default dtype) and float64.  ``ratio`` is their time over ours: above 1,
ours is faster.  Best of ``--repeat`` calls after one warm-up call.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = [("spanning_tree", 32), ("spanning_tree", 64), ("matching", 32), ("binary_tree", 32)]


def best(fn, repeat):
    fn()
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def theirs(name):
    """(struct, log_prob) of the authors' code for a spec name."""
    if name == "spanning_tree":
        from spanning_tree.functions import span_log_prob, span_struct
        return span_struct, span_log_prob
    if name == "matching":
        from matching.functions import matching_log_prob, matching_struct
        return matching_struct, matching_log_prob
    from binary_tree.functions import bin_tree_log_prob, bin_tree_struct
    return bin_tree_struct, bin_tree_log_prob


def rows(batch, dtypes, repeat, semantics, backend="torch"):
    import torch
    from estimators import uniform_to_exp                  # the authors' module
    from structdsl import compile as compile_spec, specs
    out = []
    for name, n in CASES:
        struct, log_prob = theirs(name)
        prog = compile_spec(getattr(specs, name), backend=backend)
        ours = (lambda a: a) if backend == "torch" else (lambda a: a.detach().numpy())
        shape = (batch, n, n) if name != "binary_tree" else (batch, n)
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, dtype=dtype, generator=g)
            if name == "spanning_tree":                    # undirected: one rate per edge
                x = (x + x.transpose(1, 2)) / 2
            u = torch.rand(shape, dtype=dtype, generator=g)
            row = {"spec": name, "n": n, "dtype": str(dtype).replace("torch.", "")}
            if "sample" in semantics:
                row["sample theirs"] = batch / best(lambda: struct(uniform_to_exp(-x, u)), repeat)
                row["sample ours"] = batch / best(lambda: prog.sample(ours(x), uniforms=ours(u)), repeat)
            if "lp" in semantics and name != "binary_tree":     # theirs replays a Python tree per element
                trace = prog.sample(ours(x), uniforms=ours(u)).trace
                their_var = struct(uniform_to_exp(-x, u))

                def their_lp():
                    y = (-x).clone().requires_grad_(True)
                    log_prob(their_var, y).sum().backward()

                def our_lp():
                    if backend != "torch":
                        return prog.log_prob_and_grad(trace, ours(x))
                    y = x.clone().requires_grad_(True)
                    prog.log_prob(trace, y).sum().backward()
                row["lp theirs ms"] = 1e3 * best(their_lp, repeat)
                row["lp ours ms"] = 1e3 * best(our_lp, repeat)
            out.append(row)
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def table(out, markdown):
    header = ["spec", "n", "dtype", "sample theirs", "sample ours", "ratio", "lp fwd+bwd theirs",
              "lp fwd+bwd ours", "ratio"]
    lines = []
    for r in out:
        s_t, s_o = r.get("sample theirs"), r.get("sample ours")
        l_t, l_o = r.get("lp theirs ms"), r.get("lp ours ms")
        lines.append([r["spec"], str(r["n"]), r["dtype"],
                      f"{s_t:,.0f}/s" if s_t else "-", f"{s_o:,.0f}/s" if s_o else "-",
                      f"{s_o / s_t:.2f}" if s_t else "-",
                      f"{l_t:.0f} ms" if l_t else "-", f"{l_o:.0f} ms" if l_o else "-",
                      f"{l_t / l_o:.2f}" if l_t else "-"])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(header)]
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                         + ["| " + " | ".join(x) + " |" for x in lines])
    return "\n".join(["  ".join(h.rjust(w) for h, w in zip(header, widths)), "-" * (sum(widths) + 2 * len(widths))]
                     + ["  ".join(c.rjust(w) for c, w in zip(x, widths)) for x in lines])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors", default=os.environ.get("STRUCTDSL_AUTHORS_DIR"),
                   help="a checkout of the authors' code (or set STRUCTDSL_AUTHORS_DIR)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--semantics", default="sample,lp")
    p.add_argument("--backend", choices=["torch", "numba"], default="torch")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if not args.authors or not (Path(args.authors) / "estimators.py").is_file():
        p.error("--authors DIR must be a checkout of the authors' code (it has estimators.py at its top)")
    sys.path.insert(0, str(Path(args.authors).resolve()))
    import torch
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"torch {torch.__version__}, batch {args.batch}, best of {args.repeat}, our backend {args.backend}")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    out = rows(args.batch, dtypes, args.repeat, args.semantics.split(","), args.backend)
    print(f"\nThe {args.backend} backend against the authors' code (ratio = their time / ours; > 1: ours faster)")
    print(table(out, args.markdown))


if __name__ == "__main__":
    main()
