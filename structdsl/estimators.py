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
* ``num_samples=K > 1`` uses the leave-one-out baseline by default: each sample's loss is
  compared with the mean of the *other* ``K - 1``, which is independent of that sample, so
  the baseline adds no bias.  The estimate is ``1/K sum_k (f_k - mean_{j!=k} f_j) score_k``
  ``= 1/(K-1) sum_k (f_k - mean_j f_j) score_k``.  (``leave_one_out=False`` averages ``K``
  plain estimates instead.)
* :class:`RELAX` with the reparameterised conditional noise ``E~ ~ E | T`` is unbiased for
  any critic ``c``: ``E[c(E~) d log p(T)] = E[d c(E)] - E[d c(E~)]`` (the control variate has
  mean zero), so the critic can be trained freely to cut the variance.
* :func:`exact_gradient` enumerates every trace (small sizes) and is exact.
"""
from __future__ import annotations

import math

import numpy as np

import torch
from torch import nn

__all__ = ["t_reinforce", "e_reinforce", "RELAX", "exact_gradient", "MLPCritic"]


def t_reinforce(dist, f, num_samples=1, leave_one_out=None):
    """Surrogate loss of T-REINFORCE (the score of the trace), "T-REINFORCE+" for
    ``num_samples > 1`` (leave-one-out baseline unless ``leave_one_out=False``).  Unbiased."""
    K, loo = _samples(num_samples, leave_one_out)
    lead = (K,) + dist.batch_shape
    if _native(dist):            # CPU fast path: one native call draws and scores the traces
        d = dist._draw_native((K,), None, score=True)
        return _NativeScoreSurrogate.apply(_losses(f, d.structure, lead, screen=False), dist.logits, d.grad, loo)
    trace, structure, _ = dist._draw((K,), None)       # no reparameterised noise needed
    losses = _losses(f, structure, lead)
    return _score_surrogate(losses, dist._log_prob(trace), loo)   # its own traces: no validation


def e_reinforce(dist, f, num_samples=1, leave_one_out=None):
    """Surrogate loss of E-REINFORCE (the score of the exponential noise
    ``dist.noise_log_prob(E)``), "E-REINFORCE+" for ``num_samples > 1``.  Unbiased, but its
    variance is never below T-REINFORCE's: prefer :func:`t_reinforce`."""
    K, loo = _samples(num_samples, leave_one_out)
    lead = (K,) + dist.batch_shape
    if _native(dist):            # CPU fast path: the noise's score is 1 - E_1 per live atom
        d = dist._draw_native((K,), None, noise_score=True)
        return _NativeScoreSurrogate.apply(_losses(f, d.structure, lead, screen=False), dist.logits, d.grad, loo)
    trace, structure, log_noise = dist._draw((K,), None)
    losses = _losses(f, structure, lead)
    return _score_surrogate(losses, dist.noise_log_prob(log_noise.exp()), loo)


class RELAX(nn.Module):
    """RELAX with the conditional noise ``E~ ~ E | T`` and a learned critic ``c``:

        g = (f(T) - c(E~)) d log p(T) + d c(E) - d c(E~)

    where ``E`` is the reparameterised noise that produced ``T`` and ``E~`` is drawn from
    ``E | T`` (reparameterised too).  ``c(E~)`` has the same mean derivative as ``c(E)``, so
    ``g`` is unbiased for every critic; the critic is trained to minimise the variance of
    ``g``.  **Critic loss**: ``sum over batch and atoms of g**2`` (its gradient in the
    critic's parameters is that of the variance, since ``E[g]`` does not depend on them);
    the surrogate carries this gradient to the critic, so one optimiser over the model's and
    this module's parameters trains both.

    critic: any ``nn.Module`` mapping the Gumbel-perturbed logits ``z = -log E``
    (``[*lead, *atom_shape]``, 0 at atoms that cannot race) to ``[*lead]`` (or
    ``[*lead, 1]``).  Default: :class:`MLPCritic` over the flattened atoms, built for
    ``atom_shape`` here (pass it, so that the optimiser sees the critic's parameters) or
    lazily at the first call.  Its output layer starts at zero, so RELAX starts as
    T-REINFORCE.

    Calling it, ``relax(dist, f, num_samples=1)``, returns the surrogate loss (value: the
    mean sampled loss); ``num_samples`` averages that many independent estimates.  It needs
    ``dist.logits`` to require grad (it differentiates the estimate in the critic).
    """

    def __init__(self, critic=None, atom_shape=None, hidden=64):
        super().__init__()
        self.hidden = hidden
        if critic is None and atom_shape is not None:
            critic = MLPCritic(atom_shape, hidden)
        self.critic = critic

    def forward(self, dist, f, num_samples=1):
        K, _ = _samples(num_samples, False)
        x = dist.logits
        if not x.requires_grad:
            raise ValueError("RELAX differentiates its estimate in the critic, so dist.logits must "
                             "require grad (they are what the estimate is for)")
        if self.critic is None:
            self.critic = MLPCritic(dist.atom_shape, self.hidden).to(x.device, x.dtype)
        lead = (K,) + dist.batch_shape
        if _native(dist) and type(self.critic) is MLPCritic and self.critic._plain_cpu():
            return _NativeRelax.surrogate(self.critic, dist, f, K)
        s = dist.sample_with_structure((K,))
        losses = _losses(f, s.structure, lead)
        log_e = s.log_noise                                      # reparameterised in the logits
        log_tilde = _log(dist.conditional_noise(s.trace))        # E | T, reparameterised
        logp = dist._log_prob(s.trace)                           # its own traces: no validation
        c_e = self._critic(_gumbel(log_e, x), lead)
        c_tilde = self._critic(_gumbel(log_tilde, x), lead)
        # the score's coefficient moves with the critic but not with the logits
        c_coef = self._critic(_gumbel(log_tilde.detach(), x.detach()), lead)
        n = losses.numel()
        theta_part = (((losses.detach() - c_coef) * logp).sum() + c_e.sum() - c_tilde.sum()) / n
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

    def _critic(self, z, lead):
        p = next(self.critic.parameters(), None)
        out = self.critic(z if p is None else z.to(p.dtype))   # a float32 critic on float64 logits
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
    tanh MLP over the flattened atoms; the output layer starts at zero (critic = 0)."""

    def __init__(self, atom_shape, hidden=64):
        super().__init__()
        self.atom_shape = tuple(atom_shape)
        self.net = nn.Sequential(nn.Linear(math.prod(self.atom_shape), hidden), nn.Tanh(), nn.Linear(hidden, 1))
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

    def forward(self, z):
        self._check(z.shape)
        k = len(self.atom_shape)
        return self.net(z.reshape(z.shape[:z.dim() - k] + (-1,))).squeeze(-1)


def exact_gradient(dist, f):
    """Surrogate loss whose value is ``mean_batch E[f]`` computed exactly, by enumerating
    every trace of every batch element (small sizes only), and whose gradient is therefore
    the exact gradient (in the logits, and in ``f``'s parameters).  ``f`` is called once on
    all traces: ``sample_shape = (N,)``, ``N`` the largest support in the batch (smaller
    supports are padded with zero-probability copies of their first trace)."""
    x = dist.logits
    batch = dist.batch_shape
    flat = batch.numel()
    patterns = dist._live_patterns()
    n = max(len(dist._support_of(p)) for p in patterns)
    R = dist.event_shape[0]
    traces = torch.empty((n, flat, R), dtype=torch.int64, device=x.device)
    weight = torch.zeros((n, flat), dtype=x.dtype, device=x.device)
    for pattern, lanes in patterns.items():
        t = dist._support_of(pattern)
        pad = t[:1].expand(n - len(t), R)
        for b in lanes:
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
    total = d.numpy().sum() if d.device.type == "cpu" else float(d.sum())
    if d.numel() and math.isfinite(total):            # one reduction screens every entry
        return out
    bad = ~torch.isfinite(d)
    if bad.any():
        i = tuple(int(v) for v in torch.nonzero(bad)[0])
        raise FloatingPointError(f"f returned a non-finite loss {float(out.detach()[i])} at "
                                 f"[sample, *batch] index {i}")
    return out


def _score_surrogate(losses, score, loo):
    """``mean(losses) + mean(adv * (score - stop(score)))``: value the mean loss, gradient
    the (leave-one-out) score-function estimate of the batch mean's gradient."""
    fd = losses.detach()
    K = fd.shape[0]
    adv = (fd - fd.mean(0)) * (K / (K - 1)) if loo else fd      # f_k - mean_{j != k} f_j
    return losses.mean() + (adv * (score - score.detach())).mean()


def _native(dist):
    """Whether ``dist`` takes the CPU fast path (a tensor subclass, e.g. Pyro's provenance
    tracking, goes through torch ops, which see it)."""
    return dist._numba is not None and type(dist.logits) is torch.Tensor


class _NativeScoreSurrogate(torch.autograd.Function):
    """:func:`_score_surrogate` in one autograd node, from the analytic scores ``grad`` of
    the traces or of the noise (NumPy ``[K * batch, A]``): value ``mean(losses)``; gradient
    ``1/n`` in the losses and ``mean_k,batch adv * grad`` in the logits ``[*batch, *atom]``."""

    @staticmethod
    def forward(ctx, losses, logits, grad, loo):
        from .backends.numba_estimators import weigh_scores
        fd = losses.detach().numpy()
        K = fd.shape[0]
        g, mean, finite = weigh_scores(np.ascontiguousarray(fd, dtype=np.float64).reshape(K, -1), grad, loo)
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
    gradient give the critic loss's gradient without a double backward."""

    @staticmethod
    def surrogate(critic, dist, f, K):
        from .backends.numba_estimators import relax_mlp
        x = dist.logits
        critic._check(torch.Size((K,)) + dist.batch_shape + dist.atom_shape)
        d = dist._draw_native((K,), None, score=True, members=True)
        losses = _losses(f, d.structure, (K,) + dist.batch_shape)
        shape = d.log_noise.shape                                   # [K, *batch, *atom]
        L, (R, A) = losses.numel(), (dist.instance.max_races, dist.instance.num_atoms)
        u = dist._uniforms((L, R + A)).double().numpy()          # as conditional_noise draws them
        lanes = (L, A)
        # the logits the draw used: invalid atoms' entries (ignored, even a NaN) as 0
        xb = np.ascontiguousarray(np.broadcast_to(dist._x(detach=True).double().numpy(), shape).reshape(lanes))
        live = np.ascontiguousarray(np.broadcast_to(dist._live.numpy(), shape).reshape(lanes))
        W1, b1, w2, b2 = (p.detach().double().numpy() for p in
                          (critic.net[0].weight, critic.net[0].bias, critic.net[2].weight, critic.net[2].bias))
        G, *grad_p = relax_mlp(xb, live, d.members, d.trace.numpy().reshape(L, R),
                               d.grad, losses.detach().double().numpy().reshape(L),
                               d.log_noise.double().numpy().reshape(lanes), u, np.ascontiguousarray(W1), b1,
                               np.ascontiguousarray(w2[0]), float(b2[0]), K)
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
