"""Race recognition for the verifier: the noise's declaration ``atoms(...)``, the races
``race``/``race_groups`` and their member, key and ``valid`` predicates."""
from __future__ import annotations

import ast

from . import ir
from .frontend_names import KEYWORDS


class RaceRules:
    """Mixed into :class:`structdsl.frontend._Frontend` (whose ``fail``, ``expr`` and
    ``static`` it uses): ``atoms()``, the races and their predicates, which set the
    frontend's ``noise``, ``atoms`` and ``races``."""

    def declare_atoms(self, s, top):
        if not top:
            self.fail(s, "atoms() must be declared at the top level of the spec, not in a loop or if")
        if self.atoms is not None:
            self.fail(s, f"noise is already declared at line {self.atoms.line}: a spec has one atoms() array")
        if len(s.targets) != 1 or not isinstance(s.targets[0], ast.Name):
            self.fail(s, "write `noise = atoms(...)` with a single name")
        call = s.value
        if not call.args:
            self.fail(s, "atoms() needs at least one dimension")
        dims = tuple(self.static(d, "an atoms dimension") for d in call.args)
        valid = None
        for kw in call.keywords:
            if kw.arg != "valid":
                self.fail(s, f"atoms() takes only the keyword `valid=`, not {kw.arg!r}")
            valid = self.pred(kw.value, len(dims), "valid", state=False)
        self.noise = s.targets[0].id
        self.atoms = ir.AtomDecl(self.noise, dims, valid, s.lineno)
        return None

    def race(self, s, kind):
        call = s.value
        if len(s.targets) != 1:
            self.fail(s, f"assign the winner of {kind}() to one target")
        target = s.targets[0]
        ndim = len(self.atoms.dims)
        names = target.elts if isinstance(target, ast.Tuple) else [target]
        if not all(isinstance(n, ast.Name) for n in names):
            self.fail(s, f"the winner of {kind}() must be assigned to plain names")
        if len(names) != ndim:
            got = "one name" if len(names) == 1 else f"{len(names)} names"
            self.fail(s, f"{kind}() over {ndim}-d atoms returns {ndim} index "
                      f"{'value' if ndim == 1 else 'arrays' if kind == 'race_groups' else 'values'}; "
                      f"unpack them into {ndim} names, got {got}")
        if any(n.id == self.noise for n in names):
            self.fail(s, f"noise {self.noise!r} cannot be reassigned")
        if not call.args or not (isinstance(call.args[0], ast.Name) and call.args[0].id == self.noise):
            self.fail(s, f"the first argument of {kind}() must be the noise {self.noise!r} declared by atoms()")
        keywords = {}
        for kw in call.keywords:
            if kw.arg not in KEYWORDS[kind]:
                hint = " (pass the members positionally: race(noise, members))" if kw.arg == "members" else ""
                self.fail(s, f"{kind}() takes no keyword {kw.arg!r}; its keywords are "
                          f"{sorted(KEYWORDS[kind])}{hint}")
            keywords[kw.arg] = kw.value
        allow_empty = keywords.pop("allow_empty", None)
        if allow_empty is not None:
            if not (isinstance(allow_empty, ast.Constant) and type(allow_empty.value) is bool):
                self.fail(s, "allow_empty= must be written literally as True or False")
            allow_empty = allow_empty.value
        rid = len(self.races)
        self.races[rid] = s.lineno
        targets = [n.id for n in names]
        if kind == "race":
            if len(call.args) > 2:
                self.fail(s, "race(noise) or race(noise, members): members is a predicate lambda or a mask")
            members = self.members(call.args[1], ndim, "members") if len(call.args) == 2 else None
            return ir.Race(targets, members, rid, s.lineno, allow_empty=bool(allow_empty))
        args = list(call.args[1:])
        groups = keywords.get("groups")
        if len(args) == 2 and groups is None:
            groups = args.pop()
        if len(args) != 1 or groups is None:
            self.fail(s, "write race_groups(noise, key, groups=G): key gives each atom's group, G is static")
        key = self.members(args[0], ndim, "key")
        return ir.GroupRace(targets, key, self.static(groups, "a group count"), rid, s.lineno,
                            allow_empty=bool(allow_empty))

    def members(self, node, ndim, what):
        if isinstance(node, ast.Lambda):
            return self.pred(node, ndim, what, state=True)
        return self.expr(node, f"{what} of a race")

    def pred(self, node, ndim, what, state):
        if not isinstance(node, ast.Lambda):
            self.fail(node, f"{what} must be a lambda over the atom indices")
        a = node.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or a.posonlyargs:
            self.fail(node, f"the {what} lambda takes plain index parameters only")
        params = tuple(x.arg for x in a.args)
        if len(params) != ndim:
            self.fail(node, f"the {what} lambda takes {len(params)} index parameter(s) but the "
                      f"atoms have {ndim} dimension(s)")
        saved, noise = self.locals, self.noise
        self.locals = (saved if state else set()) | set(params)
        if noise in params:
            self.noise = None          # a lambda parameter shadows the noise's name, as in Python
        try:
            body = self.expr(node.body, what)
        finally:
            self.locals, self.noise = saved, noise
        return ir.Pred(params, body, node.lineno, state=state)
