"""The type-and-shape pass: every value of a spec is int64 or bool, a scalar or an array
whose shape is a static expression of the parameters.

The pass runs twice per program.  At ``compile`` time the sizes are unknown: it fixes every
local's dtype and rank, checks definite assignment (a local read on a path where it may be
unbound is refused at that line), the index forms, the operators' operand types and the
predicates, and keeps each shape as the text of its static expression (``n``, ``2 * n``).
When the sizes are known (the first call with logits of a new shape) it runs again with
every dimension's value, and checks that the shapes that meet agree.  Both runs raise
:class:`~structdsl.errors.SpecError` naming the user's line.

Typing rules (the one meaning every backend lowers):

* arithmetic ``+ - * // % << >>`` and unary ``-``: int64 (bool operands count as 0/1);
* ``& | ^``: bool if both operands are bool (logical), else int64 (bitwise); ``~``: logical
  not on bool, bitwise not on int;
* ``not``, ``and``, ``or``, ``if``/``a if c else b`` conditions and ``where``'s first argument
  take bools only;
* broadcasting: a scalar goes with any shape; arrays align on their trailing dims, which must
  be equal (no stretching of size-1 dims);
* a local keeps the type of its first binding (a bool may be stored into an int local);
* indexing: int scalars and ``:`` (basic), int arrays (a gather; not mixed with ``:``), and a
  bool mask only as the whole index of a store target with a scalar value;
* a predicate gives one bool (members) or int (key) per atom.  It is *grid-safe* when every
  value that depends on the atom's indices is a scalar: then evaluating it once on whole
  index grids equals evaluating it atom by atom.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from . import ir
from .errors import SpecError


@dataclass(frozen=True)
class Dim:
    """One dimension: the text of its static expression and, when known, its value."""
    text: str
    value: int | None = None

    def __str__(self):
        return self.text


@dataclass(frozen=True)
class Type:
    """dtype ``"int"`` (int64) or ``"bool"``; ``shape`` a tuple of :class:`Dim` (``()`` for a
    scalar); ``varying``: inside a predicate, the value depends on the atom's indices."""
    dtype: str
    shape: tuple = ()
    varying: bool = False

    @property
    def ndim(self):
        return len(self.shape)

    def __str__(self):
        name = "int64" if self.dtype == "int" else "bool"
        return name if not self.shape else f"{name}[{', '.join(map(str, self.shape))}]"


INT, BOOL = Type("int"), Type("bool")


class Typing:
    """The pass's result: the type of every local, output and expression node, and which
    predicates are grid-safe."""

    def __init__(self, name):
        self.name = name
        self.locals = {}          # name -> Type (first binding)
        self.lines = {}           # name -> line of that binding
        self.outputs = {}         # field -> Type
        self._exprs = {}          # id(ast node) -> Type
        self._grid = {}           # id(ir.Pred) -> bool

    def of(self, node):
        """The :class:`Type` of an expression node of the IR."""
        return self._exprs[id(node)]

    def grid_safe(self, pred):
        return self._grid[id(pred)]

    def __str__(self):
        rows = []
        for n, t in self.locals.items():
            stack = re.fullmatch(r"__S_(\w+?)__(\w+)", n)
            if stack:       # a local function's local: one slot per activation on a stack
                rows.append((f"{stack[1]}.{stack[2]}", f"int64 per call (stack of {t.shape[0]})", self.lines[n]))
            elif not n.startswith("__"):                       # the compiler's own temporaries
                rows.append((n, str(t), self.lines[n]))
        width = max((len(r[0]) for r in rows), default=4)
        out = [f"types of {self.name}:"] + [f"  {n:<{width}}  {t}   (line {line})" for n, t, line in rows]
        out.append("structure: " + ", ".join(f"{n} {t}" for n, t in self.outputs.items()))
        return "\n".join(out)

    __repr__ = __str__


def check(program: ir.Program, param_types: dict, env: dict) -> Typing:
    """Type ``program``.  ``param_types``: the :class:`Type` of every parameter; ``env``: the
    values of the static names known so far (dimensions whose expression needs a name
    outside ``env`` stay symbolic)."""
    return _Checker(program, param_types, env).run()


def array_type(array, name):
    """The :class:`Type` of a data parameter or tuple constant."""
    dtype = "bool" if array.dtype == bool else "int"
    return Type(dtype, tuple(Dim(str(s), int(s)) for s in array.shape))


_BITS = (ast.BitAnd, ast.BitOr, ast.BitXor)


class _Checker:
    def __init__(self, program, param_types, env):
        self.p, self.params, self.env = program, param_types, env
        self.typing = Typing(program.name)
        self.idx = {}              # index parameters of the predicate being typed
        self.grid_ok = True
        self.atom_dims = tuple(self.dim(d) for d in program.atoms.dims)

    # ---- helpers ------------------------------------------------------------------------
    def fail(self, where, message):
        line = where if isinstance(where, int) else getattr(where, "lineno", None)
        # a local of a local function lives in a stack slot: show the user's name
        message = re.sub(r"__S_\w+?__(\w+)\[__sp\]", r"\1", message)
        raise SpecError(message, self.p.file, line)

    def dim(self, node):
        try:
            value = ir.static_eval(node, self.env, self.p.file)
        except NameError:
            value = None
        return Dim(ast.unparse(node), value)

    def dims(self, node):
        """A shape: static dims that must not be negative once their values are known."""
        elts = node.elts if isinstance(node, ast.Tuple) else [node]
        out = tuple(self.dim(e) for e in elts)
        for e, d in zip(elts, out):
            self.nonnegative(e, d, "a shape")
        return out

    def mixed_bits(self, where, op):
        """``&``, ``|``, ``^`` are logical on bools and bitwise on ints; a bool mixed with an
        int has no obvious meaning (``True & 2`` is 0), so the user says which one."""
        o = _OPS[type(op)]
        self.fail(where, f"`{o}` mixes a bool and an int64: it is logical on bools and bitwise "
                  f"on ints; write `b {o} (x != 0)` for the logical one, or `int(b) {o} x` for bits")

    def nonnegative(self, node, d, what):
        if d.value is not None and d.value < 0:
            values = ", ".join(f"{k}={v}" for k, v in self.env.items() if k in self.p.params)
            self.fail(node, f"{what} `{d}` is {d.value} < 0 with {values}: choose parameters "
                      f"that keep it non-negative, or add `require({d} >= 0, \"...\")`")

    def sizes(self):
        return ", ".join(f"{k}={v}" for k, v in self.env.items() if k in self.p.params) or "no sizes"

    @staticmethod
    def same(a, b):
        if a.value is not None and b.value is not None:
            return a.value == b.value
        return True      # symbolic: rechecked once the sizes are known

    def fmt(self, shape):
        return "[" + ", ".join(d.text if d.value is None or d.text == str(d.value)
                               else f"{d.text}={d.value}" for d in shape) + "]"

    def broadcast(self, node, *types):
        """Shape of an elementwise result; scalars go anywhere, arrays align on trailing dims."""
        shape = ()
        for t in types:
            a, b = (shape, t.shape) if len(shape) >= len(t.shape) else (t.shape, shape)
            for x, y in zip(a[len(a) - len(b):], b):
                if not self.same(x, y):
                    self.fail(node, f"shapes {self.fmt(shape)} and {self.fmt(t.shape)} do not "
                              f"match in `{ast.unparse(node)}`")
            shape = a
        return shape

    def typed(self, node, t):
        if t.varying and t.ndim:
            self.grid_ok = False        # an atom-dependent array: evaluate atom by atom
        self.typing._exprs[id(node)] = t
        return t

    def need_bool(self, node, t, what):
        if t.dtype != "bool":
            self.fail(node, f"{what} takes a bool, got {t} in `{ast.unparse(node)}` "
                      f"(compare explicitly, e.g. `x != 0`)")

    # ---- expressions --------------------------------------------------------------------
    def expr(self, node, defined):
        return self.typed(node, self._expr(node, defined))

    def _expr(self, node, defined):
        if isinstance(node, ast.Constant):
            return BOOL if type(node.value) is bool else INT
        if isinstance(node, ast.Name):
            return self.name(node, defined)
        if isinstance(node, ast.BinOp):
            a, b = self.expr(node.left, defined), self.expr(node.right, defined)
            shape = self.broadcast(node, a, b)
            if isinstance(node.op, _BITS) and a.dtype != b.dtype:
                self.mixed_bits(node, node.op)
            dtype = "bool" if isinstance(node.op, _BITS) and a.dtype == b.dtype == "bool" else "int"
            return Type(dtype, shape, a.varying or b.varying)
        if isinstance(node, ast.UnaryOp):
            t = self.expr(node.operand, defined)
            if isinstance(node.op, ast.Not):
                self.need_bool(node, t, "`not`")
                if t.ndim:
                    self.fail(node, "`not` takes one bool; for an array write `~mask`")
                return t
            if isinstance(node.op, ast.Invert):
                return t
            return Type("int", t.shape, t.varying)
        if isinstance(node, ast.BoolOp):
            ts = [self.expr(v, defined) for v in node.values]
            for v, t in zip(node.values, ts):
                self.need_bool(v, t, "`and`/`or`")
            return Type("bool", self.broadcast(node, *ts), any(t.varying for t in ts))
        if isinstance(node, ast.Compare):
            a, b = self.expr(node.left, defined), self.expr(node.comparators[0], defined)
            return Type("bool", self.broadcast(node, a, b), a.varying or b.varying)
        if isinstance(node, ast.IfExp):
            c = self.expr(node.test, defined)
            self.need_bool(node.test, c, "a conditional expression")
            a, b = self.expr(node.body, defined), self.expr(node.orelse, defined)
            if c.ndim == 0 and (a.ndim != b.ndim):
                self.fail(node, f"both branches of `a if c else b` must have the same shape, "
                          f"got {a} and {b}")
            dtype = "bool" if a.dtype == b.dtype == "bool" else "int"
            return Type(dtype, self.broadcast(node, c, a, b), c.varying or a.varying or b.varying)
        if isinstance(node, ast.Subscript):
            return self.subscript(node, defined)
        if isinstance(node, ast.Call):
            return self.call(node, defined)
        if isinstance(node, ast.Tuple):
            self.fail(node, "a tuple is only allowed as a shape or in `a, b = x, y`")
        self.fail(node, f"{type(node).__name__} is outside the DSL")

    def name(self, node, defined):
        n = node.id
        if n in self.idx:
            return self.idx[n]
        if n in self.params:             # parameters, data parameters, tuple constants
            return self.params[n]
        if n in ("int", "bool"):
            self.fail(node, f"{n} can only be called or given as a dtype")
        if n not in defined:
            where = self.typing.lines.get(n)
            also = f" (it is assigned at line {where})" if where else ""
            self.fail(node, f"local {n!r} may be unbound here: it is not assigned on every path "
                      f"before this line{also}")
        return self.typing.locals[n]

    def subscript(self, node, defined, store=False):
        base = self.expr(node.value, defined)
        if base.ndim == 0:
            self.fail(node, f"`{ast.unparse(node.value)}` is a scalar ({base}) and cannot be indexed")
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(elts) > base.ndim:
            self.fail(node, f"too many indices: `{ast.unparse(node.value)}` is {base}")
        kinds = []
        for e in elts:
            if isinstance(e, ast.Slice):
                kinds.append(("slice", None))
                continue
            t = self.expr(e, defined)
            if t.dtype == "bool":
                if t.ndim == 0:
                    self.fail(e, "a bool cannot be an index: write int(b), or index with a mask array")
                kinds.append(("mask", t))
            else:
                kinds.append(("scalar" if t.ndim == 0 else "array", t))
        varying = base.varying or any(t.varying for _, t in kinds if t is not None)
        rest = base.shape[len(elts):]
        if any(k == "mask" for k, _ in kinds):
            if not store:
                self.fail(node, "a boolean-mask read `x[mask]` has a length that depends on the "
                          "state: use where(mask, x, 0), or any/all/sum of where(...)")
            if len(kinds) != 1:
                self.fail(node, "a mask must be the whole index: `x[mask] = value`")
            mask = kinds[0][1]
            lead = base.shape[:mask.ndim]
            if mask.ndim > base.ndim or any(not self.same(a, b) for a, b in zip(lead, mask.shape)):
                self.fail(node, f"mask {mask} does not match the leading dims of {base}")
            return Type(base.dtype, ("mask",), varying)
        arrays = [t for k, t in kinds if k == "array"]
        if arrays:
            if any(k == "slice" for k, _ in kinds):
                self.fail(node, "an index array mixed with `:` is outside the DSL (NumPy would "
                          "move the dimensions): index one axis at a time")
            if store:
                self.fail(node, "writing through an index array (a scatter) is outside the DSL: "
                          "duplicate indices have no single meaning on parallel backends; "
                          "write a loop")
            shape = self.broadcast(node, *[t for _, t in kinds]) + rest
        else:
            shape = tuple(base.shape[i] for i, (k, _) in enumerate(kinds) if k == "slice") + rest
        return Type(base.dtype, shape, varying)

    def call(self, node, defined):
        name = node.func.id
        args = node.args
        kws = {k.arg: k.value for k in node.keywords}

        def arity(lo, hi=None):
            hi = lo if hi is None else hi
            if not lo <= len(args) <= hi:
                want = str(lo) if lo == hi else f"{lo} to {hi}"
                self.fail(node, f"{name}() takes {want} argument(s), got {len(args)}")

        def dtype_of(node_or_none, default):
            if node_or_none is None:
                return default
            if not (isinstance(node_or_none, ast.Name) and node_or_none.id in ("int", "bool")):
                self.fail(node, f"the dtype of {name}() must be int or bool")
            return node_or_none.id

        if name == "live":
            return Type("bool", self.atom_dims)
        if name == "arange":
            arity(1)
            return Type("int", self.dims(args[0]))
        if name in ("zeros", "ones"):
            arity(1, 2)
            if len(args) == 2 and "dtype" in kws:
                self.fail(node, f"{name}() got dtype twice")
            return Type(dtype_of(args[1] if len(args) == 2 else kws.get("dtype"), "int"), self.dims(args[0]))
        if name == "full":
            arity(2)
            v = self.expr(args[1], defined)
            if v.ndim:
                self.fail(node, f"full()'s value must be a scalar, got {v}")
            dtype = dtype_of(kws.get("dtype"), v.dtype)
            if dtype == "bool" and v.dtype == "int":
                self.fail(node, "full(..., int value, dtype=bool): write the value as True/False")
            return Type(dtype, self.dims(args[0]), v.varying)
        ts = [self.expr(a, defined) for a in args]
        varying = any(t.varying for t in ts)
        if name == "where":
            arity(3)
            self.need_bool(args[0], ts[0], "where()'s condition")
            dtype = "bool" if ts[1].dtype == ts[2].dtype == "bool" else "int"
            return Type(dtype, self.broadcast(node, *ts), varying)
        if name in ("minimum", "maximum") or (name in ("min", "max") and len(args) >= 2):
            arity(2, 8)
            dtype = "bool" if all(t.dtype == "bool" for t in ts) else "int"
            return Type(dtype, self.broadcast(node, *ts), varying)
        if name in ("min", "max", "any", "all", "sum", "argmin", "argmax"):
            arity(1)
            t = ts[0]
            if t.ndim == 0:
                self.fail(node, f"{name}() reduces an array; `{ast.unparse(args[0])}` is a scalar")
            if name in ("any", "all"):
                self.need_bool(args[0], t, f"{name}()")
                return Type("bool", (), varying)
            if name in ("argmin", "argmax") and t.ndim != 1:
                self.fail(node, f"{name}() takes a 1-d array, got {t}")
            if name in ("min", "max"):
                return Type(t.dtype, (), varying)
            return Type("int", (), varying)
        if name == "abs":
            arity(1)
            return Type("int", ts[0].shape, varying)
        if name in ("int", "bool"):
            arity(1)
            if ts[0].ndim:
                self.fail(node, f"{name}() converts a scalar; for an array use where(...) or `x != 0`")
            return Type(name, (), varying)
        self.fail(node, f"{name}() is not a DSL function")

    # ---- statements -----------------------------------------------------------------------
    def bind(self, name, t, where):
        t = Type(t.dtype, t.shape)
        old = self.typing.locals.get(name)
        if old is None:
            self.typing.locals[name] = t
            self.typing.lines[name] = where.lineno if hasattr(where, "lineno") else where
            return
        first = self.typing.lines[name]
        if old.ndim != t.ndim or any(not self.same(a, b) for a, b in zip(old.shape, t.shape)):
            self.fail(where, f"local {name!r} is {old} (line {first}) and cannot become {t}: "
                      f"a local keeps one shape")
        if old.dtype == "bool" and t.dtype == "int":
            self.fail(where, f"local {name!r} is {old} (line {first}); this value is {t}: "
                      f"write `{name} = (value != 0)` or start it as an int")

    def store(self, target, vtype, where, defined):
        """Check ``target[index] = value`` (value already typed)."""
        if target.value.id not in defined:
            self.name(target.value, defined)         # raises: may be unbound
        sel = self.subscript(target, defined, store=True)
        self.typed(target, sel)
        if sel.shape == ("mask",):
            if vtype.ndim:
                self.fail(where, "`x[mask] = value` takes a scalar value")
        elif vtype.ndim > sel.ndim or any(
                not self.same(a, b) for a, b in zip(sel.shape[sel.ndim - vtype.ndim:], vtype.shape)):
            self.fail(where, f"cannot store {vtype} into `{ast.unparse(target)}`, which is {sel}")
        if sel.dtype == "bool" and vtype.dtype == "int":
            self.fail(where, f"cannot store an int64 value into the bool array "
                      f"{target.value.id!r}: write `(value != 0)`")

    def assign_target(self, t, vtype, where, defined):
        if isinstance(t, ast.Name):
            self.bind(t.id, vtype, where)
            defined.add(t.id)
        else:
            self.store(t, vtype, where, defined)

    def block(self, stmts, defined):
        """Type ``stmts``; update ``defined`` in place; return True if the block always
        ends in ``break``."""
        for s in stmts:
            if isinstance(s, ir.Break):
                return True
            if isinstance(s, ir.Assign):
                self.assign(s, defined)
            elif isinstance(s, ir.AugAssign):
                self.aug_assign(s, defined)
            elif isinstance(s, ir.If):
                c = self.expr(s.test, defined)
                self.need_bool(s.test, c, "`if`")
                if c.ndim:
                    self.fail(s.test, f"an `if` condition must be one bool, got {c}: use any() or all()")
                a, b = set(defined), set(defined)
                ends_a, ends_b = self.block(s.body, a), self.block(s.orelse, b)
                if ends_a and ends_b:
                    return True
                defined |= (b if ends_a else a if ends_b else a & b) - defined
            elif isinstance(s, ir.Fail):
                c = self.expr(s.test, defined)
                assert c.dtype == "bool" and not c.ndim, "a compiler check tests one bool"
            elif isinstance(s, ir.Loop):
                count = self.expr(s.count, defined | set(s.bound_vars))
                if count.ndim or count.dtype != "int":
                    self.fail(s.count, f"a loop bound must be an int, got {count}")
                self.bind(s.var, INT, s.line)
                inner = set(defined) | {s.var}
                self.block(s.body, inner)
            elif isinstance(s, ir.Race):
                if s.members is not None:
                    self.members(s.members, defined, "bool", "members")
                for t in s.targets:
                    self.bind(t, INT, s.line)
                    defined.add(t)
            elif isinstance(s, ir.GroupRace):
                self.members(s.key, defined, "int", "key")
                g = self.dim(s.groups)
                for t in s.targets:
                    self.bind(t, Type("int", (g,)), s.line)
                    defined.add(t)
            else:  # pragma: no cover - the frontend only produces the types above
                raise TypeError(type(s).__name__)
        return False

    def assign(self, s, defined):
        value = s.value
        for target in s.targets:
            if isinstance(target, ast.Tuple):
                if not (isinstance(value, ast.Tuple) and len(value.elts) == len(target.elts)):
                    self.fail(s.line, "unpacking takes a tuple of the same length: `a, b = x, y`")
                ts = [self.expr(v, defined) for v in value.elts]
                for t, v in zip(target.elts, ts):
                    self.assign_target(t, v, s.line, defined)
            else:
                self.assign_target(target, self.expr(value, defined), s.line, defined)

    def aug_assign(self, s, defined):
        target = s.target
        v = self.expr(s.value, defined)
        if isinstance(target, ast.Name):
            cur = self.name(target, defined)
            self.typed(target, cur)
        else:
            if target.value.id not in defined:
                self.name(target.value, defined)         # raises: may be unbound
            # an update is a store: the scatter and mask rules of `x[i] = v` apply
            cur = self.subscript(target, defined, store=True)
            if cur.shape == ("mask",):
                op = _OPS.get(type(s.op), "?")
                self.fail(s.line, f"`x[mask] {op}= value` is outside the DSL: write "
                          f"`{target.value.id} = where(mask, {target.value.id} {op} value, "
                          f"{target.value.id})`")
            self.typed(target, cur)
        if isinstance(s.op, _BITS) and cur.dtype != v.dtype:
            self.mixed_bits(s.line, s.op)
        dtype = "bool" if isinstance(s.op, _BITS) and cur.dtype == v.dtype == "bool" else "int"
        shape = self.broadcast(target, cur, v)
        if len(shape) != cur.ndim:
            self.fail(s.line, f"`{ast.unparse(target)} {_OPS.get(type(s.op), '?')}= ...` would change "
                      f"its shape from {cur} to {Type(dtype, shape)}")
        if cur.dtype == "bool" and dtype == "int":
            self.fail(s.line, f"`{ast.unparse(target)}` is bool; this update makes an int64")

    def members(self, m, defined, dtype, what):
        if isinstance(m, ir.Pred):
            self.pred(m, defined, dtype, what)
            return
        t = self.expr(m, defined)
        if t.dtype != dtype or t.ndim != len(self.atom_dims) or any(
                not self.same(a, b) for a, b in zip(t.shape, self.atom_dims)):
            self.fail(m, f"a race's {what} array must be {Type(dtype, self.atom_dims)} (the "
                      f"atoms' shape), got {t}")

    def pred(self, pred, defined, dtype, what):
        saved = self.idx, self.grid_ok
        self.idx = {p: Type("int", (), True) for p in pred.params}
        self.grid_ok = True
        try:
            t = self.expr(pred.body, defined if pred.state else set())
            if t.ndim:
                self.fail(pred.line, f"the {what} predicate gives one value per atom; this one "
                          f"gives {t}")
            if t.dtype != dtype:
                self.fail(pred.line, f"the {what} predicate must give {'a bool' if dtype == 'bool' else 'an int'}"
                          f" per atom, got {t}")
            self.typing._grid[id(pred)] = self.grid_ok
        finally:
            self.idx, self.grid_ok = saved

    def run(self):
        p = self.p
        if p.atoms.valid is not None:
            self.pred(p.atoms.valid, set(), "bool", "valid")
        for cond, _, line in p.requires:
            t = self.expr(cond, set())
            if t.dtype != "bool" or t.ndim:
                self.fail(line, "require() takes a bool condition")
        defined = set()
        self.block(p.body, defined)
        for name in p.outputs:
            if name not in defined:
                self.fail(p.end_line, f"returned field {name!r} may be unbound: it is not "
                          f"assigned on every path")
            self.typing.outputs[name] = self.typing.locals[name]
        return self.typing


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%",
        ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>"}
