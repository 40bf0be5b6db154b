"""The custom operator ``structdsl::log_prob_and_score`` (``structdsl/ops.py``): it passes
``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch), equals
the NumPy reference's ``log_prob_and_grad``, and ``RaceDistribution.log_prob`` compiles to it
with no graph break (``fullgraph=True``), matching eager values and gradients."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")
import torch._dynamo  # noqa: E402

from shared_specs import atom_shape, compiled  # noqa: E402
from structdsl import ops  # noqa: E402
from structdsl.torch import RaceDistribution  # noqa: E402

SPECS = ["spanning_tree", "top_k", "binary_tree", "arborescence", "matching"]


def _case(name, seed=0):
    shape = atom_shape(name, 5)
    x = torch.as_tensor(np.random.default_rng(seed).normal(size=(3,) + shape))
    d = RaceDistribution(compiled(name, "torch"), x, validate_args=False)
    trace = d.sample(generator=torch.Generator().manual_seed(seed))
    return d, x, trace


@pytest.mark.parametrize("name", SPECS)
def test_opcheck(name):
    d, x, trace = _case(name)
    key = ops.handle(d.program.numba_twin())
    res = torch.library.opcheck(ops.log_prob_and_score, (key, trace, x.clone().requires_grad_(True)))
    assert set(res.values()) == {"SUCCESS"}, res


@pytest.mark.parametrize("name", SPECS)
def test_the_operator_is_the_reference_log_prob_and_its_gradient(name):
    d, x, trace = _case(name, seed=1)
    other = trace.flip(0)                      # other elements' traces: some have probability zero
    t = torch.cat([trace, other])
    xx = torch.cat([x, x])
    ref = compiled(name, "numpy").log_prob_and_grad(t.numpy(), xx.numpy())
    logp, score = ops.log_prob_and_score(ops.handle(d.program.numba_twin()), t, xx)
    np.testing.assert_allclose(logp.numpy(), ref[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(score.numpy(), np.where(np.isneginf(ref[0])[:, None, None] if xx.dim() == 3
                                                       else np.isneginf(ref[0])[:, None], 0.0, ref[1]),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["spanning_tree", "binary_tree"])
def test_log_prob_compiles_to_the_operator_without_a_graph_break(name):
    d, x, _ = _case(name, seed=2)
    traces = d.sample((4,), generator=torch.Generator().manual_seed(3))
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ve = RaceDistribution(d.program, xe, validate_args=False).log_prob(traces).exp().sum()
    ve.backward()
    dc = RaceDistribution(d.program, xc, validate_args=False)
    torch._dynamo.reset()
    fn = torch.compile(lambda t: dc.log_prob(t).exp().sum(), fullgraph=True)   # fullgraph: a break raises
    vc = fn(traces)
    vc.backward()
    torch.testing.assert_close(vc, ve.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-12, atol=1e-14)


def test_a_dead_handle_is_refused():
    with pytest.raises(RuntimeError, match="no live program"):
        ops.log_prob_and_score("spanning_tree@0", torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 5, 5))
