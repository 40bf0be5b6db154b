"""Race lowering for the numba code generator: each race statement as calls of the race
kernels of :mod:`numba_kernels`, with its member test lowered per atom.

Three paths, chosen once per spec (:class:`RaceLowering` sets ``fast``, ``blocks`` and ``snap``):

* the generic path: each race evaluates its predicate (or mask) for every atom into a
  buffer and calls ``race`` / ``race_groups``, which solve, score or do both;
* the nested fast path (a ``nested=True`` spec without grouped races): every race lies
  inside the previous one, so sampling pops the winners from one heap of the lane's noise and
  tests the predicate only for popped atoms (a lane whose pops are mostly wasted races
  through blocks instead: :func:`_nested_race`), and replaying scores through each atom's
  exit race (the last race it took part in) instead of summing over the members of every race;
* its snapshot scorer (every race has a predicate, or no condition): each race keeps the
  lane locals its predicate reads, and after the body a binary search over those snapshots
  finds every atom's exit race, in O(atoms x log races) predicate tests.
"""
from __future__ import annotations

import ast
import copy

from structdsl import ir

from .numba_ast import LANE_STATE, _attr, _call, _mode, _name, _np, _set_row, _st
from .numba_kernels import (MODE_SAMPLE_SCORE_NESTED, MODE_SCORE, MODE_SOLVE, ST_ATOM, ST_BLOCKS, ST_CANDIDATES, ST_SLOT,
                            ST_STATUS)


class RaceLowering:
    """The race pass of a :class:`numba_lowering.Codegen` (``gen``): it lowers member tests
    through the generator's expressions, with the predicate's parameters renamed."""

    def __init__(self, gen):
        self.gen = gen
        program = gen.p
        # the nested fast path: every race inside the previous one, so in solve mode one
        # sort of the lane's noise serves every race (grouped races keep the generic path)
        self.fast = "nested_heap" in gen.passes and program.nested and not any(isinstance(s, ir.GroupRace)
                                               for s in ir.walk_statements(program.body))
        # ... and its score replays through snapshots when every race has a predicate (or
        # no condition): each race keeps the lane locals its predicate reads, and each
        # atom's exit race is then found by binary search over the races (see race())
        self.snap = "snapshot_scorer" in gen.passes and self.fast and all(isinstance(s.members, (ir.Pred, type(None)))
                                      for s in ir.walk_statements(program.body) if isinstance(s, ir.Race))
        # ... and its blocks (_nested_race), where a race has a member test: only a test can
        # make a popped atom a non-member, and so waste a pop
        self.blocks = "block_race" in gen.passes and self.fast and any(
            s.members is not None for s in ir.walk_statements(program.body) if isinstance(s, ir.Race))
        self.sites = []                  # snapshot races: (members, the lane locals it reads)
        self.site_of = {}                # id(race statement) -> its site

    def member_test(self, members, atom, rename=None):
        """``(pre, stmts, value)``: ``pre`` runs once per race, ``stmts`` then ``value`` say
        whether the flat atom ``atom`` is a member (a predicate, a mask expression or all).
        ``rename``: lane locals the predicate reads under other names (snapshots)."""
        if members is None:
            return [], [], ast.Constant(True)
        if not isinstance(members, ir.Pred):
            flat = _call(_attr(self.gen.expr(members), "reshape"), ast.UnaryOp(ast.USub(), ast.Constant(1)))
            pre = [ast.Assign([_name("__flat", ast.Store())], flat)]
            return pre, [], ast.Subscript(_name("__flat"), _name(atom), ast.Load())
        names = [f"__x{i}" for i in range(len(members.params))]
        self.gen.rename = {**(rename or {}), **dict(zip(members.params, names))}
        self.gen.in_pred = True
        try:
            value = self.gen.expr(members.body)
        finally:
            self.gen.rename = {}
            self.gen.in_pred = False
        return [], self.unravel(_name(atom), names), value

    def fill(self, members, buffer):
        """Statements writing a predicate's (or mask's) value for every atom into ``buffer``,
        atom by atom in flat order (the reference's per-atom meaning, and its first error).
        The reference names the atom whose evaluation failed: when the loop met an error,
        a second loop finds that atom (nothing is spent on it otherwise)."""
        codes = len(self.gen.codes)
        pre, stmts, value = self.member_test(members, "__a")
        body = stmts + [ast.Assign([ast.Subscript(_name(buffer), _name("__a"), ast.Store())], value)]
        loop = ast.For(_name("__a", ast.Store()), _call("__range", _name("__A")), body, [])
        if not isinstance(members, ir.Pred) or len(self.gen.codes) == codes:
            return pre + [loop]
        _, stmts, value = self.member_test(members, "__a")
        st0 = _st(ST_STATUS)
        found = ast.If(ast.Compare(st0, [ast.NotEq()], [ast.Constant(0)]), [
            ast.Assign([_st(ST_ATOM, ast.Store())],
                       ast.BinOp(_name("__a"), ast.Add(), ast.Constant(1))), ast.Break()], [])
        locate = ast.For(_name("__a", ast.Store()), _call("__range", _name("__A")),
                         stmts + [ast.Assign([_name(self.gen.temp("v"), ast.Store())], value), found], [])
        met = ast.BoolOp(ast.And(), [ast.Compare(_name("__z"), [ast.Eq()], [ast.Constant(0)]),
                                     ast.Compare(st0, [ast.NotEq()], [ast.Constant(0)])])
        again = [ast.Assign([_st(ST_STATUS, ast.Store())], ast.Constant(0)), locate]
        return pre + [ast.Assign([_name("__z", ast.Store())], st0), loop, ast.If(met, again, [])]

    def nested_members(self, members):
        """Replaying a nested spec: only the live atoms of the previous race's member list
        ``__cand[:__st[ST_CANDIDATES]]`` can be members (nesting), so only they are tested;
        the members are compacted in place into ``__cand[:__m]`` and get ``__ex[a] = this
        race``."""
        pre, stmts, value = self.member_test(members, "__a")
        keep = [ast.Assign([ast.Subscript(_name("__cand"), _name("__m"), ast.Store())], _name("__a")),
                ast.AugAssign(_name("__m", ast.Store()), ast.Add(), ast.Constant(1)),
                ast.Assign([ast.Subscript(_name("__ex"), _name("__a"), ast.Store())], _st(ST_SLOT))]
        body = [ast.Assign([_name("__a", ast.Store())], ast.Subscript(_name("__cand"), _name("__k"), ast.Load())),
                ast.If(ast.Subscript(_name("__alive"), _name("__a"), ast.Load()),
                       stmts + [ast.If(value, keep, [])], [])]
        count = _st(ST_CANDIDATES)
        return pre + [ast.Assign([_name("__m", ast.Store())], ast.Constant(0)),
                      ast.For(_name("__k", ast.Store()), _call("__range", count), body, [])]

    def unravel(self, flat, names):
        """``names`` = the multi-index of the flat atom index ``flat`` (C order)."""
        if len(names) == 1:
            return [ast.Assign([_name(names[0], ast.Store())], flat)]
        # a table made once per call ([A, ndim]): no integer division in the atom loops
        return [ast.Assign([_name(x, ast.Store())],
                           ast.Subscript(_name("__unr"), ast.Tuple([flat, ast.Constant(axis)], ast.Load()), ast.Load()))
                for axis, x in enumerate(names)]

    def race_args(self, s):
        """``(state, allow_empty, code_empty, code_nest, code_bound)`` of race ``s``, with the
        reference's messages."""
        line, code, name = s.line, self.gen.code, self.gen.p.name
        if isinstance(s, ir.GroupRace):
            empty = code("EmptyRaceError", line, "race_groups has no live member in any group")
        else:
            empty = code("EmptyRaceError", line, "race has no live member (every candidate is retired, "
                         "invalid or at logit -inf; race(..., allow_empty=True) returns -1 instead)")
        nest = code("NestingError", line, f"spec {name!r} declares nested=True, but this race's "
                    f"members are not inside one member set of the previous race (line {{prev}})", "nest")
        bound = code("RaceError", line, f"{name}: more races than the static bound {{a}}", "bound")
        return [_name(x) for x in LANE_STATE[:1] + LANE_STATE[2:]], ast.Constant(s.allow_empty), empty, nest, bound

    def read_locals(self, members):
        """The lane locals a race predicate reads (sorted): what its snapshot keeps."""
        if members is None:
            return []
        found = {n.id for n in ast.walk(members.body) if isinstance(n, ast.Name)}
        return sorted(found.intersection(self.gen.types.locals) - set(members.params))

    def snapshot_keep(self, s):
        """Keep the lane locals race ``s``'s predicate reads in the snapshot of the current
        slot (once per race statement: the replay and the sampler share the site)."""
        if id(s) not in self.site_of:
            self.site_of[id(s)] = len(self.sites)
            self.sites.append((s.members, self.read_locals(s.members)))
        site = self.site_of[id(s)]
        free = self.sites[site][1]
        slot = _st(ST_SLOT)
        keep = [_set_row(_name(f"__sn{site}_{v}"), slot, _name(v), bool(self.gen.types.locals[v].shape))
                for v in free]
        keep.append(ast.Assign([ast.Subscript(_name("__site"), slot, ast.Store())], ast.Constant(site)))
        return [ast.If(ast.Compare(slot, [ast.Lt()], [_attr(_name("__tr"), "size")]), keep, [])]

    def snapshot_race(self, s, allow, empty, bound):
        """Replaying a race of the nested fast path (mode != MODE_SOLVE): keep the locals its predicate
        reads in this race's slot, check that the trace's winner is a member (scanning every
        live atom only when it is not, to tell an empty race from an impossible trace) and
        retire it.  The other atoms' exit races come after the body (:meth:`exit_search`)."""
        slot = _st(ST_SLOT)
        fits = ast.Compare(slot, [ast.Lt()], [_attr(_name("__tr"), "size")])
        out = self.snapshot_keep(s) + [
            ast.If(fits, [ast.Assign([_name("__w", ast.Store())], ast.Subscript(_name("__tr"), slot, ast.Load()))],
                   [ast.Assign([_name("__w", ast.Store())], ast.Constant(-1))]),
            ast.Assign([_name("__in", ast.Store())], ast.Constant(False))]
        _, stmts, value = self.member_test(s.members, "__w")
        valid = ast.BoolOp(ast.And(), [ast.Compare(_name("__w"), [ast.GtE()], [ast.Constant(0)]),
                                        ast.Compare(_name("__w"), [ast.Lt()], [_name("__A")])])
        out.append(ast.If(valid, [ast.If(ast.Subscript(_name("__alive"), _name("__w"), ast.Load()),
                                         stmts + [ast.Assign([_name("__in", ast.Store())], value)], [])], []))
        _, stmts, value = self.member_test(s.members, "__a")
        found = ast.If(value, [ast.Assign([_name("__any", ast.Store())], ast.Constant(True)), ast.Break()], [])
        scan = ast.For(_name("__a", ast.Store()), _call("__range", _name("__A")),
                       [ast.If(ast.Subscript(_name("__alive"), _name("__a"), ast.Load()), stmts + [found], [])], [])
        out += [ast.Assign([_name("__any", ast.Store())], _name("__in")),
                ast.If(ast.UnaryOp(ast.Not(), _name("__in")), [scan], [])]
        return out, _call("__score_snap", _name("__w"), _name("__in"), _name("__any"), _name("__alive"),
                          _name("__tr"), _name("__st"), _name("__ex"), allow, empty, bound)

    def exit_search(self):
        """After a snapshot replay: every live atom that never won left after the last race
        whose predicate (on that race's snapshot) holds for it.  Nesting makes membership
        monotone in the race, so a binary search finds it: O(atoms x log races) predicate
        tests instead of one per member per race (:data:`_EXIT_SEARCH`)."""
        if not self.sites:
            return []
        branches = []
        for site, (members, free) in enumerate(self.sites):
            rename = {v: f"__sv{site}_{v}" for v in free}
            _, stmts, value = self.member_test(members, "__a", rename)
            stmts = [stmt for stmt in stmts if not (isinstance(stmt, ast.Assign) and
                                                    stmt.targets[0].id.startswith("__x"))]   # unravelled once
            bind = [ast.Assign([_name(rename[v], ast.Store())],
                               ast.Subscript(_name(f"__sn{site}_{v}"), _name("__mid"), ast.Load())) for v in free]
            branches.append((site, bind + stmts + [ast.Assign([_name("__in", ast.Store())], value)]))
        # one site: its test alone, so that __in is the predicate's value (a phi of it and
        # False would give LLVM a branch on it back)
        dispatch = branches[0][1] if len(branches) == 1 else _splice("__in = False")
        for site, body in reversed(branches if len(branches) > 1 else []):
            test = ast.Compare(ast.Subscript(_name("__site"), _name("__mid"), ast.Load()), [ast.Eq()],
                               [ast.Constant(site)])
            dispatch = [ast.If(test, body, dispatch)]
        arity = {len(m.params) for m, _ in self.sites if m is not None}
        if len(arity) > 1:           # pragma: no cover - one atom declaration: one arity
            self.gen.fail(self.gen.p.body[0], "races with predicates of different arities")
        # the atom's coordinates, once per atom (a race without a predicate needs none)
        unravel = self.unravel(_name("__a"), [f"__x{i}" for i in range(arity.pop())]) if arity else []
        # a test that branches itself (a short-circuit and/or, a conditional, several sites)
        # mispredicts anyway: it keeps the search that stops early, branching on the outcome
        branches = any(isinstance(n, (ast.BoolOp, ast.IfExp, ast.If, ast.While, ast.For))
                       for t in dispatch for n in ast.walk(t))
        src = (_EXIT_SEARCH_BRANCHING if branches else _EXIT_SEARCH).replace("ST_SLOT", str(ST_SLOT)) \
            .replace("ST_STATUS", str(ST_STATUS)).replace("MODE_SOLVE", str(MODE_SOLVE))
        return _splice(src, UNRAVEL=unravel, TEST=dispatch)

    def snapshot_buffers(self):
        """The snapshot buffers of the lane (empty when sampling): one slot per trace slot."""
        slots = ast.IfExp(_mode(ast.NotEq(), MODE_SOLVE), _attr(_name("__tr"), "size"), ast.Constant(0))
        out = [ast.Assign([_name("__site", ast.Store())], _call(_np("empty"), slots, _np("int64")))]
        for site, (_, free) in enumerate(self.sites):
            for v in free:
                t = self.gen.types.locals[v]
                dims = [self.gen.static(ast.parse(d.text, mode="eval").body, False) for d in t.shape]
                out.append(ast.Assign([_name(f"__sn{site}_{v}", ast.Store())],
                                      _call(_np("empty"), ast.Tuple([slots] + dims, ast.Load()),
                                            _np("bool_" if t.dtype == "bool" else "int64"))))
        return out

    def race(self, s):
        state, allow, empty, nest, bound = self.race_args(s)
        w = self.gen.temp("w")
        if self.snap:        # score through snapshots and exit races found afterwards
            generic, call = self.snapshot_race(s, allow, empty, bound)
        elif self.fast:      # score through exit races: no per-race sums over the members
            generic = self.nested_members(s.members)
            call = _call("__score_nested", _name("__m"), _name("__alive"), _name("__tr"),
                         _name("__st"), _name("__ex"), allow, empty, bound)
        else:
            generic = self.fill(s.members, "__mb")
            call = _call("__race", _name("__mode"), _name("__mb"), *state, allow, empty, nest, bound,
                         ast.Constant(s.line))
        generic.append(ast.Assign([_name(w, ast.Store())], call))
        out = generic
        if self.fast:        # solving and sampling pop the lane's heap; a replay scores as above
            out = [ast.If(_mode(ast.NotEq(), MODE_SCORE), self.pop(s, w, allow, empty, bound), generic)]
        out.append(self.gen.check())
        if len(s.targets) == 1:
            out.append(ast.Assign([_name(s.targets[0], ast.Store())], _name(w)))
            return out
        idx = [self.gen.temp("x") for _ in s.targets]
        out += [ast.If(ast.Compare(_name(w), [ast.GtE()], [ast.Constant(0)]),
                       self.unravel(_name(w), idx),
                       [ast.Assign([_name(i, ast.Store())], ast.Constant(-1)) for i in idx])]
        out += [ast.Assign([_name(t, ast.Store())], _name(i)) for t, i in zip(s.targets, idx)]
        return out

    def pop(self, s, w, allow, empty, bound):
        """The nested fast path: the winner is the first member popped from the lane's heap of
        live atoms (ordered by raw noise); a popped non-member is never a member again, since
        every later race lies inside this one.  The predicate is evaluated only for popped
        atoms, and the nesting promise itself is trusted here (the reference checks it, and
        so does this backend's score semantics).

        When the pops are mostly wasted (a race retires many members at once, as a winner
        that retires its whole row and column of a grid: 70 % of the cells are then popped),
        the lane leaves the heap for good and races through blocks (:func:`_nested_race`):
        the same winner, without the pops."""
        pre, stmts, value = self.member_test(s.members, "__i")
        test = stmts + [ast.Assign([_name("__in", ast.Store())], value)]
        scan = _nested_race(w, test, self.blocks)
        take = _call("__take", _name(w), _name("__alive"), _name("__tr"), _name("__st"), allow, empty, bound)
        out = pre + [ast.Assign([_name(w, ast.Store())], ast.UnaryOp(ast.USub(), ast.Constant(1))), *scan,
                     ast.Assign([_name(w, ast.Store())], take)]
        if not self.snap:
            return out
        # sampling to score (MODE_SAMPLE_SCORE_NESTED): this race's snapshot, and the winner's exit race
        keep = self.snapshot_keep(s)
        won = ast.If(ast.Compare(_name(w), [ast.GtE()], [ast.Constant(0)]),
                     [ast.Assign([ast.Subscript(_name("__ex"), _name(w), ast.Store())],
                                 ast.BinOp(_st(ST_SLOT), ast.Sub(), ast.Constant(1)))], [])
        scoring = _mode(ast.Eq(), MODE_SAMPLE_SCORE_NESTED)
        return [ast.If(scoring, keep, [])] + out + [ast.If(scoring, [won], [])]

    def race_groups(self, s):
        g = self.gen.temp("g")
        # the reference evaluates groups= before the keys
        out = [ast.Assign([_name(f"{g}n", ast.Store())], self.gen.static(s.groups))] + self.fill(s.key, "__kb")
        state, allow, empty, nest, bound = self.race_args(s)
        key = self.gen.code("SpecValueError", s.line, "race_groups key {a} outside [-1, {b}) for atom {atom}", "key")
        call = _call("__race_groups", _name("__mode"), _name("__kb"), _name(f"{g}n"), *state, allow, empty, nest,
                     bound, ast.Constant(s.line), key)
        out += [ast.Assign([_name(g, ast.Store())], call), self.gen.check()]
        if len(s.targets) == 1:
            out.append(ast.Assign([_name(s.targets[0], ast.Store())], _name(g)))
            return out
        # the winners' multi-indices (-1 for an empty group), one loop for every target
        dims, e, v = len(s.targets), self.gen.temp("e"), self.gen.temp("v")
        size = ast.Subscript(_attr(_name(g), "shape"), ast.Constant(0), ast.Load())
        fresh = {t: self.gen.temp("f") for t in s.targets}
        out += [ast.Assign([_name(fresh[t], ast.Store())], _call(_np("empty"), size, _np("int64"))) for t in s.targets]
        unravel = [ast.Assign([_name(v, ast.Store())], ast.Subscript(_name(g), _name(e), ast.Load()))]
        empty = []
        for axis in range(dims - 1, -1, -1):
            cell = ast.Subscript(_name(fresh[s.targets[axis]]), _name(e), ast.Store())
            empty.append(ast.Assign([cell], ast.UnaryOp(ast.USub(), ast.Constant(1))))
            if axis == 0:
                unravel.append(ast.Assign([cell], _name(v)))
            else:
                unravel += [ast.Assign([cell], ast.BinOp(_name(v), ast.Mod(), _name(f"__d{axis}"))),
                            ast.Assign([_name(v, ast.Store())], ast.BinOp(_name(v), ast.FloorDiv(), _name(f"__d{axis}")))]
        test = ast.Compare(ast.Subscript(_name(g), _name(e), ast.Load()), [ast.Lt()], [ast.Constant(0)])
        out.append(ast.For(_name(e, ast.Store()), _call("__range", size), [ast.If(test, empty, unravel)], []))
        out += [ast.Assign([_name(t, ast.Store())], _name(fresh[t])) for t in s.targets]
        return out


# The nested fast path's race, two ways (``W``: the winner, -1 before; ``TEST``: sets ``__in``,
# whether atom ``__i`` is a member).  Heap: pop until a member comes out; a popped non-member
# is retired for good (nesting), but each pop costs O(log A).  Once more than ``__budget``
# pops of the lane were wasted, the lane switches to blocks of ``__bsz`` consecutive atoms
# (about sqrt(A) of them): each block keeps its first member in (noise, index) order, which
# stays its first member while it is one (member sets only shrink), so a race tests each
# block's kept atom and rescans only the blocks whose kept atom left: O(sqrt(A)) tests a race
# plus the rescans, instead of a pop per retired atom (one loop does both: over the kept atom
# alone, then, if it left, over its block).  Both ways find the same winner: the first member
# in (noise, index) order; ties go to the lower index, as in the heap.
_HEAP_RACE = """
while True:
    __i = __heap_pop(__hk, __h, __hs)
    if __i < 0:
        break
    if __alive[__i]:
        TEST
        if __in:
            W = __i
            break
        WASTED
"""
_ENTER_BLOCKS = """
__bs = __bsz
__barg = __np_full((__A + __bs - 1) // __bs, __np.int64(-2), __np.int64)
"""
_LEAVE_HEAP = """
__stale += 1
if __stale > __budget:
    __st[ST_BLOCKS] = 1
    ENTER
    break
"""
# the lane's block state: __bs the block length (0 while in the heap), __barg each block's
# kept atom (-2: to scan, -1: no member left); __blocks0: the lane starts in blocks
_BLOCK_STATE = """
__bsz = __block_size(__A)
__budget = 2 * __bsz
__stale = 0
__bs = 0
__barg = __h[:0]
if __blocks0:
    ENTER
"""
_BLOCKS = """
if __bs > 0:
    __best = 0.0
    for __q in range(__barg.size):
        __c = __barg[__q]
        if __c == -1:
            continue
        __whole = __c < 0
        __from = __q * __bs if __whole else __c
        __to = __min(__A, __q * __bs + __bs) if __whole else __c + 1
        while True:
            __k = -1
            __cv = 0.0
            for __i in range(__from, __to):
                if __alive[__i] and (__k < 0 or __res[__i] < __cv):
                    TEST
                    if __in:
                        __k = __i
                        __cv = __res[__i]
            if __k >= 0 or __whole:
                break
            __whole = True
            __from = __q * __bs
            __to = __min(__A, __q * __bs + __bs)
        __barg[__q] = __k
        if __k >= 0 and (W < 0 or __cv < __best):
            W = __k
            __best = __cv
"""


# The exit search (RaceLowering.exit_search), for each live atom that never won: __last, the
# last race found to hold it (-1 at first), tries __last + __step for __step = the largest
# power of two <= the races run, down to 1.  TEST sets __in: whether the atom is a member of
# race __mid on that race's snapshot.  The step is taken without a branch on __in
# (numba_kernels.step_if): its outcome is a coin flip, which a branch mispredicts half the
# time, so the search does the same work for every atom and nothing else.  A test that
# branches itself (_EXIT_SEARCH_BRANCHING) gains nothing from that: it bisects [__lo, __hi]
# and stops when the interval is empty.
_EXIT_SEARCH = """
if __mode != MODE_SOLVE and __st[ST_STATUS] == 0 and __st[ST_SLOT] > 0:
    __races = __st[ST_SLOT]
    __top = 1
    while __top * 2 <= __races:
        __top *= 2
    for __k in range(__cand.size):
        __a = __cand[__k]
        if __ex[__a] < 0:
            UNRAVEL
            __last = -1
            __step = __top
            while __step > 0:
                __p = __last + __step
                __mid = __np.uint64(__min(__p, __races - 1))     # unsigned: no wraparound to index with
                TEST
                __last = __step_if(__in & (__p < __races), __last, __step)
                __step //= 2
            __ex[__a] = __last
"""
_EXIT_SEARCH_BRANCHING = """
if __mode != MODE_SOLVE and __st[ST_STATUS] == 0 and __st[ST_SLOT] > 0:
    for __k in range(__cand.size):
        __a = __cand[__k]
        if __ex[__a] < 0:
            UNRAVEL
            __lo = 0
            __hi = __st[ST_SLOT] - 1
            __last = -1
            while __lo <= __hi:
                __mid = __np.uint64((__lo + __hi) // 2)
                TEST
                if __in:
                    __last = __np.int64(__mid)
                    __lo = __last + 1
                else:
                    __hi = __np.int64(__mid) - 1
            __ex[__a] = __last
"""


def _nested_race(w, test, blocks):
    """The statements of the nested fast path's race (above): the heap alone, or, with
    ``blocks``, the heap while the lane is in it (leaving it once its pops are mostly
    wasted), then the blocks."""
    enter = _splice(_ENTER_BLOCKS)
    leave = _splice(_LEAVE_HEAP.replace("ST_BLOCKS", str(ST_BLOCKS)), ENTER=enter) if blocks else []
    heap = _splice(_HEAP_RACE, W=w, TEST=test, WASTED=leave)
    if not blocks:
        return heap
    in_heap = ast.Compare(_name("__bs"), [ast.Eq()], [ast.Constant(0)])
    return [ast.If(in_heap, heap, [])] + _splice(_BLOCKS, W=w, TEST=test)


def block_state(blocks):
    """The lane's start on the nested fast path: its block state (:data:`_BLOCK_STATE`), or
    only ``__bs = 0`` (the heap, always) without ``blocks``."""
    return _splice(_BLOCK_STATE, ENTER=_splice(_ENTER_BLOCKS)) if blocks else _splice("__bs = 0")


def _splice(src, W="W", **stmts):
    """The statements of template ``src`` with the name ``W`` renamed ``W`` (a str) and each
    bare statement named like a key of ``stmts`` (``TEST``, ``WASTED``, ``ENTER``) replaced by
    those statements, fresh copies each time."""
    class Fill(ast.NodeTransformer):
        def visit_Name(self, node):
            return _name(W, node.ctx) if node.id == "W" else node

        def visit_Expr(self, node):
            if isinstance(node.value, ast.Name) and node.value.id in stmts:
                return [copy.deepcopy(t) for t in stmts[node.value.id]]
            return node

    return Fill().visit(ast.parse(src)).body
