"""The graph-layout data of SST's NRI experiment, generated on the fly (batched NumPy).

One example (Paulus et al. 2020, "Gradient estimation with stochastic softmax tricks",
``data_scripts/generate_graph_layout_dataset.py``):

1. the hidden graph is the **maximum spanning tree of K_n under i.i.d. standard Gumbel edge
   weights** (Kruskal);
2. initial positions ``x_0 ~ N(0, I)`` in 2-D (never part of the data);
3. every frame is **one Fruchterman-Reingold step** as networkx's ``spring_layout(G,
   pos=previous, iterations=1)`` computes it, then networkx's rescaling: the first frame is
   one step from ``x_0``, each later frame one step from the previous frame; ``T`` frames;
4. the data are the positions only (no velocities), ``[B, n, T, 2]``;
5. min-max normalised to ``[-1, 1]`` with the training set's minimum and maximum over all
   coordinates (:func:`normalise`).

One Fruchterman-Reingold step (networkx 3.x ``_fruchterman_reingold`` with ``iterations=1``,
unit edge weights, no fixed nodes), for positions ``p`` ``[n, 2]`` and adjacency ``A``:

* ``k = sqrt(1 / n)`` (the optimal distance), temperature ``t = 0.1 * max(width, height)``
  of the bounding box of ``p``;
* ``delta_ij = p_i - p_j``, ``d_ij = max(|delta_ij|, 0.01)``;
* ``disp_i = sum_j delta_ij (k^2 / d_ij^2 - A_ij d_ij / k)``;
* ``p_i += disp_i * t / max(|disp_i|, 0.01)`` (every node moves by ``t``, unless its
  displacement is shorter than 0.01);
* rescale (``rescale_layout``, scale 1, centre 0): subtract the mean of each axis, divide
  by the largest absolute coordinate.

:func:`tests.test_experiments` holds this module to networkx to 1e-12.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["GraphLayoutData", "maximum_spanning_trees", "fruchterman_reingold_step", "simulate",
           "generate", "normalise", "make_splits"]


class GraphLayoutData(NamedTuple):
    positions: np.ndarray       # float64 [B, n, T, 2]
    adjacency: np.ndarray       # bool [B, n, n], symmetric: the hidden tree


def maximum_spanning_trees(weights):
    """Kruskal, batched: the maximum spanning tree of each ``[n, n]`` weight matrix (read
    at ``u < v``).  weights: ``[B, n, n]``.  Returns bool ``[B, n, n]`` symmetric.

    Edges are taken in decreasing weight (a stable sort: ties by the order ``(0,1), (0,2),
    ..., (n-2, n-1)``); an edge is kept when its endpoints lie in different components."""
    w = np.asarray(weights, dtype=np.float64)
    B, n, _ = w.shape
    iu, iv = np.triu_indices(n, 1)
    order = np.argsort(-w[:, iu, iv], axis=1, kind="stable")          # [B, m]
    comp = np.broadcast_to(np.arange(n), (B, n)).copy()
    adjacency = np.zeros((B, n, n), dtype=bool)
    rows = np.arange(B)
    for r in range(order.shape[1]):
        e = order[:, r]
        u, v = iu[e], iv[e]
        cu, cv = comp[rows, u], comp[rows, v]
        join = cu != cv
        adjacency[rows[join], u[join], v[join]] = True
        adjacency[rows[join], v[join], u[join]] = True
        # relabel v's component as u's (for the lanes that join)
        comp = np.where(join[:, None] & (comp == cv[:, None]), cu[:, None], comp)
    return adjacency


def fruchterman_reingold_step(pos, adjacency):
    """One step of networkx's Fruchterman-Reingold with its rescaling, batched.

    pos: ``[B, n, 2]``; adjacency: ``[B, n, n]`` (0/1).  Returns the new ``[B, n, 2]``
    (the same floating-point operations as networkx 3.x, in the same order)."""
    pos = np.array(pos, dtype=np.float64)                    # a copy: updated in place
    A = np.asarray(adjacency, dtype=np.float64)
    n = pos.shape[1]
    k = np.sqrt(1.0 / n)
    extent = pos.max(axis=1) - pos.min(axis=1)                # [B, 2]
    t = np.maximum(extent[:, 0], extent[:, 1]) * 0.1          # [B]
    delta = pos[:, :, np.newaxis, :] - pos[:, np.newaxis, :, :]
    distance = np.linalg.norm(delta, axis=-1)
    np.clip(distance, 0.01, None, out=distance)
    displacement = np.einsum("bijk,bij->bik", delta, (k * k / distance ** 2 - A * distance / k))
    length = np.linalg.norm(displacement, axis=-1)
    length = np.clip(length, a_min=0.01, a_max=None)
    delta_pos = np.einsum("bij,bi->bij", displacement, t[:, None] / length)
    pos += delta_pos
    # rescale_layout(pos, scale=1) + center (0)
    pos -= pos.mean(axis=1, keepdims=True)
    lim = np.abs(pos).max(axis=(1, 2))
    scale = np.where(lim > 0, 1.0 / np.where(lim > 0, lim, 1.0), 1.0)
    pos *= scale[:, None, None]
    return pos


def simulate(adjacency, initial, num_frames=10):
    """Frames ``[B, n, T, 2]``: the first is one step from ``initial`` ``[B, n, 2]``, each
    later one a step from the previous frame."""
    frames = []
    pos = initial
    for _ in range(num_frames):
        pos = fruchterman_reingold_step(pos, adjacency)
        frames.append(pos)
    return np.stack(frames, axis=2)


def generate(num, seed, n=10, num_frames=10, dims=2, chunk=4096):
    """``num`` examples from ``numpy.random.default_rng(seed)``: Gumbel weights of every
    edge, then the initial positions, drawn chunk by chunk.  Returns :class:`GraphLayoutData`
    (positions not yet normalised)."""
    if dims != 2:
        raise ValueError("the Fruchterman-Reingold temperature here reads a 2-D bounding box")
    rng = np.random.default_rng(seed)
    positions, adjacency = [], []
    for start in range(0, num, chunk):
        b = min(chunk, num - start)
        gumbel = rng.gumbel(size=(b, n, n))
        adj = maximum_spanning_trees(gumbel)
        x0 = rng.standard_normal((b, n, dims))
        positions.append(simulate(adj, x0, num_frames))
        adjacency.append(adj)
    return GraphLayoutData(np.concatenate(positions), np.concatenate(adjacency))


def normalise(train, *others):
    """Min-max normalise to ``[-1, 1]`` with the training set's min and max (over every
    coordinate, as SST's loader does).  Returns the normalised arrays and ``(lo, hi)``."""
    lo, hi = float(train.min()), float(train.max())
    f = lambda x: (x - lo) * 2.0 / (hi - lo) - 1.0          # noqa: E731
    return (f(train),) + tuple(f(o) for o in others) + ((lo, hi),)


def make_splits(num_train, num_test, seed, n=10, num_frames=10, num_valid=0):
    """Train / (valid) / test sets from independent seeds (``seed``, ``seed + 1``, ``seed +
    2`` via ``SeedSequence`` spawning), normalised with the training set's range.  Returns a
    dict ``{"train": GraphLayoutData, "test": ..., ["valid": ...], "range": (lo, hi)}``."""
    seeds = np.random.SeedSequence(seed).spawn(3)
    train = generate(num_train, seeds[0], n, num_frames)
    test = generate(num_test, seeds[1], n, num_frames)
    parts = [train.positions, test.positions]
    valid = generate(num_valid, seeds[2], n, num_frames) if num_valid else None
    if valid is not None:
        parts.append(valid.positions)
    normed = normalise(*parts)
    out = {"train": GraphLayoutData(normed[0], train.adjacency),
           "test": GraphLayoutData(normed[1], test.adjacency), "range": normed[-1]}
    if valid is not None:
        out["valid"] = GraphLayoutData(normed[2], valid.adjacency)
    return out
