"""The latent-structure experiments (structdsl.experiments): the data generator against
networkx, SST's matrix-tree marginals against enumeration, the MAP oracle against Kruskal and
brute force, I-MLE's backward, the trace KL against its exact value and gradient, and smoke
runs of experiments 1 and 3."""
import csv
import dataclasses
import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nx = pytest.importorskip("networkx")
pytest.importorskip("numba")

import structdsl  # noqa: E402
from structdsl import specs  # noqa: E402
from structdsl.experiments import baselines as B  # noqa: E402
from structdsl.experiments.graph_layout_data import (  # noqa: E402
    generate, make_splits, maximum_spanning_trees, simulate)


def _nx_tree(w):
    n = w.shape[0]
    G = nx.Graph()
    G.add_nodes_from(range(n))
    for u in range(n):
        for v in range(u + 1, n):
            G.add_edge(u, v, weight=float(w[u, v]))
    A = np.zeros((n, n), dtype=bool)
    for u, v in nx.maximum_spanning_tree(G, algorithm="kruskal").edges():
        A[u, v] = A[v, u] = True
    return A


# ---- 1. the generator ----------------------------------------------------------------------------
def test_generator_matches_networkx_spring_layout():
    """Kruskal's maximum spanning tree of Gumbel weights and ten Fruchterman-Reingold frames
    (spring_layout(iterations=1), rescaled) agree with networkx to 1e-12, batched."""
    rng = np.random.default_rng(3)
    Bn, n, T = 12, 10, 10
    w = rng.gumbel(size=(Bn, n, n))
    adj = maximum_spanning_trees(w)
    x0 = rng.standard_normal((Bn, n, 2))
    frames = simulate(adj, x0, T)
    assert frames.shape == (Bn, n, T, 2)
    worst = 0.0
    for b in range(Bn):
        assert (adj[b] == _nx_tree(w[b])).all()
        assert adj[b].sum() == 2 * (n - 1) and (adj[b] == adj[b].T).all()
        G = nx.Graph()
        G.add_nodes_from(range(n))
        G.add_edges_from(zip(*np.nonzero(np.triu(adj[b]))))
        pos = {i: x0[b, i] for i in range(n)}
        for t in range(T):
            pos = nx.spring_layout(G, pos=pos, iterations=1, seed=0)
            ref = np.array([pos[i] for i in range(n)])
            worst = max(worst, float(np.abs(ref - frames[b, :, t]).max()))
    assert worst <= 1e-12
    # the frames move: consecutive frames differ, and each is rescaled to max |coord| = 1
    assert np.abs(np.diff(frames, axis=2)).max() > 1e-3
    np.testing.assert_allclose(np.abs(frames).max(axis=(1, 3)), 1.0, rtol=0, atol=1e-12)


def test_generator_is_seeded_and_normalised():
    a, b = generate(40, seed=5), generate(40, seed=5)
    assert (a.positions == b.positions).all() and (a.adjacency == b.adjacency).all()
    assert not (generate(40, seed=6).positions == a.positions).all()
    d = make_splits(64, 32, seed=1)
    tr, te = d["train"].positions, d["test"].positions
    assert tr.min() == -1.0 and tr.max() == 1.0         # min-max on the training set
    lo, hi = d["range"]
    raw_test = generate(32, np.random.SeedSequence(1).spawn(3)[1]).positions
    np.testing.assert_allclose((te + 1) * (hi - lo) / 2 + lo, raw_test, atol=1e-12)
    assert d["train"].adjacency.sum((1, 2)).tolist() == [18] * 64      # trees on 10 nodes


# ---- 2. SST's matrix-tree marginals -----------------------------------------------------------
def _spanning_trees(n):
    edges = [(u, v) for u in range(n) for v in range(u + 1, n)]
    for sub in itertools.combinations(edges, n - 1):
        comp = list(range(n))
        ok = True
        for u, v in sub:
            cu, cv = comp[u], comp[v]
            if cu == cv:
                ok = False
                break
            comp = [cu if c == cv else c for c in comp]
        if ok:
            yield sub


@pytest.mark.parametrize("n", [4, 5])
@pytest.mark.parametrize("t", [0.5, 1.0, 3.0])
def test_sst_marginals_equal_enumeration(n, t):
    """P(edge in T) under p(T) ∝ exp(sum_{e in T} w_e / t), summed over every spanning tree
    (16 on K4, 125 on K5), equals the gradient of the Laplacian minor's log det."""
    trees = list(_spanning_trees(n))
    assert len(trees) == n ** (n - 2)                  # Cayley
    rng = np.random.default_rng(n)
    w = rng.normal(size=(3, n, n)) * 2.0
    got = B.spanning_tree_marginals(torch.as_tensor(w / t)).detach().numpy()
    for b in range(3):
        want = np.zeros((n, n))
        z = 0.0
        for tree in trees:
            p = math.exp(sum(w[b][e] for e in tree) / t)
            z += p
            for e in tree:
                want[e] += p
        want /= z
        np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-12)
        assert abs(got[b].sum() - (n - 1)) < 1e-12
        assert (np.tril(got[b]) == 0).all()


def test_sst_straight_through_is_the_hard_tree_with_the_marginals_gradient():
    prog = B.compile_numba_or_numpy(specs.spanning_tree)
    solve = B.map_solver(prog)
    theta = torch.randn(6, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    z, u = B.sst_spanning_tree(theta, 0.7, hard=True, solve=solve)
    assert ((z.detach() == 0) | (z.detach() == 1)).all() and (z.detach().sum((-1, -2)) == 4).all()
    assert (z.detach() == solve(u.detach())).all()
    c = torch.randn(5, 5, dtype=torch.float64)
    (g_st,) = torch.autograd.grad((z * c).sum(), theta)
    torch.manual_seed(0)
    soft, u2 = B.sst_spanning_tree(theta, 0.7, hard=False)
    assert torch.equal(u, u2)
    (g_soft,) = torch.autograd.grad((soft * c).sum(), theta)
    torch.testing.assert_close(g_st, g_soft, rtol=0, atol=1e-12)


# ---- 3. the MAP oracle and I-MLE -----------------------------------------------------------------
def test_map_oracle_is_the_maximum_spanning_tree():
    """The spec's own solve, as I-MLE's MAP oracle, returns the maximum spanning tree of the
    scores (networkx's Kruskal), for scores of any sign and spread."""
    prog = B.compile_numba_or_numpy(specs.spanning_tree)
    solve = B.map_solver(prog)
    rng = np.random.default_rng(0)
    s = rng.normal(size=(30, 8, 8)) * np.array([0.01, 1, 50])[rng.integers(0, 3, 30)][:, None, None]
    z = solve(torch.as_tensor(s)).numpy()
    for b in range(30):
        assert (z[b] == np.triu(_nx_tree(s[b]))).all()
    # the same trees as the data generator's Kruskal
    assert (z == np.triu(maximum_spanning_trees(s))).all()


def test_map_oracle_is_the_maximum_weight_arborescence():
    """Chu-Liu/Edmonds via solve on 1 + max - scores maximises the total score (brute force over
    every parent array at n = 4)."""
    n = 4
    prog = B.compile_numba_or_numpy(specs.arborescence)
    solve = B.map_solver(prog, embed=B.arborescence_embed)
    rng = np.random.default_rng(1)
    s = rng.normal(size=(20, n, n)) * 3
    z = solve(torch.as_tensor(s)).numpy()
    for b in range(20):
        best, arg = -math.inf, None
        for parents in itertools.product(range(n), repeat=n - 1):
            par = (-1,) + parents
            if any(par[v] == v for v in range(1, n)):
                continue
            ok = True
            for v in range(1, n):                  # every node reaches the root
                seen, u = set(), v
                while u != 0 and u not in seen:
                    seen.add(u)
                    u = par[u]
                ok &= u == 0
            if ok:
                val = sum(s[b, par[v], v] for v in range(1, n))
                if val > best:
                    best, arg = val, par
        want = np.zeros((n, n))
        for v in range(1, n):
            want[arg[v], v] = 1
        assert (z[b] == want).all()


def test_map_oracle_agrees_with_distribution_argmax_when_present():
    from structdsl.torch import RaceDistribution
    if not hasattr(RaceDistribution, "argmax"):
        pytest.skip("RaceDistribution.argmax is not in this tree")
    prog = structdsl.compile(specs.spanning_tree, backend="torch")
    x = torch.randn(16, 7, 7, dtype=torch.float64)
    z = B.map_solver(B.compile_numba_or_numpy(specs.spanning_tree))(x)
    a = RaceDistribution(prog, logits=x).argmax().structure.adjacency
    assert (torch.triu(torch.as_tensor(a), 1).to(torch.float64) == z).all()


def test_imle_forward_and_backward():
    """Without noise: forward = MAP(theta); backward = MAP(theta) - MAP(theta - lambda dy)
    (divided by lambda with scale=True), the I-MLE gradient."""
    prog = B.compile_numba_or_numpy(specs.top_k, k=2)
    solve = B.map_solver(prog)
    theta = torch.tensor([[0.3, 2.0, 1.0, -1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    z = B.imle(theta, solve, lam=2.0, noise=None)
    assert z.tolist() == [[0, 1, 1, 0, 0]]
    c = torch.tensor([[0.0, 0.0, 1.0, -1.0, 0.0]], dtype=torch.float64)     # dL/dz
    (g,) = torch.autograd.grad((z * c).sum(), theta)
    # theta - 2 c = [0.3, 2, -1, 1, 0.5]: top-2 = items 1 and 3
    assert g.tolist() == [[0, 0, 1, -1, 0]]
    z = B.imle(theta, solve, lam=2.0, noise=None, scale=True)
    (g,) = torch.autograd.grad((z * c).sum(), theta)
    assert g.tolist() == [[0, 0, 0.5, -0.5, 0]]
    # with noise: the forward pass is a MAP of perturbed scores, a valid 2-subset
    z = B.imle(theta.expand(50, 5), solve, lam=1.0, noise="sog", k=2)
    assert (z.sum(-1) == 2).all() and len({tuple(r) for r in z.tolist()}) > 1


def test_sum_of_gamma_noise_sums_to_a_gumbel():
    torch.manual_seed(0)
    k = 5
    s = B.sum_of_gamma((8000, k), k, nb_iterations=40).sum(-1).numpy()
    # standard Gumbel: mean Euler's gamma (0.5772), variance pi^2 / 6 (the truncation at 40
    # terms leaves a small deficit)
    assert abs(s.mean() - 0.5772) < 0.05 and abs(s.var() - math.pi ** 2 / 6) < 0.15


# ---- the trace KL -------------------------------------------------------------------------------
def test_trace_kl_is_unbiased_for_its_value_and_gradient():
    """On K4 (96 traces): the mean of the per-sample KL values and of the surrogate's gradient
    match the exact KL(q(T) || p0(T)) and its autograd gradient, by enumeration."""
    from structdsl.torch import RaceDistribution
    prog = structdsl.compile(specs.spanning_tree, backend="torch")
    x0 = torch.as_tensor(np.random.default_rng(2).normal(size=(4, 4)))
    x = x0.clone().requires_grad_(True)
    d = RaceDistribution(prog, logits=x)
    prior = RaceDistribution(prog, logits=torch.zeros(4, 4, dtype=torch.float64))
    traces = d.enumerate_support()
    lq = d.log_prob(traces)
    exact = (lq.exp() * (lq - prior.log_prob(traces))).sum()
    (g_exact,) = torch.autograd.grad(exact, x)
    N = 4000
    torch.manual_seed(1)
    xb = x0.expand(N, 4, 4).clone().requires_grad_(True)
    sur, kl = B.trace_kl(RaceDistribution(prog, logits=xb), prior, num_samples=4)
    sur.backward()
    g = (xb.grad * N)[:, np.triu(np.ones((4, 4), bool), 1)]
    mask = torch.as_tensor(np.triu(np.ones((4, 4), bool), 1))
    se_v = kl.mean(0).std() / math.sqrt(N)
    assert abs(float(kl.mean()) - float(exact.detach())) < 4 * float(se_v)
    se_g = g.std(0) / math.sqrt(N)
    assert ((g.mean(0) - g_exact[mask]).abs() <= 4 * se_g + 1e-12).all()
    for score in ("noise",):
        xb.grad = None
        sur, _ = B.trace_kl(RaceDistribution(prog, logits=xb), prior, num_samples=4, score=score)
        sur.backward()
        g = (xb.grad * N)[:, mask]
        assert ((g.mean(0) - g_exact[mask]).abs() <= 4.5 * g.std(0) / math.sqrt(N)).all()


# ---- smoke runs --------------------------------------------------------------------------------
def test_graph_layout_smoke_every_estimator(tmp_path):
    """A few steps of experiment 1 with every estimator: finite losses and metrics, the CSV
    and JSON written, the table and the figure."""
    from structdsl.experiments import graph_layout as gl
    cfg = gl.Config(num_train=48, num_test=16, steps=2, batch_size=8, eval_every=1, eval_batch=16,
                    num_samples=2, hidden=16, out=str(tmp_path))
    data = make_splits(cfg.num_train, cfg.num_test, 0)
    for est in gl.ESTIMATORS:
        rows = gl.train(dataclasses.replace(cfg, estimator=est), data, progress=False, log=None)
        assert [r["step"] for r in rows] == [0, 1, 2]
        for r in rows[1:]:
            assert math.isfinite(r["train_loss"]) and math.isfinite(r["train_nll"]) and r["train_nll"] > 0
            assert math.isfinite(r["test_elbo"]) and r["test_elbo"] < 0
            assert 0 <= r["test_precision"] <= 1 and 0 <= r["test_precision_map"] <= 1
            assert r["ms_per_step"] > 0
        with open(tmp_path / f"{est}-seed0.csv") as fh:
            written = list(csv.DictReader(fh))
        assert len(written) == 3 and float(written[-1]["test_elbo"]) == pytest.approx(rows[-1]["test_elbo"])
        assert (tmp_path / f"{est}-seed0.json").exists()
    table = gl.summarise(str(tmp_path))
    assert all(gl.LABELS[e] in table for e in gl.ESTIMATORS)
    pytest.importorskip("matplotlib")
    gl.plot_curves(str(tmp_path))
    assert (tmp_path / "learning_curves.png").stat().st_size > 0


def test_bias_variance_smoke(tmp_path):
    """Experiment 3 on spanning trees and top-k with few draws: every estimator reports
    finite numbers; the unbiased ones sit within their noise floor of the exact gradient; the
    table and the figure are written."""
    from structdsl.experiments import bias_variance as bv
    rows = bv.run(str(tmp_path), keys=("spanning_tree", "arborescence", "top_k"), draws=400, critic_steps=3,
                  log=None, progress=False)
    labels = {(r["instance"], r["estimator"]) for r in rows}
    assert ("spanning_tree (n=5)", "SST ST (t=0.5)") in labels and ("top_k (k=3 of 6)", "I-MLE SoG (λ=1)") in labels
    assert ("arborescence (n=4)", "SST soft (t=1)") in labels          # the directed matrix-tree relaxation
    assert not any(r["instance"].startswith("top_k") and r["estimator"].startswith("SST") for r in rows)
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("bias", "se", "cos", "var"))
        if "REINFORCE" in r["estimator"] or r["estimator"] == "RELAX":
            assert r["bias"] < 5 * r["se"], r
    for soft in [r for r in rows if r["estimator"] == "SST soft (t=1)"]:
        assert soft["bias"] > 5 * soft["se"], soft      # a relaxation is biased, visibly
    assert (tmp_path / "bias_variance.md").read_text().count("|") > 50
    assert (tmp_path / "bias_variance.csv").exists()
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "bias_variance.png").stat().st_size > 0


def test_gumbel_kl_closed_form_and_its_shift_minimum():
    """theta + exp(-theta) - 1 per valid atom; with shift=True the minimum over a common
    shift of the logits (the tree law is shift-invariant), found here by a grid."""
    valid = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    theta = torch.as_tensor(np.random.default_rng(4).normal(size=(2, 5, 5)) - 3.0)
    direct = B.gumbel_kl(theta, valid)
    want = torch.where(valid, theta + torch.exp(-theta) - 1, 0.0).sum((-1, -2))
    torch.testing.assert_close(direct, want)
    shifted = B.gumbel_kl(theta, valid, shift=True)
    grid = torch.stack([B.gumbel_kl(theta + c, valid) for c in np.linspace(-10, 10, 20001)])
    torch.testing.assert_close(shifted, grid.min(0).values, rtol=0, atol=1e-6)
    assert (shifted <= direct).all() and (shifted >= 0).all()


def test_skip_first_decoder_sends_no_message_on_non_edges_and_the_flag_parses():
    """NRI's ``skip_first``: the "no edge" type is silent, so with an empty graph a node's
    prediction ignores every other node, and an edge makes it depend on its neighbour; the
    CLI reads ``--skip-first false`` as False (``bool("false")`` would be True)."""
    from structdsl.experiments.__main__ import _config, build_parser
    from structdsl.experiments.nri import Decoder, edge_types_from_adjacency
    torch.manual_seed(0)
    n = 4
    x = torch.randn(1, n, 2)
    moved = x.clone()
    moved[0, 3] += 1.0                                   # move node 3
    for skip, empty_ignores in ((True, True), (False, False)):
        dec = Decoder(n, 2, 16, skip_first=skip)
        empty = edge_types_from_adjacency(torch.zeros(1, n, n))
        same = torch.allclose(dec.step(x, empty)[0, 0], dec.step(moved, empty)[0, 0])
        assert same == empty_ignores
    dec = Decoder(n, 2, 16, skip_first=True)
    z = torch.zeros(1, n, n)
    z[0, 0, 3] = z[0, 3, 0] = 1.0
    edge = edge_types_from_adjacency(z)
    assert not torch.allclose(dec.step(x, edge)[0, 0], dec.step(moved, edge)[0, 0])
    assert torch.allclose(dec.step(x, edge)[0, 1], dec.step(moved, edge)[0, 1])   # node 1 has no edge
    for text, value in (("false", False), ("true", True), ("0", False)):
        args = build_parser().parse_args(["graph-layout", "--estimator", "imle", "--skip-first", text])
        assert _config(args).skip_first is value
    with pytest.raises(SystemExit):
        build_parser().parse_args(["graph-layout", "--skip-first", "maybe"])


def test_time_steps_interleaves_estimators_and_reports_every_round(capsys):
    """``time-steps``: every estimator timed in every round (positive ms), the median among
    them, and the CLI's table names each estimator."""
    from structdsl.experiments import graph_layout as gl
    from structdsl.experiments.__main__ import main
    from structdsl.experiments.timing import format_times, time_steps
    base = gl.Config(num_train=32, num_test=8, batch_size=4, num_samples=2, hidden=8)
    times = time_steps(gl, base, ["t_reinforce+", "sst_st"], steps=2, rounds=3, progress=False)
    assert list(times) == ["t_reinforce+", "sst_st"]
    for med, each in times.values():
        assert len(each) == 3 and all(t > 0 for t in each) and med == sorted(each)[1]
    assert "| SST (straight-through) |" in format_times(times, gl.LABELS)
    with pytest.raises(SystemExit, match="unknown estimator"):
        main(["time-steps", "graph-layout", "--estimators", "nope", "--no-progress"])
