"""Module assembly for the numba code generator: the lowered lane as the source of one
Python module.

The lane (one batch element: the spec's statements, lowered by :mod:`numba_lowering` and
its passes) becomes a function ``lane`` and its argument types ``LANE_SIGNATURE``.  The
backend compiles it as a C callback of that signature; the drivers that run it over the
batch in the mode each semantics needs (``numba_kernels.run_lanes``, ``MODE_*``) are shared
by every spec and call it through its address, so LLVM optimises the lane once.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from .numba_ast import KERNELS, LANE_STATE, _attr, _call, _const, _mode, _name, _np
from .numba_kernels import MODE_SCORE
from .numba_races import block_state

def _array(dtype, ndim, readonly=False):
    return f"__t.Array(__t.{dtype}, {ndim}, 'C'{', readonly=True' if readonly else ''})"


#: The types of the lane's fixed arguments (``numba_kernels._one_lane`` passes them): rows
#: of the drivers' [B, ...] buffers, read-only where the backend passes a read-only view.
_STATE_TYPES = {
    "__mode": "__t.int64", "__blocks0": "__t.boolean", "__ip": _array("int64", 1, True),
    "__alive": _array("boolean", 1), "__live0": _array("boolean", 1), "__res": _array("float64", 1),
    "__x": _array("float64", 1, True), "__tr": _array("int64", 1), "__st": _array("int64", 1),
    "__fs": _array("float64", 1), "__grad": _array("float64", 1), "__lsum": _array("float64", 1),
    "__u": _array("float64", 1, True), "__pkey": _array("int64", 1), "__log_space": "__t.boolean",
    "__flags": "__t.int64", "__ex": _array("int64", 1), "__cand": _array("int64", 1),
    "__unr": _array("int64", 2, True), "__out": _array("int64", 1)}


def _lane_types(gen, lane_args):
    """The Numba types of ``lane_args``, as source: the fixed ones and the spec's data
    parameters (read-only int64 or bool arrays)."""
    out = []
    for a in lane_args:
        t = gen.param_types.get(a)
        out.append(_STATE_TYPES[a] if a in _STATE_TYPES else
                   _array("boolean" if t.dtype == "bool" else "int64", t.ndim, True))
    return out


def data_params(gen):
    """The spec's data parameters (arrays), in order; its other parameters are ints."""
    return [x for x in gen.p.params if x in gen.param_types and gen.param_types[x].shape]


def module_source(gen):
    """The source of the module that code generator ``gen`` (a :class:`numba_lowering.Codegen`)
    makes of its spec: it lowers the spec's body on the way."""
    p = gen.p
    data = data_params(gen)
    ints = [x for x in p.params if x not in data]
    lane_args = ["__mode", "__blocks0", "__ip"] + data + LANE_STATE + ["__ex", "__cand", "__unr", "__out"]
    body = [ast.Assign([_name(x, ast.Store())], ast.Subscript(_name("__ip"), ast.Constant(i), ast.Load()))
            for i, x in enumerate(ints)]             # the int parameters, from one array
    body += [ast.Assign([_name(f"__d{i}", ast.Store())], gen.static(d, False)) for i, d in enumerate(p.atoms.dims)]
    body += [ast.Assign([_name("__A", ast.Store())], _attr(_name("__alive"), "size")),
             ast.Assign([_name("__hs", ast.Store())], _call(_np("zeros"), ast.Constant(1), _np("int64"))),
             ast.Assign([_name("__h", ast.Store())], _call(_np("empty"), _name("__A") if gen.fast
                                                            else ast.Constant(0), _np("int64"))),
             ast.Assign([_name("__hk", ast.Store())], _call(_np("empty"), _name("__A") if gen.fast
                                                             else ast.Constant(0))),
             ast.Assign([_name("__mb", ast.Store())], _call(_np("empty"), _name("__A"), _np("bool_"))),
             ast.Assign([_name("__kb", ast.Store())], _call(_np("empty"), _name("__A"), _np("int64")))]
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
    # solve, sample: the fields, flattened one after the other into the lane's output row
    writes = [ast.Assign([_name("__o", ast.Store())], ast.Constant(0))]
    for f in p.outputs:
        if gen.types.locals[f].shape:
            writes.append(ast.Assign([_name("__o", ast.Store())], _call("__put_flat", _name("__out"), _name("__o"),
                                                                      _name(f))))
        else:
            writes += [ast.Assign([ast.Subscript(_name("__out"), _name("__o"), ast.Store())], _name(f)),
                       ast.AugAssign(_name("__o", ast.Store()), ast.Add(), ast.Constant(1))]
    body.append(ast.If(_mode(ast.NotEq(), MODE_SCORE), writes, []))
    # a plain function: the backend compiles it as a C callback of LANE_SIGNATURE, which the
    # drivers (numba_kernels.run_lanes) call through its address
    lane = _function("lane", lane_args, body, "")
    src = [
        f"# generated by structdsl from spec {p.name!r} ({p.file}); do not edit",
        # Numba's cache does not see changes in the modules a cached function calls: the
        # kernels' hash is part of this source, hence of its file name (a new cache entry)
        f"# kernels {_kernels_hash()}",
        "# every name the generated code uses starts with '__': spec names never do",
        "import numpy as __np",
        "from numba import types as __t",
        "from structdsl.backends.numba_kernels import " + ", ".join(f"{k} as __{k}" for k in KERNELS),
        "__range, __min, __max, __abs = range, min, max, abs",
        *_constant_arrays(gen.constants),
        "",
        "# the lane's arguments, in order (the drivers pass them; a callback's types are exact)",
        f"LANE_SIGNATURE = __t.void({', '.join(_lane_types(gen, lane_args))})",
        "", "",
        ast.unparse(_locate(lane)),
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


