"""Experiment 2 (ListOps with an arborescence latent): the generator against an independent
evaluator and bracket parser, the directed matrix-tree marginals and the MAP oracle against
brute-force enumeration (with padding), SST's straight-through arborescence, the attachment
metrics on a hand-made case, and a smoke run of every estimator."""
import csv
import dataclasses
import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from structdsl import specs  # noqa: E402
from structdsl.experiments import baselines as B  # noqa: E402
from structdsl.experiments import listops_data as D  # noqa: E402


# ---- an independent reading of the sentences --------------------------------------------------
def _bracket_parents(tokens):
    """Heads from the brackets alone: a token's head is the innermost open operator; ``]`` is
    headed by the operator it closes."""
    stack, parents = [], []
    for t in tokens:
        parents.append(stack[-1] if stack else -1)
        if t in (D.MIN, D.MAX, D.MED):
            stack.append(len(parents) - 1)
        elif t == D.CLOSE:
            stack.pop()
    assert not stack, "unbalanced brackets"
    return parents


def _median(values):
    s = sorted(values)
    k = len(s)
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) // 2


def _evaluate_tree(tokens, parents):
    """The value of the root from the tokens and the parent array only."""
    children = {i: [] for i in range(len(tokens))}
    for v, p in enumerate(parents):
        if p >= 0:
            children[p].append(v)

    def value(i):
        t = tokens[i]
        if t < 10:
            assert not children[i], "a digit has no dependents"
            return t
        assert t in (D.MIN, D.MAX, D.MED), f"token {t} cannot head an expression"
        closes = [c for c in children[i] if tokens[c] == D.CLOSE]
        assert len(closes) == 1 and all(not children[c] for c in closes)
        args = [value(c) for c in children[i] if tokens[c] != D.CLOSE]
        return {D.MIN: min, D.MAX: max, D.MED: _median}[t](args)

    assert parents[0] == -1 and all(p >= 0 for p in parents[1:])
    return value(0)


def _depth(parents, tokens):
    """Operator nesting depth: the largest number of operators on a root-to-token path."""
    best = 0
    for v in range(len(tokens)):
        d, u = 0, v
        while u >= 0:
            d += tokens[u] in (D.MIN, D.MAX, D.MED)
            u = parents[u]
        best = max(best, d)
    return best


@pytest.mark.parametrize("kw", [dict(), dict(balance=False, max_depth=4, max_args=5, min_depth=1, p_op=0.4)])
def test_gold_tree_of_every_example_evaluates_to_its_label(kw):
    """3000 examples: the gold parents are the brackets' parse, every token but the root has
    one head, and the gold tree, evaluated from tokens + parents alone (MED as ListOps'
    int(numpy.median): the floor of the middle two's mean), gives the label."""
    d = D.generate(3000, np.random.default_rng(7), **kw)
    assert d.tokens.shape == (3000, 30) and d.parents.shape == (3000, 30)
    meds_even = 0
    for i in range(len(d)):
        n = int(d.lengths[i])
        toks, pars = d.tokens[i, :n].tolist(), d.parents[i, :n].tolist()
        assert pars == _bracket_parents(toks)
        assert _evaluate_tree(toks, pars) == d.labels[i]
        assert (d.tokens[i, n:] == D.PAD).all() and (d.parents[i, n:] == -1).all()
        meds_even += sum(1 for v, t in enumerate(toks) if t == D.MED
                         and sum(1 for c, p in enumerate(pars) if p == v and toks[c] != D.CLOSE) % 2 == 0)
    assert meds_even > 100             # the even-count median is exercised
    assert D.apply_op(D.MED, [1, 4]) == 2 and D.apply_op(D.MED, [3, 1, 2]) == 2 and D.apply_op(D.MED, [8, 9]) == 8


def test_generator_is_seeded_bounded_and_balanced():
    kw = dict(max_len=24, max_depth=3, min_depth=2, max_args=4)
    a, b = D.generate(500, 3, **kw), D.generate(500, 3, **kw)
    assert all((getattr(a, f) == getattr(b, f)).all() for f in ("tokens", "lengths", "labels", "parents"))
    c = D.generate(500, 4, **kw)
    assert not (c.tokens == a.tokens).all()
    assert a.tokens.shape == (500, 24) and a.lengths.max() <= 24 and a.lengths.min() >= 4
    depths = [_depth(a.parents[i, :a.lengths[i]].tolist(), a.tokens[i, :a.lengths[i]].tolist()) for i in range(500)]
    assert depths == a.depths.tolist() and min(depths) == 2 and max(depths) == 3
    for i in range(500):                # 2..max_args arguments per operator, the root an operator
        toks, pars = a.tokens[i, :a.lengths[i]], a.parents[i, :a.lengths[i]]
        assert toks[0] in (D.MIN, D.MAX, D.MED)
        for v in np.nonzero(np.isin(toks, (D.MIN, D.MAX, D.MED)))[0]:
            assert 2 <= ((pars == v) & (toks != D.CLOSE)).sum() <= 4
    assert D.label_histogram(a).tolist() == [50] * 10          # balanced by quota
    s = D.make_splits(100, 50, seed=1, **kw)
    s2 = D.make_splits(100, 50, seed=1, **kw)
    assert (s["train"].tokens == s2["train"].tokens).all() and (s["test"].tokens == s2["test"].tokens).all()
    tr, te = np.random.SeedSequence(1).spawn(2)
    assert (D.generate(50, np.random.default_rng(te), **kw).tokens == s["test"].tokens).all()
    assert not (s["train"].tokens[:50] == s["test"].tokens).all()
    assert D.to_string(a.tokens[0]).startswith("[M")


# ---- arborescences by brute force ----------------------------------------------------------------
def _arborescences(nodes, root=0):
    """Every parent map over ``nodes`` in which each non-root node reaches the root."""
    others = [v for v in nodes if v != root]
    for heads in itertools.product(nodes, repeat=len(others)):
        par = dict(zip(others, heads))
        if any(par[v] == v for v in others):
            continue
        ok = True
        for v in others:
            seen, u = set(), v
            while u != root and u not in seen:
                seen.add(u)
                u = par[u]
            ok &= u == root
        if ok:
            yield par


def _brute_marginals(w, nodes):
    n = w.shape[0]
    want, z = np.zeros((n, n)), 0.0
    for par in _arborescences(nodes):
        p = math.exp(sum(w[par[v], v] for v in par))
        z += p
        for v in par:
            want[par[v], v] += p
    return want / z


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_arborescence_marginals_equal_enumeration(scale):
    """Directed matrix-tree theorem (Koo et al. 2007): the gradient of log det of the
    in-degree Laplacian's minor equals P(u -> v in A) summed over all 16 arborescences of 4
    nodes rooted at 0, and over the 16 of 4 present nodes among 5 (node 2 padded: by -inf,
    or by the mask with finite garbage in its edges)."""
    trees = list(_arborescences(range(4)))
    assert len(trees) == 16
    rng = np.random.default_rng(int(scale * 10))
    w = rng.normal(size=(3, 4, 4)) * scale
    got = B.arborescence_marginals(torch.as_tensor(w)).detach().numpy()
    for b in range(3):
        np.testing.assert_allclose(got[b], _brute_marginals(w[b], range(4)), rtol=0, atol=1e-10)
        np.testing.assert_allclose(got[b].sum(0), [0, 1, 1, 1], rtol=0, atol=1e-12)
        assert (np.diag(got[b]) == 0).all() and (got[b][:, 0] == 0).all()
    w5 = rng.normal(size=(2, 5, 5)) * scale
    nodes = [0, 1, 3, 4]
    want = [_brute_marginals(w5[b], nodes) for b in range(2)]
    padded = w5.copy()
    padded[:, 2, :] = -np.inf
    padded[:, :, 2] = -np.inf
    got = B.arborescence_marginals(torch.as_tensor(padded)).detach().numpy()
    mask = torch.tensor([True, True, False, True, True])
    got_mask = B.arborescence_marginals(torch.as_tensor(w5), mask=mask).detach().numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], want[b], rtol=0, atol=1e-10)
        np.testing.assert_allclose(got_mask[b], want[b], rtol=0, atol=1e-10)
        assert (got[b][2] == 0).all() and (got[b][:, 2] == 0).all()


def test_arborescence_marginals_are_differentiable_again():
    """The marginals keep their graph (create_graph=True): their gradient, by autograd, matches
    a central finite difference."""
    w = torch.as_tensor(np.random.default_rng(5).normal(size=(4, 4))).requires_grad_(True)
    c = torch.as_tensor(np.random.default_rng(6).normal(size=(4, 4)))
    (g,) = torch.autograd.grad((B.arborescence_marginals(w) * c).sum(), w)
    h, fd = 1e-6, torch.zeros(4, 4, dtype=torch.float64)
    for u in range(4):
        for v in range(4):
            e = torch.zeros(4, 4, dtype=torch.float64)
            e[u, v] = h
            fd[u, v] = ((B.arborescence_marginals(w.detach() + e) * c).sum()
                        - (B.arborescence_marginals(w.detach() - e) * c).sum()) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=0, atol=1e-7)


def _solver():
    return B.map_solver(B.compile_numba_or_numpy(specs.arborescence), embed=B.arborescence_embed)


def test_map_oracle_is_the_maximum_weight_arborescence_with_padding():
    """Chu-Liu/Edmonds through the spec's solve returns the arborescence of largest total
    score, by brute force: on 4 nodes, and on 6 with a ragged set of present nodes (-inf
    padding, as a padded batch of sentences)."""
    solve = _solver()
    rng = np.random.default_rng(2)
    for n, lengths in ((4, [4] * 12), (6, [6, 5, 4, 3, 2, 6, 5, 4])):
        s = rng.normal(size=(len(lengths), n, n)) * rng.choice([0.1, 1, 5], size=(len(lengths), 1, 1))
        for b, m in enumerate(lengths):
            s[b, m:, :] = -np.inf
            s[b, :, m:] = -np.inf
        z = solve(torch.as_tensor(s)).numpy()
        for b, m in enumerate(lengths):
            best, arg = -math.inf, None
            for par in _arborescences(range(m)):
                val = sum(s[b, par[v], v] for v in par)
                if val > best:
                    best, arg = val, par
            want = np.zeros((n, n))
            for v, u in arg.items():
                want[u, v] = 1
            assert (z[b] == want).all()


def test_sst_straight_through_is_the_map_arborescence_with_the_marginals_gradient():
    solve = _solver()
    theta = torch.randn(6, 5, 5, dtype=torch.float64)
    theta[3:, 4, :] = -math.inf                         # node 4 absent in half the batch
    theta[3:, :, 4] = -math.inf
    theta.requires_grad_(True)
    torch.manual_seed(0)
    z, u = B.sst_arborescence(theta, 0.7, hard=True, solve=solve)
    zd = z.detach()
    assert ((zd == 0) | (zd == 1)).all()
    assert (zd == solve(u.detach())).all()
    assert zd[:3].sum(-2)[:, 1:].eq(1).all() and zd[3:].sum(-2)[:, 1:4].eq(1).all() and (zd[3:, :, 4] == 0).all()
    assert (zd[:, :, 0] == 0).all()
    c = torch.randn(5, 5, dtype=torch.float64)
    (g_st,) = torch.autograd.grad((z * c).sum(), theta)
    torch.manual_seed(0)
    soft, u2 = B.sst_arborescence(theta, 0.7, hard=False)
    assert torch.equal(u, u2)
    np.testing.assert_allclose(soft.detach().sum(-2)[:3, 1:].numpy(), 1.0, atol=1e-12)
    (g_soft,) = torch.autograd.grad((soft * c).sum(), theta)
    torch.testing.assert_close(g_st, g_soft, rtol=0, atol=1e-12)
    assert torch.isfinite(g_st).all() and (g_st[3:, 4] == 0).all() and (g_st[3:, :, 4] == 0).all()


# ---- metrics and the smoke run ----------------------------------------------------------------------
def test_attachment_metrics_on_a_hand_made_sentence():
    """[MAX 2 [MIN 4 7 ] ] : gold heads -1 0 0 2 2 2 0; a prediction with the inner operator's
    ']' wrong, and '4' reversed (4 -> [MIN instead of [MIN -> 4)."""
    from structdsl.experiments.listops import attachment
    tokens = torch.tensor([[D.MAX, 2, D.MIN, 4, 7, D.CLOSE, D.CLOSE, D.PAD]])
    gold = torch.tensor([[-1, 0, 0, 2, 2, 2, 0, -1]])
    pred = torch.tensor([[-1, 0, 3, 0, 2, 0, 0, -1]])
    r = attachment(pred, gold, tokens, torch.tensor([7]))
    # all: tokens 1..6 -> correct 1, 4, 6 = 3/6; args (not ']'): 1, 2, 3, 4 -> 1, 4 = 2/4;
    # undirected: + token 2 (pred 3 -> 2, gold 2 -> 3) = 4/6
    assert r["all"].tolist() == [0.5] and r["args"].tolist() == [0.5] and r["undirected"].tolist() == [4 / 6]


def test_listops_smoke_every_estimator(tmp_path):
    """Three steps of experiment 2 with every estimator and reference row: finite losses,
    metrics in range, the CSV and JSON written, the table and the figure."""
    from structdsl.experiments import listops as lo
    cfg = lo.Config(num_train=48, num_test=24, max_len=20, steps=3, batch_size=8, eval_every=1, eval_batch=24,
                    num_samples=2, hidden=16, embed=16, passes=3, relax_hidden=16, out=str(tmp_path))
    data = lo.make_data(cfg)
    assert data["train"].tokens.shape == (48, 20)
    for est in lo.ESTIMATORS + lo.REFERENCES:
        rows = lo.train(dataclasses.replace(cfg, estimator=est), data, progress=False, log=None)
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        for r in rows[1:]:
            assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0 and 0 <= r["train_acc"] <= 1
            assert r["ms_per_step"] > 0
            for k in ("acc", "acc_map", "precision", "precision_map", "precision_args", "precision_undirected_map"):
                assert 0 <= r[f"test_{k}"] <= 1, (est, k)
            assert r["test_precision_args"] <= 1 and r["test_precision_undirected"] >= r["test_precision"]
        if est == "gold":
            assert rows[-1]["test_precision"] == 1.0 == rows[-1]["test_precision_map"]
        with open(tmp_path / f"{est}-seed0.csv") as fh:
            written = list(csv.DictReader(fh))
        assert len(written) == 4 and float(written[-1]["test_acc"]) == pytest.approx(rows[-1]["test_acc"])
        assert (tmp_path / f"{est}-seed0.json").exists()
    table = lo.summarise(str(tmp_path))
    assert all(lo.LABELS[e] in table for e in lo.ESTIMATORS + lo.REFERENCES)
    assert table.count("\n") == 1 + len(lo.ESTIMATORS + lo.REFERENCES)
    pytest.importorskip("matplotlib")
    lo.plot_curves(str(tmp_path))
    assert (tmp_path / "learning_curves.png").stat().st_size > 0


def test_training_gradients_reach_the_parser_and_are_finite():
    """One step of every estimator on a padded batch: the parser's parameters get a finite,
    nonzero gradient (the score-function estimators through the logits; SST and I-MLE
    through their relaxation), and the reader's too."""
    from structdsl.experiments import listops as lo
    cfg = lo.Config(num_train=16, num_test=8, max_len=16, num_samples=2, hidden=8, embed=8, passes=2,
                    relax_hidden=8)
    data = lo.make_data(cfg)
    batch = lo._batch(data["train"], np.arange(8))
    assert len(set(batch[1].tolist())) > 1              # ragged lengths: padding in play
    for est in lo.ESTIMATORS:
        torch.manual_seed(0)
        c = dataclasses.replace(cfg, estimator=est)
        model, parts = lo.ListOpsModel(c), lo._Parts(c)
        relax = None
        if est == "relax":
            from structdsl import estimators
            relax = estimators.RELAX(atom_shape=(16, 16), hidden=8)
        loss, _ = lo.training_loss(c, model, parts, batch, relax)
        loss.backward()
        gp = torch.cat([p.grad.flatten() for p in model.parser.parameters() if p.grad is not None])
        gr = torch.cat([p.grad.flatten() for p in model.reader.parameters() if p.grad is not None])
        assert torch.isfinite(gp).all() and gp.abs().sum() > 0, est
        assert torch.isfinite(gr).all() and gr.abs().sum() > 0, est
