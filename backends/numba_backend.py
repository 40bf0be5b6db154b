"""Numba backend: every spec compiled to native code, parallel over the batch.

The IR and its types are lowered to the source of one function, ``chunk``: the spec's own
statements for one batch element (the lane), inlined into a loop over a range of lanes that
draws or replays and scores each one.  The source is written once to a per-user cache
directory under a name keyed by the hash of the source itself; ``chunk`` is compiled as a C
callback of its signature (``numba.cfunc``), and the drivers shared by every spec
(``numba_kernels.run_lanes`` for small batches, ``run_lanes_parallel`` over threads) call
it at its address, in every mode.  Numba's on-disk cache
(``cache=True``) keeps both for every later process.  Nothing here knows any structure: predicates
become loops over the atoms, races calls to the kernels of :mod:`numba_kernels`.

The code generator lives in the modules next to this one: :mod:`numba_lowering` (the
expressions and statements), :mod:`numba_fusion` (elementwise loops), :mod:`numba_races`
(the races and the nested fast path) and :mod:`numba_module` (the module around the lane).
This module compiles, loads and runs what they write.

Meaning (the reference's, see docs/design.md section 3): indices are always checked, and so
is int64 arithmetic (an out-of-range index, a division by zero, an overflow, an empty race,
a broken nesting promise or more races than the static bound records an error code and the
values its message names; Python raises it with the reference's class, message, spec line
and batch element).  ``enumerate`` delegates to the reference backend.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from structdsl import errors, philox, races
from structdsl.program import Draw, Program as _BaseProgram, Replay, Scores

from .numba_lowering import PASSES, Codegen, LoweringError
from .numba_module import _kernels_hash  # noqa: F401  (tests read it here)

_CACHE_ENV = "STRUCTDSL_CACHE_DIR"


def cache_dir():
    """Where generated sources (and Numba's cache next to them) live: ``$STRUCTDSL_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/structdsl`` or ``~/.cache/structdsl``; a temporary directory when
    none of those can be written."""
    root = os.environ.get(_CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "structdsl")
    path = Path(root) / "numba"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(path)
    except OSError:
        import tempfile
        path = Path(tempfile.gettempdir()) / f"structdsl-{os.getuid() if hasattr(os, 'getuid') else 0}" / "numba"
        path.mkdir(parents=True, exist_ok=True)
    return path


#: The reference's scalar overflow messages give the exact result, from the operands.
_EXACT = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "//": lambda a, b: a // b, "neg": lambda a, b: -a, "abs": lambda a, b: abs(a),
          # past 256 bits the exact result is written a * 2**s, as the reference does
          "<<": lambda a, b: a << b if b <= 256 else f"{a} * 2**{b}", "sum": lambda a, b: a + b * 2**64}


def _message(code, row, atom_shape):
    """The reference's message for error ``code`` from the values its lane recorded (see
    ``numba_kernels.ST_A``)."""
    from .numba_kernels import ST_A, ST_ATOM, ST_B, ST_C, ST_PREV
    text = code.message
    if code.fmt is not None:
        a, b, c = int(row[ST_A]), int(row[ST_B]), int(row[ST_C])
        exact = _EXACT[code.fmt](a, b) if code.fmt in _EXACT else None
        text = text.format(a=a, b=b, exact=exact, prev=int(row[ST_PREV]), atom=_atom(c, atom_shape))
    if code.pred and row[ST_ATOM] > 0:
        text += f" (evaluating the predicate for atom {_atom(int(row[ST_ATOM]) - 1, atom_shape)})"
    return text


def _atom(flat, shape):
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if 0 <= flat < int(np.prod(shape)) else flat


# The nested fast path's probe: PROBE_LANES lanes run first, on the serial driver, to choose
# how the others start (numba_races._nested_race), in batches of PROBE_FROM lanes or more (at
# 64 lanes the probe cost a spec whose lanes never leave their heap 6 % of a call)
PROBE_LANES, PROBE_FROM = 2, 256


def _lane_input(a, dtype=np.float64):
    """``a`` as a read-only C-contiguous array of ``dtype``: a view of ``a`` itself when it
    is one already, whether ``a`` is writable or not (the logits the public API hands over
    are read-only broadcast views: copying them cost 2 ms of an 11 ms call at 1024 lanes of
    1024 atoms), else a copy.  Every array a driver only reads comes through here, so its
    Numba signature is always the same: a Fortran-ordered, strided or writable variant
    would type as another signature and compile the whole driver again (3-15 s)."""
    a = np.asarray(a)
    if not (a.dtype == dtype and a.flags.c_contiguous):
        a = np.ascontiguousarray(a, dtype=dtype)
    view = a.view()
    view.flags.writeable = False
    return view


_NO_KEY = _lane_input(np.zeros(2, dtype=np.uint64), np.uint64)   # the Philox key when lanes draw from given uniforms


def load(source):
    """Import the generated module from the cache directory (written once per hash)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    name = f"structdsl_gen_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = cache_dir() / f"{name}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)                        # atomic: concurrent processes agree
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _compile_lock(path):
    """Hold a lock on ``path + '.lock'`` while this process compiles (or loads) a generated
    module: processes that start together (test workers, data-loader workers, distributed
    ranks) then compile each module once, the others loading it from Numba's cache, instead
    of compiling it side by side.  No lock where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:                                      # pragma: no cover - Windows
        yield
        return
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Program(_BaseProgram):
    """A spec compiled to native code with Numba (see :class:`structdsl.program.Program`).

    ``prog.source`` shows the generated module; the first call of each semantics compiles
    it (or loads Numba's cache); a batch of at least :attr:`parallel_from` lanes runs in
    parallel on ``numba.get_num_threads()`` threads, a smaller one in a plain loop.
    """

    backend = "numba"
    #: the code generator's optional rewrites (``numba_lowering.PASSES``); a subclass with
    #: fewer compiles the generic lowering, which the tests compare the rewrites with
    passes = PASSES
    #: checked int64 arithmetic (the DSL's meaning); only ``benchmarks/run.py`` compiles a
    #: subclass without it, to measure what the checks cost (such a program wraps on overflow)
    check_overflow = True
    #: batches of at least this many lanes run on the parallel driver, smaller ones on the
    #: serial one (no threads to start; it also compiles in a third of the time)
    parallel_from = 64

    def __init__(self, spec, **static_params):
        super().__init__(spec, **static_params)
        from .numpy_reference import Program as Reference
        self.reference = Reference(spec, **static_params)   # valid masks and enumeration
        gen = Codegen(self.ir, self.types, self._constant_arrays, check_overflow=self.check_overflow,
                      passes=self.passes, param_types=self._param_types())
        self.source = gen.module()
        self._codes = gen.codes
        self._fast, self._snap, self._blocks = gen.fast, gen.snap, gen.races.blocks
        # the nested fast paths trust a nested=True promise (docs/design.md 4.4): checking
        # it would cost a pass over the atoms per race, the very work they avoid
        self.checks_nesting = not gen.fast
        self._module = load(self.source)
        self._chunk = None               # chunk compiled as a C callback, on first use
        self._called = set()             # (driver, mode, draw): the calls whose argument types were checked
        self._consts = {}
        from .numba_kernels import WANT_GRAD, WANT_MEMBERS
        self._want_grad, self._want_members = WANT_GRAD, WANT_MEMBERS

    def _consts_of(self, inst):
        """What the drivers take of ``inst``, made once per atom shape: the int parameters (one
        int64 array, in the spec's order), the data parameters (a tuple of arrays), the valid
        mask and the unravel table (``[A, ndim]``: each flat atom's multi-index, C order)."""
        c = self._consts.get(inst.atom_shape)
        if c is None:
            values = [inst.params[p] for p in self.ir.params]
            ints = np.array([v for v in values if not isinstance(v, np.ndarray)], dtype=np.int64)
            data = tuple(_lane_input(v, v.dtype) for v in values if isinstance(v, np.ndarray))
            c = self._consts[inst.atom_shape] = (_lane_input(ints, np.int64), data,
                                                 _lane_input(inst.valid.reshape(-1), bool),
                                                 _lane_input(np.indices(inst.atom_shape).reshape(
                                                     len(inst.atom_shape), -1).T, np.int64))
        return c

    def _layout(self, inst):
        """``[(shape, bool?, start, stop)]`` of each field in a lane's output rows (int fields in
        one, bool fields in the other), and the two rows' widths: made once per atom shape."""
        key = ("layout", inst.atom_shape)
        layout = self._consts.get(key)
        if layout is None:
            fields, at = [], {False: 0, True: 0}
            for name in self.ir.outputs:
                t = inst.types.outputs[name]
                shape, is_bool = tuple(d.value for d in t.shape), t.dtype == "bool"
                size = int(np.prod(shape, dtype=np.int64))
                fields.append((shape, is_bool, at[is_bool], at[is_bool] + size))
                at[is_bool] += size
            layout = self._consts[key] = (fields, at[False], at[True])
        return layout

    def _outputs(self, inst, lead):
        """The lanes' output rows: int64 ``[lead, W]`` and bool ``[lead, Wb]``, each row a lane's
        int (bool) fields one after the other, flattened (see :meth:`_fields`)."""
        _, width, width_bool = self._layout(inst)
        return np.zeros((lead, width), dtype=np.int64), np.zeros((lead, width_bool), dtype=bool)

    def _fields(self, inst, out):
        """The structure's fields, ``[lead, *shape]`` each, from the rows ``out``."""
        lead = out[0].shape[:1]
        return [np.ascontiguousarray(out[is_bool][:, a:b]).reshape(lead + shape)
                for shape, is_bool, a, b in self._layout(inst)[0]]

    def _driver(self, lanes):
        """The driver for a batch of ``lanes``: the parallel one from ``parallel_from`` lanes."""
        return "run_lanes_parallel" if lanes >= self.parallel_from else "run_lanes"

    def _run(self, driver, inst, out, first, stop, *args):
        """Run lanes ``first`` to ``stop - 1`` with ``numba_kernels.<driver>``: this program's
        ``chunk`` on the constants of ``inst`` (:meth:`_consts_of`), the output rows ``out``
        and the chunk's other arguments ``args``; a Numba typing failure (a construct this
        backend lowers into code Numba rejects) becomes a clear error instead of a raw Numba
        traceback."""
        import numba
        from . import numba_kernels
        run = getattr(numba_kernels, driver)
        ip, data, valid, unr = self._consts_of(inst)
        kind = (driver, args[10], args[9])       # the driver, the mode and whether the lanes draw
        args = (ip, *data, *out, valid, unr, numba_kernels.lane_kernels(), *args)
        bounds = (first, stop, numba.get_num_threads()) if driver == "run_lanes_parallel" else (first, stop)
        try:
            if self._chunk is not None and kind in self._called:
                run(self._chunk.address, args, *bounds)
                return
            # the first calls compile or load chunk and the driver: one process at a time
            with _compile_lock(self._module.__file__):
                self._compile_chunk(args)
                run(self._chunk.address, args, *bounds)
            self._called.add(kind)
        except Exception as exc:
            if type(exc).__module__.startswith("numba"):
                last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                raise LoweringError(
                    f"the numba backend could not compile spec {self.ir.name!r} ({type(exc).__name__}: "
                    f"{last}); the generated source is in {self._module.__file__} and the "
                    f"reference backend (backend='numpy') runs the spec", self.ir.file, self.ir.atoms.line) from exc
            raise

    def _compile_chunk(self, args):
        """Compile (or load) ``chunk`` as a C callback of its signature, once, and check that
        ``args`` have its types: a driver calls it at its address, where Numba cannot check.
        Every kind of call (driver, mode, draw) is checked on its first run: the arrays each
        kind passes are built with fixed types (:func:`_lane_input`, fresh buffers)."""
        import numba
        from numba import cfunc
        sig = self._module.CHUNK_SIGNATURE
        if self._chunk is None:
            self._chunk = cfunc(sig, cache=True, error_model="numpy")(self._module.chunk)
        got = tuple(numba.typeof(a) for a in args) + (numba.int64, numba.int64)
        if got != sig.args:       # a bug in this backend, never a user's: say where
            wrong = next(i for i, (g, w) in enumerate(zip(got, sig.args)) if g != w) if len(got) == len(sig.args) else None
            raise AssertionError(f"chunk of {self.ir.name!r} takes {sig.args} and would be called on {got} "
                                 f"(argument {wrong})")

    def _raise(self, st, inst, check_logits=None):
        """Raise the first lane's spec error; ``check_logits``: after a draw, a callable that
        names a NaN or +inf logit (it raises) if a lane met one."""
        from .numba_kernels import BAD_LOGIT, ST_STATUS
        if not np.count_nonzero(st[:, ST_STATUS]):        # the common case: one count
            return
        if check_logits is not None and (st[:, ST_STATUS] == BAD_LOGIT).any():
            check_logits()
            raise ValueError("logits contain NaN or +inf")      # pragma: no cover - it raised
        bad = np.flatnonzero(st[:, ST_STATUS] > 0)
        if bad.size:
            lane = int(bad[0])
            code = self._codes[int(st[lane, ST_STATUS]) - 1]
            raise getattr(errors, code.cls)(_message(code, st[lane], inst.atom_shape), self.ir.file, code.line, lane)

    def _solve_all(self, inst, res, uniforms, logits, log_space, check_logits=None, score=None, key=None):
        """Run the solve driver: on given weights ``res``, or drawing ``res = log E`` from
        ``uniforms`` and ``logits`` when they are given.  Returns traces, fields, the log
        noise.  ``score``: ``(fs, grad, lsum, flags)`` buffers, to score the drawn traces in
        the same lanes (``MODE_SAMPLE_SCORE_NESTED`` on the nested fast path, else
        ``MODE_SAMPLE_SCORE``).  ``key``: draw from the Philox stream of this uint64 ``[2]``
        key inside the lanes instead of from ``uniforms`` (then ``None``)."""
        B, A = res.shape
        draw = uniforms is not None or key is not None
        none, read_none = np.zeros((B, 0)), _lane_input(np.zeros((B, 0)))   # the unused buffers
        tr = np.full((B, inst.max_races), -1, dtype=np.int64)
        from .numba_kernels import (MODE_SAMPLE_SCORE, MODE_SAMPLE_SCORE_NESTED, MODE_SOLVE, ST_BLOCKS, ST_NESTING,
                                    ST_WIDTH)
        st = np.zeros((B, ST_WIDTH), dtype=np.int64)
        if self.ir.nested:
            st[:, ST_NESTING] = 1
        out = self._outputs(inst, B)
        # the nested fast path never writes its residuals: then they are the log noise itself
        log_noise = res if (self._fast or not draw) else np.empty((B, A))
        mode = MODE_SOLVE if score is None else MODE_SAMPLE_SCORE_NESTED if self._fast else MODE_SAMPLE_SCORE
        fs, grad, lsum, flags = score or (np.zeros((B, 1)), none, none, 0)
        # inputs read-only through _lane_input, outputs fresh: the types CHUNK_SIGNATURE states
        args = (read_none if uniforms is None else _lane_input(uniforms),
                _NO_KEY if key is None else _lane_input(key, np.uint64), _lane_input(logits) if draw else read_none,
                res, log_noise, np.empty((B, A), dtype=bool), tr, st, bool(log_space), draw, mode, fs, grad, lsum,
                read_none, none, flags)
        # the nested fast path's probe: when its first lanes all leave the heap for blocks, the
        # others start in blocks (numba_races._nested_race; the same winners either way)
        probe, blocks0 = (PROBE_LANES if self._blocks and B >= PROBE_FROM else 0), False
        if probe:       # a parallel launch would cost more than these lanes
            self._run("run_lanes", inst, out, 0, probe, *args, False)
            blocks0 = bool((st[:probe, ST_BLOCKS] == 1).all())
        self._run(self._driver(B), inst, out, probe, B, *args, blocks0)
        self._raise(st, inst, (check_logits or (lambda: self.check_logits(logits))) if draw else None)
        return tr, self._fields(inst, out), log_noise

    # ---- the backend contract (structdsl.program) ---------------------------------------------
    def solve_flat(self, inst, weights, log_space):
        tr, outs, _ = self._solve_all(inst, np.array(weights, dtype=np.float64, order="C"), None, None, log_space)
        return tr, outs

    def seeded_uniforms(self, seed, lanes, width):
        """As the contract, compiled (``numba_kernels.philox_rows``: the same bits; E | T's
        ``seed=`` spent most of its time in NumPy's Philox)."""
        from . import numba_kernels
        seed = philox.check_seed(seed)
        out = np.empty((lanes, width))
        numba_kernels.philox_rows(np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32), out)
        return out

    def draw_seeded_flat(self, inst, seed, logits, check_logits=None):
        """As the contract: each lane draws its own uniforms of the Philox stream inside the
        compiled driver (in parallel, no ``[B, A]`` array of uniforms)."""
        key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
        tr, outs, log_noise = self._solve_all(inst, np.empty(logits.shape), None, logits, True,
                                              check_logits, key=key)
        return Draw(tr, outs, log_noise)

    def draw_flat(self, inst, uniforms, logits, check_logits=None):
        """As the contract; ``uniforms`` in [0, 1) (a 0 counts as the smallest normal float)."""
        tr, outs, log_noise = self._solve_all(inst, np.empty(uniforms.shape), uniforms, logits, True,
                                              check_logits)
        return Draw(tr, outs, log_noise)

    def replay_flat(self, inst, traces, logits):
        """Member sets from the replay kernel (lane flag ``WANT_MEMBERS``)."""
        logp, _, members = self._score(inst, traces, logits, False, None, want_members=True)
        return Replay(logp > -np.inf, races.Members(members))

    def score_flat(self, inst, traces, logits, want_grad=False, uniforms=None):
        """The fused kernels: log p, its gradient and E | T computed as the lanes replay
        (``finish_score`` / ``finish_nested`` in numba_kernels), the formulas of
        :mod:`structdsl.races`, which the conformance suite holds them to."""
        logp, grad, noise = self._score(inst, traces, logits, want_grad, uniforms)
        if grad is not None:
            grad[np.isneginf(logp)] = 0.0
        return Scores(logp, grad, noise, None)

    def draw_and_score_flat(self, inst, uniforms, logits, check_logits=None, members=False):
        """A training step's draw and trace score in one native call: a spec off the nested
        fast path scores each race against the logits as it runs it (``MODE_SAMPLE_SCORE``); on
        the nested fast path the sampler keeps each race's snapshot and the lane then finds
        every atom's exit race (``MODE_SAMPLE_SCORE_NESTED``; a spec whose races take mask expressions samples, then
        replays).  ``members``: the scores' replay holds the races' member sets."""
        B, A = uniforms.shape
        R = inst.max_races
        if self._fast and not self._snap:           # the callees take any layout (_lane_input)
            d = self.draw_flat(inst, uniforms, logits, check_logits)
            logp, grad, mem = self._score(inst, d.trace, logits, True, None, want_members=members)
            return d, Scores(logp, grad, None, Replay(logp > -np.inf, races.Members(mem)) if members else None)
        fs, grad = np.zeros((B, 1)), np.zeros((B, A))
        lsum = np.zeros((B, R * A) if members else (B, 0))
        flags = self._want_grad | (self._want_members if members else 0)
        tr, outs, log_noise = self._solve_all(inst, np.empty((B, A)), uniforms, logits, True,
                                              check_logits or (lambda: self.check_logits(logits)),
                                              score=(fs, grad, lsum, flags))
        # a drawn trace always has positive probability: fs holds its log p
        replay = Replay(np.ones(B, dtype=bool), races.Members((lsum > 0).reshape(B, R, A))) if members else None
        return Draw(tr, outs, log_noise), Scores(fs[:, 0], grad, None, replay)

    def _score(self, inst, traces, logits, want_grad, uniforms, want_members=False):
        """``(log p, grad or None, E | T noise or None)``; with ``want_members`` the third is
        the races' member sets, bool ``[B, R, A]`` (written where E | T's buffer would be)."""
        from .numba_kernels import (IMPOSSIBLE, MODE_SCORE, ST_NESTING, ST_STATUS, ST_WIDTH, WANT_GRAD, WANT_MEMBERS,
                                    WANT_NOISE)
        B, A = logits.shape
        R = inst.max_races
        tr = np.array(traces, dtype=np.int64, order="C")      # written by the lanes: a copy
        st = np.zeros((B, ST_WIDTH), dtype=np.int64)
        st[:, ST_NESTING] = 1 if self.ir.nested else 0
        fs = np.zeros((B, 1))
        # the nested fast path's lanes write every gradient entry (finish_nested; a lane that
        # finds its trace impossible is zeroed after): no [B, A] memset before the lanes
        grad = (np.empty if self._fast else np.zeros)((B, A) if want_grad else (B, 0))
        noisy = uniforms is not None
        # E | T's per-atom sums of race minima: the generic score accumulates them; the
        # nested fast path's come from exit races and need no buffer.  Every lane that scores
        # writes its whole noise row (a lane that fails raises before the noise is returned)
        sums = noisy and not self._fast
        lsum = np.zeros((B, R * A) if want_members else (B, A) if sums else (B, 0))
        noise = np.empty((B, A) if noisy else (B, 0))
        unused = _lane_input(np.empty((B, 0)))                 # the read-only buffers a replay skips
        u = _lane_input(uniforms) if noisy else unused          # read only, for E | T
        flags = (WANT_GRAD if want_grad else 0) | (WANT_NOISE if noisy else 0) | (WANT_MEMBERS if want_members else 0)
        out = self._outputs(inst, 1)       # a replay writes no fields: one row for the type
        x = _lane_input(logits)
        # a replay reads the logits only: the residuals' buffer is never touched (never
        # faulted in), it only gives the driver its [B, A] type
        self._run(self._driver(B), inst, out, 0, B, unused, _NO_KEY, x,
                  np.empty((B, A)), np.empty((B, 0)), np.empty((B, A), dtype=bool),   # the lanes fill alive
                  tr, st, False, False, MODE_SCORE, fs, grad, lsum, u, noise, flags, False)
        self._raise(st, inst)
        logp = np.where(st[:, ST_STATUS] == IMPOSSIBLE, -np.inf, fs[:, 0])
        if want_members:
            return logp, (grad if want_grad else None), (lsum > 0).reshape(B, R, A)
        return logp, (grad if want_grad else None), (noise if noisy and not np.isneginf(logp).any() else None)
