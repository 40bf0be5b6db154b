"""The yardstick of issue "native speed": a spanning-tree sampler written by hand for one
structure, against which the generic compiler's numba code is measured.

Kruskal on the raw noise, per lane: draw one uniform per edge ``u < v`` inside the parallel
kernel (Numba's per-thread generator, seeded per lane), turn it into ``E = -log(U) /
exp(logit)``, heapify the edges in place and pop until ``n - 1`` edges have joined two
components (union-find with path halving).  Scratch (heap keys, heap edges, union-find) is
allocated once per lane chunk, not per lane.  It draws the same law as
``specs.spanning_tree`` (a different stream), and records the same trace (flat atom
indices ``u * n + v`` in race order).

Nothing here is used by the library: it is the bar a generic compiler should clear.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _sift_down(keys, items, start, size):
    i = start
    k, it = keys[i], items[i]
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and keys[c + 1] < keys[c]:
            c += 1
        if keys[c] >= k:
            break
        keys[i], items[i] = keys[c], items[c]
        i = c
    keys[i], items[i] = k, it


@njit(cache=True, inline="always")
def _find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(cache=True, parallel=True)
def kruskal_heap(logits, seed, trace, adjacency):
    """``logits [B, n, n]`` (upper triangle read) -> ``trace [B, n - 1]`` (flat edge
    indices) and ``adjacency [B, n, n]`` (bool, symmetric), both filled in place."""
    B, n = logits.shape[0], logits.shape[1]
    m = n * (n - 1) // 2
    chunks = min(B, 64)
    for c in prange(chunks):
        keys = np.empty(m, np.float64)
        items = np.empty(m, np.int64)
        parent = np.empty(n, np.int64)
        for b in range(c, B, chunks):
            np.random.seed(seed + b)
            size = 0
            for u in range(n):
                for v in range(u + 1, n):
                    keys[size] = -np.log(np.random.random()) * np.exp(-logits[b, u, v])
                    items[size] = u * n + v
                    size += 1
            for i in range(size // 2 - 1, -1, -1):
                _sift_down(keys, items, i, size)
            for i in range(n):
                parent[i] = i
            adjacency[b] = False
            joined = 0
            while joined < n - 1 and size > 0:
                e = items[0]
                size -= 1
                keys[0], items[0] = keys[size], items[size]
                _sift_down(keys, items, 0, size)
                u, v = e // n, e % n
                ru, rv = _find(parent, u), _find(parent, v)
                if ru != rv:
                    parent[ru] = rv
                    trace[b, joined] = e
                    adjacency[b, u, v] = True
                    adjacency[b, v, u] = True
                    joined += 1


def sample(logits, seed):
    """``logits [B, n, n]`` -> ``(trace [B, n - 1], adjacency [B, n, n])``."""
    logits = np.ascontiguousarray(logits, dtype=np.float64)
    B, n = logits.shape[0], logits.shape[1]
    trace = np.full((B, n - 1), -1, np.int64)
    adjacency = np.zeros((B, n, n), np.bool_)
    kruskal_heap(logits, seed, trace, adjacency)
    return trace, adjacency
