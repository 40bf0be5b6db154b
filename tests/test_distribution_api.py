"""The parts of ``RaceDistribution`` a torch user looks for beyond sampling and scoring:
``entropy()`` (exact, by enumeration; against brute force written here from the races'
definition), ``argmax()`` (the algorithm on noise-free weights; against textbook
algorithms), ``sample_and_score`` and ``enumerate_supports`` (the public methods the
estimators use), each on the CPU fast path and the lock-step path."""
import itertools
import math

import numpy as np
import pytest
import torch

import structdsl
from shared_specs import compiled
from structdsl import specs
from structdsl.errors import EnumerationLimitError
from structdsl.torch import RaceDistribution, SupportTooLarge

PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "lockstep"])


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- brute force: every trace with its probability, from the race definition alone --------------
def plackett_luce_traces(x, k):
    """``{trace: p}`` of ``k`` successive races over the items not yet drawn."""
    rates = np.exp(np.asarray(x, dtype=np.float64))
    out = {}
    for seq in itertools.permutations(range(len(rates)), k):
        p, left = 1.0, set(range(len(rates)))
        for w in seq:
            p *= rates[w] / sum(rates[i] for i in left)
            left.remove(w)
        out[seq] = p
    return out


def kruskal_race_traces(x):
    """``{trace: p}`` of Kruskal as races: each race is over the edges ``u < v`` joining two
    components; the winner merges them (flat edge index ``u * n + v``)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    edges = [(u, v) for u in range(n) for v in range(u + 1, n)]
    out = {}

    def grow(comp, seq, p):
        members = [(u, v) for u, v in edges if comp[u] != comp[v]]
        if not members:
            out[tuple(seq)] = p
            return
        total = sum(math.exp(x[u, v]) for u, v in members)
        for u, v in members:
            cu, cv = comp[u], comp[v]
            grow([cu if c == cv else c for c in comp], seq + [u * n + v], p * math.exp(x[u, v]) / total)

    grow(list(range(n)), [], 1.0)
    return out


def brute_entropy(law):
    p = np.array(list(law.values()))
    assert abs(p.sum() - 1) < 1e-12
    return float(-(p * np.log(p)).sum())


CASES = [("top_k", dict(k=2), (4,), lambda x: plackett_luce_traces(x, 2)),
         ("top_k", dict(k=3), (5,), lambda x: plackett_luce_traces(x, 3)),
         ("permutation", {}, (3,), lambda x: plackett_luce_traces(x, 3)),
         ("permutation", {}, (4,), lambda x: plackett_luce_traces(x, 4)),
         ("spanning_tree", {}, (3, 3), kruskal_race_traces),
         ("spanning_tree", {}, (4, 4), kruskal_race_traces)]


@PATHS
@pytest.mark.parametrize("name, statics, shape, law", CASES,
                         ids=lambda c: str(c) if isinstance(c, (str, tuple)) else "")
def test_entropy_is_the_brute_force_entropy_of_the_traces(name, statics, shape, law, fast):
    """Exact entropy of the trace law for a batch of random logits: equal to the entropy of
    the brute-force law (every trace listed, probabilities from the race definition), the
    number of traces the same; differentiable, with the gradient of that brute-force sum."""
    prog = structdsl.compile(getattr(specs, name), backend="torch", **statics)
    x = torch.as_tensor(np.random.default_rng(1).normal(size=(3,) + shape)).requires_grad_(True)
    d = RaceDistribution(prog, x, fast_cpu=fast)
    h = d.entropy()
    assert h.shape == (3,) and h.dtype == torch.float64
    for b in range(3):
        brute = law(x[b].detach().numpy())
        assert len(brute) == len(d.enumerate_support()), (len(brute), len(d.enumerate_support()))
        assert abs(h[b].item() - brute_entropy(brute)) < 1e-12
    # gradient: central differences of the brute-force entropy
    w = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    (h * w).sum().backward()
    eps = 1e-6
    valid = prog.instance(shape).valid
    for idx in list(zip(*np.nonzero(valid)))[:4]:
        b = 1
        up, down = x[b].detach().numpy().copy(), x[b].detach().numpy().copy()
        up[idx] += eps
        down[idx] -= eps
        fd = (brute_entropy(law(up)) - brute_entropy(law(down))) / (2 * eps)
        assert abs(x.grad[(b,) + tuple(idx)].item() - w[b].item() * fd) < 1e-6


def test_entropy_of_a_ragged_batch_is_each_elements_own():
    """Elements with -inf atoms (smaller sizes) get the entropy of their smaller law: a
    top-3 of 4 uniform items has entropy log 24, of 3 (one at -inf) log 6."""
    x = torch.zeros(3, 4, dtype=torch.float64)
    x[1, 3] = -math.inf
    x[2] = torch.as_tensor(np.random.default_rng(2).normal(size=4))
    x[2, 0] = -math.inf
    d = RaceDistribution(structdsl.compile(specs.top_k, backend="torch", k=3), x)
    h = d.entropy()
    assert abs(h[0].item() - math.log(24)) < 1e-12
    assert abs(h[1].item() - math.log(6)) < 1e-12
    brute = plackett_luce_traces(x[2, 1:].numpy(), 3)          # the -inf item never fires
    assert abs(h[2].item() - brute_entropy(brute)) < 1e-12
    supports = d.enumerate_supports()
    assert sorted(len(t) for t, _ in supports) == [6, 6, 24]
    assert sorted(int(i) for _, el in supports for i in el) == [0, 1, 2]


def test_entropy_of_a_large_support_names_the_monte_carlo_estimate():
    """Past the enumeration guard: SupportTooLarge (an EnumerationLimitError and a
    NotImplementedError, as torch raises for a missing entropy) naming the Monte Carlo
    estimate, which does estimate the entropy (checked where both exist)."""
    d = RaceDistribution(specs.spanning_tree, torch.zeros(7, 7, dtype=torch.float64))
    with pytest.raises(SupportTooLarge, match=r"-dist\.log_prob\(dist\.sample\(\(n,\)\)\)\.mean\(0\)") as err:
        d.entropy()
    assert isinstance(err.value, EnumerationLimitError) and isinstance(err.value, NotImplementedError)
    small = RaceDistribution(specs.spanning_tree, torch.as_tensor(np.random.default_rng(3).normal(size=(5, 5))))
    lp = small.log_prob(small.sample((20000,), generator=gen(0)))
    mc, se = -lp.mean(0), lp.std() / math.sqrt(lp.numel())
    assert abs(mc - small.entropy()) < 4 * se


# ---- argmax --------------------------------------------------------------------------------------
def maximum_spanning_forest(w):
    """Prim's algorithm from every unvisited node, on ``w[u, v]`` (``u < v``; -inf: no edge):
    the maximum spanning forest as a set of ``(u, v)`` with ``u < v``."""
    n = w.shape[0]
    sym = np.full((n, n), -np.inf)
    iu = np.triu_indices(n, 1)
    sym[iu] = w[iu]
    sym.T[iu] = w[iu]
    seen, tree = set(), set()
    for root in range(n):
        if root in seen:
            continue
        seen.add(root)
        while True:
            best = max(((sym[a, b], a, b) for a in seen for b in range(n) if b not in seen), default=None)
            if best is None or best[0] == -np.inf:
                break
            _, a, b = best
            seen.add(b)
            tree.add((min(a, b), max(a, b)))
    return tree


@PATHS
def test_argmax_of_spanning_tree_is_the_maximum_spanning_tree(fast):
    """argmax() on random logits, some edges absent (a padded node: a forest), is the maximum
    spanning forest of the logits by Prim's algorithm; its trace lists the edges in
    decreasing logit (Kruskal's order); logits far from 0 (exp would over/underflow) too."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 7, 7)) * np.array([1, 1, 1, 1, 300, 1000])[:, None, None]
    x[1, 6, :] = x[1, :, 6] = -np.inf                        # node 6 absent in element 1
    x[2, 0, 1:] = -np.inf                                    # node 0 isolated in element 2
    d = RaceDistribution(specs.spanning_tree, torch.as_tensor(x), fast_cpu=fast)
    best = d.argmax()
    assert best.trace.shape == (6, 6) and best.structure.adjacency.shape == (6, 7, 7)
    for b in range(6):
        adj = best.structure.adjacency[b].numpy()
        got = {(u, v) for u in range(7) for v in range(u + 1, 7) if adj[u, v]}
        assert got == maximum_spanning_forest(x[b]), b
        won = [int(t) for t in best.trace[b] if t >= 0]
        assert [x[b].reshape(-1)[t] for t in won] == sorted((x[b].reshape(-1)[t] for t in won), reverse=True)
    # moderate logits: the same as the solver on the noise at its mean, exp(-logits)
    plain = RaceDistribution(specs.spanning_tree, torch.as_tensor(x[:4]), fast_cpu=fast)
    assert torch.equal(plain.argmax().trace, plain.program.solve(torch.exp(-plain.logits)).trace)


@PATHS
def test_argmax_of_top_k_and_permutation_is_the_sort_of_the_logits(fast):
    x = torch.as_tensor(np.random.default_rng(5).normal(size=(4, 3, 8)))
    x[0, 0, :6] = -math.inf                                   # only two live items
    top = RaceDistribution(compiled("top_k", "torch"), x, fast_cpu=fast).argmax()   # k = 2
    want = torch.topk(x, 2, dim=-1).indices
    assert torch.equal(top.structure.order, want) and torch.equal(top.trace, want)
    assert torch.equal(top.structure.subset, torch.zeros_like(x, dtype=torch.bool).scatter(-1, want, True))
    perm = RaceDistribution(specs.permutation, x[1:], fast_cpu=fast).argmax()
    assert torch.equal(perm.structure.order, torch.argsort(x[1:], dim=-1, descending=True))


def test_argmax_is_not_the_mode():
    """The docstring's warning, shown: for these logits the noise-free matching is not the
    most probable matching, and the noise-free spanning-tree trace is not the most probable
    trace (the laws enumerated exactly)."""
    cases = [("matching", [[-1.3, -0.3, 1.6], [3.0, -2.5, 3.0], [2.7, 1.6, 0.5]]),
             ("spanning_tree", [[-1.1, -0.6, 0.8, 2.1], [-0.3, 2.7, -1.3, 0.7], [1.8, 0.2, -1.5, -1.8],
                                [-0.9, 0.4, -2.0, -0.4]])]
    for name, x in cases:
        x = np.array(x)
        e = compiled(name, "numpy").enumerate(logits=x)
        best = RaceDistribution(compiled(name, "torch"), torch.as_tensor(x)).argmax()
        probs = np.array([float(p) for p in e.probs])
        p_trace = probs[[np.array_equal(t, best.trace.numpy()) for t in e.traces]]
        assert len(p_trace) == 1 and p_trace[0] < probs.max() - 0.01, (name, p_trace, probs.max())
        if name == "matching":
            law = e.structure_law()
            same = [float(p) for s, p in law if all(np.array_equal(a, b.numpy()) for a, b in zip(s, best.structure))]
            assert len(same) == 1 and same[0] < float(law[0][1]) - 0.05


# ---- sample_and_score, enumerate_supports ------------------------------------------------------------
@pytest.mark.parametrize("name", ["spanning_tree", "arborescence", "binary_tree", "clustering"])
def test_sample_and_score_on_both_paths(name):
    """The same traces as sample() from the same generator on both paths; log_prob is
    dist.log_prob of them, score its gradient (autograd, per sample), the noise score the
    gradient of noise_log_prob at fixed E_1; member sets contain each race's winner and agree
    between the paths."""
    from shared_specs import atom_shape
    shape = atom_shape(name, 5)
    x0 = torch.as_tensor(np.random.default_rng(6).normal(size=(2,) + shape))
    out = {}
    for fast in (True, False):
        x = x0.clone().requires_grad_(True)
        d = RaceDistribution(compiled(name, "torch"), x, fast_cpu=fast)
        assert d.cpu_fast_path == fast
        s = d.sample_and_score((3,), generator=gen(7), members=True)
        assert torch.equal(s.trace, d.sample((3,), generator=gen(7)))
        lp = d.log_prob(s.trace)
        torch.testing.assert_close(s.log_prob.double(), lp.detach(), rtol=1e-12, atol=1e-12)
        for k in range(3):
            (g,) = torch.autograd.grad(lp[k].sum(), x, retain_graph=True)
            torch.testing.assert_close(s.score[k].double(), g, rtol=1e-10, atol=1e-12)
        R = d.event_shape[0]
        assert s.members.shape == (3, 2, R, math.prod(shape)) and s.members.dtype == torch.bool
        for idx in itertools.product(range(3), range(2), range(R)):
            w = int(s.trace[idx])
            assert (w < 0) == (not bool(s.members[idx].any())) and (w < 0 or bool(s.members[idx][w]))
        n = d.sample_and_score((3,), generator=gen(7), score="noise", members=True)
        assert torch.equal(n.trace, s.trace) and torch.equal(n.log_noise, s.log_noise)
        assert torch.equal(n.members, s.members)      # a replay after the draw, not the scoring pass
        e = n.log_noise.exp()
        e1 = (e * x.detach().exp()).detach()
        xv = x.detach().clone().requires_grad_(True)
        nlp = d.noise_log_prob(e1 / xv.exp())                         # E = E_1 / rate: the score holds E fixed
        torch.testing.assert_close(n.log_prob.double(), nlp.detach(), rtol=1e-10, atol=1e-10)
        (gn,) = torch.autograd.grad(d.noise_log_prob(e.detach()).sum(), x)
        torch.testing.assert_close(n.score.sum(0).double(), gn, rtol=1e-10, atol=1e-10)
        out[fast] = s
    torch.testing.assert_close(out[True].log_noise, out[False].log_noise, rtol=1e-12, atol=0)
    assert torch.equal(out[True].members, out[False].members)
    with pytest.raises(ValueError, match="score must be"):
        d.sample_and_score(score="gumbel")


def test_enumerate_supports_matches_enumerate_support_per_element():
    x = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    x[0, 1, 4, :] = x[0, 1, :, 4] = -math.inf
    x[1, 2, 0, 1] = -math.inf
    d = RaceDistribution(specs.spanning_tree, x)
    groups = d.enumerate_supports()
    assert len(groups) == 3
    flat = x.reshape(6, 5, 5)
    for traces, elements in groups:
        for e in elements.tolist():
            alone = RaceDistribution(specs.spanning_tree, flat[e]).enumerate_support()
            assert torch.equal(traces, alone)
    with pytest.raises(ValueError, match="ragged"):
        d.enumerate_support()
