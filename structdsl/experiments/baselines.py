"""The baselines beside the score-function estimators, each written once.

Everything here is generic over a spec whose structure has a field of the atoms' shape (an
``embed`` function turns a structure record into that float array, 0 at invalid atoms),
except :func:`spanning_tree_marginals`, the matrix-tree theorem, which is inherently about
spanning trees.

* :func:`map_solver` — the MAP oracle of a spec: its own deterministic ``solve`` (public
  Program API) on weights that decrease with the scores.
* :func:`imle` — I-MLE (Niepert et al. 2021) with any ``solve(weights)`` callable:
  perturb-and-MAP forward, ``z - z'`` backward against the target distribution obtained by
  perturbing the scores with ``-lambda * dL/dz``.
* :func:`sst_spanning_tree` — SST's spanning-tree relaxation (Paulus et al. 2020): Gumbel
  perturbed utilities, Gibbs marginals at temperature ``t`` (soft), or the hard maximum
  spanning tree of the utilities with the marginals' gradient (straight-through).
* :class:`IndependentBernoulli` — independent Bernoulli atoms, the unstructured baseline.
* :func:`trace_kl` — ``KL(q(T) || p0(T))`` estimated from the trace's exact ``log_prob``,
  with a score-function surrogate for its gradient.
"""
from __future__ import annotations

import math

import numpy as np
import torch

import structdsl
from structdsl.estimators import score_surrogate

__all__ = ["valid_mask", "default_embed", "arborescence_embed", "map_solver", "sum_of_gamma", "gumbel", "imle",
           "spanning_tree_marginals", "sst_spanning_tree", "gumbel_kl", "IndependentBernoulli",
           "trace_kl", "compile_numba_or_numpy"]


# ---- specs' atoms, structures and MAP ------------------------------------------------------
def valid_mask(program, atom_shape):
    """bool ``[*atom_shape]``: the spec's valid atoms (public Program API: the instance)."""
    return np.array(program.instance(tuple(atom_shape)).valid, dtype=bool)      # a writable copy


def default_embed(structure, atom_shape, valid=None):
    """The structure record's first field of the atoms' shape, as float64 (0 at invalid
    atoms): ``adjacency`` for spanning trees, ``subset`` for top-k.  Specs without such a
    field need their own ``embed`` (e.g. :func:`arborescence_embed`)."""
    k = len(atom_shape)
    for name, field in zip(structure._fields, structure):
        f = torch.as_tensor(np.asarray(field)) if not torch.is_tensor(field) else field
        if tuple(f.shape[f.dim() - k:]) == tuple(atom_shape):
            out = f.to(torch.float64)
            if valid is not None:
                out = out * torch.as_tensor(valid, dtype=torch.float64, device=out.device)
            return out
    raise ValueError(f"no structure field has the atoms' shape {tuple(atom_shape)} "
                     f"(fields {structure._fields}); pass an embed function")


def arborescence_embed(structure, atom_shape=None, valid=None):
    """The arborescence spec's structure (``parent`` ``[..., n]``, -1 at the root and absent
    nodes; or the ``parent`` tensor itself) as its edge indicator ``[..., n, n]`` float64,
    ``[u, v] = 1`` iff ``parent[v] = u``: the atoms' layout (a :func:`map_solver` ``embed``)."""
    parent = structure.parent if hasattr(structure, "parent") else structure
    parent = parent if torch.is_tensor(parent) else torch.as_tensor(np.asarray(parent))
    n = parent.shape[-1]
    onehot = torch.nn.functional.one_hot(parent.clamp_min(0), n).to(torch.float64)    # [..., v, u]
    return (onehot * (parent >= 0)[..., None]).transpose(-1, -2)                      # [..., u, v]


def map_solver(program, embed=None):
    """``solve(scores)``: the spec's deterministic algorithm as a MAP oracle.

    ``scores`` ``[*batch, *atom_shape]`` (a tensor, larger = better); the spec's ``solve``
    runs on the raw weights ``1 + max(scores) - scores`` (per lane, over the valid atoms):
    positive and decreasing in the scores.  For order-based algorithms (Kruskal, top-k,
    sorting) this is the same output as ``solve(exp(-scores))`` (the race's own noise
    convention), i.e. the maximum-weight structure; for Chu-Liu/Edmonds, whose output depends
    on sums of weights, it is the maximum-weight arborescence.  Returns ``embed(structure)``
    as float64 ``[*batch, *atom_shape]`` on the scores' device (default :func:`default_embed`),
    with attribute ``last_structure`` holding the last structure record."""

    def solve(scores):
        s = scores.detach().to("cpu", torch.float64).numpy()
        k = program.atom_ndim
        atom_shape = s.shape[s.ndim - k:]
        valid = valid_mask(program, atom_shape)
        flat = s.reshape((-1,) + tuple(atom_shape))
        top = np.where(valid, flat, -np.inf).reshape(flat.shape[0], -1).max(axis=1)
        w = 1.0 + top.reshape((-1,) + (1,) * k) - flat
        w = np.where(valid, w, np.inf).reshape(s.shape)
        structure = program.solve(w).structure
        solve.last_structure = structure
        e = (embed or default_embed)(structure, atom_shape, valid)
        return torch.as_tensor(e, dtype=torch.float64).reshape(s.shape).to(scores.device)

    solve.last_structure = None
    return solve


# ---- noise ------------------------------------------------------------------------------------
def sum_of_gamma(shape, k, nb_iterations=10, dtype=torch.float64):
    """I-MLE's Sum-of-Gamma noise: ``(sum_{i=1..s} Gamma(shape 1/k, rate i/k) - log s) / k``
    with ``s = nb_iterations`` (torch's global generator); summed over ``k`` independent
    copies it is approximately a standard Gumbel."""
    out = torch.zeros(shape, dtype=dtype)
    conc = torch.full(shape, 1.0 / k, dtype=dtype)
    for i in range(1, nb_iterations + 1):
        out = out + torch._standard_gamma(conc) * (k / i)          # scale k / i = rate i / k
    return (out - math.log(nb_iterations)) / k


def gumbel(shape, generator=None, dtype=torch.float64):
    u = torch.rand(shape, generator=generator, dtype=dtype).clamp_(torch.finfo(dtype).tiny, 1.0)
    return -torch.log((-torch.log(u)).clamp_min(torch.finfo(dtype).tiny))


# ---- I-MLE --------------------------------------------------------------------------------------
class _IMLE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, solve, noise, lam, tau, scale):
        z = solve(theta.detach() + tau * noise)
        ctx.save_for_backward(theta.detach(), noise, z)
        ctx.solve, ctx.lam, ctx.tau, ctx.scale = solve, lam, tau, scale
        return z.to(theta.dtype)

    @staticmethod
    def backward(ctx, dy):
        theta, noise, z = ctx.saved_tensors
        target = theta - ctx.lam * dy.to(theta.dtype)           # theta' = theta - lambda dL/dz
        with torch.no_grad():
            z_prime = ctx.solve(target + ctx.tau * noise)       # the same noise
        g = z - z_prime
        if ctx.scale:
            g = g / ctx.lam
        return g.to(theta.dtype), None, None, None, None, None


def imle(theta, solve, lam=10.0, noise="sog", k=None, tau=1.0, scale=False, generator=None,
         nb_iterations=10):
    """I-MLE: ``z = MAP(theta + tau * eps)`` forward; backward ``z - MAP(theta - lambda dL/dz
    + tau * eps)`` (the same ``eps``), divided by ``lambda`` when ``scale`` (the
    ``--gradient-scaling`` option of torch-imle; off in I-MLE's default).

    theta: ``[*batch, *atom_shape]`` scores; solve: a MAP oracle (e.g. :func:`map_solver`);
    noise: ``"sog"`` (Sum-of-Gamma with ``k`` terms, ``k`` = the structure's size, e.g.
    ``n - 1`` edges of a spanning tree) or ``"gumbel"`` or ``None``.  Returns ``z`` (float,
    the structure's embedding)."""
    shape = theta.shape
    if noise == "sog":
        if k is None:
            raise ValueError("Sum-of-Gamma noise needs k (the number of atoms in a structure)")
        eps = sum_of_gamma(shape, k, nb_iterations)
    elif noise == "gumbel":
        eps = gumbel(shape, generator)
    elif noise is None:
        eps = torch.zeros(shape, dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise {noise!r}")
    return _IMLE.apply(theta, solve, eps.to(theta.device, torch.float64), float(lam), float(tau), bool(scale))


# ---- SST: spanning trees ----------------------------------------------------------------------
def spanning_tree_marginals(weights, max_range=math.inf):
    """Edge marginals of the Gibbs distribution ``p(T) ∝ exp(sum_{e in T} weights_e)`` over
    the spanning trees of K_n (the matrix-tree theorem): the gradient of ``log Z = log det
    L_minor`` with ``L = diag(W 1) - W``, ``W_uv = exp(weights_uv)`` for ``u != v``, and the
    minor deleting node 0's row and column.

    weights: ``[*batch, n, n]``, read at ``u < v`` (symmetrised here).  Returns ``[*batch,
    n, n]`` marginals at ``u < v`` (0 elsewhere), differentiable in ``weights`` (the graph
    is kept: ``create_graph=True``).  Computed in float64 with the maximum subtracted;
    ``max_range`` clips weights below ``max - max_range`` (SST's option; off by default)."""
    n = weights.shape[-1]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=weights.device), 1)
    x = weights.to(torch.float64)
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        xm = torch.where(upper, x, torch.full_like(x, -math.inf))
        c = xm.flatten(-2).max(-1).values[..., None, None]
        xs = x - c
        if max_range < math.inf:
            xs = torch.clamp(xs, min=-max_range)
        w = torch.where(upper, torch.exp(torch.where(upper, xs, 0.0)), 0.0)
        w = w + w.transpose(-1, -2)
        lap = torch.diag_embed(w.sum(-1)) - w
        logz = torch.logdet(lap[..., 1:, 1:]) + (n - 1) * c[..., 0, 0]
        (marg,) = torch.autograd.grad(logz.sum(), x, create_graph=True)
    return torch.where(upper, marg, 0.0).to(weights.dtype)


def sst_spanning_tree(theta, t=1.0, hard=False, solve=None, generator=None, max_range=math.inf):
    """SST's spanning-tree sample: utilities ``U = theta + Gumbel`` at ``u < v``; soft:
    the Gibbs marginals of ``U / t``; ``hard`` (straight-through): the maximum spanning tree
    of ``U`` (``solve``, the spec's MAP oracle) in the forward pass, the marginals' gradient in
    the backward pass.  Returns ``(z [*batch, n, n] at u < v, U)``."""
    g = gumbel(theta.shape, generator).to(theta.device)
    u = theta.to(torch.float64) + g
    soft = spanning_tree_marginals(u / t, max_range)
    if not hard:
        return soft, u
    h = solve(u.detach())
    return h + (soft - soft.detach()), u          # exactly h forward


def gumbel_kl(theta, valid, shift=False):
    """``KL(Gumbel(theta, 1) || Gumbel(0, 1)) = theta + exp(-theta) - 1`` summed over the
    valid atoms (SST's ``kl_gumbel`` counts each undirected edge twice, once per direction;
    :func:`structdsl.experiments.graph_layout.evaluate` states its convention).

    ``shift=True``: the minimum over a common shift ``theta + c`` (the race law, hence the
    tree's law, does not change when every logit moves by ``c``): ``sum(theta) + m c`` with
    ``c = log(sum exp(-theta) / m)``, ``m`` valid atoms.  Still an upper bound on the tree's
    KL (data processing), and the fair one for logits trained without this KL."""
    v = torch.as_tensor(valid, device=theta.device)
    dims = tuple(range(theta.dim() - v.dim(), theta.dim()))
    if shift:
        m = int(v.sum())
        t = torch.where(v, theta, 0.0)
        c = torch.logsumexp(torch.where(v, -theta, -math.inf), dim=dims) - math.log(m)
        return t.sum(dims) + m * c
    k = theta + torch.exp(-theta) - 1.0
    return torch.where(v, k, 0.0).sum(dims)


# ---- independent Bernoulli atoms --------------------------------------------------------------
class IndependentBernoulli:
    """Independent ``Bernoulli(sigmoid(theta))`` at the valid atoms (the unstructured
    baseline), prior ``Bernoulli(1/2)`` (logit 0)."""

    def __init__(self, theta, valid):
        self.theta = theta
        self.valid = torch.as_tensor(valid, device=theta.device)
        self.atom_dims = self.valid.dim()

    def sample(self, k, generator=None):
        p = torch.sigmoid(self.theta.detach())
        u = torch.rand((k,) + tuple(p.shape), generator=generator, dtype=p.dtype)
        return ((u < p) & self.valid).to(p.dtype)

    def log_prob(self, z):
        lp = -torch.nn.functional.binary_cross_entropy_with_logits(
            self.theta.expand(z.shape), z, reduction="none")
        return torch.where(self.valid, lp, 0.0).flatten(z.dim() - self.atom_dims).sum(-1)

    def kl_to_uniform(self):
        """Exact ``KL(q || Bernoulli(1/2)^A)`` per batch element."""
        p = torch.sigmoid(self.theta)
        lp, lq = torch.nn.functional.logsigmoid(self.theta), torch.nn.functional.logsigmoid(-self.theta)
        k = p * lp + (1 - p) * lq + math.log(2.0)
        return torch.where(self.valid, k, 0.0).flatten(self.theta.dim() - self.atom_dims).sum(-1)

    def map(self):
        return ((self.theta.detach() > 0) & self.valid).to(self.theta.dtype)


# ---- KL of the trace law ------------------------------------------------------------------------
def trace_kl(dist, prior, num_samples=4, score="trace"):
    """``KL(q(T) || p0(T))`` between two race distributions of one spec (``dist`` and
    ``prior``, e.g. the encoder's logits and all-zero logits), from ``num_samples`` fresh
    traces per batch element and their exact ``log_prob``.

    Returns ``(surrogate, kl)``: ``kl`` ``[K, *batch]`` the per-sample values ``log q(T) -
    log p0(T)`` (detached); ``surrogate`` a scalar whose value is their mean and whose
    gradient in ``dist.logits`` is the leave-one-out score-function estimate of the gradient
    of the batch mean of the KL (``E[(log q - log p0) d log q] + E[d log q]``, the second
    term 0 in expectation and dropped): with the trace's score (``score="trace"``) or the
    exponential noise's score (``"noise"``, as E-REINFORCE scores)."""
    K = int(num_samples)
    if score == "trace":
        trace = dist.sample((K,))
        s = dist.log_prob(trace)
        lq = s.detach()
    elif score == "noise":
        trace, noise = dist.sample_with_noise((K,))
        s = dist.noise_log_prob(noise.detach())
        lq = dist.log_prob(trace).detach()
    else:
        raise ValueError(f"score must be 'trace' or 'noise', got {score!r}")
    kl = lq - prior.log_prob(trace).detach()
    return score_surrogate(kl, s, loo=K >= 2), kl


def compile_numba_or_numpy(spec, **static):
    """The spec compiled for the numba backend when numba is installed, else NumPy (for
    ``solve`` in the MAP oracle)."""
    import importlib.util
    backend = "numba" if importlib.util.find_spec("numba") is not None else "numpy"
    return structdsl.compile(spec, backend=backend, **static)


# ---- SST: arborescences (appended for experiment 2) -----------------------------------------
def arborescence_marginals(weights, root=0, mask=None):
    """Edge marginals of the Gibbs distribution ``p(A) ∝ exp(sum_{(u -> v) in A} weights_uv)``
    over the spanning arborescences rooted at ``root`` (the directed matrix-tree theorem, Koo et
    al. 2007; Tutte): ``log Z = log det L_minor`` with the in-degree Laplacian ``L_vv = sum_u
    W_uv``, ``L_uv = -W_uv`` (``u != v``), ``W_uv = exp(weights_uv)``, and the minor deleting
    the root's row and column; the marginals are ``∂ log Z / ∂ weights`` by autograd with
    ``create_graph=True`` (differentiable again), in float64.

    weights: ``[*batch, n, n]``, entry ``[u, v]`` the edge ``u -> v``, read at ``u != v``,
    ``v != root`` (the arborescence spec's valid atoms); ``-inf`` removes an edge.  mask: bool
    ``[*batch, n]``, the present nodes (the root always is); absent nodes take no part (their
    edges are ignored, whatever they hold).  Default: a node is present when one of its
    valid edges (in or out) is above ``-inf``, the arborescence spec's padding rule.  Every
    present node must be reachable from the root through edges above ``-inf`` (else ``Z = 0``).
    Stabilised by subtracting each node's largest incoming weight (every arborescence has one
    edge into each present non-root node, so ``log Z`` shifts by their sum).  Returns
    ``[*batch, n, n]`` marginals, 0 at removed, invalid and absent edges; each present
    non-root node's column sums to 1."""
    n = weights.shape[-1]
    dev = weights.device
    x = weights.to(torch.float64)
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    idx = torch.arange(n, device=dev)
    valid = (idx[:, None] != idx[None, :]) & (idx[None, :] != root)
    live = valid & (x.detach() > -math.inf)
    if mask is None:
        present = live.any(-1) | live.any(-2)
    else:
        present = torch.as_tensor(mask, dtype=torch.bool, device=dev).expand(x.shape[:-1])
    present = present | (idx == root)
    live = live & present[..., :, None] & present[..., None, :]
    with torch.enable_grad():
        c = torch.where(live, x, -math.inf).amax(-2, keepdim=True).detach()      # [*, 1, n]
        c = torch.where(c > -math.inf, c, 0.0)
        w = torch.exp(torch.where(live, x - c, -math.inf))                         # 0 where not live
        lap = torch.diag_embed(w.sum(-2) + (~present).to(torch.float64)) - w      # absent: identity
        keep = torch.cat([idx[:root], idx[root + 1:]])
        minor = lap.index_select(-2, keep).index_select(-1, keep)
        shift = torch.where(present & (idx != root), c[..., 0, :], 0.0).sum(-1)
        logz = torch.logdet(minor) + shift
        (marg,) = torch.autograd.grad(logz.sum(), x, create_graph=True)
    return torch.where(live, marg, 0.0).to(weights.dtype)


def sst_arborescence(theta, t=1.0, hard=False, solve=None, generator=None, mask=None, root=0):
    """SST's arborescence sample (Paulus et al. 2020): utilities ``U = theta + Gumbel`` (``-inf``
    stays ``-inf``); soft: the Gibbs edge marginals of ``U / t`` (:func:`arborescence_marginals`);
    ``hard`` (straight-through): the maximum-weight arborescence of ``U`` (``solve``, e.g.
    :func:`map_solver` of the arborescence spec, Chu-Liu/Edmonds) in the forward pass, the
    marginals' gradient in the backward pass.  Returns ``(z [*batch, n, n], U)``, ``z[u, v]``
    for the edge ``u -> v``."""
    g = gumbel(theta.shape, generator).to(theta.device)
    u = theta.to(torch.float64) + g
    soft = arborescence_marginals(u / t, root=root, mask=mask)
    if not hard:
        return soft, u
    if solve is None:
        raise ValueError("the straight-through sample needs solve (the MAP oracle)")
    h = solve(u.detach())
    return h + (soft - soft.detach()), u          # exactly h forward


__all__ += ["arborescence_marginals", "sst_arborescence"]
