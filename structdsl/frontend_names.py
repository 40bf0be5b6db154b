"""The names a spec reads, as the verifier (:mod:`structdsl.frontend`) sees them: the
DSL's own vocabulary, the names reserved for the compiler, and the outer values (builtins,
module globals, closure cells) a spec may read as constants."""
from __future__ import annotations

import ast
import builtins

from .dsl import PRIMITIVES, PY_BUILTINS
from .errors import SpecError

RACES = ("race", "race_groups")
IO_NAMES = {"print", "open", "input", "exec", "eval", "compile", "__import__", "breakpoint",
            "globals", "locals", "vars", "getattr", "setattr", "delattr", "id", "hash"}
_RANDOM_SOURCES = ("random", "secrets", "torch")   # modules whose use inside a spec is randomness
STATIC_FUNCS = {"min", "max", "abs"}
DSL_NAMES = frozenset(PRIMITIVES) | frozenset(PY_BUILTINS) | {"spec"}
# The keywords each DSL function accepts; any other keyword is refused (NumPy's ufunc keywords
# such as ``out=`` or ``where=`` would otherwise reach the arrays).
KEYWORDS = {"zeros": {"dtype"}, "ones": {"dtype"}, "full": {"dtype"}, "atoms": {"valid"},
            "race": {"allow_empty"}, "race_groups": {"groups", "allow_empty"}}
INT64 = (-2**63, 2**63 - 1)


def check_reserved(fdef, file):
    """Names starting with ``__`` belong to the compiler (its race handler and helpers),
    and the DSL's own names (``race``, ``atoms``, ``range``, ``any`` ...) keep their
    meaning: a local function, variable or parameter may not shadow them, since every
    pass (the recursion pass's guards and bounds first) reads them as the primitives."""
    for n in ast.walk(fdef):
        names = []
        if isinstance(n, ast.Name):
            names = [(n.id, n, isinstance(n.ctx, ast.Store))]
        elif isinstance(n, ast.arg):
            names = [(n.arg, n, True)]
        elif isinstance(n, ast.FunctionDef) and n is not fdef:
            names = [(n.name, n, True)]
        for name, node, binds in names:
            if name.startswith("__"):
                raise SpecError(f"name {name!r}: names starting with '__' are reserved for "
                                f"the compiler", file, node.lineno)
            if binds and name in DSL_NAMES:
                what = ("a local function" if isinstance(node, ast.FunctionDef) else
                        "a parameter" if isinstance(node, ast.arg) else "a variable")
                raise SpecError(f"{what} named {name!r} would shadow the DSL's {name}(): "
                                f"every DSL and builtin name the DSL gives meaning to keeps it; "
                                f"rename it (e.g. {name}_)", file, node.lineno)


def outer_names(fn):
    """Every name a spec body or its lambdas could read from outside: builtins, the module's
    globals and the enclosing function's cells (``inspect.getclosurevars`` misses names read
    only inside a lambda)."""
    names = dict(vars(builtins))
    names.update(fn.__globals__)
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            names[name] = cell.cell_contents
        except ValueError:        # an empty cell: the name is assigned after the spec
            pass
    return names


def is_random_module(name):
    return "random" in name or name.split(".")[0] in _RANDOM_SOURCES


def is_plain_constant(value):
    """Exact ints and bools, and (nested, rectangular) tuples of them.  Subclasses are not
    constants: their ``repr``, ``__index__`` or ``__eq__`` could run arbitrary code."""
    if type(value) is bool:
        return True
    if type(value) is int:
        return INT64[0] <= value <= INT64[1]
    if type(value) is tuple:
        return all(is_plain_constant(v) for v in value) and _rectangular(value)
    return False


def _rectangular(value):
    if not value or all(type(v) is not tuple for v in value):
        return True
    if any(type(v) is not tuple for v in value):
        return False
    return len({len(v) for v in value}) == 1 and all(_rectangular(v) for v in value)


def constant_node(value, where):
    """An AST node for a verified constant, built directly (never by parsing a repr)."""
    if type(value) is tuple:
        node = ast.Tuple([constant_node(v, where) for v in value], ast.Load())
    else:
        node = ast.Constant(value)
    return ast.copy_location(node, where)
