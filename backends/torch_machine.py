"""The torch backend's lock-step machine: one call of a spec on ``B`` lanes at once.

:class:`_Machine` holds the lanes' state (which lanes execute, which are dead, the first
error of each and the values its message names), binds and stores locals, evaluates race
predicates on the atoms' index grid, and runs statements and loops under masks; its
expressions come from :class:`torch_exprs.ExprLowering` and its races from
:class:`torch_races.RaceLowering`.  The errors it records are codes that
:meth:`torch_backend.Program._finish` turns back into the reference's exceptions, with the
message templates filled in by :func:`_render`.  See :mod:`torch_backend` for how control
flow becomes masks.
"""
from __future__ import annotations

import ast
import math

import numpy as np
import torch

from structdsl import ir
from structdsl.errors import RaceError

from .torch_exprs import ExprLowering
from .torch_ops import _any, _any_lead
from .torch_races import RaceLowering


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


class _Machine(ExprLowering, RaceLowering):
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

    # ---- stores ---------------------------------------------------------------------------
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
