"""Independent reference solvers for the deterministic algorithms (test-only dependencies).

Each takes raw weights of the atoms' shape and returns the structure as a dict of fields.
None of them uses structdsl.
"""
import networkx as nx
import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform


def categorical(w):
    return {"index": int(np.argmin(w))}


def permutation(w):
    order = np.argsort(w, kind="stable")
    return {"order": order, "rank": np.argsort(order)}


def top_k(w, k):
    order = np.argsort(w, kind="stable")[:k]
    subset = np.zeros(len(w), bool)
    subset[order] = True
    return {"order": order, "subset": subset}


def spanning_tree(w):
    n = len(w)
    g = nx.Graph()
    g.add_weighted_edges_from((u, v, w[u, v]) for u in range(n) for v in range(u + 1, n))
    adj = np.zeros((n, n), bool)
    for u, v in nx.minimum_spanning_tree(g, algorithm="kruskal").edges:
        adj[u, v] = adj[v, u] = True
    return {"adjacency": adj}


def arborescence(w, root=0):
    n = len(w)
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    # no edge enters the root, so the root of any spanning arborescence is `root`
    g.add_weighted_edges_from((u, v, w[u, v]) for u in range(n) for v in range(n)
                              if u != v and v != root)
    parent = np.full(n, -1)
    for u, v in nx.minimum_spanning_arborescence(g).edges:
        parent[v] = u
    return {"parent": parent}


def cartesian_tree(w):
    """Classic stack construction of the min-Cartesian tree (O(n))."""
    n = len(w)
    parent, left, right = np.full(n, -1), np.full(n, -1), np.full(n, -1)
    stack = []
    for i in range(n):
        last = -1
        while stack and w[stack[-1]] > w[i]:
            last = stack.pop()
        if last >= 0:
            parent[last] = i
            left[i] = last
        if stack:
            parent[i] = stack[-1]
            right[stack[-1]] = i
        stack.append(i)
    return {"parent": parent, "left": left, "right": right}


def greedy_matching(w):
    """Sort all cells, take a cell whenever its row and column are both free."""
    d = len(w)
    match, rows, cols = np.full(d, -1), set(), set()
    for flat in np.argsort(w, axis=None, kind="stable"):
        i, j = divmod(int(flat), d)
        if i not in rows and j not in cols:
            match[i] = j
            rows.add(i)
            cols.add(j)
    return {"match": match}


def single_linkage(w, c):
    """scipy's single-linkage clustering cut at c clusters; labels = smallest member."""
    n = len(w)
    d = np.triu(w, 1)
    d = d + d.T
    clusters = fcluster(linkage(squareform(d, checks=False), method="single"), c, criterion="maxclust")
    label = np.array([min(np.flatnonzero(clusters == clusters[v])) for v in range(n)])
    return {"label": label}
