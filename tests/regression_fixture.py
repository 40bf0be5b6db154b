"""A frozen copy of the project's outputs, for refactors that promise no behaviour change.

    python tests/regression_fixture.py --write      # freeze today's outputs (then commit them)

For every built-in and test-only spec of the conformance suite, on fixed logits (finite, and
with some atoms at ``-inf``) and fixed uniforms: the reference's trace, structure, ``log E``, log p, its
gradient and ``E | T``.  For the torch distribution (both its CPU fast path and the lock-step
path) and the estimators, under ``torch.manual_seed``: sampled traces, the gradient of
log p, ``E | T`` and each estimator's gradient in the logits, so that a change in what the
distribution draws, in which order, or how it scores, shows.  ``tests/test_regression.py``
holds every backend to this file (traces exactly, floats to 1e-12).
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "fixtures", "regression.npz")
DIST_SPECS = ["categorical", "top_k", "permutation", "spanning_tree", "arborescence", "binary_tree",
              "matching", "clustering", "height", "nested_sites"]


def cases():
    """``[(name, spec, statics, atom_shape)]``: every spec of the differential harness at its
    largest size."""
    from test_conformance import SPECS, _case
    out = []
    for name in SPECS:
        spec, (lo, hi), statics, shape_of = _case(name)
        out.append((name, spec, statics, tuple(shape_of(hi))))
    return out


def inputs(name, shape, max_races, masked):
    """Fixed logits ``[3, *shape]`` (``masked``: about a quarter of the atoms at ``-inf``),
    sample uniforms and ``E | T`` uniforms, from a seed derived from the name."""
    rng = np.random.default_rng(sum(map(ord, name)) + masked)
    logits = rng.normal(size=(3,) + shape)
    if masked:
        logits = np.where(rng.random(logits.shape) < 0.25, -np.inf, logits)
    u = rng.random((3,) + shape) * 0.998 + 0.001
    A = int(np.prod(shape))
    v = rng.random((3, max_races + A)) * 0.998 + 0.001
    return logits, u, v


def program_outputs(run, name, shape):
    """``{key: array}`` of one spec through a conformance ``Runner`` (any backend), on finite
    and on masked logits; a case that raises records its error class instead."""
    import structdsl
    out = {}
    for masked in (False, True):
        key = f"{name}/{'masked' if masked else 'finite'}"
        try:
            logits, u, v = inputs(name, shape, run.max_races(shape), masked)
            s = run.sample(logits, uniforms=u)
            out[f"{key}/trace"] = s.trace
            for field, value in zip(s.structure._fields, s.structure):
                out[f"{key}/structure/{field}"] = np.asarray(value)
            out[f"{key}/log_noise"] = s.log_noise
            logp, grad = run.log_prob_and_grad(s.trace, logits)
            out[f"{key}/logp"], out[f"{key}/grad"] = logp, grad
            out[f"{key}/noise_given_trace"] = run.conditional_noise(s.trace, logits, uniforms=v)
        except (structdsl.RaceError, structdsl.SpecError, ValueError) as exc:
            out[f"{key}/error"] = np.array(type(exc).__name__)
    return out


def distribution_outputs(name, fast_cpu):
    """``{key: array}`` of the torch distribution and the estimators on spec ``name``."""
    import torch
    import shared_specs as S
    from structdsl import estimators
    from structdsl.torch import RaceDistribution
    tag = f"dist/{name}/{'fast' if fast_cpu else 'lockstep'}"
    n = S.SIZES[name][1]
    shape = S.atom_shape(name, n)
    prog = S.compiled(name, "torch")
    g = np.random.default_rng(sum(map(ord, name)) + 1)
    logits0 = torch.as_tensor(g.normal(size=(2,) + shape))
    f = S.structure_loss(name, n, seed=3)
    out = {}

    def fresh():
        x = logits0.clone().requires_grad_(True)
        return x, RaceDistribution(prog, x, fast_cpu=fast_cpu)

    torch.manual_seed(0)
    x, dist = fresh()
    trace = dist.sample((3,))
    out[f"{tag}/trace"] = trace.numpy()
    dist.log_prob(trace).sum().backward()
    out[f"{tag}/logp_grad"] = x.grad.numpy().copy()
    x, dist = fresh()
    out[f"{tag}/noise_given_trace"] = dist.conditional_noise(trace).detach().numpy()
    for est in ("t_reinforce", "e_reinforce", "relax"):
        torch.manual_seed(1)
        x, dist = fresh()
        if est == "relax":
            torch.manual_seed(2)
            relax = estimators.RELAX(atom_shape=shape, hidden=8).double()
            torch.manual_seed(1)
            loss = relax(dist, f, num_samples=3)
        else:
            loss = getattr(estimators, est)(dist, f, num_samples=3)
        loss.backward()
        out[f"{tag}/{est}/loss"] = loss.detach().numpy()
        out[f"{tag}/{est}/grad"] = x.grad.numpy().copy()
    return out


def collect():
    from conformance import runner
    out = {}
    for name, spec, statics, shape in cases():
        out.update(program_outputs(runner(spec, "numpy", **statics), name, shape))
    for name in DIST_SPECS:
        for fast in (True, False):
            out.update(distribution_outputs(name, fast))
    return out


def load():
    with np.load(PATH, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit(__doc__)
    sys.path.insert(0, HERE)
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    data = collect()
    np.savez_compressed(PATH, **data)
    print(f"wrote {len(data)} arrays to {PATH} ({os.path.getsize(PATH) // 1024} KiB)")
