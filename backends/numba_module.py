"""Module assembly for the numba code generator: the lowered lane as the source of one
Python module.

The lane (one batch element: the spec's statements, lowered by :mod:`numba_lowering` and
its passes) is inlined into a loop over a range of lanes, each drawn or replayed and scored
in the mode each semantics needs (``numba_kernels.MODE_*``): the function ``chunk`` and its
argument types ``CHUNK_SIGNATURE``.  The backend compiles it as a C callback of that
signature; the drivers that run it over the batch (``numba_kernels.run_lanes``, serial and
``prange``) are shared by every spec and call it at its address, so LLVM optimises the
lane once and no driver is compiled per spec.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from .numba_ast import KERNELS, _attr, _call, _const, _mode, _name, _np
from .numba_kernels import LANE_KERNEL_INDEX, MODE_SAMPLE_SCORE_NESTED, MODE_SCORE, ST_CANDIDATES, ST_STATUS
from .numba_races import block_state

def _array(dtype, ndim, readonly=False):
    return f"__t.Array(__t.{dtype}, {ndim}, 'C'{', readonly=True' if readonly else ''})"


#: The chunk's arguments (but the spec's data parameters, which come after ``__ip``) and their
#: Numba types, as source: [B, ...] buffers, read-only where the backend passes a read-only view.
_CHUNK_ARGS = {
    "__ip": _array("int64", 1, True), "__c_out": _array("int64", 2), "__c_outb": _array("boolean", 2),
    "__valid": _array("boolean", 1, True), "__unr": _array("int64", 2, True), "__c_fns": _array("int64", 1, True),
    "__c_uni": _array("float64", 2, True), "__c_key": _array("uint64", 1, True),
    "__c_logits": _array("float64", 2, True), "__c_res": _array("float64", 2), "__c_log_noise": _array("float64", 2),
    "__c_alive": _array("boolean", 2), "__c_tr": _array("int64", 2), "__c_st": _array("int64", 2),
    "__log_space": "__t.boolean", "__c_draw": "__t.boolean", "__mode": "__t.int64", "__c_fs": _array("float64", 2),
    "__c_grad": _array("float64", 2), "__c_lsum": _array("float64", 2), "__c_u": _array("float64", 2, True),
    "__c_noise": _array("float64", 2), "__flags": "__t.int64", "__blocks0": "__t.boolean",
    "__c_first": "__t.int64", "__c_stop": "__t.int64"}

# One lane's preparation around the lane's own statements (``pass`` below), in every mode:
# MODE_SCORE replays the trace __tr under the logits __x (__res unread) and scores it: log p,
# its gradient, member sets or E | T (__flags; E | T from the uniforms __u) into __fs, __grad,
# __lsum and the noise row.  The other modes sample (__c_draw: the noise is drawn from
# __c_uni, or from the Philox stream of __c_key when __c_uni has no columns, and the logits)
# or solve (__res holds given weights); MODE_SAMPLE_SCORE also scores each race as it runs,
# MODE_SAMPLE_SCORE_NESTED (the nested fast path) keeps the races' snapshots and scores
# through exit races after the lane.  __blocks0: the nested fast path's lanes start racing in
# blocks (the backend's probe says so, numba_races._nested_race).
_LANE_LOOP = """
__c_A = __c_res.shape[1]
__c_score = __mode == {MODE_SCORE}
__c_exits = __c_score or __mode == {MODE_SAMPLE_SCORE_NESTED}      # exit races (the nested fast path)
{scratch}
# the lane's bookkeeping: buffers of the chunk, reset by each lane (no allocation per lane)
__c_live0 = __np_empty(__c_A, __np.bool_)
__pkey = __np_empty(__c_A, __np.int64)
__c_ex = __np_empty(__c_A if __c_exits else 0, __np.int64)
__c_cand = __np_empty(__c_A if __c_exits else 0, __np.int64)
for __c_b in range(__c_first, __c_stop):
    if not __c_score:
        if __c_draw and __c_uni.shape[1] == 0:       # seed=: the lane draws its own uniforms
            __call_prepare_seeded(__c_fns[{prepare_seeded}], (__valid, __c_key, __c_b, __c_logits[__c_b], __c_alive[__c_b],
                                  __c_res[__c_b], __c_log_noise[__c_b], __c_st[__c_b]))
        elif __c_draw:
            __call_prepare_sample(__c_fns[{prepare_sample}], (__valid, __c_uni[__c_b], __c_logits[__c_b], __c_alive[__c_b],
                                  __c_res[__c_b], __c_log_noise[__c_b], __c_st[__c_b]))
        else:
            __call_prepare_solve(__c_fns[{prepare_solve}], (__valid, __c_res[__c_b], __c_alive[__c_b]))
    else:
        __call_prepare_replay(__c_fns[{prepare_replay}], (__valid, __c_logits[__c_b], __c_alive[__c_b]))
    __alive, __res, __x, __tr, __st = __c_alive[__c_b], __c_res[__c_b], __c_logits[__c_b], __c_tr[__c_b], __c_st[__c_b]
    __fs, __grad, __lsum, __u = __c_fs[__c_b], __c_grad[__c_b], __c_lsum[__c_b], __c_u[__c_b]
    __live0 = __c_live0
    __copy_into(__live0, __alive)
    __fill(__pkey, __np.int64(-1))
    if __c_exits:
        __ex = __c_ex
        __c_n = 0
        for __c_i in range(__c_A):
            __ex[__c_i] = -1
            if __live0[__c_i]:
                __c_cand[__c_n] = __c_i
                __c_n += 1
        __cand = __c_cand[:__c_n]                        # the candidates: every live atom
    else:
        __ex = __pkey
        __cand = __pkey
    if __c_score:
        __st[{ST_CANDIDATES}] = __cand.size
    __c_row = __np.int64(0) if __c_score else __c_b     # the output rows (one row when scoring)
    __out, __outb = __c_out[__c_row], __c_outb[__c_row]
    __c_ret = False
    for __c_once in range(1):       # the lane; its returns break out to here
        pass
    {finish}
"""
_FINISH_GENERIC = """if __c_score and __st[{ST_STATUS}] == 0:
        __call_finish_score(__c_fns[{finish_score}], (__tr, __st, __lsum, __x, __live0, __u[__c_tr.shape[1]:],
                            __c_noise[__c_b], __flags))"""
_FINISH_NESTED = """if (__c_score or __mode == {MODE_SAMPLE_SCORE_NESTED}) and __st[{ST_STATUS}] == 0:
        __call_finish_nested(__c_fns[{finish_nested}], (__tr, __st, __ex, __x, __live0, __u, __fs, __grad,
                             __c_noise[__c_b], __lsum, __flags))"""


def data_params(gen):
    """The spec's data parameters (arrays), in order; its other parameters are ints."""
    return [x for x in gen.p.params if x in gen.param_types and gen.param_types[x].shape]


def _returns_to_breaks(stmts):
    """The lane's statements with each ``return`` turned into ``__c_ret = True; break`` and a
    ``if __c_ret: break`` after every loop that holds one: inside ``for __c_once in range(1)``,
    a return leaves the lane and its loop goes on to the lane's score and the next lane."""
    out = []
    for st in stmts:
        if isinstance(st, ast.Return):
            out += [ast.Assign([_name("__c_ret", ast.Store())], ast.Constant(True)), ast.Break()]
            continue
        if isinstance(st, ast.If):
            st.body, st.orelse = _returns_to_breaks(st.body), _returns_to_breaks(st.orelse)
        elif isinstance(st, (ast.For, ast.While)):
            holds = any(isinstance(n, ast.Return) for n in ast.walk(st))
            st.body = _returns_to_breaks(st.body)
            out.append(st)
            if holds:
                out.append(ast.If(_name("__c_ret"), [ast.Break()], []))
            continue
        out.append(st)
    return out


def module_source(gen):
    """The source of the module that code generator ``gen`` (a :class:`numba_lowering.Codegen`)
    makes of its spec: it lowers the spec's body on the way."""
    p = gen.p
    data = data_params(gen)
    ints = [x for x in p.params if x not in data]
    body = [ast.Assign([_name(f"__d{i}", ast.Store())], gen.static(d, False)) for i, d in enumerate(p.atoms.dims)]
    # the heap (__hs its size, reset by heap_init), the races' member and key buffers (filled
    # before each race) and the subtractions the races' losers owe (numba_kernels._subtract;
    # NaN: none): buffers of the chunk (see _LANE_LOOP); on the nested fast path races run
    # generic only to score, which leaves the subtractions alone
    body += [ast.Assign([_name("__A", ast.Store())], _attr(_name("__alive"), "size")),
             ast.Assign([_name("__pend", ast.Store())], _name("__hk" if gen.fast else "__c_pend"))]
    if not gen.fast:
        body += ast.parse("for __c_i in range(__A):\n    __pend[__c_i] = __np.nan").body
    if gen.fast:            # the heap, and the blocks a lane may race through instead
        body += block_state(gen.races.blocks)
        body.append(ast.If(ast.BoolOp(ast.And(), [_mode(ast.NotEq(), MODE_SCORE),
                                                  ast.Compare(_name("__bs"), [ast.Eq()], [ast.Constant(0)])]),
                           [ast.Expr(_call("__heap_init", _name("__alive"), _name("__res"), _name("__hk"),
                                           _name("__h"), _name("__hs")))], []))
    stmts = gen.block(p.body)
    body += gen.races.snapshot_buffers() + stmts       # the races tell which buffers there are
    body.append(gen.check())
    body += gen.races.exit_search()
    # solve, sample: the fields, flattened one after the other into the lane's output rows
    # (int fields into __out, bool ones into __outb)
    writes = [ast.Assign([_name("__c_at", ast.Store())], ast.Constant(0)),
              ast.Assign([_name("__c_atb", ast.Store())], ast.Constant(0))]
    for f in p.outputs:
        row, at = ("__outb", "__c_atb") if gen.types.locals[f].dtype == "bool" else ("__out", "__c_at")
        if gen.types.locals[f].shape:
            writes.append(ast.Assign([_name(at, ast.Store())], _call("__put_flat", _name(row), _name(at), _name(f))))
        else:
            writes += [ast.Assign([ast.Subscript(_name(row), _name(at), ast.Store())], _name(f)),
                       ast.AugAssign(_name(at, ast.Store()), ast.Add(), ast.Constant(1))]
    body.append(ast.If(_mode(ast.NotEq(), MODE_SCORE), writes, []))
    # the chunk: the int parameters from one array, then the lanes, each with the lane's
    # statements inlined (a call would cost each lane a reference count per array it passes)
    consts = dict(MODE_SCORE=MODE_SCORE, MODE_SAMPLE_SCORE_NESTED=MODE_SAMPLE_SCORE_NESTED,
                  ST_CANDIDATES=ST_CANDIDATES, ST_STATUS=ST_STATUS, **LANE_KERNEL_INDEX)
    heap = "__c_A" if gen.fast else "0"
    scratch = "\n".join(["__hs = __np_zeros(1, __np.int64)", f"__h = __np_empty({heap}, __np.int64)",
                         f"__hk = __np_empty({heap}, __np.float64)", "__mb = __np_empty(__c_A, __np.bool_)",
                         "__kb = __np_empty(__c_A, __np.int64)"]
                        + ([] if gen.fast else ["__c_pend = __np_empty(__c_A, __np.float64)"]))
    loop = ast.parse(_LANE_LOOP.format(finish=(_FINISH_NESTED if gen.fast else _FINISH_GENERIC).format(**consts),
                                       scratch=scratch, **consts)).body
    lanes = next(st for st in loop if isinstance(st, ast.For))
    once = next(st for st in lanes.body if isinstance(st, ast.For) and st.target.id == "__c_once")
    once.body = _returns_to_breaks(body)
    unpack = [ast.Assign([_name(x, ast.Store())], ast.Subscript(_name("__ip"), ast.Constant(i), ast.Load()))
              for i, x in enumerate(ints)]
    args = ["__ip"] + data + list(_CHUNK_ARGS)[1:]
    types = [_CHUNK_ARGS["__ip"]] + [_array("boolean" if gen.param_types[x].dtype == "bool" else "int64",
                                            gen.param_types[x].ndim, True) for x in data] + list(_CHUNK_ARGS.values())[1:]
    chunk = _function("chunk", args, unpack + loop, "")
    src = [
        f"# generated by structdsl from spec {p.name!r} ({p.file}); do not edit",
        # Numba's cache does not see changes in the modules a cached function calls: the
        # kernels' hash is part of this source, hence of its file name (a new cache entry)
        f"# kernels {_kernels_hash()}",
        "# every name the generated code uses starts with '__': spec names never do",
        "import numpy as __np",
        "from numba import types as __t",
        "from structdsl.backends.numba_kernels import " + ", ".join(f"{k} as __{k}" for k in KERNELS),
        "__range, __min, __max, __abs = range, __smin, __smax, abs",
        *_constant_arrays(gen.constants),
        "",
        "# chunk's arguments, in order: the backend compiles it as a C callback of this signature",
        "# (numba.cfunc), which numba_kernels.run_lanes calls at its address",
        f"CHUNK_SIGNATURE = __t.void({', '.join(types)})",
        "", "",
        ast.unparse(_locate(chunk)),
    ]
    return "\n".join(src)


def _constant_arrays(constants):
    """The spec's tuple constants as module globals (Numba freezes a global array into
    the compiled code), built from their values, element by element."""
    out = []
    for name, value in sorted(constants.items()):
        flat = ast.List([_const(v) for v in value.reshape(-1).tolist()], ast.Load())
        array = _call(_np("array"), flat, _np("bool_" if value.dtype == bool else "int64"))
        shape = ast.Tuple([ast.Constant(d) for d in value.shape], ast.Load())
        out.append(ast.unparse(ast.Assign([_name(name, ast.Store())], _call(_attr(array, "reshape"), shape),
                                          lineno=1)))
    return out


def _kernels_hash():
    """The hash of ``numba_kernels.py`` that each generated source carries (see above)."""
    path = Path(__file__).with_name("numba_kernels.py")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _function(name, args, body, decorator):
    """A function definition with ``decorator``, made by parsing its text back."""
    fn = ast.FunctionDef(name, ast.arguments(posonlyargs=[], args=[ast.arg(a) for a in args], kwonlyargs=[],
                                             kw_defaults=[], defaults=[]), body, [], None, None)
    if "type_params" in ast.FunctionDef._fields:
        fn.type_params = []
    text = ast.unparse(_locate(fn))
    return ast.parse(decorator + "\n" + text).body[0]


def _locate(node):
    """``node`` with a position on every node (``ast.unparse`` needs one)."""
    for n in ast.walk(node):
        if "lineno" in n._attributes:
            n.lineno = getattr(n, "lineno", 1) or 1
            n.col_offset = getattr(n, "col_offset", 0) or 0
            n.end_lineno = getattr(n, "end_lineno", None) or n.lineno
            n.end_col_offset = getattr(n, "end_col_offset", None) or 0
    return node


