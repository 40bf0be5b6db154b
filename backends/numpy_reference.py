"""NumPy reference backend: readable, obviously right, one lane at a time.

Lowering: the IR becomes one Python function ``spec(rt, *params)`` whose statements are the
spec's own (line numbers kept, so tracebacks point at the user's file); every race becomes
a call ``rt.race(race_id, members)`` / ``rt.race_groups(race_id, key, groups)`` to a *race
handler*.  The handler is the only thing that differs between the semantics:

* :class:`Solver`     - residual races on given noise: argmin of the members' residuals,
  subtract the minimum from every member, retire the winner (DESIGN.md §2);
* :class:`Replayer`   - feeds a trace's winners back; accumulates
  ``logits[w] - logsumexp(logits[members])`` and records every member set;
* :class:`Enumerator` - replays a prefix of winners and, at the first race past it, stops
  with the race's member sets so the caller can branch on every possible winner.

Predicates (``lambda *idx``) are evaluated on broadcasting index grids (``np.ogrid``).
"""
from __future__ import annotations

import ast
import itertools
import math

import numpy as np

from structdsl import ir
from structdsl.errors import EmptyRaceError, EnumerationLimitError, NestingError, RaceError
from structdsl.program import Program as _BaseProgram


def _min(a, *rest):
    return np.min(a) if not rest else np.minimum(a, *rest)


def _max(a, *rest):
    return np.max(a) if not rest else np.maximum(a, *rest)


def _full(shape, value, dtype=None):
    if dtype is None:
        dtype = bool if isinstance(value, (bool, np.bool_)) else np.int64
    return np.full(shape, value, dtype=dtype)


def _dtype(dtype):
    return bool if dtype is bool else np.int64


#: What each DSL name means on NumPy arrays.
OPS = {
    "arange": lambda n: np.arange(n, dtype=np.int64),
    "zeros": lambda shape, dtype=int: np.zeros(shape, dtype=_dtype(dtype)),
    "ones": lambda shape, dtype=int: np.ones(shape, dtype=_dtype(dtype)),
    "full": _full,
    "where": np.where, "minimum": np.minimum, "maximum": np.maximum,
    "argmin": lambda a: int(np.argmin(a)), "argmax": lambda a: int(np.argmax(a)),
    "any": lambda a: bool(np.any(a)), "all": lambda a: bool(np.all(a)),
    "sum": lambda a: np.sum(a), "abs": np.abs, "min": _min, "max": _max,
    "int": int, "bool": bool, "range": range,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_not": np.logical_not,
}


# ---- lowering --------------------------------------------------------------------------
def lower(program: ir.Program):
    """Compile the IR to a Python function ``f(rt, *params) -> tuple of outputs``."""
    body = _statements(program.body) or [ast.Pass()]
    ret = ast.Return(ast.Tuple([ast.Name(o, ast.Load()) for o in program.outputs], ast.Load()))
    ret.lineno = max(program.races.values(), default=program.atoms.line)
    args = ast.arguments(posonlyargs=[], args=[ast.arg("__rt")] + [ast.arg(p) for p in program.params],
                         kwonlyargs=[], kw_defaults=[], defaults=[])
    fdef = ast.FunctionDef(program.name, args, body + [ret], [], None, None, type_params=[]) \
        if "type_params" in ast.FunctionDef._fields else ast.FunctionDef(program.name, args, body + [ret], [], None, None)
    fdef.lineno = program.atoms.line
    module = _locate(ast.Module([fdef], type_ignores=[]), program.atoms.line)
    namespace = dict(OPS)
    exec(compile(module, program.file, "exec"), namespace)
    function = namespace[program.name]
    function.lowered_source = ast.unparse(module)      # what the compiler generated, for reading
    return function


def lower_valid(program: ir.Program):
    """Compile the atoms' ``valid`` predicate to ``f(*params) -> f(*index grids) -> mask``."""
    args = ast.arguments(posonlyargs=[], args=[ast.arg(p) for p in program.params],
                         kwonlyargs=[], kw_defaults=[], defaults=[])
    outer = ast.Lambda(args, _lambda(program.atoms.valid))
    code = compile(_locate(ast.Expression(outer), program.atoms.line), program.file, "eval")
    return eval(code, dict(OPS))


def _locate(node, line):
    """Give generated nodes the line of their nearest located ancestor (user's lines kept)."""
    if "lineno" in node._attributes:
        line = getattr(node, "lineno", None) or line
        node.lineno = line
        if getattr(node, "end_lineno", None) is None or node.end_lineno < line:
            node.end_lineno = line
        node.col_offset = getattr(node, "col_offset", 0) or 0
        node.end_col_offset = getattr(node, "end_col_offset", 0) or 0
    for child in ast.iter_child_nodes(node):
        _locate(child, line)
    return node


def _lambda(pred):
    args = ast.arguments(posonlyargs=[], args=[ast.arg(p) for p in pred.params], kwonlyargs=[],
                         kw_defaults=[], defaults=[])
    node = ast.Lambda(args, pred.body)
    node.lineno = pred.line
    return node


def _members(m):
    if m is None:
        return ast.Constant(None)
    return _lambda(m) if isinstance(m, ir.Pred) else m


def _targets(names):
    if len(names) == 1:
        return ast.Name(names[0], ast.Store())
    return ast.Tuple([ast.Name(n, ast.Store()) for n in names], ast.Store())


def _statements(stmts):
    out = []
    for s in stmts:
        if isinstance(s, ir.Assign):
            node = ast.Assign(s.targets, s.value)
        elif isinstance(s, ir.AugAssign):
            node = ast.AugAssign(s.target, s.op, s.value)
        elif isinstance(s, ir.If):
            node = ast.If(s.test, _statements(s.body) or [ast.Pass()], _statements(s.orelse))
        elif isinstance(s, ir.Loop):
            node = ast.For(ast.Name(s.var, ast.Store()),
                           ast.Call(ast.Name("range", ast.Load()), [s.count], []),
                           _statements(s.body) or [ast.Pass()], [])
        elif isinstance(s, ir.Break):
            node = ast.Break()
        elif isinstance(s, ir.Race):
            call = ast.Call(ast.Attribute(ast.Name("__rt", ast.Load()), "race", ast.Load()),
                            [ast.Constant(s.race_id), _members(s.members)], [])
            node = ast.Assign([_targets(s.targets)], call)
        elif isinstance(s, ir.GroupRace):
            call = ast.Call(ast.Attribute(ast.Name("__rt", ast.Load()), "race_groups", ast.Load()),
                            [ast.Constant(s.race_id), _members(s.key), s.groups], [])
            node = ast.Assign([_targets(s.targets)], call)
        else:  # pragma: no cover - the frontend only produces the types above
            raise TypeError(f"unknown IR statement {type(s).__name__}")
        node.lineno = s.line
        out.append(node)
    return out


# ---- race handlers ---------------------------------------------------------------------
def _logsumexp(x):
    """log(sum(exp(x))) of a non-empty 1-d array with a finite maximum."""
    top = x.max()
    return top + math.log(np.exp(x - top).sum())


class _Impossible(Exception):
    """A replayed winner was not a live member: the trace has probability zero."""


class _Branch(Exception):
    """Enumeration reached the first race past its prefix."""

    def __init__(self, masks):
        self.masks = masks


class _Lane:
    """State shared by every race handler of one lane: live atoms, retirements, checks."""

    def __init__(self, prog, inst, live):
        self.prog, self.inst = prog, inst
        self.alive = live.copy()              # bool [A]: valid, rate > 0, not yet a winner
        self.slot = 0                         # next trace position
        self.previous = None                  # member masks of the previous race (nesting)

    def where(self, rid):
        return self.prog.ir.where(self.prog.ir.races[rid])

    def _grid_values(self, rid, fn_or_array, what, dtype):
        shape = self.inst.atom_shape
        if fn_or_array is None:
            return np.ones(self.inst.num_atoms, dtype=bool)
        value = fn_or_array(*self.prog.grids(shape)) if callable(fn_or_array) else fn_or_array
        value = np.asarray(value)
        if dtype is bool and value.dtype != bool:
            raise RaceError(f"{self.where(rid)}: race {what} must be boolean, got dtype {value.dtype}")
        if dtype is int and not np.issubdtype(value.dtype, np.integer):
            raise RaceError(f"{self.where(rid)}: race_groups key must be integer, got dtype {value.dtype}")
        try:
            return np.broadcast_to(value, shape).reshape(-1)
        except ValueError:
            raise RaceError(f"{self.where(rid)}: race {what} has shape {value.shape}, which does not "
                            f"broadcast to the atoms' shape {shape}") from None

    def race(self, rid, members):
        mask = self._grid_values(rid, members, "members", bool) & self.alive
        if not mask.any():
            raise EmptyRaceError(f"{self.where(rid)}: race has no live member (every candidate "
                                 f"is retired, invalid or at logit -inf)")
        (w,) = self._run(rid, [mask])
        return self._unravel(w)

    def race_groups(self, rid, key, groups):
        keys = self._grid_values(rid, key, "key", int)
        bad = (keys < -1) | (keys >= groups)
        if bad.any():
            raise RaceError(f"{self.where(rid)}: race_groups key {int(keys[bad][0])} outside "
                            f"[-1, {groups})")
        keys = np.where(self.alive, keys, -1)
        present = np.unique(keys[keys >= 0])
        if present.size == 0:
            raise EmptyRaceError(f"{self.where(rid)}: race_groups has no live member in any group")
        winners = self._run(rid, [keys == g for g in present])
        out = np.full(groups, -1, dtype=np.int64)
        out[present] = winners
        if len(self.inst.atom_shape) == 1:
            return out
        idx = np.unravel_index(np.maximum(out, 0), self.inst.atom_shape)
        return tuple(np.where(out >= 0, i, -1).astype(np.int64) for i in idx)

    def _run(self, rid, masks):
        if self.prog.ir.nested:
            self._check_nested(rid, masks)
        winners = self.pick(masks)
        self.alive[winners] = False
        self.previous = (rid, masks)
        return winners

    def _check_nested(self, rid, masks):
        if self.previous is None:
            return
        prid, before = self.previous
        for m in masks:
            first = int(np.argmax(m))
            outer = next((b for b in before if b[first]), None)
            if outer is None or (m & ~outer).any():
                raise NestingError(
                    f"{self.where(rid)}: spec {self.prog.ir.name!r} declares nested=True, but this "
                    f"race's members are not inside one member set of the previous race "
                    f"(line {self.prog.ir.races[prid]})")

    def _unravel(self, w):
        if len(self.inst.atom_shape) == 1:
            return int(w)
        return tuple(int(i) for i in np.unravel_index(w, self.inst.atom_shape))

    def _take_slot(self):
        if self.slot >= self.inst.max_races:  # pragma: no cover - bound is proven statically
            raise RaceError(f"{self.prog.ir.name}: more races than the static bound {self.inst.max_races}")
        self.slot += 1
        return self.slot - 1


class Solver(_Lane):
    """Residual races on given noise (DESIGN.md §2): the sample/solve semantics.

    ``log_space``: the weights are ``log E`` and residuals stay logs,
    ``log(r - m) = log r + log(1 - exp(log m - log r))``, exact at any scale.
    """

    def __init__(self, prog, inst, weights, log_space=False):
        super().__init__(prog, inst, weights < np.inf)
        self.residual = weights.copy()
        self.log_space = log_space
        self.trace = np.full(inst.max_races, -1, dtype=np.int64)

    def pick(self, masks):
        winners = []
        for m in masks:
            w = int(np.argmin(np.where(m, self.residual, np.inf)))
            if self.log_space:
                r, lo = self.residual[m], self.residual[w]
                with np.errstate(divide="ignore", invalid="ignore"):
                    # a tie leaves a zero residual (log -inf), as the linear solver does
                    self.residual[m] = np.where(r == lo, -np.inf, r + np.log(-np.expm1(lo - r)))
            else:
                self.residual[m] -= self.residual[w]
            self.trace[self._take_slot()] = w
            winners.append(w)
        return winners


class Replayer(_Lane):
    """Feeds a trace's winners back; accumulates log p(T) and records member sets."""

    def __init__(self, prog, inst, trace, logits):
        super().__init__(prog, inst, inst.valid.reshape(-1) & ~np.isneginf(logits))
        self.trace, self.logits = trace, logits
        self.logp = 0.0
        self.members = np.zeros((inst.max_races, inst.num_atoms), dtype=bool)

    def pick(self, masks):
        winners = []
        for m in masks:
            slot = self._take_slot()
            w = int(self.trace[slot])
            if w < 0 or not m[w]:
                raise _Impossible
            self.logp += self.logits[w] - _logsumexp(self.logits[m])
            self.members[slot] = m
            winners.append(w)
        return winners

    def finish(self):
        if (self.trace[self.slot:] >= 0).any():
            raise _Impossible      # the trace has winners the program never asked for


class Enumerator(_Lane):
    """Replays a prefix; at the first race past it, raises :class:`_Branch`."""

    def __init__(self, prog, inst, prefix, weights, exact):
        live = inst.valid.reshape(-1) & (weights > 0 if exact else ~np.isneginf(weights))
        super().__init__(prog, inst, live)
        self.prefix, self.weights, self.exact = prefix, weights, exact
        self.prob = 1 if exact else 0.0      # exact: product of rate ratios; else log p

    def pick(self, masks):
        if self.slot + len(masks) > len(self.prefix):
            raise _Branch(masks)
        winners = []
        for m in masks:
            w = self.prefix[self._take_slot()]
            x = self.weights[m]
            if self.exact:
                self.prob = self.prob * self.weights[w] / sum(x)
            else:
                self.prob += self.weights[w] - _logsumexp(x)
            winners.append(w)
        return winners


# ---- the program -------------------------------------------------------------------------
class Program(_BaseProgram):
    """A spec compiled for the NumPy reference backend (see :class:`structdsl.program.Program`)."""

    backend = "numpy"

    def __init__(self, spec, **static_params):
        super().__init__(spec, **static_params)
        self.function = lower(self.ir)
        self._valid_fn = lower_valid(self.ir) if self.ir.atoms.valid else None
        self._grids = {}

    @property
    def source(self):
        """The Python the IR was lowered to (races are calls to the race handler ``__rt``)."""
        return self.function.lowered_source

    def grids(self, shape):
        g = self._grids.get(shape)
        if g is None:
            g = self._grids[shape] = tuple(np.ogrid[tuple(slice(0, s) for s in shape)]) \
                if len(shape) > 1 else (np.arange(shape[0]),)
        return g

    def _valid_mask(self, params, dims):
        if self._valid_fn is None:
            return np.ones(dims, dtype=bool)
        pred = self._valid_fn(*(params[p] for p in self.ir.params))
        mask = np.asarray(pred(*self.grids(dims)))
        if mask.dtype != bool:
            raise RaceError(f"{self.ir.where(self.ir.atoms.line)}: atoms' valid must be boolean")
        return np.broadcast_to(mask, dims).copy()

    def _call(self, handler, inst):
        return self.function(handler, *(inst.params[p] for p in self.ir.params))

    def _solve(self, inst, weights, log_space):
        traces = np.full((len(weights), inst.max_races), -1, dtype=np.int64)
        fields = []
        for b, w in enumerate(weights):
            lane = Solver(self, inst, w, log_space)
            fields.append(self._call(lane, inst))
            traces[b] = lane.trace
        return traces, _stack(fields, len(self.ir.outputs), weights.shape[0])

    def _replay(self, inst, traces, logits):
        logp = np.empty(len(traces))
        members = np.zeros((len(traces), inst.max_races, inst.num_atoms), dtype=bool)
        for b in range(len(traces)):
            lane = Replayer(self, inst, traces[b], logits[b])
            try:
                self._call(lane, inst)
                lane.finish()
                logp[b] = lane.logp
                members[b] = lane.members
            except _Impossible:
                logp[b] = -np.inf
        return logp, members

    def _enumerate(self, inst, weights, exact, max_traces):
        done, stack = [], [()]
        while stack:
            prefix = stack.pop()
            lane = Enumerator(self, inst, prefix, weights, exact)
            try:
                outs = self._call(lane, inst)
            except _Branch as branch:
                choices = itertools.product(*(np.flatnonzero(m).tolist() for m in branch.masks))
                stack.extend(prefix + c for c in reversed(list(choices)))
                continue
            done.append((prefix, outs, lane.prob))
            if len(done) > max_traces:
                raise EnumerationLimitError(
                    f"{self.ir.name} with atoms {inst.atom_shape} has more than {max_traces} traces; "
                    f"enumerate(..., max_traces=N) raises the guard")
        traces = np.full((len(done), inst.max_races), -1, dtype=np.int64)
        for i, (prefix, _, _) in enumerate(done):
            traces[i, :len(prefix)] = prefix
        if exact:
            probs = np.array([p for _, _, p in done] + [None], dtype=object)[:-1]
            with np.errstate(divide="ignore"):
                logps = np.log(np.array([float(p) for p in probs], dtype=np.float64))
        else:
            logps = np.array([p for _, _, p in done], dtype=np.float64)
            probs = np.exp(logps)
        return traces, _stack([o for _, o, _ in done], len(self.ir.outputs), len(done)), probs, logps


def _stack(rows, nfields, n):
    if n == 0:
        return [np.zeros((0,)) for _ in range(nfields)]
    return [np.stack([np.asarray(r[i]) for r in rows]) for i in range(nfields)]
