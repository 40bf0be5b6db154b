"""Race lowering for the torch backend's lock-step machine (:class:`torch_machine._Machine`).

:class:`RaceLowering` is a mixin of the machine: it runs a ``race`` or ``race_groups``
statement on every lane at once.  Solving, a plain race is a masked argmin of the residuals
(first index on ties) and a grouped race one segment reduction by key (``scatter_reduce``),
the present groups taking trace slots in key order; replaying, the winners come from the
trace and the score is folded in by :func:`structdsl.races.fold_race` /
:func:`structdsl.races.fold_groups`.  It also checks what the reference checks: empty
races, the static bound on races, the ``nested=True`` promise, and traces that are
impossible.  A mixin, not a separate object, because a race reads and writes most of the
machine's lane state (residuals, trace, live atoms, slots, errors) and calls back into its
expressions and stores.
"""
from __future__ import annotations

import ast
import math

import torch

from structdsl import ir, races

from .torch_ops import _any, _bools

_EMPTY_RACE = ("race has no live member (every candidate is retired, invalid or at logit -inf; "
               "race(..., allow_empty=True) returns -1 instead)")


class RaceLowering:
    """The race half of :class:`torch_machine._Machine` (``race``, ``race_groups`` and the
    ``compete*`` / ``narrow`` / ``pick`` steps they share)."""

    def race(self, s):
        m = _bools(torch.bitwise_and, self.members(s.members, "bool"), self.alive)
        on = self.on()
        if not self.all_lanes(on):          # a [B, A] pass saved when every lane runs
            m = _bools(torch.bitwise_and, m, on[:, None])
        if self.prog._plain_races:
            w = self.compete(s, m)
        else:                                # beside grouped races: one group (nesting by key)
            w = self.compete_groups(s, torch.where(m, 0, -1), 1)[:, 0]
        self.store_winners(s, w, 0)

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
        self.store_winners(s, ws, 1)

    def store_winners(self, s, w, rank):
        """Bind race ``s``'s targets: the flat winners ``w`` (``rank`` 0: ``[B]``, 1: ``[B, G]``),
        or, with one target per atom dimension, their unravelled indices."""
        if len(s.targets) == 1:
            self.store(ast.Name(s.targets[0], ast.Store()), w, rank, s.line)
            return
        for t, x in zip(s.targets, self.unravel(w)):
            self.store(ast.Name(t, ast.Store()), x, rank, s.line)

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
