"""PyTorch backend: the IR interpreted on batched tensors, every lane in lock-step.

One interpreter (:class:`_Machine`) walks the IR once per call; each value is a tensor
``[*lead, *own]`` where ``lead`` is the batch ``[B]`` (inside a predicate, the batch and the
atoms' index grid ``[B, *atom_shape]``, size-1 where a value does not vary) and ``own`` the
value's DSL shape from the type pass.  Control flow becomes masks:

* the lanes that execute a statement are ``active & ~dead``; an ``if`` runs both branches,
  each under its own mask, and a write is ``torch.where(mask, new, old)``;
* ``break`` clears the lane until its loop ends; a lane that raised a spec error (or whose
  replayed trace is impossible) is *dead* from then on;
* ``a and b``, ``a if c else b`` on scalars guard the side they would not evaluate, so an
  index error counts only where the reference would raise it;
* a race is a masked argmin over the flattened atoms (first index on ties, as the
  reference); a grouped race runs every group at once as segment reductions by key
  (``scatter_reduce``), its present groups taking trace slots in key order.

Errors are flags ``[B]`` (first error per lane, in program order) checked once per call and
raised as the reference raises them: the same class, spec line, batch element and message.
A message that names run-time values (the bad index, the exact result of a scalar overflow,
the bad key, the previous race's line) keeps them with the lane's first error; inside a
predicate, whose errors the reference meets atom by atom, each atom keeps its first error
and the lane takes that of its first failing atom, named in the message.  A lane that runs
more races than the static bound, or a compiler-inserted check (``ir.Fail``) that fails,
raises as well.  Nothing on the hot path leaves the device; on CPU a loop stops early once
no lane is active (one ``any()`` per iteration) and a check records nothing when no element
fails (one ``any()``), on CUDA every loop runs its static bound and every check runs in full.

Scores are differentiable by autograd: ``log p(T)`` accumulates ``logits[w] - logsumexp``
race by race, and ``E | T`` is built from the race minima in log space, so
``conditional_noise`` is reparameterised in the logits.
"""
from __future__ import annotations

import ast
import collections
import contextlib
import math

import numpy as np
import torch

from structdsl import errors, ir, races
from structdsl.errors import RaceError
from structdsl.program import Draw, Program as _BaseProgram, Replay
from structdsl.program import Sample, Solution

_I64_MIN, _I64_MAX = -2**63, 2**63 - 1
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


_CMP = {ast.Eq: torch.eq, ast.NotEq: torch.ne, ast.Lt: torch.lt, ast.LtE: torch.le,
        ast.Gt: torch.gt, ast.GtE: torch.ge}


def _any(x):
    """``x.any(-1)`` of a bool tensor, as the largest of its bytes: torch's bool reductions
    take several times longer on CPU (about 600 us against 20 us for 1024 x 1024)."""
    if x.dtype != torch.bool or x.shape[-1] == 0:
        return x.any(-1)
    return x.view(torch.uint8).amax(-1).bool()


def _all(x):
    """``x.all(-1)`` of a bool tensor (see :func:`_any`)."""
    if x.dtype != torch.bool or x.shape[-1] == 0:
        return x.all(-1)
    return x.view(torch.uint8).amin(-1).bool()


def _any_lead(x, B):
    """``[B]``: whether any entry of a lead-shaped bool (``[B or 1, *grid]``) is set."""
    x = _any(x.reshape(x.shape[0], -1)) if x.dim() > 1 else x
    return x.expand(B) if x.shape[0] == 1 else x


#: The exact results the reference's messages print for an int64 overflow of scalars, from
#: the operands ``a``, ``b`` a lane keeps with its error (``sum``: the sums of the high and
#: low 32-bit halves).
_EXACT = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
          "floordiv": lambda a, b: a // b, "neg": lambda a, b: -a, "abs": lambda a, b: abs(a),
          "sum": lambda a, b: (a << 32) + b,
          # past 256 bits the exact result is written a * 2**s, as the reference does (a shift
          # by millions would be a number Python refuses to print)
          "lshift": lambda a, b: a << b if b <= 256 else f"{a} * 2**{b}"}


def _escape(message):
    """A literal message as a :func:`_render` template."""
    return message.replace("{", "{{").replace("}", "}}")


def _render(template, values, shape):
    """A lane's error message from its template and values ``(v0, v1, flat atom)``."""
    v0, v1, at = values
    fields = {"v0": v0, "v1": v1}
    if "{atom}" in template:
        at = min(max(at, 0), math.prod(shape) - 1)
        fields["atom"] = tuple(int(i) for i in np.unravel_index(at, shape))
    for name, exact in _EXACT.items():
        if "{" + name + "}" in template:
            fields[name] = exact(v0, v1)
    return template.format(**fields)


_EMPTY_RACE = ("race has no live member (every candidate is retired, invalid or at logit -inf; "
               "race(..., allow_empty=True) returns -1 instead)")


def _bools(fn, a, b):
    """``fn`` (``torch.bitwise_and``, ``_or`` or ``_xor``) of two bool tensors, computed on
    their bytes (0 or 1, so the result is a bool again): torch's bool kernels take about 3x
    longer when they broadcast on CPU (860 us against 270 for ``[1024, 32, 1] & [1024, 1, 32]``)."""
    if a.dtype == b.dtype == torch.bool:
        return fn(a.view(torch.uint8), b.view(torch.uint8)).view(torch.bool)
    return fn(a, b)


class _Machine:
    """One call of the program on ``B`` lanes.  ``mode``: ``"solve"`` (residual races on
    ``res``) or ``"replay"`` (winners from ``trace``, accumulating ``logp`` and E | T)."""

    def __init__(self, prog, inst, mode, live, device):
        self.prog, self.p, self.inst, self.mode = prog, prog.ir, inst, mode
        self.types = inst.types
        self.B, self.A, self.R = live.shape[0], inst.num_atoms, inst.max_races
        self.device = device
        self.live0 = live                                   # bool [B, A]
        self.alive = live.clone()
        self.dead = torch.zeros(self.B, dtype=torch.bool, device=device)
        self.active = torch.ones(self.B, dtype=torch.bool, device=device)
        self.err = torch.zeros(self.B, dtype=torch.int64, device=device)
        self.info = torch.zeros((self.B, 3), dtype=torch.int64, device=device)   # the first error's values
        self.perr = self.pinfo = None                       # inside a predicate: errors per atom
        self.prev_line = torch.zeros(self.B, dtype=torch.int64, device=device)   # nesting: previous race
        self.impossible = torch.zeros(self.B, dtype=torch.bool, device=device)
        self.slot = torch.zeros(self.B, dtype=torch.int64, device=device)
        self.prev_key = torch.full((self.B, self.A), -1, dtype=torch.int64, device=device)   # grouped races
        self.prev_in = torch.zeros((self.B, self.A), dtype=torch.bool, device=device)         # plain races
        self.has_prev = torch.zeros(self.B, dtype=torch.bool, device=device)
        self.member_sets = None                             # replay_flat: [B, R, A]
        self.env = {}
        self.grid = None                                    # index grids inside a predicate
        self.L = 1
        self.broken = []                                    # per enclosing loop: lanes that broke
        self.early_exit = device.type == "cpu"
        self.atoms_iota = torch.arange(self.A, device=device)

    # ---- errors and masks ----------------------------------------------------------------
    def all_lanes(self, mask):
        """Whether ``mask`` ``[B]`` holds for every lane, asked only where a sync is cheap
        (CPU): then a masked ``[B, A]`` update can be skipped (on CUDA: always False)."""
        return self.early_exit and bool(mask.all())

    def on(self):
        return self.active & ~self.dead

    def flag(self, bad, cls, line, message, values=None, atom=None):
        """Record error ``cls`` at ``line`` for the executing lanes where ``bad`` (lead-shaped).

        A message that names run-time values, as the reference's do, is a template (see
        :func:`_render`): ``values`` is a callable giving up to two lead-shaped int tensors
        (``{v0}``, ``{v1}``, and the exact results that :data:`_EXACT` computes from them),
        ``atom`` a ``[B]`` flat atom index (``{atom}``); they are kept with each lane's first
        error.  Inside a predicate the reference evaluates atom by atom and names the atom:
        the first error of each atom is kept, and the lane gets that of its first atom
        (:meth:`predicate_errors`)."""
        if self.early_exit and not bool(bad.any()):      # CPU: nothing to record (a cheap sync)
            return
        template = values is not None or atom is not None
        if self.grid is None:
            code = self.prog._code(cls, line, message, self.inst.atom_shape if template else None)
            return self.record(bad, code, values if template else None, atom, template)
        code = self.prog._code(cls, line, (message if template else _escape(message)) +
                               " (evaluating the predicate for atom {atom})", self.inst.atom_shape)
        if self.perr is not None or any(d != 1 for d in bad.shape[1:]):
            return self.flag_atoms(bad, code, values)
        # the same for every atom, and no atom failed before in this predicate: the lane's
        # error is this one, at atom 0 (a [B] update instead of a [B, A] one)
        at0 = values and (lambda: tuple(v.reshape(v.shape[0], -1)[:, 0] for v in values()))
        self.record(bad.reshape(bad.shape[0]), code, at0, None, True)

    def record(self, bad, code, values, atom, template):
        """Lanes ``bad`` (lead-shaped) that run fail with error ``code``, unless they failed before."""
        bad = _any_lead(bad, self.B) & self.on()
        first = (self.err == 0) & bad
        self.err = torch.where(first, code, self.err)
        if template:
            row = self.info_row(values() if values is not None else (), (self.B,), atom)
            self.info = torch.where(first[:, None], row, self.info)
        self.dead = self.dead | bad

    def info_row(self, values, shape, atom=None):
        """``[*shape, 3]``: ``values`` (up to two) and ``atom`` as one int64 row per lane
        (``atom`` None: 0); ``[*shape, 2]`` without the atom column when ``atom`` is False."""
        zero = self.const(0).reshape(())
        cols = [v.long() for v in values] + [zero] * (2 - len(values))
        if atom is not False:
            cols.append(zero if atom is None else atom)
        return torch.stack([c.expand(shape) for c in cols], -1)

    def flag_atoms(self, bad, code, values):
        """``flag`` inside a predicate: the first error of every (lane, atom), in program order."""
        shape = (self.B,) + self.inst.atom_shape
        bad = bad.expand(shape)
        if self.perr is None:
            self.perr = torch.zeros(shape, dtype=torch.int64, device=self.device)
            self.pinfo = torch.zeros(shape + (2,), dtype=torch.int64, device=self.device)
        first = (self.perr == 0) & bad
        self.perr = torch.where(first, code, self.perr)
        if values is not None:
            self.pinfo = torch.where(first[..., None], self.info_row(values(), shape, False), self.pinfo)

    def predicate_errors(self):
        """After a predicate: each executing lane whose atoms raised gets the error of its first
        such atom (flat order), as the reference's atom-by-atom evaluation raises it."""
        if self.perr is None:
            return
        B, A = self.B, self.A
        perr, pinfo = self.perr.reshape(B, A), self.pinfo.reshape(B, A, 2)
        self.perr = self.pinfo = None
        hit = perr > 0
        at = hit.view(torch.uint8).argmax(1)
        code = perr.gather(1, at[:, None])[:, 0]
        row = pinfo.gather(1, at[:, None, None].expand(B, 1, 2))[:, 0]
        row = torch.cat([row, at[:, None]], 1)
        bad = _any(hit) & self.on()
        first = (self.err == 0) & bad
        self.err = torch.where(first, code, self.err)
        self.info = torch.where(first[:, None], row, self.info)
        self.dead = self.dead | bad

    def errors(self):
        """``[B, 4]``: each lane's first error code (0: none) and the values its message names."""
        return torch.cat([self.err[:, None], self.info], 1)

    # ---- values ---------------------------------------------------------------------------
    def own(self, node):
        return self.types.of(node).ndim

    def const(self, value, dtype=None):
        """A Python constant as a tensor on the device, made once per program and device:
        building it per use would be a host-to-device copy, which synchronises on CUDA."""
        key = ("__const", str(self.device), type(value).__name__, repr(value), dtype)
        t = self.prog._tensors.get(key)
        if t is None:
            t = torch.as_tensor(value, device=self.device)
            if dtype is not None:
                t = t.to(dtype)
            elif t.dtype not in (torch.bool, torch.int64):
                t = t.to(torch.int64)
            self.prog._tensors[key] = t          # never written: every store is out of place
        return t.reshape((1,) * self.L + tuple(t.shape))

    def lift(self, x, k_from, k_to):
        """Insert ``k_to - k_from`` own dims of size 1 in front of ``x``'s own dims."""
        if k_to == k_from:
            return x
        return x.reshape(x.shape[:self.L] + (1,) * (k_to - k_from) + x.shape[self.L:])

    def lead_mask(self, m, k):
        """A lead-shaped mask broadcastable against a value with ``k`` own dims."""
        return m.reshape(m.shape + (1,) * k)

    def lookup(self, name, line):
        if self.grid is not None and name in self.grid:
            return self.grid[name]
        if name in self.env:
            v = self.env[name]
            if self.L > 1:      # a lane value seen from a predicate: room for the grid dims
                v = v.reshape(v.shape[:1] + (1,) * (self.L - 1) + v.shape[1:])
            return v
        if name in self.static_env:
            return self.const(self.static_env[name])
        if name in self.prog._tensors_of(self.inst, self.device):
            v = self.prog._tensors_of(self.inst, self.device)[name]
            return v.reshape((1,) * self.L + tuple(v.shape))
        raise RaceError(f"{name!r} is not bound", self.p.file, line)   # pragma: no cover

    # ---- expressions ----------------------------------------------------------------------
    def ev(self, node, g=None):
        """Evaluate ``node``; ``g``: a lead-shaped bool guard (None: everywhere) outside
        which errors do not count (the reference would not evaluate the node there)."""
        line = getattr(node, "lineno", None)
        if isinstance(node, ast.Constant):
            return self.const(node.value)
        if isinstance(node, ast.Name):
            return self.lookup(node.id, line)
        if isinstance(node, ast.Tuple):      # pragma: no cover - tuples only as indices/targets
            raise TypeError("tuple value")
        if isinstance(node, ast.BinOp):
            return self.binop(node, g)
        if isinstance(node, ast.UnaryOp):
            x = self.ev(node.operand, g)
            t = self.types.of(node.operand)
            if isinstance(node.op, ast.USub):
                x = x.long()
                self.overflow(x == _I64_MIN, g, self.own(node.operand), line, "-", "neg", x)
                return -x
            if isinstance(node.op, ast.UAdd):
                return x.long()
            if isinstance(node.op, ast.Invert) and t.dtype == "int":
                return ~x
            return ~x                        # not / ~ on bools
        if isinstance(node, ast.BoolOp):
            return self.boolop(node, g)
        if isinstance(node, ast.Compare):
            a, b = node.left, node.comparators[0]
            k = self.own(node)
            x, y = self.lift(self.ev(a, g), self.own(a), k), self.lift(self.ev(b, g), self.own(b), k)
            if x.dtype != y.dtype:
                x, y = x.long(), y.long()
            return _CMP[type(node.ops[0])](x, y)
        if isinstance(node, ast.IfExp):
            k = self.own(node)
            test = self.ev(node.test, g)
            want_int = self.types.of(node).dtype == "int"
            if self.own(node.test) == 0:       # lazy: each side guarded by its condition
                body = self.ev(node.body, self.both(g, test))
                orelse = self.ev(node.orelse, self.both(g, ~test))
            else:
                body, orelse = self.ev(node.body, g), self.ev(node.orelse, g)
            body, orelse = self.lift(body, self.own(node.body), k), self.lift(orelse, self.own(node.orelse), k)
            if want_int:
                body, orelse = body.long(), orelse.long()
            return torch.where(self.lift(test, self.own(node.test), k), body, orelse)
        if isinstance(node, ast.Subscript):
            return self.getitem(node, g)
        if isinstance(node, ast.Call):
            return self.call(node, g)
        raise TypeError(f"cannot lower {type(node).__name__}")  # pragma: no cover

    @staticmethod
    def both(g, m):
        return m if g is None else g & m

    def in_range(self, i, d):
        """Whether index ``i`` is an atom coordinate of a predicate (its grid tensor, values
        ``0 .. size - 1``) with ``size <= d``: then it cannot be out of range and its check,
        a pass over the grid, is skipped."""
        return self.grid is not None and i.numel() <= d and any(i is c for c in self.grid.values())

    def guarded(self, bad, g, k):
        """Reduce an elementwise ``bad`` (with ``k`` own dims) to lead shape, inside ``g``."""
        if k:
            bad = _any(bad.reshape(bad.shape[:self.L] + (-1,)))
        return bad if g is None else bad & g

    def binop(self, node, g):
        k = self.own(node)
        a = self.lift(self.ev(node.left, g), self.own(node.left), k)
        b = self.lift(self.ev(node.right, g), self.own(node.right), k)
        return self.arith(node.op, a, b, k, node.lineno, g)

    def arith(self, op, a, b, k, line, g):
        """``a op b`` on aligned values with ``k`` own dims, checked as the reference checks."""
        if isinstance(op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
            if a.dtype != b.dtype:
                a, b = a.long(), b.long()
            return _bools({ast.BitAnd: torch.bitwise_and, ast.BitOr: torch.bitwise_or,
                           ast.BitXor: torch.bitwise_xor}[type(op)], a, b)
        a, b = a.long(), b.long()
        if isinstance(op, ast.Add):
            r = a + b
            self.overflow(((a ^ r) & (b ^ r)) < 0, g, k, line, "+", "add", a, b)
            return r
        if isinstance(op, ast.Sub):
            r = a - b
            self.overflow(((a ^ b) & (a ^ r)) < 0, g, k, line, "-", "sub", a, b)
            return r
        if isinstance(op, ast.Mult):
            r = a * b
            # the quotient test r / a != b, except for a in (0, -1): -1 overflows only with MIN
            # (and MIN / -1 itself would trap the CPU's integer division: SIGFPE)
            small = (a == 0) | (a == -1)
            bad = (~small & (torch.div(r, torch.where(small, 1, a), rounding_mode="trunc") != b)) | \
                ((a == -1) & (b == _I64_MIN))
            self.overflow(bad, g, k, line, "*", "mul", a, b)
            return r
        if isinstance(op, (ast.FloorDiv, ast.Mod)):
            zero = b == 0
            what = "division" if isinstance(op, ast.FloorDiv) else "modulo"
            self.flag(self.guarded(zero, g, k), "SpecZeroDivisionError", line, f"integer {what} by zero")
            bs = torch.where(zero | ((a == _I64_MIN) & (b == -1)), 1, b)    # nothing traps: flagged lanes
            if isinstance(op, ast.FloorDiv):
                self.overflow((a == _I64_MIN) & (b == -1), g, k, line, "//", "floordiv", a, b)
                return torch.div(a, bs, rounding_mode="floor")
            return torch.remainder(a, bs)
        if isinstance(op, (ast.LShift, ast.RShift)):
            self.flag(self.guarded(b < 0, g, k), "SpecValueError", line, "negative shift count")
            s = b.clamp(0, 63)
            if isinstance(op, ast.RShift):
                return torch.bitwise_right_shift(a, s)
            r = torch.bitwise_left_shift(a, s)
            bad = (torch.bitwise_right_shift(r, s) != a) | ((r < 0) != (a < 0)) | ((b > 63) & (a != 0))
            self.overflow(bad, g, k, line, "<<", "lshift", a, b)
            return r
        raise TypeError(type(op).__name__)  # pragma: no cover

    def overflow(self, bad, g, k, line, op, exact, *operands):
        """An int64 overflow of ``op`` (``bad`` elementwise, ``k`` own dims): on scalars the
        reference prints the exact result, computed from the ``operands`` (see :data:`_EXACT`)."""
        if k:
            self.flag(self.guarded(bad, g, k), "SpecOverflowError", line, f"int64 overflow in {op}")
        else:
            self.flag(self.guarded(bad, g, 0), "SpecOverflowError", line,
                      f"int64 overflow in {op} (the exact result is {{{exact}}})", values=lambda: operands)

    def boolop(self, node, g):
        k = self.own(node)
        is_and = isinstance(node.op, ast.And)
        if k:                                  # arrays: elementwise, every side evaluated
            out = None
            op = torch.bitwise_and if is_and else torch.bitwise_or
            for v in node.values:
                x = self.lift(self.ev(v, g), self.own(v), k)
                out = x if out is None else _bools(op, out, x)
            return out
        out, guard = None, g                   # scalars: short-circuit, as Python
        for v in node.values:
            x = self.ev(v, guard)
            out = x if out is None else (out & x if is_and else out | x)
            guard = self.both(g, out if is_and else ~out)
        return out

    # ---- indexing -------------------------------------------------------------------------
    def index_nodes(self, node):
        s = node.slice
        return s.elts if isinstance(s, ast.Tuple) else [s]

    def getitem(self, node, g):
        x = self.ev(node.value, g)
        L, pos, line = self.L, 0, node.lineno
        # as the reference: every index is evaluated, then they are checked axis by axis
        idx = [None if isinstance(e, ast.Slice) else (self.ev(e, g).long(), self.own(e))
               for e in self.index_nodes(node)]
        for axis, entry in enumerate(idx):
            if entry is None:
                pos += 1
                continue
            i, ki = entry
            d = x.shape[L + pos]
            if not self.in_range(i, d):
                self.index_error(i, ki, d, g, line, "read", axis)
                i = i.clamp(0, max(d - 1, 0))
            x = self.take(x, i, ki, L + pos)
            pos += ki
        return x

    def index_error(self, i, ki, d, g, line, what, axis):
        """Flag index ``i`` (``ki`` own dims) outside ``[0, d)``, naming the first bad value
        (in the index array's own order) as the reference does."""
        bad = (i < 0) | (i >= d)

        def first():
            if not ki:
                return (i,)
            lead = bad.shape[:self.L]
            flat_bad = bad.reshape(lead + (-1,))
            at = flat_bad.view(torch.uint8).argmax(-1, keepdim=True)
            return (i.expand(bad.shape).reshape(lead + (-1,)).gather(-1, at)[..., 0],)
        self.flag(self.guarded(bad, g, ki), "SpecIndexError", line,
                  f"{what} index {{v0}} is out of range for axis {axis} of size {d}", values=first)

    def take(self, x, i, ki, dim):
        """``x`` indexed at own axis ``dim`` by ``i`` (``ki`` own dims): the axis becomes ``i``'s dims."""
        L = self.L
        lead = torch.broadcast_shapes(x.shape[:L], i.shape[:L])
        x = x.expand(lead + x.shape[L:])
        pre, post = x.shape[L:dim], x.shape[dim + 1:]
        s = i.shape[L:]
        S = math.prod(s)
        if x.shape[dim] == 0:                       # nothing to read: every index was flagged
            return x.new_zeros(lead + pre + s + post)
        idx = i.expand(lead + s).reshape(lead + (1,) * len(pre) + (S,) + (1,) * len(post))
        idx = idx.expand(lead + pre + (S,) + post)
        out = torch.gather(x, dim, idx)
        return out.reshape(lead + pre + s + post)

    def store(self, target, value, vnode_own, line, op=None):
        """``target = value`` (``op``: ``target op= value``, for a name) for the executing lanes."""
        if isinstance(target, ast.Name):
            name = target.id
            local = self.types.locals[name]
            new = value
            if op is not None:
                new = self.apply_op(op, self.env[name], local.ndim, value, vnode_own, line)
            new = self.fit(new, local)
            old = self.env.get(name)
            if old is None:
                self.env[name] = new
            else:
                m = self.lead_mask(self.on(), local.ndim)
                self.env[name] = torch.where(m, new, old) if new.dtype == old.dtype else \
                    torch.where(m, new.to(old.dtype), old)
            return
        name = target.value.id
        x = self.env[name]
        k = x.dim() - 1
        own_shape = x.shape[1:]
        mask = torch.ones((1,) * (1 + k), dtype=torch.bool, device=self.device)
        keep = []            # own axes that the value spans
        elts = self.index_nodes(target)
        if op is not None:                         # pragma: no cover - see augmented_store
            raise TypeError("an augmented store through a subscript is a read, then a store")
        if vnode_own == 0 and len(elts) == k and not any(
                isinstance(e, ast.Slice) or self.own(e) for e in elts):
            return self.store_element(name, x, elts, value, line)
        if len(elts) == 1 and not isinstance(elts[0], ast.Slice) and self.types.of(elts[0]).dtype == "bool" \
                and self.own(elts[0]):
            mask = self.ev(elts[0])                # x[mask] = scalar
            v = value.reshape(value.shape + (1,) * k)
        else:
            pos = 0
            idx = [None if isinstance(e, ast.Slice) else self.ev(e).long() for e in elts]
            for i in idx:
                if i is None:
                    keep.append(pos)
                    pos += 1
                    continue
                d = own_shape[pos]
                self.index_error(i, 0, d, None, line, "write", pos)
                shape = [1] * k
                shape[pos] = d
                iota = torch.arange(d, device=self.device).reshape([1] + shape)
                mask = mask & (iota == i.reshape(i.shape + (1,) * k))
                pos += 1
            keep += list(range(pos, k))
            sub = len(keep)
            src = self.lift(value, vnode_own, sub)             # right-aligned to the sub-array
            shape = list(src.shape[:1])                        # the sub-array's axes back in place
            it = iter(src.shape[1:])
            for ax in range(k):
                shape.append(next(it) if ax in keep else 1)
            v = src.reshape(shape)
        if x.dtype == torch.int64 and v.dtype == torch.bool:
            v = v.long()
        m = mask & self.lead_mask(self.on(), k)
        self.env[name] = torch.where(m, v, x)

    def store_element(self, name, x, elts, value, line):
        """``x[i, j, ...] = scalar``: one scatter per lane, O(B) instead of a masked where."""
        B, shape = self.B, x.shape[1:]
        lin = torch.zeros((), dtype=torch.int64, device=self.device)
        idx = [self.ev(e).long() for e in elts]      # all evaluated, then checked in axis order
        for pos, i in enumerate(idx):
            d = shape[pos]
            self.index_error(i, 0, d, None, line, "write", pos)
            lin = lin * d + i.clamp(0, max(d - 1, 0))
        if not math.prod(shape):                     # nothing to write: every index was flagged
            return
        flat = x.expand((B,) + tuple(shape)).reshape(B, -1)
        lin = lin.expand(B)[:, None]
        v = value.reshape(-1).expand(B).to(flat.dtype)[:, None]
        on = self.on()[:, None]
        # out of place: a tensor subclass's __torch_function__ (e.g. Pyro's provenance) sees it
        flat = flat.scatter(1, lin, torch.where(on, v, flat.gather(1, lin)))
        self.env[name] = flat.reshape((B,) + tuple(shape))

    def augmented_store(self, s):
        """``x[idx] op= value`` as the reference runs it, ``x[idx] = x[idx] op value``: the read
        (its indices evaluated and checked) comes before the value is evaluated."""
        cur = self.getitem(s.target, None)
        kcur = cur.dim() - 1
        value, kval = self.ev(s.value), self.own(s.value)
        new = self.apply_op(s.op, cur, kcur, value, kval, s.line)
        self.store(s.target, new, max(kcur, kval), s.line)

    def apply_op(self, op, cur, kcur, value, kval, line):
        k = max(kcur, kval)
        return self.arith(op, self.lift(cur, kcur, k), self.lift(value, kval, k), k, line, None)

    def fit(self, v, local):
        """A value bound to a local: bools widened for int locals, expanded to its shape."""
        if local.dtype == "int" and v.dtype == torch.bool:
            v = v.long()
        shape = tuple(d.value for d in local.shape)
        return v.expand((v.shape[0],) + shape) if v.shape[1:] != shape else v

    # ---- DSL functions --------------------------------------------------------------------
    def call(self, node, g):
        name = node.func.id
        t = self.types.of(node)
        k = t.ndim
        line = node.lineno
        if name == "live":
            return self.live0.reshape((self.B,) + (1,) * (self.L - 1) + self.inst.atom_shape)
        if name in ("arange", "zeros", "ones", "full"):
            shape = tuple(d.value for d in t.shape)
            dtype = torch.bool if t.dtype == "bool" else torch.int64
            if name == "arange":
                return torch.arange(shape[0], device=self.device).reshape((1,) * self.L + shape)
            if name in ("zeros", "ones"):
                fill = torch.zeros if name == "zeros" else torch.ones
                return fill((1,) * self.L + shape, dtype=dtype, device=self.device)
            v = self.ev(node.args[1], g).to(dtype)
            return v.reshape(v.shape + (1,) * k).expand(v.shape + shape)
        args = node.args
        if name == "where":
            c, a, b = (self.lift(self.ev(x, g), self.own(x), k) for x in args)
            if t.dtype == "int":
                a, b = a.long(), b.long()
            return torch.where(c, a, b)
        if name in ("minimum", "maximum") or (name in ("min", "max") and len(args) >= 2):
            fn = torch.minimum if name in ("minimum", "min") else torch.maximum
            xs = [self.lift(self.ev(x, g), self.own(x), k) for x in args]
            if t.dtype == "int":
                xs = [x.long() for x in xs]
            out = xs[0]
            for x in xs[1:]:
                out = fn(out, x)
            return out
        if name in ("min", "max", "any", "all", "sum", "argmin", "argmax"):
            x = self.ev(args[0], g)
            flat = x.reshape(x.shape[:self.L] + (-1,))
            if flat.shape[-1] == 0 and name not in ("any", "all", "sum"):    # those have a value: False, True, 0
                self.flag(torch.ones((1,) * self.L, dtype=torch.bool, device=self.device) if g is None else g,
                          "SpecValueError", line, f"{name}() of an empty array")
                return torch.zeros(flat.shape[:-1], dtype=torch.bool if t.dtype == "bool" else torch.int64,
                                   device=self.device)
            if name == "any":
                return _any(flat)
            if name == "all":
                return _all(flat)
            if name == "sum":
                x = flat.long()     # exact overflow test: sum the high and low 32-bit halves apart
                high = torch.bitwise_right_shift(x, 32).sum(-1)
                low = torch.bitwise_and(x, 0xFFFFFFFF).sum(-1)
                top = high + torch.bitwise_right_shift(low, 32)
                self.overflow((top < -2**31) | (top >= 2**31), g, 0, line, "sum", "sum", high, low)
                return x.sum(-1)
            if name in ("argmin", "argmax"):
                return (flat.long().argmin(-1) if name == "argmin" else flat.long().argmax(-1))
            if flat.dtype == torch.bool:
                return _all(flat) if name == "min" else _any(flat)
            return flat.amin(-1) if name == "min" else flat.amax(-1)
        if name == "abs":
            x = self.ev(args[0], g).long()
            self.overflow(x == _I64_MIN, g, k, line, "abs", "abs", x)
            return x.abs()
        if name == "int":
            return self.ev(args[0], g).long()
        if name == "bool":
            return self.ev(args[0], g) != 0
        raise TypeError(f"{name}() is not a DSL function")  # pragma: no cover

    # ---- predicates -----------------------------------------------------------------------
    def members(self, m, dtype):
        """``[B, A]`` values of a race's members (a predicate, a mask or all atoms)."""
        shape = (self.B,) + self.inst.atom_shape
        if m is None:
            return torch.ones((self.B, self.A), dtype=torch.bool, device=self.device)
        if not isinstance(m, ir.Pred):
            v = self.ev(m)
            return v.expand(shape).reshape(self.B, self.A)
        k = len(self.inst.atom_shape)
        self.L = 1 + k
        self.grid = {}
        for j, (name, d) in enumerate(zip(m.params, self.inst.atom_shape)):
            s = [1] * (1 + k)
            s[1 + j] = d
            self.grid[name] = torch.arange(d, device=self.device).reshape(s)
        try:
            v = self.ev(m.body)
        finally:
            self.L, self.grid = 1, None
        self.predicate_errors()
        v = v.expand(shape).reshape(self.B, self.A)
        return v.long() if dtype == "int" and v.dtype == torch.bool else v

    # ---- statements -----------------------------------------------------------------------
    def run(self, body):
        for s in body:
            self.statement(s)

    def statement(self, s):
        if isinstance(s, ir.Assign):
            for target in s.targets:
                if isinstance(target, ast.Tuple):
                    values = [(self.ev(v), self.own(v)) for v in s.value.elts]
                    for t, (v, kv) in zip(target.elts, values):
                        self.store(t, v, kv, s.line)
                else:
                    self.store(target, self.ev(s.value), self.own(s.value), s.line)
        elif isinstance(s, ir.AugAssign) and isinstance(s.target, ast.Subscript):
            self.augmented_store(s)
        elif isinstance(s, ir.AugAssign):
            self.store(s.target, self.ev(s.value), self.own(s.value), s.line, op=s.op)
        elif isinstance(s, ir.If):
            outer = self.active
            test = self.ev(s.test)
            self.active = outer & test
            self.run(s.body)
            self.active = self.after_branch(outer) & ~test
            self.run(s.orelse)
            self.active = self.after_branch(outer)
        elif isinstance(s, ir.Loop):
            self.loop(s)
        elif isinstance(s, ir.Break):
            self.broken[-1] = self.broken[-1] | self.on()
            self.active = self.active & ~self.broken[-1]
        elif isinstance(s, ir.Race):
            self.race(s)
        elif isinstance(s, ir.GroupRace):
            self.race_groups(s)
        elif isinstance(s, ir.Fail):         # a compiler-inserted check: the lane stops with it
            self.flag(self.ev(s.test), s.error, s.line, s.message)
        else:  # pragma: no cover
            raise TypeError(type(s).__name__)

    def after_branch(self, outer):
        return outer & ~self.broken[-1] if self.broken else outer

    def loop(self, s):
        bound_env = {**self.static_env, **self.loop_vars}
        count = ir.static_eval(s.count, bound_env, self.p.file)
        outer = self.active
        self.broken.append(torch.zeros(self.B, dtype=torch.bool, device=self.device))
        for i in range(max(count, 0)):
            self.active = outer & ~self.broken[-1]
            if self.early_exit and not bool(self.on().any()):
                break
            self.loop_vars[s.var] = i
            self.env[s.var] = self.const(i)
            self.run(s.body)
        self.broken.pop()
        self.active = self.after_branch(outer)

    # ---- races ----------------------------------------------------------------------------
    def race(self, s):
        m = _bools(torch.bitwise_and, self.members(s.members, "bool"), self.alive)
        on = self.on()
        if not self.all_lanes(on):          # a [B, A] pass saved when every lane runs
            m = _bools(torch.bitwise_and, m, on[:, None])
        if self.prog._plain_races:
            w = self.compete(s, m)
        else:                                # beside grouped races: one group (nesting by key)
            w = self.compete_groups(s, torch.where(m, 0, -1), 1)[:, 0]
        if len(s.targets) == 1:
            self.store(ast.Name(s.targets[0], ast.Store()), w, 0, s.line)
            return
        for t, x in zip(s.targets, self.unravel(w)):
            self.store(ast.Name(t, ast.Store()), x, 0, s.line)

    def race_groups(self, s):
        G = ir.static_eval(s.groups, self.static_env, self.p.file)
        keys = self.members(s.key, "int")
        out = (keys < -1) | (keys >= G)                  # [B, A]; the reference names the first
        at = out.view(torch.uint8).argmax(1)
        self.flag(_any(out), "SpecValueError", s.line, f"race_groups key {{v0}} outside [-1, {G}) for atom {{atom}}",
                  values=lambda: (keys.gather(1, at[:, None])[:, 0],), atom=at)
        keys = torch.where(_bools(torch.bitwise_and, self.alive, self.on()[:, None]), keys, -1)
        if G:
            ws = self.compete_groups(s, keys, G)
        else:                                # no group, hence no live member in any group
            if not s.allow_empty:
                self.flag(self.on(), "EmptyRaceError", s.line, "race_groups has no live member in any group")
            ws = torch.zeros((self.B, 0), dtype=torch.int64, device=self.device)
        if len(s.targets) == 1:
            self.store(ast.Name(s.targets[0], ast.Store()), ws, 1, s.line)
            return
        for t, x in zip(s.targets, self.unravel(ws)):
            self.store(ast.Name(t, ast.Store()), x, 1, s.line)

    def unravel(self, w):
        out, rest = [], w
        for d in reversed(self.inst.atom_shape):
            out.append(torch.where(w >= 0, torch.remainder(rest, d), -1))
            rest = torch.div(rest, d, rounding_mode="floor")
        return out[::-1]

    def compete_groups(self, s, keys, G):
        """Every group's race at once, as segment reductions over the atoms (``scatter_reduce``
        by key) instead of one masked pass per group: ``keys`` ``[B, A]`` in ``[-1, G)`` (-1:
        no race; lanes that do not run are all -1).  Returns the winners ``[B, G]`` (-1 for an
        empty group).  As the reference: the present groups race in key order, taking the
        next trace slots; each group's winner is its first least residual; every member's
        residual drops by its own group's minimum; then the winners retire."""
        B, A, R = self.B, self.A, self.R
        dev = self.device
        col = keys + 1                                   # column 0 gathers the atoms of no group
        member = keys >= 0
        if self.mode == "solve":
            lo = torch.full((B, G + 1), math.inf, dtype=self.res.dtype, device=dev).scatter_reduce_(
                1, col, self.res, "amin")
            lo[:, 0] = math.inf
            present = lo[:, 1:] < math.inf               # live atoms have finite residuals
            lo_at = lo.gather(1, col)                    # each atom's group minimum (+inf: none)
            first = torch.where(member & (self.res == lo_at), self.atoms_iota, A)
            w = torch.full((B, G + 1), A, dtype=torch.int64, device=dev).scatter_reduce_(1, col, first, "amin")[:, 1:]
        else:
            present = torch.zeros((B, G + 1), dtype=torch.int64, device=dev).scatter_add_(
                1, col, member.long())[:, 1:] > 0
        anyone = _any(present)
        if not s.allow_empty:
            self.flag(~anyone, "EmptyRaceError", s.line, "race_groups has no live member in any group"
                      if isinstance(s, ir.GroupRace) else _EMPTY_RACE)
        if self.p.nested:
            self.check_nested_groups(s, keys, col, member, G)
        # the present groups take the next slots, in key order
        slot_of = self.slot[:, None] + torch.cumsum(present.long(), 1) - 1       # [B, G]
        over = present & (slot_of >= R)          # past the static bound (a suffix of the groups)
        at = torch.where(present, slot_of.clamp(max=max(R - 1, 0)), R)           # R: a spare column
        if self.mode == "solve":
            self.flag(_any(over), "RaceError", s.line, self.too_many_races())
            if not self.p.nested:
                self.lower_residuals(member & (lo_at < math.inf), lo_at)
            if R:
                spare = torch.cat([self.trace, self.trace[:, :1]], 1)
                self.trace = spare.scatter_(1, at, torch.where(present, w, 0))[:, :R].contiguous()
        else:
            w = torch.cat([self.trace, self.trace[:, :1]], 1).gather(1, at) if R else \
                torch.full((B, G), -1, dtype=torch.int64, device=dev)
            ok = present & (w >= 0) & ~over
            ws = torch.where(ok, w, 0)
            won = ok & (keys.gather(1, ws) == torch.arange(G, device=dev))  # the trace's winner is in its group
            bad = _any(present & ~won & ~over)
            # the reference replays the groups in key order: an impossible winner before the
            # first group past the bound (groups past it come last) ends the lane first
            self.flag(_any(over) & ~bad, "RaceError", s.line, self.too_many_races())
            bad = bad | _any(over)
            self.impossible = self.impossible | bad
            self.dead = self.dead | bad
            present = present & ~bad[:, None]
            w = ws
            if self.member_sets is not None:       # replay_flat: each present group's members at its slot
                groups = (col[:, None, :] == torch.arange(1, G + 1, device=dev)[None, :, None]) & present[:, :, None]
                spare = torch.cat([self.member_sets, self.member_sets[:, :1]], 1)
                self.member_sets = spare.scatter(1, at[:, :, None].expand(groups.shape), groups)[:, :R]
            ur = torch.cat([self.u[:, :R], self.u[:, :1]], 1).gather(1, at) if self.u is not None else None
            self.logp, self.log_sum = races.fold_groups(self.logits, col, G, w, present, self.logp,
                                                        self.log_sum if self.u is not None else None, ur)
        if self.p.nested:
            moved = anyone & self.on()
            self.prev_key = torch.where(moved[:, None], keys, self.prev_key)
            self.moved_on(s, moved)
        gone = torch.zeros((B, A + 1), dtype=torch.bool, device=dev).scatter_(1, torch.where(present, w, A), True)
        self.alive = self.alive & ~gone[:, :A]
        self.slot = self.slot + present.long().sum(1)
        return torch.where(present, w, -1)

    def check_nested_groups(self, s, keys, col, member, G):
        """Each group's members lie in one member set of the previous race: their previous
        keys are all equal and not -1."""
        B, dev = self.B, self.device
        big = self.A + 1
        pk = self.prev_key
        lo = torch.full((B, G + 1), big, dtype=torch.int64, device=dev).scatter_reduce_(
            1, col, torch.where(member, pk, big), "amin")[:, 1:]
        hi = torch.full((B, G + 1), -big, dtype=torch.int64, device=dev).scatter_reduce_(
            1, col, torch.where(member, pk, -big), "amax")[:, 1:]
        bad = self.has_prev & _any((lo < big) & ((lo != hi) | (lo < 0)))
        self.flag_nesting(bad, s)

    def flag_nesting(self, bad, s):
        """A broken ``nested=True`` promise at race ``s``, naming the previous race's line."""
        self.flag(bad, "NestingError", s.line,
                  f"spec {self.p.name!r} declares nested=True, but this race's members are not "
                  f"inside one member set of the previous race (line {{v0}})", values=lambda: (self.prev_line,))

    def moved_on(self, s, moved):
        """Nesting: the lanes ``moved`` ran race ``s``, the previous race of their next one."""
        self.has_prev = self.has_prev | moved
        self.prev_line = torch.where(moved, self.const(s.line), self.prev_line)

    def compete(self, s, m):
        """The plain race on mask ``m`` ``[B, A]``; returns the winners ``[B]`` (-1 where
        ``m`` is empty)."""
        narrow = self.mode == "solve" and self.prog._exit_races
        if self.mode == "solve" and not narrow:     # the masked minimum: empty iff it is +inf
            minimum = torch.where(m, self.res, math.inf).min(1)
            nonempty = minimum.values < math.inf
        else:
            nonempty, minimum = _any(m), None
        moved = nonempty & self.on()
        if narrow:
            minimum = self.narrow(m, moved)
        if not s.allow_empty:           # only lanes that did not move can fail here
            self.flag(~nonempty, "EmptyRaceError", s.line, _EMPTY_RACE)
        if self.p.nested:             # the member set the next race must lie in
            bad = self.has_prev & _any(m > self.prev_in)             # a member outside
            self.flag_nesting(bad, s)
            self.prev_in = m if self.all_lanes(moved) else torch.where(moved[:, None], m, self.prev_in)
        w = self.pick(s, m, moved, minimum)
        if self.p.nested:
            self.moved_on(s, moved)
        else:
            self.has_prev = self.has_prev | moved
        return torch.where(moved, w, -1)

    def narrow(self, m, moved):
        """``torch.where(m, res, inf).min(1)`` for a plain race of a nested spec, solving:
        its residuals never change, so ``res`` itself (the machine's copy) is the search
        buffer, kept at ``+inf`` outside each lane's latest member set.  As a member set lies
        inside the previous one, only the atoms that just left it are written: a sparse
        masked fill instead of a masked copy of every atom per race (on 2 CPU cores, about
        2x faster with 4096 atoms a lane).  ``moved``: the lanes whose race runs and is not
        empty.  (A lane that breaks nesting gets an error; what its buffer holds then does
        not matter.)"""
        drop = ~m                                   # first race of a lane: every non-member
        if self.all_lanes(self.has_prev):
            drop = drop & self.prev_in
        else:
            drop = drop & (self.prev_in | ~self.has_prev[:, None])
        if not self.all_lanes(moved):                # a lane whose race did not run keeps its set
            drop = drop & moved[:, None]
        return self.res.masked_fill_(drop, math.inf).min(1)

    def lower_residuals(self, upd, lo):
        """After a race whose minimum is ``lo`` (broadcast to ``[B, A]``): the residuals of
        the members ``upd`` drop by it, in log space as the reference computes it (a member
        equal to the minimum goes to ``-inf``)."""
        if self.log_space:
            gap = torch.where(self.res == lo, -math.inf, self.res + torch.log(-torch.expm1(lo - self.res)))
        else:
            gap = self.res - lo
        self.res = torch.where(upd, gap, self.res)

    def too_many_races(self):
        return f"{self.p.name}: more races than the static bound {self.R}"

    def pick(self, s, m, raced, minimum=None):
        """One race on mask ``m`` for the lanes ``raced``: the winner ``[B]`` (garbage elsewhere);
        ``minimum``: solving, the masked residuals' ``min(1)`` (values and first argmin)."""
        R = self.R
        pos = self.slot.clamp(max=max(R - 1, 0))[:, None]
        over = raced & (self.slot >= R)           # past the static bound: a RaceError, as the reference
        self.flag(over, "RaceError", s.line, self.too_many_races())
        raced = raced & ~over
        if self.mode == "solve":
            w = minimum.indices
            if not self.p.nested:      # nested: every member has the same shift, order kept
                self.lower_residuals(_bools(torch.bitwise_and, m, raced[:, None]), minimum.values[:, None])
            if R:
                self.trace.scatter_(1, pos, torch.where(raced[:, None], w[:, None], self.trace.gather(1, pos)))
        else:
            w = self.trace.gather(1, pos)[:, 0] if R else torch.zeros_like(self.slot)
            ok_index = (w >= 0) & (self.slot < R)
            ws = torch.where(ok_index, w, 0)
            member = m.gather(1, ws[:, None])[:, 0] & ok_index
            bad = raced & ~member
            self.impossible = self.impossible | bad
            self.dead = self.dead | bad
            raced = raced & ~bad
            if not self.all_lanes(member):
                ws = torch.where(member, ws, m.float().argmax(1))
            if self.exit is not None:     # nested: only the exit races are kept (see exit_scores)
                took_part = m if self.all_lanes(raced) else m & raced[:, None]
                self.exit = torch.where(took_part, self.slot[:, None], self.exit)
                w1 = ws[:, None]
                self.alive = self.alive.scatter(1, w1, self.alive.gather(1, w1) & ~raced[:, None])
                self.slot = self.slot + raced.long()
                return ws
            if self.member_sets is not None:       # replay_flat: the race's member set at its slot
                at = pos[:, :, None].expand(-1, 1, self.A)   # lanes that did not race keep their row
                row = torch.where(raced[:, None, None], m[:, None, :], self.member_sets.gather(1, at))
                self.member_sets = self.member_sets.scatter(1, at, row)
            ur = self.u.gather(1, pos)[:, 0] if self.u is not None else None
            self.logp, self.log_sum = races.fold_race(self.logits, m, ws, raced, self.logp,
                                                      self.log_sum if self.u is not None else None, ur)
            w = ws
        w1 = w.clamp(0, self.A - 1)[:, None]
        self.alive = self.alive.scatter(1, w1, self.alive.gather(1, w1) & ~raced[:, None])
        self.slot = self.slot + raced.long()
        return w


class Program(_BaseProgram):
    """A spec lowered to batched PyTorch (see :class:`structdsl.program.Program`).

    Same semantics as the other backends, on tensors: every argument may be a
    ``torch.Tensor`` on any device (arrays are converted), results are tensors on the
    logits' device.  ``log_prob`` and ``conditional_noise`` are differentiable in the logits
    by autograd.  ``enumerate`` and the atoms' valid masks come from the reference backend.
    """

    backend = "torch"
    #: replay CUDA graphs of repeated calls on CUDA tensors (see ``_graphed``); set False on
    #: a program to run every call eagerly
    cuda_graphs = True

    def __init__(self, spec, **static_params):
        super().__init__(spec, **static_params)
        from .numpy_reference import Program as Reference
        self.reference = Reference(spec, **static_params)
        self._codes, self._code_of, self._tensors = [], {}, {}
        self._graph_cache = collections.OrderedDict()
        self._plain_races = not any(isinstance(s, ir.GroupRace) for s in ir.walk_statements(self.ir.body))
        # nested and plain: every atom takes part in a prefix of the races, up to its exit race
        self._exit_races = self.ir.nested and self._plain_races

    def numba_twin(self):
        """The same spec compiled for the numba backend (once), or None without numba: the
        CPU fast path of :class:`structdsl.torch.RaceDistribution`."""
        if not hasattr(self, "_numba_twin"):
            import importlib.util
            self._numba_twin = None
            if importlib.util.find_spec("numba") is not None:
                from .numba_backend import Program as Numba
                self._numba_twin = Numba(self.spec, **self.static_params, **self.data)
        return self._numba_twin

    def _code(self, cls, line, message, shape=None):
        """The error code of (class, line, message); ``shape``: the message is a template
        filled in from the lane's values (``{atom}`` unravelled in this atom shape)."""
        key = (cls, line, message, shape)
        if key not in self._code_of:
            self._codes.append(key)
            self._code_of[key] = len(self._codes)
        return self._code_of[key]

    def atom_mask(self, inst, device):
        """The atoms' valid mask, flat ``[A]``, on ``device`` (made once)."""
        key = ("__valid", inst.atom_shape, str(device))
        if key not in self._tensors:
            self._tensors[key] = torch.as_tensor(np.array(inst.valid.reshape(-1)), device=device)
        return self._tensors[key]

    def _tensors_of(self, inst, device):
        """Data parameters and tuple constants as tensors on ``device`` (made once)."""
        key = (inst.atom_shape, str(device))
        if key not in self._tensors:
            arrays = {**self._constant_arrays, **self.data}
            self._tensors[key] = {k: torch.as_tensor(np.array(v), device=device) for k, v in arrays.items()}
        return self._tensors[key]

    # ---- argument checks (tensors) -------------------------------------------------------
    def _logits(self, logits, what="logits"):
        if torch.is_tensor(logits):
            x = logits
        else:
            try:
                x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
            except (TypeError, ValueError) as exc:       # the Program API's words
                raise TypeError(f"{what} must be a real array: {exc}") from None
        if not torch.is_floating_point(x):
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
        k = self.atom_ndim
        if x.dim() < k:
            raise ValueError(f"{self.ir.name}: {what} must have shape {self.expected_shape()} (at least {k} "
                             f"dims), got shape {tuple(x.shape)}")
        inst = self.instance(tuple(x.shape[x.dim() - k:]))
        if x.numel():
            # as the Program API: entries at invalid atoms are not part of the model, ignored
            # whatever they hold; NaN or +inf at a valid atom is refused, naming its index
            valid = self.atom_mask(inst, x.device).reshape(inst.atom_shape)
            nan, pinf = torch.isnan(x), torch.isposinf(x)
            bad_nan, bad_pinf, ignored = torch.stack([(nan & valid).any(), (pinf & valid).any(),
                                                      ((nan | pinf) & ~valid).any()]).tolist()
            if bad_nan:
                nan = nan & valid
                raise ValueError(f"{what} contain NaN ({int(nan.sum())} entries, first at "
                                 f"index {tuple(torch.nonzero(nan)[0].tolist())})")
            if bad_pinf:
                raise ValueError(f"{what} contain +inf (first at index "
                                 f"{tuple(torch.nonzero(pinf & valid)[0].tolist())}): a rate of +inf "
                                 f"has no race law; use large finite logits")
            if ignored:          # no NaN may reach a kernel (or a gradient: 0 * NaN is NaN)
                x = torch.where(valid, x, -math.inf)
        return x, tuple(x.shape[:x.dim() - k]), inst

    def _uniforms_t(self, uniforms, generator, shape, like, what="uniforms", seed=None):
        if seed is not None:
            # seed= means what it means on every backend: the reference's NumPy draw, so one
            # seed gives one sample everywhere (generator= is torch's own stream)
            if uniforms is not None or generator is not None:
                raise TypeError("give either uniforms= or seed=, not both" if uniforms is not None
                                else "give either generator= or seed=, not both")
            uniforms = self._uniforms(None, seed, tuple(shape), what)
        if uniforms is None:
            u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
            return u.clamp_min(torch.finfo(like.dtype).tiny)
        if generator is not None:
            raise TypeError("give either uniforms= or generator=, not both")
        u = uniforms if torch.is_tensor(uniforms) else torch.as_tensor(np.asarray(uniforms, dtype=np.float64))
        u = u.to(device=like.device, dtype=like.dtype)
        if tuple(u.shape) != tuple(shape):
            raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(u.shape)}")
        if u.numel() and not bool(((u > 0) & (u < 1)).all()):
            raise ValueError(f"{what} must lie strictly inside (0, 1)")
        return u

    def _trace(self, trace, logits):
        x, lbatch, inst = self._logits(logits)
        t = trace if torch.is_tensor(trace) else torch.as_tensor(np.asarray(trace))
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            # the Program API's words (structdsl.program), with NumPy's name of the dtype
            raise TypeError(f"trace must be an integer array, got dtype {str(t.dtype).removeprefix('torch.')}")
        R = inst.max_races
        if t.dim() < 1 or t.shape[-1] != R:
            raise ValueError(f"trace must have shape [..., {R}] (max_races of {self.ir.name} for atoms "
                             f"{inst.atom_shape}), got {tuple(t.shape)}")
        t = t.to(device=x.device, dtype=torch.int64)
        if t.numel() and bool(((t < -1) | (t >= inst.num_atoms)).any()):
            raise ValueError(f"trace entries must be flat atom indices in [0, {inst.num_atoms}) or -1 padding")
        try:
            batch = torch.broadcast_shapes(tuple(t.shape[:-1]), lbatch)
        except RuntimeError:
            raise ValueError(f"trace batch shape {tuple(t.shape[:-1])} does not broadcast with logits "
                             f"batch shape {lbatch}") from None
        B = math.prod(batch)
        t = t.expand(tuple(batch) + (R,)).reshape(B, R)
        x = x.expand(tuple(batch) + inst.atom_shape).reshape(B, inst.num_atoms)
        return t, x, tuple(batch), inst

    # ---- the machine ----------------------------------------------------------------------
    def _machine(self, inst, mode, live, device):
        m = _Machine(self, inst, mode, live, device)
        p = self.ir
        m.static_env = {k: v for k, v in p.static_values(
            {k: v for k, v in inst.params.items() if isinstance(v, int)},
            lambda e, env: ir.static_eval(e, env, p.file)).items()}
        m.loop_vars = {}
        return m

    def _finish(self, err, batch):
        """Raise the first lane's error, ``err`` ``[B, 4]`` the lanes' error codes and the
        values their messages name (see ``_Machine.errors``; one sync per call)."""
        if err.numel() and bool((err[:, 0] > 0).any()):
            lane = int(torch.nonzero(err[:, 0] > 0)[0, 0])
            code, *values = (int(v) for v in err[lane].tolist())
            cls, line, message, shape = self._codes[code - 1]
            if shape is not None:
                message = _render(message, values, shape)
            lane_index = tuple(int(i) for i in np.unravel_index(lane, batch)) if batch else None
            raise getattr(errors, cls)(message, self.ir.file, line, lane_index)

    # ---- CUDA graphs ----------------------------------------------------------------------
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

    def _no_trace(self, logp, what):
        """Raise for the first lane whose trace has probability zero (one sync)."""
        if bool(torch.isneginf(logp).any()):
            lane = int(torch.nonzero(torch.isneginf(logp))[0, 0])
            raise ValueError(f"trace (flat batch index {lane}) {what}")

    def _outputs(self, m):
        out = []
        for name in self.ir.outputs:
            v = m.env[name]
            t = m.inst.types.outputs[name]
            shape = tuple(d.value for d in t.shape)
            out.append(v.expand((m.B,) + shape))
        return out

    def _solve_t(self, inst, res, log_space, batch):
        """(trace ``[B, R]``, fields) of the algorithm on residuals ``res`` ``[B, A]``."""
        def body(res):
            device = res.device
            live = self.atom_mask(inst, device) & (res < math.inf)
            m = self._machine(inst, "solve", live, device)
            m.res, m.log_space = res.clone(), log_space
            m.trace = torch.full((m.B, inst.max_races), -1, dtype=torch.int64, device=device)
            with torch.no_grad():
                m.run(self.ir.body)
            return (m.errors(), m.trace, *self._outputs(m))
        err, trace, *fields = self._run_body(("solve", inst.atom_shape, log_space), body, (res.detach(),))
        self._finish(err, batch)
        return trace, fields

    # ---- public API -----------------------------------------------------------------------
    def sample(self, logits, *, sample_shape=(), uniforms=None, seed=None, generator=None):
        """Draw structures: ``log E = log(-log U) - logits`` raced in log space.

        logits: ``[*batch, *atom_shape]`` (float32 or float64, any device); uniforms:
        ``sample_shape + batch + atom_shape`` in (0, 1); or ``seed`` (an int: the NumPy
        reference's draw, so a seed gives the same sample on every backend); or drawn with
        torch's ``generator`` (its default when none of the three is given).
        Returns :class:`~structdsl.program.Sample` of tensors (trace ``[*lead, max_races]``).
        """
        x, batch, inst = self._logits(logits)
        shape = tuple(sample_shape) + batch + inst.atom_shape
        u = self._uniforms_t(uniforms, generator, shape, x, seed=seed)
        lead = shape[:len(shape) - self.atom_ndim]
        A = inst.num_atoms
        xb = x.detach().expand(shape).reshape(-1, A)
        live = self.atom_mask(inst, x.device) & ~torch.isneginf(xb)
        log_e = torch.where(live, torch.log(-torch.log(u.reshape(-1, A))) - torch.where(live, xb, 0.0), math.inf)
        trace, fields = self._solve_t(inst, log_e, True, lead)
        return Sample(trace.reshape(lead + (inst.max_races,)), self._structure_t(fields, lead),
                      log_e.reshape(shape))

    def solve(self, weights):
        """Run the algorithm on raw noise ``weights`` ``[*batch, *atom_shape]`` (+inf excludes)."""
        w = weights if torch.is_tensor(weights) else torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if not torch.is_floating_point(w):
            w = w.double()
        k = self.atom_ndim
        if w.dim() < k:
            raise ValueError(f"{self.ir.name}: weights must have shape {self.expected_shape()}, got {tuple(w.shape)}")
        batch, inst = tuple(w.shape[:w.dim() - k]), self.instance(tuple(w.shape[w.dim() - k:]))
        if w.numel() and bool((torch.isnan(w) | torch.isneginf(w)).any()):
            raise ValueError("weights contain NaN or -inf")
        w = torch.where(self.atom_mask(inst, w.device), w.reshape(-1, inst.num_atoms), math.inf)
        trace, fields = self._solve_t(inst, w, False, batch)
        return Solution(trace.reshape(batch + (inst.max_races,)), self._structure_t(fields, batch))

    def _structure_t(self, fields, lead):
        return self.Structure(*(f.reshape(tuple(lead) + tuple(f.shape[1:])) for f in fields))

    def _replay_t(self, t, x, inst, batch, u=None):
        """(log p ``[B]``, the machine, live atoms) of traces ``t`` ``[B, R]`` under logits
        ``x`` ``[B, A]``; differentiable in ``x``; raises the lanes' first spec error."""
        logp, m, live = self._replay_core(t, x, inst, u)
        self._finish(m.errors(), batch)
        return logp, m, live

    def _replay_core(self, t, x, inst, u=None, members=False):
        device = x.device
        live = self.atom_mask(inst, device) & ~torch.isneginf(x.detach())
        m = self._machine(inst, "replay", live, device)
        m.trace, m.logits, m.u = t, x, u
        m.member_sets = torch.zeros((m.B, inst.max_races, inst.num_atoms), dtype=torch.bool, device=device) \
            if members and not self._exit_races else None
        m.logp = torch.zeros(m.B, dtype=x.dtype, device=device)
        m.log_sum = torch.full((m.B, inst.num_atoms), torch.finfo(x.dtype).min / 4, dtype=x.dtype, device=device)
        m.exit = torch.full((m.B, inst.num_atoms), -1, dtype=torch.int64, device=device) \
            if self._exit_races else None
        with torch.no_grad() if self._exit_races else contextlib.nullcontext():
            m.run(self.ir.body)
        # nested plain races: log p from the exit races in one pass (the machine kept no score)
        m.races = races.ExitRaces(m.exit, inst.max_races) if m.exit is not None else None
        if m.races is not None:
            m.logp = races.log_prob(x, t, m.races)
        # winners the program never asked for
        tail = (torch.arange(inst.max_races, device=device)[None, :] >= m.slot[:, None]) & (t >= 0)
        m.impossible = m.impossible | (_any(tail) & ~m.dead)
        logp = torch.where(m.impossible, -math.inf, m.logp)
        return logp, m, live

    # ---- the backend contract (structdsl.program) on tensors ----------------------------------
    def solve_flat(self, inst, weights, log_space):
        return self._solve_t(inst, weights, log_space, (weights.shape[0],))

    def draw_flat(self, inst, uniforms, logits, check_logits=None):
        live = self.atom_mask(inst, logits.device) & ~torch.isneginf(logits)
        log_e = torch.where(live, races.log_race_minimum(uniforms, torch.where(live, logits, 0.0)), math.inf)
        trace, fields = self.solve_flat(inst, log_e, True)
        return Draw(trace, fields, log_e)

    def replay_flat(self, inst, traces, logits):
        """Exit races for a nested spec with plain races, else member sets ``[B, R, A]``."""
        logp, m, _ = self._replay_core(traces, logits, inst, members=True)
        self._finish(m.errors(), (traces.shape[0],))
        return Replay(logp > -math.inf, m.races if m.races is not None else races.Members(m.member_sets))

    def _score_body(self, inst):
        """``(t, x) -> (err, log p, d log p / dx)`` for a CUDA graph: the replay and its
        backward in one capture (0 gradient where log p is -inf)."""
        def body(t, x):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                logp, m, _ = self._replay_core(t, xg, inst)
                finite = torch.isfinite(logp)
                grad = None
                if logp.requires_grad:              # not when no lane ran a race
                    (grad,) = torch.autograd.grad(torch.where(finite, logp, 0.0).sum(), xg, allow_unused=True)
            grad = torch.zeros_like(x) if grad is None else torch.where(finite[:, None], grad, 0.0)
            return m.errors(), logp.detach(), grad
        return body

    def decode(self, trace, logits):
        """The structure record of ``trace`` (replayed under ``logits``, which say which atoms
        are live); fields ``[*batch, *field_shape]``.  Raises ValueError for an impossible trace."""
        t, x, batch, inst = self._trace(trace, logits)

        def body(t, x):
            with torch.no_grad():
                logp, m, _ = self._replay_core(t, x, inst)
            return (m.errors(), logp, *self._outputs(m))
        err, logp, *fields = self._run_body(("decode", inst.atom_shape), body, (t, x))
        self._finish(err, batch)
        self._no_trace(logp, f"is not a trace of {self.ir.name} under these logits: it has no structure")
        return self._structure_t(fields, batch)

    def log_prob(self, trace, logits):
        """log p(trace), differentiable in the logits; ``-inf`` for impossible traces.
        trace ``[*b1, max_races]``, logits ``[*b2, *atom_shape]``; returns ``[*broadcast(b1, b2)]``."""
        t, x, batch, inst = self._trace(trace, logits)
        if self._graphs_apply(t, x):
            if x.requires_grad and torch.is_grad_enabled():
                # the replay and its backward as one graph; the analytic gradient is the backward
                err, logp, grad = self._graphed(("score", inst.atom_shape), self._score_body(inst), (t, x.detach()))
                self._finish(err, batch)
                eager = lambda x: self._replay_t(t, x, inst, batch)[0]   # noqa: E731
                return _GraphedScore.apply(x, logp, grad, eager).reshape(batch)

            def body(t, x):
                logp, m, _ = self._replay_core(t, x, inst)
                return m.errors(), logp
            err, logp = self._graphed(("log_prob", inst.atom_shape), body, (t, x.detach()))
            self._finish(err, batch)
            return logp.reshape(batch)
        logp, _, _ = self._replay_t(t, x, inst, batch)
        return logp.reshape(batch)

    def log_prob_and_grad(self, trace, logits):
        """``(log p [*batch], d log p / d logits [*batch, *atom_shape])``, the gradient by
        autograd (0 where ``log p`` is ``-inf``); no graph is kept."""
        t, x, batch, inst = self._trace(trace, logits)
        err, logp, grad = self._run_body(("score", inst.atom_shape), self._score_body(inst), (t, x))
        self._finish(err, batch)
        return logp.reshape(batch), grad.reshape(batch + inst.atom_shape)

    def conditional_noise(self, trace, logits, *, uniforms=None, seed=None, generator=None):
        """``E | T``, reparameterised: differentiable in the logits given the uniforms.
        uniforms ``[*batch, max_races + A]`` (race minima first, then the fresh noise), or
        ``seed`` (the reference's draw) or ``generator``, as for :meth:`sample`."""
        t, x, batch, inst = self._trace(trace, logits)
        R, A = inst.max_races, inst.num_atoms
        u = self._uniforms_t(uniforms, generator, batch + (R + A,), x, seed=seed).reshape(-1, R + A)

        def body(t, x, u):
            logp, m, live = self._replay_core(t, x, inst, u)
            if m.races is not None:
                noise = races.noise_given_trace(x, t, m.races, u, live)
            else:                          # the machine summed the race minima as it replayed
                noise = races.noise_from_sums(x, t, m.log_sum, u, live)
            return m.errors(), logp, noise
        # without a gradient to carry, E | T is one more replay (differentiable: eager)
        err, logp, noise = self._run_body(("noise", inst.atom_shape), body, (t, x, u),
                                          graphs=not (x.requires_grad and torch.is_grad_enabled()))
        self._finish(err, batch)
        self._no_trace(logp, "has probability zero under these logits: there is no noise that produces it")
        return noise.reshape(batch + inst.atom_shape)
