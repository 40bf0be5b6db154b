"""Loop fusion for the numba code generator: a 1-d elementwise expression as one loop.

Lowered operation by operation, ``y = where(x[idx] > 0, a + b, -a)`` allocates an array per
operation, which is most of a vectorised spec's time under Numba.  :class:`LoopFusion`
writes such an assignment (and ``any``/``all`` of such an expression in a test) as one loop
over the elements instead, with scalar subexpressions hoisted before it and gathers read per
element.  It must mean what the NumPy-style lowering means, errors included: an expression it
cannot fuse is rolled back (its error codes and temporaries forgotten, as if never tried),
and a loop whose first error may differ from NumPy's (which runs each operation over the
whole array before the next) runs the statement again unfused when it meets one.
"""
from __future__ import annotations

import ast

from .numba_ast import ARITH, _attr, _call, _name, _np, _st
from .numba_kernels import ST_STATUS


class _NotFusable(Exception):
    """An expression the loop fusion leaves to the NumPy lowering."""


class LoopFusion:
    """The loop fusion pass of a :class:`numba_lowering.Codegen` (``gen``), whose error codes,
    temporaries and renames it shares."""

    def __init__(self, gen, enabled=True):
        self.gen, self.enabled = gen, enabled      # disabled: nothing fuses (the generic lowering)

    def if_statement(self, test, body, orelse):
        """``if test: body else: orelse``, with ``any``/``all`` of an elementwise expression
        in the test reduced by a fused loop run just before it.  ``a and b`` without an else
        is ``if a: if b:`` (``b`` only runs when ``a`` holds, as in Python)."""
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) and not orelse and \
                not any(self.gen.t(v).ndim for v in test.values):
            for v in reversed(test.values[1:]):
                body = self.if_statement(v, body, [])
            return self.if_statement(test.values[0], body, [])
        negate = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
        reduced = self.reduction(test.operand if negate else test)
        if reduced is None:
            return [ast.If(self.gen.expr(test), body, orelse)]
        stmts, value = reduced
        return stmts + [ast.If(ast.UnaryOp(ast.Not(), value) if negate else value, body, orelse)]

    def reduction(self, node):
        """``any(e)`` / ``all(e)`` of a 1-d elementwise expression ``e`` as one loop with no
        temporary array: ``(statements, result name)``, or None.  The loop evaluates every
        element (and its checks, in the NumPy lowering's order) unless ``e`` has no checked
        site in the loop, when it stops at the first decisive element."""
        if not (isinstance(node, ast.Call) and self.gen.types.primitive(node).name in ("any", "all")):
            return None
        attempt = self.fuse(node.args[0])
        if attempt is None:
            return None
        i, value, fusion = attempt
        found = node.func.id == "any"             # the value an element decides
        out = self.gen.temp("r")
        test = value if found else ast.UnaryOp(ast.Not(), value)
        decide = [ast.Assign([_name(out, ast.Store())], ast.Constant(found))]
        if not fusion["sites"]:
            decide.append(ast.Break())
        loop = ast.For(_name(i, ast.Store()), _call("__range", fusion["length"]),
                       fusion["body"] + [ast.If(test, decide, [])], [])
        stmts = fusion["pre"] + [ast.Assign([_name(out, ast.Store())], ast.Constant(not found)), loop]
        return self.first_error(fusion, stmts, lambda: self.gen.expr(node)), _name(out)

    def first_error(self, fusion, stmts, unfused):
        """A fused loop whose first error may not be the NumPy lowering's (:meth:`exact`):
        when it meets one, the statement runs again unfused (``unfused()``: its NumPy-style
        lowering, on the same values), which records the reference's first error instead."""
        if self.exact(fusion):
            return stmts
        z, st0 = _name("__z"), _st(ST_STATUS)
        met = ast.BoolOp(ast.And(), [ast.Compare(z, [ast.Eq()], [ast.Constant(0)]),
                                     ast.Compare(st0, [ast.NotEq()], [ast.Constant(0)])])
        again = [ast.Assign([_st(ST_STATUS, ast.Store())], ast.Constant(0)),
                 ast.Assign([_name(self.gen.temp("u"), ast.Store())], unfused())]
        return [ast.Assign([_name("__z", ast.Store())], st0)] + stmts + [ast.If(met, again, [])]

    def fused(self, name, node):
        """``name = <1-d elementwise expression>`` as one loop writing a fresh array (NumPy
        would allocate an array per operation: most of a vectorised spec's time).  Scalar
        subexpressions are hoisted before the loop, gathers become per-element reads; the
        result equals the NumPy lowering's, errors included (:meth:`first_error`).  Returns
        the statements, or None when the expression does not fuse."""
        attempt = self.fuse(node)
        if attempt is None:
            return None
        i, value, fusion = attempt
        t = self.gen.t(node)
        dtype = self.gen.types.locals[name].dtype
        if dtype == "int" and t.dtype == "bool":
            value = _call(_np("int64"), value)
        out = self.gen.temp("f")
        n = _name(f"{out}n")
        fresh = _call(_np("empty"), n, _np("bool_" if dtype == "bool" else "int64"))
        if name in fusion["leaves"] and name not in fusion["gathered"] and self.exact(fusion):
            # the target is read only at the element being written: overwrite its buffer
            # (every array local owns its buffer; the size test guards a rebinding; not when
            # an error may run the statement again on the original values)
            x = _name(name)
            size = ast.Subscript(_attr(x, "shape"), ast.Constant(0), ast.Load())
            fresh = ast.IfExp(ast.Compare(size, [ast.Eq()], [n]), x, fresh)
        loop = ast.For(_name(i, ast.Store()), _call("__range", _name(f"{out}n")),
                       fusion["body"] + [ast.Assign([ast.Subscript(_name(out), _name(i), ast.Store())], value)], [])
        stmts = fusion["pre"] + [
            ast.Assign([_name(f"{out}n", ast.Store())], fusion["length"]),
            ast.Assign([_name(out, ast.Store())], fresh),
            loop]
        return self.first_error(fusion, stmts, lambda: self.gen.value_for(name, node)) + [
            ast.Assign([_name(name, ast.Store())], _name(out))]

    def fuse(self, node):
        """Element ``i`` of the 1-d elementwise expression ``node``: ``(i, value, fusion)``
        (``fusion``: the statements before the loop and in its body, its length, its checked
        sites), or None when it does not fuse (then as if never tried: the NumPy lowering
        follows, with the same error codes)."""
        if not self.enabled or self.gen.t(node).ndim != 1 or isinstance(node, (ast.Name, ast.Constant)):
            return None
        i = self.gen.temp("e")
        fusion = {"pre": [], "body": [], "length": None, "sites": [], "hoisted_checks": 0,
                  "leaves": set(), "gathered": set()}
        codes, count = len(self.gen.codes), self.gen.count
        try:
            value = self.element(node, i, fusion)
        except _NotFusable:
            value = None
        if value is None or fusion["length"] is None:
            del self.gen.codes[codes:]
            self.gen.count = count
            return None
        return i, value, fusion

    @staticmethod
    def exact(fusion):
        """Whether a fused loop surely reports the NumPy lowering's first error.  NumPy runs
        one operation over the whole array after another, the loop one element through every
        operation after another: their first errors agree when the checked sites are all
        hoisted (they run before the loop, in order), or the loop's sites all raise the same
        error for the same element (one site, or gathers of equal length through the same
        index, or one array operation's overflow at one line)."""
        return len(set(fusion["sites"])) <= 1 and not (fusion["sites"] and fusion["hoisted_checks"])

    def checked(self, value, codes, fusion, signature=()):
        """An element's checked operation ``value``, which registered the codes from
        ``codes`` on: evaluated in the loop's body, in the NumPy lowering's order of
        operations (also where a ``where`` would not choose it: NumPy computes both sides)."""
        new = self.gen.codes[codes:]
        if not new:
            return value
        fusion["sites"] += [(code, *signature) for code in new]
        temp = self.gen.temp("a")
        fusion["body"].append(ast.Assign([_name(temp, ast.Store())], value))
        return _name(temp)

    def element(self, node, i, fusion):
        """Element ``i`` of a fusable expression (raises :class:`_NotFusable`)."""
        t = self.gen.t(node)
        line = getattr(node, "lineno", None) or self.gen.line
        if not t.ndim:
            if isinstance(node, (ast.Constant, ast.Name)):
                return self.gen.expr(node)
            codes = len(self.gen.codes)
            temp = self.gen.temp("h")                       # loop-invariant: evaluated once
            fusion["pre"].append(ast.Assign([_name(temp, ast.Store())], self.gen.expr(node)))
            fusion["hoisted_checks"] += len(self.gen.codes) - codes
            return _name(temp)
        if t.ndim != 1:
            raise _NotFusable
        if isinstance(node, ast.Name):
            fusion["leaves"].add(node.id)
            x = _name(self.gen.rename.get(node.id, node.id))
            if fusion["length"] is None:
                fusion["length"] = ast.Subscript(_attr(x, "shape"), ast.Constant(0), ast.Load())
            return ast.Subscript(x, _name(i), ast.Load())
        if isinstance(node, ast.BinOp):
            left, right = self.element(node.left, i, fusion), self.element(node.right, i, fusion)
            lt, rt = self.gen.t(node.left), self.gen.t(node.right)
            if isinstance(node.op, ARITH) or not (lt.dtype == rt.dtype == "bool"):
                left, right = self.scalar_int(left, lt), self.scalar_int(right, rt)
            if isinstance(node.op, ARITH):
                codes = len(self.gen.codes)
                return self.checked(self.gen.arith(node.op, left, right, True, line, element=True), codes, fusion)
            return ast.BinOp(left, node.op, right)
        if isinstance(node, ast.Compare):
            return ast.Compare(self.element(node.left, i, fusion), node.ops,
                               [self.element(node.comparators[0], i, fusion)])
        if isinstance(node, ast.UnaryOp):
            x, xt = self.element(node.operand, i, fusion), self.gen.t(node.operand)
            if isinstance(node.op, ast.UAdd):
                return self.scalar_int(x, xt)
            if isinstance(node.op, ast.USub):
                if not self.gen.check_overflow:
                    return ast.UnaryOp(node.op, self.scalar_int(x, xt))
                codes = len(self.gen.codes)
                return self.checked(_call("__neg_s", self.scalar_int(x, xt), _name("__st"),
                                          self.gen.overflow("-", line, True)), codes, fusion)
            if isinstance(node.op, ast.Not) or xt.dtype == "bool":
                return ast.UnaryOp(ast.Not(), x)
            return ast.UnaryOp(ast.Invert(), x)
        if isinstance(node, ast.BoolOp):                     # arrays: elementwise, no short cut
            values = [self.element(v, i, fusion) for v in node.values]
            op = ast.BitAnd() if isinstance(node.op, ast.And) else ast.BitOr()
            out = values[0]
            for v in values[1:]:
                out = ast.BinOp(out, op, v)
            return out
        if isinstance(node, ast.IfExp):
            return self.select(t, node.test, node.body, node.orelse, i, fusion, lazy=True)
        if isinstance(node, ast.Subscript):
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            base = node.value
            if (len(elts) == 1 and not isinstance(elts[0], ast.Slice) and isinstance(base, ast.Name)
                    and self.gen.t(base).ndim == 2 and not self.gen.t(elts[0]).ndim):
                # a row x[k] of a 2-d local: its index checked once, before the loop
                x = _name(self.gen.rename.get(base.id, base.id))
                codes = len(self.gen.codes)
                index = self.gen.expr(elts[0])
                code = self.gen.index_code(node, "read", 0)
                row = self.gen.temp("h")
                fusion["pre"].append(ast.Assign([_name(row, ast.Store())], _call(
                    "__ck", index, ast.Subscript(_attr(x, "shape"), ast.Constant(0), ast.Load()),
                    _name("__st"), code)))
                fusion["hoisted_checks"] += len(self.gen.codes) - codes
                fusion["leaves"].add(base.id)
                fusion["gathered"].add(base.id)          # never overwritten in place: a row is not the target
                if fusion["length"] is None:
                    fusion["length"] = ast.Subscript(_attr(x, "shape"), ast.Constant(1), ast.Load())
                return ast.Subscript(x, ast.Tuple([_name(row), _name(i)], ast.Load()), ast.Load())
            if (len(elts) != 1 or isinstance(elts[0], ast.Slice) or not isinstance(base, ast.Name)
                    or self.gen.t(base).ndim != 1 or self.gen.t(elts[0]).ndim != 1):
                raise _NotFusable
            idx = self.element(elts[0], i, fusion)
            fusion["gathered"].add(base.id)
            x = _name(self.gen.rename.get(base.id, base.id))
            codes = len(self.gen.codes)
            code = self.gen.index_code(node, "read", 0)
            # equal messages for equal elements: the same index into arrays of the same length
            signature = (ast.dump(elts[0]), self.gen.t(base).shape[0].text)
            return self.checked(ast.Subscript(x, _call(
                "__ck", idx, ast.Subscript(_attr(x, "shape"), ast.Constant(0), ast.Load()), _name("__st"), code),
                ast.Load()), codes, fusion, signature)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name, args = self.gen.types.primitive(node).name, node.args
            if name == "arange":
                if fusion["length"] is None:
                    codes = len(self.gen.codes)
                    fusion["length"] = self.gen.static(args[0])        # evaluated before the loop
                    fusion["hoisted_checks"] += len(self.gen.codes) - codes
                return _name(i)
            if name == "where":
                return self.select(t, *args, i, fusion)
            if name in ("minimum", "maximum"):
                fn = "__" + name[:3]
                xs = [self.element(a, i, fusion) for a in args]
                xs = [self.scalar_int(x, self.gen.t(a)) if t.dtype == "int" else x for x, a in zip(xs, args)]
                out = xs[0]
                for x in xs[1:]:
                    out = _call(fn, out, x)
                return out
            if name == "abs":
                x = self.scalar_int(self.element(args[0], i, fusion), self.gen.t(args[0]))
                if not self.gen.check_overflow:
                    return _call("__abs", x)
                codes = len(self.gen.codes)
                return self.checked(_call("__abs_s", x, _name("__st"), self.gen.overflow("abs", line, True)),
                                    codes, fusion)
        raise _NotFusable

    def select(self, t, test, body, orelse, i, fusion, lazy=False):
        """``where(test, body, orelse)`` per element (both sides computed, as NumPy does);
        ``lazy``: ``body if test else orelse`` with a scalar test, of which NumPy computes
        one side only: it fuses only when neither side has a checked site."""
        c = self.element(test, i, fusion)
        codes = len(self.gen.codes)
        a, b = self.element(body, i, fusion), self.element(orelse, i, fusion)
        if lazy and not self.gen.t(test).ndim and len(self.gen.codes) > codes:
            raise _NotFusable
        if t.dtype == "int":
            a, b = self.scalar_int(a, self.gen.t(body)), self.scalar_int(b, self.gen.t(orelse))
        return ast.IfExp(c, a, b)

    @staticmethod
    def scalar_int(x, t):
        return _call(_np("int64"), x) if t.dtype == "bool" else x
