"""A training step under ``torch.compile``: the model compiles, the library's entry points
(marked ``torch.compiler.disable``: NumPy and Numba run inside) break the graph and run the
same code as in eager mode, so the step gives eager's numbers from the same generator state
and nothing recompiles from one step to the next."""
import pytest

torch = pytest.importorskip("torch")
import torch._dynamo  # noqa: E402

import structdsl  # noqa: E402
from structdsl import estimators, specs  # noqa: E402
from structdsl.torch import RaceDistribution  # noqa: E402

N, B = 5, 6


def _train(compiled, estimator, fast_cpu, steps=5):
    torch.manual_seed(0)
    prog = structdsl.compile(specs.spanning_tree, backend="torch")
    enc = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, N * N)).double()
    opt = torch.optim.Adam(enc.parameters(), lr=0.05)
    feats = torch.randn(B, 4, dtype=torch.float64)
    weights = torch.randn(N, N, dtype=torch.float64)
    relax = estimators.RELAX(atom_shape=(N, N), hidden=8).double() if estimator == "relax" else None

    def f(s):
        return (s.adjacency.double() * weights).sum((-1, -2))

    def step(feats, g):
        logits = enc(feats).reshape(B, N, N)
        dist = RaceDistribution(prog, logits=logits, fast_cpu=fast_cpu)
        if relax is not None:
            loss = relax(dist, f, num_samples=3, generator=g)
        else:
            loss = getattr(estimators, estimator)(dist, f, num_samples=3, generator=g)
        loss = loss + 1e-3 * dist.log_prob(dist.argmax().trace).mean()     # more entry points
        loss.backward()
        return loss.detach()

    run = torch.compile(step) if compiled else step
    g = torch.Generator().manual_seed(1)
    losses, graphs = [], []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(float(run(feats, g)))
        opt.step()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return losses, [p.detach().clone() for p in enc.parameters()], graphs


@pytest.mark.parametrize("fast_cpu", [True, False], ids=["fast", "lockstep"])
@pytest.mark.parametrize("estimator", ["t_reinforce", "e_reinforce", "relax"])
def test_a_compiled_training_step_matches_eager(estimator, fast_cpu):
    torch._dynamo.reset()
    eager_losses, eager_params, _ = _train(False, estimator, fast_cpu)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses, params, graphs = _train(True, estimator, fast_cpu)
    assert losses == pytest.approx(eager_losses, rel=1e-12, abs=1e-12)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert graphs[0] > 0                       # the encoder did compile
    assert graphs[-1] == graphs[1], f"recompiled after the second step: {graphs}"
