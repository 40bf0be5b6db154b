"""NRI's factor-graph MLP encoder and MLP interaction decoder (Kipf et al. 2018), as SST's
graph-layout experiment uses them (``modules.py`` of SST / torch-adaptive-imle).

Shapes: ``x`` ``[B, n, T, d]`` trajectories; the ``n (n - 1)`` directed edges are listed
receiver-major as NRI's ``rel_rec`` / ``rel_send`` one-hot matrices list them (off-diagonal
``(i, j)`` pairs of ``np.where(ones - eye)``, receiver ``i``, sender ``j``); here they are
gathers instead of one-hot matmuls (the same numbers).

* :class:`Encoder`: node MLP -> edge MLP (``[sender, receiver]``) -> node (mean of the
  incoming edges, NRI's ``edge2node``: the sum divided by ``n``) -> node MLP -> edge MLP on
  ``[sender, receiver, skip]`` -> one logit per directed edge; :func:`edge_logits` averages
  the two directions (SST's ``maybe_make_logits_symmetric``) into ``[B, n, n]``.
* :class:`Decoder`: one message MLP per edge type (type 0 = "no edge", type 1 = "edge"; both
  carry messages, NRI's ``skip_first=False``), weighted by the edge's type probabilities,
  summed at the receiver, an output MLP predicts the change of position; rolled forward
  from the first frame (training) or one step from every true frame (teacher forcing).
* :func:`gaussian_nll`: SST's ``nll_gaussian``: ``sum (pred - target)^2 / (2 var)`` over
  nodes, frames and coordinates, divided by ``n`` (no constant).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "Encoder", "Decoder", "edge_index", "edge_logits", "edge_types_from_adjacency",
           "gaussian_nll"]


def edge_index(n, device=None):
    """``(receivers, senders)``: the directed edges of K_n in NRI's order."""
    off = np.ones((n, n)) - np.eye(n)
    rec, send = np.where(off)
    return torch.as_tensor(rec, device=device), torch.as_tensor(send, device=device)


class MLP(nn.Module):
    """NRI's two-layer ELU MLP with batch norm over ``[B, things, features]``."""

    def __init__(self, n_in, n_hid, n_out, batch_norm=True):
        super().__init__()
        self.fc1 = nn.Linear(n_in, n_hid)
        self.fc2 = nn.Linear(n_hid, n_out)
        self.bn = nn.BatchNorm1d(n_out) if batch_norm else None
        for m in (self.fc1, self.fc2):
            nn.init.xavier_normal_(m.weight)
            m.bias.data.fill_(0.1)

    def forward(self, x):
        x = F.elu(self.fc2(F.elu(self.fc1(x))))
        if self.bn is None:
            return x
        B, N, H = x.shape
        return self.bn(x.reshape(B * N, H)).reshape(B, N, H)


class Encoder(nn.Module):
    """NRI's factor-graph MLP encoder: ``[B, n, T, d]`` -> ``[B, n (n - 1)]`` logits."""

    def __init__(self, n, n_in, hidden=64, n_out=1):
        super().__init__()
        self.n = n
        self.mlp1 = MLP(n_in, hidden, hidden)
        self.mlp2 = MLP(hidden * 2, hidden, hidden)
        self.mlp3 = MLP(hidden, hidden, hidden)
        self.mlp4 = MLP(hidden * 3, hidden, hidden)
        self.fc_out = nn.Linear(hidden, n_out)
        nn.init.xavier_normal_(self.fc_out.weight)
        self.fc_out.bias.data.fill_(0.1)
        rec, send = edge_index(n)
        self.register_buffer("rec", rec, persistent=False)
        self.register_buffer("send", send, persistent=False)

    def node2edge(self, x):
        return torch.cat([x[:, self.send], x[:, self.rec]], dim=-1)

    def edge2node(self, e):
        out = torch.zeros(e.shape[0], self.n, e.shape[2], dtype=e.dtype, device=e.device)
        out.index_add_(1, self.rec, e)
        return out / self.n

    def forward(self, x):
        B = x.shape[0]
        h = self.mlp1(x.reshape(B, self.n, -1))
        h = self.mlp2(self.node2edge(h))
        skip = h
        h = self.mlp3(self.edge2node(h))
        h = self.mlp4(torch.cat([self.node2edge(h), skip], dim=-1))
        return self.fc_out(h).squeeze(-1)


def edge_logits(directed, n):
    """``[B, n (n - 1)]`` directed logits -> ``[B, n, n]`` symmetric (the mean of both
    directions), 0 on the diagonal."""
    rec, send = edge_index(n, directed.device)
    full = directed.new_zeros(directed.shape[0], n, n)
    full[:, rec, send] = directed
    return (full + full.transpose(1, 2)) / 2


def edge_types_from_adjacency(z):
    """``[*, n, n]`` edge indicator (hard or relaxed, symmetric) -> ``[*, n (n - 1), 2]``
    type probabilities ``(no edge, edge)`` in NRI's directed-edge order."""
    n = z.shape[-1]
    rec, send = edge_index(n, z.device)
    e = z[..., rec, send]
    return torch.stack([1.0 - e, e], dim=-1)


class Decoder(nn.Module):
    """NRI's MLP interaction decoder with ``edge_types`` message MLPs."""

    def __init__(self, n, dims=2, hidden=64, edge_types=2, skip_first=False):
        super().__init__()
        self.n = n
        self.skip_first = skip_first      # NRI's option: type 0 ("no edge") carries no message
        self.msg_fc1 = nn.ModuleList([nn.Linear(2 * dims, hidden) for _ in range(edge_types)])
        self.msg_fc2 = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(edge_types)])
        self.out_fc1 = nn.Linear(dims + hidden, hidden)
        self.out_fc2 = nn.Linear(hidden, hidden)
        self.out_fc3 = nn.Linear(hidden, dims)
        rec, send = edge_index(n)
        self.register_buffer("rec", rec, persistent=False)
        self.register_buffer("send", send, persistent=False)

    def step(self, x, rel_type):
        """One step: x ``[..., n, d]``, rel_type ``[..., n (n - 1), types]`` (broadcast over
        a frame dim if x has one more) -> the next positions."""
        pre = torch.cat([x[..., self.send, :], x[..., self.rec, :]], dim=-1)
        msgs = 0
        for i in range(int(self.skip_first), len(self.msg_fc1)):
            m = F.relu(self.msg_fc2[i](F.relu(self.msg_fc1[i](pre))))
            msgs = msgs + m * rel_type[..., i:i + 1]
        agg = torch.zeros(x.shape[:-1] + (msgs.shape[-1],), dtype=x.dtype, device=x.device)
        agg.index_add_(x.dim() - 2, self.rec, msgs)
        h = F.relu(self.out_fc1(torch.cat([x, agg], dim=-1)))
        h = F.relu(self.out_fc2(h))
        return x + self.out_fc3(h)

    def rollout(self, x0, rel_type, steps):
        """From ``x0`` ``[B, n, d]``: ``[B, n, steps, d]`` predicted frames."""
        preds, x = [], x0
        for _ in range(steps):
            x = self.step(x, rel_type)
            preds.append(x)
        return torch.stack(preds, dim=2)

    def teacher_forced(self, frames, rel_type):
        """One step from every true frame but the last: ``[B, n, T, d]`` -> ``[B, n, T - 1, d]``."""
        x = frames[:, :, :-1].transpose(1, 2)                  # [B, T-1, n, d]
        out = self.step(x, rel_type.unsqueeze(1))
        return out.transpose(1, 2)


def gaussian_nll(pred, target, variance):
    """SST's ``nll_gaussian``: ``sum((pred - target)^2) / (2 variance) / n`` per example
    (``pred``, ``target`` ``[..., n, T, d]`` -> ``[...]``)."""
    n = target.shape[-3]
    return ((pred - target) ** 2).sum((-1, -2, -3)) / (2 * variance) / n
