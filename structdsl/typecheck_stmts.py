"""Statement typing for the type-and-shape pass: bindings and stores, definite
assignment through ``if``/``break``, loops, races and their predicates."""
from __future__ import annotations

import ast

from . import ir
from .typecheck_exprs import BITS, OPS
from .typecheck_types import INT, Type


class StatementTyping:
    """Mixed into :class:`structdsl.typecheck._Checker`: types the statements of the IR and
    tracks ``defined``, the locals bound on every path so far."""

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
                op = OPS.get(type(s.op), "?")
                self.fail(s.line, f"`x[mask] {op}= value` is outside the DSL: write "
                          f"`{target.value.id} = where(mask, {target.value.id} {op} value, "
                          f"{target.value.id})`")
            self.typed(target, cur)
        if isinstance(s.op, BITS) and cur.dtype != v.dtype:
            self.mixed_bits(s.line, s.op)
        dtype = "bool" if isinstance(s.op, BITS) and cur.dtype == v.dtype == "bool" else "int"
        shape = self.broadcast(target, cur, v)
        if len(shape) != cur.ndim:
            self.fail(s.line, f"`{ast.unparse(target)} {OPS.get(type(s.op), '?')}= ...` would change "
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
