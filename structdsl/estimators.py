"""Gradient estimators for any spec, shaped as surrogate losses.

After any upstream network that outputs the logits of a
:class:`~structdsl.torch.RaceDistribution`::

    loss = estimators.t_reinforce(dist, f, num_samples=3)   # or e_reinforce, relax(dist, f), ...
    loss.backward()

``f`` receives the structure record (the spec's fields as tensors with leading dims
``sample_shape + batch_shape``, ``sample_shape = (num_samples,)``) and returns per-sample
losses of exactly that shape.  Every estimator returns a scalar whose **value** is the mean
sampled loss and whose **gradient** is:

* in the logits: an estimate of ``d/d logits mean_batch E[f(structure)]`` (the batch's mean);
* in ``f``'s own parameters: the pathwise gradient of the mean sampled loss (``f`` may have
  parameters trained through the same loss);
* in a RELAX critic's parameters: the gradient of the estimator's variance (see :class:`RELAX`).

Which are unbiased, and why:

* ``e_reinforce`` (score of the noise ``E``) and ``t_reinforce`` (score of the trace ``T``)
  are unbiased: ``E[f * d log p] = d E[f]`` for any density.  ``t_reinforce`` is the
  conditional expectation of ``e_reinforce`` given ``T`` (the structure is a function of
  ``T``, and ``E[d log p(E) | T] = d log p(T)``), so its variance is never larger.
* ``num_samples=K`` means the same in every estimator: ``K`` samples per batch element,
  averaged into one estimate.  Whether the samples share a baseline is a separate argument,
  ``leave_one_out``: each sample's loss is compared with the mean of the *other* ``K - 1``,
  which is independent of that sample, so the baseline adds no bias.  The estimate is
  ``1/K sum_k (f_k - mean_{j!=k} f_j) score_k = 1/(K-1) sum_k (f_k - mean_j f_j) score_k``;
  without it, ``K`` plain estimates are averaged.  Defaults: ``t_reinforce`` and
  ``e_reinforce`` use it when ``K > 1`` ("T-REINFORCE+"); :class:`RELAX`, whose critic is its
  control variate, does not unless asked (``leave_one_out=True``: the leave-one-out baseline
  on top of the critic, still unbiased).
* :class:`RELAX` with the reparameterised conditional noise ``E~ ~ E | T`` is unbiased for
  any critic ``c``: ``E[c(E~) d log p(T)] = E[d c(E)] - E[d c(E~)]`` (the control variate has
  mean zero), so the critic can be trained freely to cut the variance.
* :func:`exact_gradient` enumerates every trace (small sizes) and is exact.

Precision: for float16/bfloat16 logits (``torch.autocast``) every estimator works on the
distribution's float32 version (:meth:`~structdsl.torch.RaceDistribution.in_working_precision`):
the draw, the scores and the estimate are computed in float32 (float64 on the CPU fast
path) and the gradient reaches the logits in their own dtype, rounded once.

The estimators use only the distribution's public methods (``sample_and_score``,
``sample_with_structure``, ``log_prob``, ``conditional_noise``, ``noise_log_prob``,
``enumerate_supports``, ``cpu_fast_path``), so any distribution that provides them works.
"""
from __future__ import annotations

import math

import numpy as np

import torch
from torch import nn

from .eager import eager

__all__ = ["t_reinforce", "e_reinforce", "RELAX", "exact_gradient", "MLPCritic", "score_surrogate"]


def t_reinforce(dist, f, num_samples=1, leave_one_out=None, generator=None):
    """Surrogate loss of T-REINFORCE (the score of the trace): ``num_samples`` samples per
    batch element, "T-REINFORCE+" for ``num_samples > 1`` (the leave-one-out baseline unless
    ``leave_one_out=False``).  Unbiased.  ``generator``: the ``torch.Generator`` the draw
    uses (default: torch's global stream), e.g. one per rank under ``torch.distributed``.

    Under ``torch.compile`` the graph breaks at the draw only: ``f`` and the surrogate are
    traced, with ``dist.log_prob`` as a custom operator on the CPU fast path when the
    distribution does not validate its arguments (see :mod:`structdsl.ops`); eagerly, one
    native call draws and scores the traces.  Both give the same estimate."""
    K, loo = _samples(num_samples, leave_one_out)
    dist = dist.in_working_precision()
    lead = (K,) + dist.batch_shape
    if not torch.compiler.is_compiling() and dist.cpu_fast_path:   # one native call draws and scores
        s = dist.sample_and_score((K,), generator, score="trace")
        return _NativeScoreSurrogate.apply(_losses(f, s.structure, lead, screen=False), dist.logits,
                                           s.array("score").reshape(-1, dist.instance.num_atoms), loo)
    s = dist.sample_with_structure((K,), generator)     # lock-step or compiled: autograd through log p
    losses = _losses(f, s.structure, lead)
    return score_surrogate(losses, dist.log_prob(s.trace), loo)


@eager
def e_reinforce(dist, f, num_samples=1, leave_one_out=None, generator=None):
    """Surrogate loss of E-REINFORCE (the score of the exponential noise
    ``dist.noise_log_prob(E)``): ``num_samples`` samples per batch element, "E-REINFORCE+"
    for ``num_samples > 1``.  Unbiased, but its variance is never below T-REINFORCE's:
    prefer :func:`t_reinforce`.  ``generator`` as for :func:`t_reinforce`."""
    K, loo = _samples(num_samples, leave_one_out)
    dist = dist.in_working_precision()
    lead = (K,) + dist.batch_shape
    if dist.cpu_fast_path:       # the noise's score is 1 - E_1 per live atom
        s = dist.sample_and_score((K,), generator, score="noise")
        return _NativeScoreSurrogate.apply(_losses(f, s.structure, lead, screen=False), dist.logits,
                                           s.array("score").reshape(-1, dist.instance.num_atoms), loo)
    s = dist.sample_with_structure((K,), generator)
    losses = _losses(f, s.structure, lead)
    return score_surrogate(losses, dist.noise_log_prob(s.log_noise.detach().exp()), loo)


class RELAX(nn.Module):
    """RELAX with the conditional noise ``E~ ~ E | T`` and a learned critic ``c``:

        g = (f(T) - b - c(E~)) d log p(T) + d c(E) - d c(E~)

    where ``E`` is the reparameterised noise that produced ``T``, ``E~`` is drawn from
    ``E | T`` (reparameterised too) and ``b`` is 0 or, with ``leave_one_out=True``, the mean
    loss of the element's other samples.  ``c(E~)`` has the same mean derivative as ``c(E)``,
    so ``g`` is unbiased for every critic; the critic is trained to minimise the variance of
    ``g``.  **Critic loss**: ``sum over batch and atoms of g**2`` (its gradient in the
    critic's parameters is that of the variance, since ``E[g]`` does not depend on them);
    the surrogate carries this gradient to the critic, so one optimiser over the model's and
    this module's parameters trains both.

    **The critic's call signature**: ``critic(z)``, or ``critic(z, context)`` when the call
    passes ``context=``.  ``z = -log E`` are the Gumbel-perturbed logits, ``[K, *batch_shape,
    *atom_shape]`` (0 at atoms that cannot race; in the critic's parameters' dtype);
    ``context`` is passed through unchanged (e.g. the model's features ``[*batch_shape, d]``:
    broadcast them over the leading sample dimension ``K`` yourself).  It returns ``[K,
    *batch_shape]`` (or ``[K, *batch_shape, 1]``).  The estimator differentiates the critic in
    ``z`` only: the context is held fixed (it gets no gradient from the estimate, and ``g``
    stays unbiased whatever it holds).  Default: :class:`MLPCritic` over the flattened atoms
    (and, with ``context_dim``, the context), built for ``atom_shape`` here (pass it, so that
    the optimiser sees the critic's parameters) or lazily at the first call.  Its output
    layer starts at zero, so RELAX starts as T-REINFORCE.

    Calling it, ``relax(dist, f, num_samples=1, context=None, leave_one_out=False,
    generator=None)``, returns the surrogate loss (value: the mean sampled loss).  ``num_samples`` means what it means
    for :func:`t_reinforce`: ``K`` samples per batch element, averaged into one estimate;
    RELAX's default is ``leave_one_out=False`` (``K`` independent estimates: the critic is
    the baseline), ``True`` adds the leave-one-out baseline of ``t_reinforce(num_samples=K)``
    on top (``K >= 2``).  It needs ``dist.logits`` to require grad (it differentiates the
    estimate in the critic).  With the default critic on the CPU fast path and no context,
    the estimate is computed in closed form (one Numba kernel, linear in the atoms per race
    for nested specs).
    """

    def __init__(self, critic=None, atom_shape=None, hidden=64, context_dim=None):
        super().__init__()
        self.hidden = hidden
        self.context_dim = context_dim
        if critic is None and atom_shape is not None:
            critic = MLPCritic(atom_shape, hidden, context_dim=context_dim)
        self.critic = critic

    @eager
    def forward(self, dist, f, num_samples=1, context=None, leave_one_out=False, generator=None):
        K, loo = _samples(num_samples, leave_one_out)
        dist = dist.in_working_precision()
        x = dist.logits
        if not x.requires_grad:
            raise ValueError("RELAX differentiates its estimate in the critic, so dist.logits must "
                             "require grad (they are what the estimate is for)")
        if self.critic is None:
            self.critic = MLPCritic(dist.atom_shape, self.hidden, context_dim=self.context_dim).to(x.device, x.dtype)
        lead = (K,) + dist.batch_shape
        if (context is None and dist.cpu_fast_path and type(self.critic) is MLPCritic
                and self.critic.context_dim is None and self.critic._plain_cpu()):
            return _NativeRelax.surrogate(self.critic, dist, f, K, loo, generator)
        s = dist.sample_with_structure((K,), generator)
        losses = _losses(f, s.structure, lead)
        log_e = s.log_noise                                      # reparameterised in the logits
        u = _conditional_uniforms(dist, K, generator)
        log_tilde = _log(dist.conditional_noise(s.trace, uniforms=u))   # E | T, reparameterised
        logp = dist.log_prob(s.trace)
        c_e = self._critic(_gumbel(log_e, x), lead, context)
        c_tilde = self._critic(_gumbel(log_tilde, x), lead, context)
        # the score's coefficient moves with the critic but not with the logits
        c_coef = self._critic(_gumbel(log_tilde.detach(), x.detach()), lead, context)
        n = losses.numel()
        theta_part = (((_advantages(losses.detach(), loo) - c_coef) * logp).sum() + c_e.sum() - c_tilde.sum()) / n
        params = [p for p in self.critic.parameters() if p.requires_grad]
        (g,) = torch.autograd.grad(theta_part, x, create_graph=bool(params))
        if not torch.isfinite(g).all():
            raise FloatingPointError("RELAX produced a non-finite gradient estimate")
        surrogate = losses.mean() + _inject(x, g)
        if params:
            # critic loss: the squared estimate, per batch element (g's scale is 1/n; undo it)
            variance = (g * n / K).pow(2).sum() / max(1, dist.batch_shape.numel())
            grads = torch.autograd.grad(variance, params, allow_unused=True)
            for p, gp in zip(params, grads):
                if gp is not None:
                    surrogate = surrogate + _inject(p, gp)
        return surrogate

    def _critic(self, z, lead, context=None):
        p = next(self.critic.parameters(), None)
        z = z if p is None else z.to(p.dtype)                  # a float32 critic on float64 logits
        out = self.critic(z) if context is None else self.critic(z, context)
        if torch.is_tensor(out) and out.dtype != z.dtype:
            out = out.to(z.dtype)
        if out.shape == lead + (1,):
            out = out.squeeze(-1)
        if out.shape != lead:
            raise ValueError(f"the RELAX critic must map [*lead, *atom_shape] = {tuple(z.shape)} to "
                             f"[*lead] = {tuple(lead)} (or [*lead, 1]); it returned {tuple(out.shape)}")
        return out


class MLPCritic(nn.Module):
    """The default RELAX critic: ``[*lead, *atom_shape] -> [*lead]``, a one-hidden-layer
    tanh MLP over the flattened atoms; the output layer starts at zero (critic = 0).

    ``context_dim=d``: the critic is called ``critic(z, context)`` with ``context``
    ``[..., d]`` broadcasting with ``lead`` (e.g. ``[*batch_shape, d]`` features, shared by
    the ``K`` samples), concatenated to the flattened atoms."""

    def __init__(self, atom_shape, hidden=64, context_dim=None):
        super().__init__()
        self.atom_shape = tuple(atom_shape)
        self.context_dim = context_dim
        inputs = math.prod(self.atom_shape) + (context_dim or 0)
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _plain_cpu(self):
        """No hooks (nothing must see a forward pass) and plain parameters on the CPU: then
        RELAX may evaluate this critic in closed form instead of calling it."""
        mods = list(self.modules())
        net = self.net
        standard = (len(net) == 3 and type(net[0]) is nn.Linear and type(net[1]) is nn.Tanh
                    and type(net[2]) is nn.Linear and net[0].bias is not None and net[2].bias is not None)
        return standard and not (
            any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in mods)
            or any(p.device.type != "cpu" or type(p) is not nn.Parameter for p in self.parameters()))

    def _check(self, z_shape):
        k = len(self.atom_shape)
        if tuple(z_shape[len(z_shape) - k:]) != self.atom_shape:
            raise ValueError(f"MLPCritic expects [*lead, {', '.join(map(str, self.atom_shape))}], "
                             f"got {tuple(z_shape)}")

    def forward(self, z, context=None):
        self._check(z.shape)
        k = len(self.atom_shape)
        lead = z.shape[:z.dim() - k]
        flat = z.reshape(lead + (-1,))
        if (context is None) != (self.context_dim is None):
            raise TypeError(f"this MLPCritic was built with context_dim={self.context_dim}: call it "
                            + ("with a context [..., context_dim] (RELAX(...)(dist, f, context=features))"
                               if context is None else "without a context (build it with context_dim=d)"))
        if context is not None:
            c = torch.as_tensor(context, dtype=flat.dtype, device=flat.device)
            if c.dim() < 1 or c.shape[-1] != self.context_dim:
                raise ValueError(f"MLPCritic(context_dim={self.context_dim}) expects a context [..., "
                                 f"{self.context_dim}], got {tuple(c.shape)}")
            flat = torch.cat([flat, c.expand(lead + (self.context_dim,))], -1)
        return self.net(flat).squeeze(-1)


@eager
def exact_gradient(dist, f):
    """Surrogate loss whose value is ``mean_batch E[f]`` computed exactly, by enumerating
    every trace of every batch element (small sizes only), and whose gradient is therefore
    the exact gradient (in the logits, and in ``f``'s parameters).  ``f`` is called once on
    all traces: ``sample_shape = (N,)``, ``N`` the largest support in the batch (smaller
    supports are padded with zero-probability copies of their first trace)."""
    dist = dist.in_working_precision()
    x = dist.logits
    batch = dist.batch_shape
    flat = batch.numel()
    supports = dist.enumerate_supports()
    n = max(len(t) for t, _ in supports)
    R = dist.event_shape[0]
    traces = torch.empty((n, flat, R), dtype=torch.int64, device=x.device)
    weight = torch.zeros((n, flat), dtype=x.dtype, device=x.device)
    for t, lanes in supports:
        pad = t[:1].expand(n - len(t), R)
        for b in lanes.tolist():
            traces[:, b] = torch.cat([t, pad])
            weight[:len(t), b] = 1.0
    traces = traces.reshape((n,) + batch + (R,))
    weight = weight.reshape((n,) + batch)
    logp = dist.log_prob(traces)
    losses = _losses(f, dist.structure(traces), (n,) + batch)
    p = torch.where(weight > 0, torch.exp(logp), 0.0)
    return (p * torch.where(weight > 0, losses, 0.0)).sum(0).mean()


# ---- shared pieces ---------------------------------------------------------------------------
def _samples(num_samples, leave_one_out):
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    loo = num_samples > 1 if leave_one_out is None else bool(leave_one_out)
    if loo and num_samples < 2:
        raise ValueError(f"the leave-one-out baseline needs num_samples >= 2 (each sample is compared "
                         f"with the mean of the others), got num_samples={num_samples}")
    return num_samples, loo


def _losses(f, structure, lead, screen=True):
    """Call ``f`` and check it returns finite per-sample losses of shape ``lead``
    (``screen=False``: the caller screens the values, and calls :func:`_screen` if one is
    not finite)."""
    out = f(structure)
    if not torch.is_tensor(out):
        raise TypeError(f"f must return a tensor of per-sample losses of shape {tuple(lead)} "
                        f"(sample_shape + batch_shape), got {type(out).__name__}")
    if out.shape != lead:
        raise ValueError(f"f must return per-sample losses of shape {tuple(lead)} (sample_shape + "
                         f"batch_shape), got {tuple(out.shape)}")
    if not torch.is_floating_point(out):
        out = out.to(torch.get_default_dtype())
    return _screen(out) if screen else out


def _screen(out):
    """``out`` if every loss is finite, else FloatingPointError naming the first bad one."""
    d = out.detach()
    if d.dtype in (torch.float16, torch.bfloat16):    # NumPy has no bfloat16
        d = d.float()
    total = d.numpy().sum() if d.device.type == "cpu" else float(d.sum())
    if d.numel() and math.isfinite(total):            # one reduction screens every entry
        return out
    bad = ~torch.isfinite(d)
    if bad.any():
        i = tuple(int(v) for v in torch.nonzero(bad)[0])
        raise FloatingPointError(f"f returned a non-finite loss {float(out.detach()[i])} at "
                                 f"[sample, *batch] index {i}")
    return out


def _advantages(fd, loo):
    """The score's coefficient from detached losses ``[K, *batch]``: the losses, or with
    ``loo`` their leave-one-out advantages ``f_k - mean_{j != k} f_j``."""
    K = fd.shape[0]
    return (fd - fd.mean(0)) * (K / (K - 1)) if loo else fd


def score_surrogate(losses, score, loo=True):
    """``mean(losses) + mean(adv * (score - stop(score)))``: value the mean loss, gradient
    the (leave-one-out) score-function estimate of the batch mean's gradient.  ``losses`` and
    ``score`` (a differentiable log-density of each sample) ``[K, *batch]``; ``loo``: the
    advantages are the leave-one-out ones (``K >= 2``), else the losses.  What
    :func:`t_reinforce` and :func:`e_reinforce` build on; public for models that score
    something else the same way (a KL term, a Bernoulli baseline)."""
    adv = _advantages(losses.detach(), loo)
    return losses.mean() + (adv * (score - score.detach())).mean()


def _conditional_uniforms(dist, K, generator=None):
    """The uniforms of ``E | T`` for ``K`` samples per element, ``[K, *batch, R + A]``, as
    ``conditional_noise`` would draw them (``torch.rand`` in ``working_dtype``, a 0 clamped to
    the smallest normal): drawn here, so that the closed form and autograd agree."""
    R, A = dist.event_shape[0], math.prod(dist.atom_shape)
    dtype = dist.working_dtype
    u = torch.rand((K,) + dist.batch_shape + (R + A,), generator=generator, dtype=dtype, device=dist.logits.device)
    return u.clamp_min(torch.finfo(dtype).tiny)


class _NativeScoreSurrogate(torch.autograd.Function):
    """:func:`score_surrogate` in one autograd node, from the analytic scores ``grad`` of
    the traces or of the noise (NumPy ``[K * batch, A]``): value ``mean(losses)``; gradient
    ``1/n`` in the losses and ``mean_k,batch adv * grad`` in the logits ``[*batch, *atom]``."""

    @staticmethod
    def forward(ctx, losses, logits, grad, loo):
        from .backends.numba_estimators import weigh_scores
        fd = losses.detach()
        if fd.dtype != torch.float64:                  # float32, float16/bfloat16 (autocast) losses
            fd = fd.double()                           # (a no-op .double() still costs a dispatch)
        fd = fd.numpy()
        K = fd.shape[0]
        g, mean, finite = weigh_scores(np.ascontiguousarray(fd).reshape(K, -1), grad, loo)
        if not finite:
            _screen(losses)                  # names the first NaN or infinite loss (or passes: an overflow)
        g = torch.from_numpy(g.reshape(logits.shape))
        ctx.g = g if g.dtype == logits.dtype else g.to(logits.dtype)
        ctx.losses_shape = losses.shape
        return torch.full((), mean, dtype=losses.dtype)

    @staticmethod
    def backward(ctx, gout):
        return _mean_grad(ctx, gout), (gout * ctx.g if ctx.needs_input_grad[1] else None), None, None


def _mean_grad(ctx, gout):
    """The gradient of ``mean(losses)`` in the losses (the native surrogates' first input)."""
    if not ctx.needs_input_grad[0]:
        return None
    return (gout / math.prod(ctx.losses_shape)).expand(ctx.losses_shape)


class _NativeRelax(torch.autograd.Function):
    """RELAX with the default critic on the CPU fast path, in closed form: one native call
    draws, scores and reports the races' member sets; ``E | T``, its Jacobian in the logits,
    the critic's input gradients and the critic-loss gradient follow analytically, in one
    Numba kernel (``backends/numba_estimators.py``), and one autograd node injects them.
    Equal (from the same random numbers) to the autograd path, which tests hold it to; a
    step's hundreds of small torch ops and its double backward are what it saves.

    Notation, per lane (one sample of one batch element): ``z = -log E`` (``= logits -
    log E_1``, so ``dz/dx = I`` at live atoms), ``z~ = -log E~``; race ``r`` has members
    ``M_r``, softmax ``P[r, b] = exp(x_b - lse_r)`` on them and minimum ``m_r = -log u_r /
    sum_{M_r} exp(x)``; ``E~_a = sum_{r: a in M_r} m_r + F_a`` (``F_a`` the fresh
    ``Exp(rate)`` of a non-winner), hence ``dz~_a/dx_b = sum_r rho[r, a] P[r, b] + phi_a
    [a = b]`` with ``rho[r, a] = m_r / E~_a`` and ``phi_a = F_a / E~_a``.  The critic
    ``c(z) = w2 . tanh(W1 z + b1) + b2``; ``D(z, d) = grad_z c(z) . d`` and its parameter
    gradient give the critic loss's gradient without a double backward.

    Scaling: ``J = rho^T P + diag(phi)`` is never formed (it was, as two float ``[L, R, A]``
    arrays: 128 MB per lane at a 200-node spanning tree, and strided passes over them); the
    kernel takes ``J^T v`` and ``J v`` from each lane's member sets, as prefix and suffix sums
    over the atoms' exit races when the sets are nested (``O(A + R)``), else over member
    lists, one batch element at a time.  The member sets come from the distribution's
    ``sample_and_score(members=True)`` (bool ``[L, R, A]``)."""

    @staticmethod
    def surrogate(critic, dist, f, K, loo=False, generator=None):
        from .backends.numba_estimators import relax_mlp
        x = dist.logits
        critic._check(torch.Size((K,)) + dist.batch_shape + dist.atom_shape)
        s = dist.sample_and_score((K,), generator, score="trace", members=True)
        losses = _losses(f, s.structure, (K,) + dist.batch_shape)
        L, R, A = losses.numel(), dist.event_shape[0], math.prod(dist.atom_shape)
        u = _conditional_uniforms(dist, K, generator).double().numpy().reshape(L, R + A)
        log_noise = s.log_noise.double().numpy().reshape(L, A)
        live = np.isfinite(log_noise)                             # +inf exactly where an atom cannot race
        # the logits the draw used; the kernel reads them at live atoms only (0 elsewhere)
        xb = np.where(live, np.broadcast_to(x.detach().double().numpy(), s.log_noise.shape).reshape(L, A), 0.0)
        W1, b1, w2, b2 = (p.detach().double().numpy() for p in
                          (critic.net[0].weight, critic.net[0].bias, critic.net[2].weight, critic.net[2].bias))
        coef = _advantages(losses.detach().double(), loo).numpy().reshape(L)
        G, *grad_p = relax_mlp(xb, live, s.array("members").reshape(L, R, A), s.trace.numpy().reshape(L, R),
                               s.array("score").reshape(L, A), np.ascontiguousarray(coef), log_noise, u,
                               np.ascontiguousarray(W1), b1, np.ascontiguousarray(w2[0]), float(b2[0]), K)
        if not np.isfinite(G).all():
            raise FloatingPointError("RELAX produced a non-finite gradient estimate")
        return _NativeRelax.apply(losses, x, (G.reshape(x.shape) / (L // K), grad_p), *critic.parameters())

    @staticmethod
    def forward(ctx, losses, logits, grads, *params):
        grad_x, grad_p = grads
        ctx.g = [torch.from_numpy(np.ascontiguousarray(grad_x)).to(logits.dtype)] + \
                [torch.as_tensor(np.reshape(gp, p.shape), dtype=p.dtype) for gp, p in zip(grad_p, params)]
        ctx.losses_shape = losses.shape
        return losses.detach().mean()

    @staticmethod
    def backward(ctx, gout):
        return (_mean_grad(ctx, gout), gout * ctx.g[0], None) + tuple(gout * g for g in ctx.g[1:])


def _inject(t, g):
    """A zero-valued term whose gradient in ``t`` is ``g`` (``t`` may hold ``-inf``: masked
    logits, where ``g`` is 0; ``g * (t - t.detach())`` would be NaN there)."""
    return _Inject.apply(t, g.detach())


class _Inject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, g):
        ctx.save_for_backward(g)
        return torch.zeros((), dtype=t.dtype, device=t.device)

    @staticmethod
    def backward(ctx, gout):
        (g,) = ctx.saved_tensors
        return gout * g, None


def _log(noise):
    return torch.log(torch.where(torch.isfinite(noise), noise, 1.0))


def _gumbel(log_noise, logits):
    """Critic input ``z = -log E`` (the Gumbel-perturbed logits), 0 where an atom cannot race."""
    ok = torch.isfinite(log_noise) & ~torch.isneginf(logits)
    return torch.where(ok, -torch.where(ok, log_noise, 0.0), 0.0)
