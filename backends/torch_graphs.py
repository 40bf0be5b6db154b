"""CUDA-graph capture and replay for the torch backend's calls.

The lock-step interpreter issues many small kernels from Python on every call; on CUDA a
repeated call (same kind, input shapes and device) is captured once as a CUDA graph and then
replayed, so that Python and the launches are paid once.  :class:`GraphedCalls` is the
``Program`` mixin that decides when a graph may serve a call and keeps a small LRU cache of
graphs per program; :class:`_GraphedScore` gives a replayed ``log_prob`` its analytic
gradient as autograd's backward.
"""
from __future__ import annotations

import torch

_GRAPH_LIMIT = 8            # CUDA graphs kept per program


def _capture(fn, inputs):
    """(static inputs, graph, static outputs): ``fn`` captured as a CUDA graph on copies of
    ``inputs``, after one warm-up run on a side stream (it fills the program's caches of
    device constants, whose host-to-device copies a capture must not make)."""
    device = inputs[0].device
    static_in = tuple(t.detach().clone() for t in inputs)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn(*static_in)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_in)
    return static_in, graph, static_out


class _GraphedScore(torch.autograd.Function):
    """log p from a graph replay whose backward is the replayed analytic gradient.  A
    backward that must itself be differentiable (``create_graph=True``, e.g. RELAX's critic
    gradient) recomputes log p eagerly and differentiates that instead."""

    @staticmethod
    def forward(ctx, x, logp, grad, eager):
        ctx.save_for_backward(x, grad)
        ctx.eager = eager
        return logp.clone()

    @staticmethod
    def backward(ctx, g):
        x, grad = ctx.saved_tensors
        if torch.is_grad_enabled():
            with torch.enable_grad():
                lp = ctx.eager(x)
                (gx,) = torch.autograd.grad(torch.where(torch.isfinite(lp), lp, 0.0), x, g, create_graph=True)
            return gx, None, None, None
        return g[:, None] * grad, None, None, None


class GraphedCalls:
    """CUDA graphs for a :class:`torch_backend.Program`: it reads the program's
    ``cuda_graphs`` switch and keeps the graphs in its ``_graph_cache`` (an OrderedDict)."""

    def _graphs_apply(self, *tensors):
        """Whether a call on these tensors may replay a CUDA graph: plain tensors on a CUDA
        device (a subclass, e.g. Pyro's provenance tracking, must see every op), outside
        another capture, and ``cuda_graphs`` on."""
        return (self.cuda_graphs and tensors[0].is_cuda and all(type(t) is torch.Tensor for t in tensors)
                and not torch.cuda.is_current_stream_capturing())

    def _graphed(self, key, fn, inputs):
        """``fn(*inputs)``: a tuple of tensors computed without autograd state leaking out.
        The first call with a given key and input shapes runs eagerly, the second captures
        a CUDA graph of ``fn`` (after a warm-up run on a side stream), later ones copy the
        inputs into the graph's buffers and replay it: the lock-step interpreter's Python
        and kernel launches are paid once.  Outputs are fresh tensors (clones of the
        graph's).  At most ``_GRAPH_LIMIT`` graphs per program, least recently used first
        out (each holds the memory of one call).  A graph's buffers belong to its program:
        one program must not run calls from two threads at once on CUDA (compile one per
        thread)."""
        # inference mode makes inference tensors, which a later normal call could not refill
        key = key + tuple((tuple(t.shape), t.dtype) for t in inputs) + (
            str(inputs[0].device), torch.is_inference_mode_enabled())
        entry = self._graph_cache.get(key)
        with torch.no_grad():
            if entry is None:
                self._graph_cache[key] = "seen"
                while len(self._graph_cache) > _GRAPH_LIMIT:
                    self._graph_cache.popitem(last=False)
                return fn(*inputs)
            self._graph_cache.move_to_end(key)
            if entry == "seen":
                entry = self._graph_cache[key] = _capture(fn, inputs)
            static_in, graph, static_out = entry
            for buf, t in zip(static_in, inputs):
                buf.copy_(t)
            graph.replay()
            return tuple(o.clone() for o in static_out)

    def _run_body(self, key, fn, inputs, graphs=True):
        """``fn(*inputs)``, through :meth:`_graphed` where a graph may serve (``graphs`` and
        :meth:`_graphs_apply`), else eagerly (autograd sees it)."""
        if graphs and self._graphs_apply(*inputs):
            return self._graphed(key, fn, tuple(t.detach() for t in inputs))
        return fn(*inputs)
