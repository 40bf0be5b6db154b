"""Check a spec against the plain algorithm it is meant to be, and check a user's spec file.

Two questions the rest of the battery cannot answer:

* *Does the race program compute the algorithm you meant?*  :func:`compare_solve`
  (in :mod:`structdsl.testing`) runs ``program.solve`` and your plain reference solver on
  random weights and reports the first disagreement.
* *Is its law the law of that algorithm on exponential noise?*  When the reference's output
  depends only on the order of the weights (:func:`is_order_only`), :func:`reference_certificate`
  proves it, or refutes it, with sympy: the spec's structure law
  (:func:`structdsl.symbolic.law`) must equal, structure by structure, the sum over every
  ordering of the valid atoms that the reference maps to that structure of the ordering's
  exponential-race probability ``prod_k r_{i_k} / (r_{i_k} + ... + r_{i_m})``.

>>> from structdsl import specs
>>> from structdsl.check import reference_certificate
>>> cert = reference_certificate(specs.spanning_tree, (4, 4))   # its @spec(reference=...)
>>> cert.ok, cert.orderings                                      # (True, 720)

:func:`check_file` is ``python -m structdsl check path/to/spec.py``: it imports the file,
finds its ``@spec`` objects and runs the verifier, the property battery
(:func:`structdsl.testing.check_spec`), the reference comparison and, with ``exact=N``, the
symbolic certificates, printing a report.  Needs ``sympy`` only for ``exact``.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from .dsl import Spec
from .errors import SpecError
from .testing import atom_shape_at, check_spec, compare_solve, reference_fields

__all__ = ["is_order_only", "ordering_law", "reference_certificate", "ReferenceCertificate",
           "load_spec_file", "SpecFileError", "check_file", "CheckUsageError", "load_data",
           "resolve_params"]


# ---- is the reference a function of the order of the weights? ------------------------------
#: Strictly increasing maps of positive weights to positive weights; ``+inf`` stays ``+inf``.
#: Smooth ones first; :func:`_order_maps` adds maps through the ranks, which do not keep any
#: property of the values but their order.
_MONOTONE = [
    ("2w + 1", lambda w: 2 * w + 1),
    ("w^3", lambda w: w ** 3),
    ("sqrt(w)", np.sqrt),
    ("exp(w) - 1 + 1e-3", lambda w: np.expm1(w) + 1e-3),
]


def _ranks(w, valid):
    """Weights replaced by their ranks ``1, 2, ...`` among the valid atoms (``+inf`` stays)."""
    return _by_rank(w, valid, np.arange(1.0, int((valid & np.isfinite(w)).sum()) + 1))


def _by_rank(w, valid, values):
    """The weights' images under the strictly increasing map that sends the ``k``-th smallest
    finite valid weight to ``values[k]`` (``values`` increasing); ``+inf`` stays."""
    out = np.full(w.shape, np.inf)
    finite = valid & np.isfinite(w)
    order = np.argsort(w[finite], kind="stable")
    r = np.empty(len(order))
    r[order] = values
    out[finite] = r
    return out


def _increasing(draw):
    """``draw()`` (a float array) sorted, redrawn until its entries are distinct."""
    while True:
        v = np.sort(draw())
        if v.size < 2 or (np.diff(v) > 0).all():
            return v


def _order_maps(valid, m, rng):
    """Strictly increasing maps that change everything about the values but their order,
    for one weight array with ``m`` finite valid weights: a scaling by ``2^64`` and by
    ``2^-64`` (exact in floating point, so a scale-free reference cannot tell; a reference
    with a threshold or an absolute tolerance at the weights' scale sees every weight on one
    side of it), and maps through the ranks: the ranks themselves, near-ties (consecutive
    weights 1e-9 apart: a reference that compares within a tolerance sees ties), powers of
    two (a geometric spread: nothing affine about it), and two random increasing maps,
    fresh ``Exp(1)`` values and log-uniform values on [1e-6, 1e6] put in the weights' order
    (a reference that reads gaps, means or sums sees other ones)."""
    fresh = _increasing(lambda: rng.exponential(size=m))
    wide = _increasing(lambda: 10.0 ** rng.uniform(-6, 6, size=m))
    rank = np.arange(1.0, m + 1)
    return [("2^64 w", lambda w: np.ldexp(w, 64)),
            ("2^-64 w", lambda w: np.ldexp(w, -64)),
            ("ranks", lambda w: _by_rank(w, valid, rank)),
            ("1 + 1e-9 * rank (near-ties)", lambda w: _by_rank(w, valid, 1 + 1e-9 * rank)),
            ("2^rank (a geometric spread)", lambda w: _by_rank(w, valid, np.ldexp(1.0, rank.astype(int)))),
            ("a random increasing map (fresh Exp(1) values, same order)", lambda w: _by_rank(w, valid, fresh)),
            ("a random increasing map (log-uniform values on [1e-6, 1e6], same order)",
             lambda w: _by_rank(w, valid, wide))]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def is_order_only(reference, program, atom_shape, *, trials=8, rng=None):
    """Whether ``reference``'s output looks like a function of the order of the weights.

    Tested, not proven: on ``trials`` random tie-free weight arrays (``+inf`` at invalid
    atoms) the output must not change when the weights go through each of a few strictly
    increasing maps: smooth ones (``2w + 1``, ``w^3``, ``sqrt``, ``exp(w) - 1``) and maps
    that keep nothing of the values but their order (:func:`_order_maps`: scalings by
    ``2^64`` and ``2^-64``, the ranks, near-ties 1e-9 apart, powers of two, and two random
    increasing maps drawn afresh per trial).  The smooth maps alone miss a reference that
    compares within a tolerance, one with a threshold away from the weights' scale (a
    sentinel "weight >= 1000 means no edge"), and can miss one that no affine map changes
    ("the atom closest to the mean").  Returns
    ``(True, None)`` or ``(False, why)``; ``why`` names the map and the weights (a
    reference that raises on a map's image is not order-only either).  Sorting, argmin and
    comparisons pass; sums of weights (a shortest path, a maximum-weight matching) fail, as
    they should: their law is not a sum over orderings.
    """
    from .testing import _tie_free_weights
    rng = np.random.default_rng(1) if rng is None else rng
    inst = program.instance(tuple(atom_shape))
    names = program.Structure._fields
    m = int(inst.valid.sum())
    for _ in range(trials):
        w = _tie_free_weights(rng, inst.valid)
        base = reference_fields(reference(w.copy()), names)
        for label, f in _MONOTONE + _order_maps(inst.valid, m, rng):
            image = f(w)
            try:
                out = reference_fields(reference(image.copy()), names)
            except Exception as exc:         # the user's code: it runs on w, so it must run here
                return False, (f"it raises on the image of the weights under the strictly increasing "
                               f"map {label} ({type(exc).__name__}: {exc}), not on the weights\n{w}")
            if not _same(base, out):
                return False, (f"its output changes when the weights go through the strictly "
                               f"increasing map {label}, e.g. for weights\n{w}")
    return True, None


# ---- laws as sums along a tree of prefixes ---------------------------------------------------
def _key(fields):
    return tuple((k, fields[k].shape, np.asarray(fields[k]).astype(np.int64).tobytes()) for k in sorted(fields))


class _Node:
    """A prefix of winners: ``members`` (bitmask of the flat atoms that race next),
    ``children`` {winner: _Node}; a complete path ends at a node with an outcome ``key``.
    ``keys``: the outcomes below; ``complete``: at this node and every node below, the
    children are exactly the members (so the paths below carry total probability 1)."""
    __slots__ = ("members", "children", "key", "keys", "complete")

    def __init__(self):
        self.members, self.children, self.key, self.keys, self.complete = None, {}, None, None, False


def _trie(paths):
    """The prefix tree of ``paths``: each ``(steps, key)``, steps a sequence of ``(winner,
    members bitmask)``.  Raises ``ValueError`` if two paths race different members after the
    same winners, or one path is a prefix of another."""
    root = _Node()
    for steps, key in paths:
        node = root
        for atom, members in steps:
            if node.key is not None or (node.members is not None and node.members != members):
                raise ValueError("two traces race different members after the same winners")
            node.members = members
            node = node.children.setdefault(atom, _Node())
        if node.children or node.key is not None:
            raise ValueError("one trace is a prefix of another")
        node.key = key
    stack = [(root, False)]
    while stack:                           # post-order, without recursion
        node, seen = stack.pop()
        if not node.children:
            node.keys, node.complete = frozenset([node.key]), True
        elif not seen:
            stack.append((node, True))
            stack.extend((c, False) for c in node.children.values())
        else:
            kids = node.children.values()
            node.keys = frozenset().union(*(c.keys for c in kids))
            mask = 0
            for a in node.children:
                mask |= 1 << a
            node.complete = mask == node.members and all(c.complete for c in kids)
    return root


def _settled(node):
    """Every path below ``node`` gives one outcome and the children are the members all
    the way down: the paths' probabilities (given the prefix) sum to exactly 1."""
    return len(node.keys) == 1 and node.complete


def _members(mask, atoms):
    return [a for a in atoms if mask >> a & 1]


def _field_law(root, gens):
    """``{key: probability}`` in the rational function field: at each node, the sum over
    winners ``a`` of ``gens[a] / (sum of the members' gens) * (the law below a)``; a settled
    node contributes 1 to its one outcome."""
    K = next(iter(gens.values())).field
    atoms = sorted(gens)

    def value(node):
        if _settled(node):
            return {next(iter(node.keys)): K.one}
        acc = {}
        for a, child in node.children.items():
            for k, v in value(child).items():
                acc[k] = acc[k] + gens[a] * v if k in acc else gens[a] * v
        total = sum((gens[a] for a in _members(node.members, atoms)), K.zero)
        return {k: v / total for k, v in acc.items()}
    return value(root)


def _nested(root, key, symbols):
    """The probability of outcome ``key`` as a nested sympy expression along the prefix
    tree (exact, not simplified: far shorter than the canonical form)."""
    import sympy
    atoms = sorted(symbols)

    def expr(node):
        if key not in node.keys:
            return sympy.Integer(0)
        if _settled(node):
            return sympy.Integer(1)
        below = [symbols[a] * expr(c) for a, c in node.children.items() if key in c.keys]
        return sympy.Add(*below) / sympy.Add(*(symbols[a] for a in _members(node.members, atoms)))
    return expr(root)


def _race_trie(law, names):
    """The race program's prefix tree: one path per trace (winners and member sets from
    the symbolic law), outcome = the fields ``names`` of its structure."""
    paths = []
    for i, t in enumerate(law.traces):
        fields = {k: np.asarray(getattr(law.structure, k)[i]) for k in names}
        winners = [int(w) for w in t if w >= 0]
        steps = [(w, sum(1 << a for a in m)) for w, m in zip(winners, law.members[i])]
        paths.append((steps, _key(fields)))
    return _trie(paths)


def ordering_law(reference, law, names, max_orderings=40320):
    """The prefix tree of ``reference``'s output over the orderings of the valid atoms.

    Only the order of the weights matters (the caller checks :func:`is_order_only`), so
    with independent ``Exp(r_i)`` weights each of the ``m!`` orderings ``i_1 < ... < i_m``
    of the ``m`` valid atoms (those of ``law``, a :class:`structdsl.symbolic.SymbolicLaw`)
    is one outcome, of probability ``prod_k r_{i_k} / (r_{i_k} + ... + r_{i_m})`` (the
    first to fire among the rest, again and again).  The reference runs once per ordering,
    on the weights ``w[i_k] = k`` (``+inf`` at invalid atoms), and its output (the fields it
    returns, checked against the spec's ``names``) is the path's outcome.

    Returns ``(root, {key: fields}, orderings)``; :func:`_field_law` sums the tree.
    Raises ``ValueError`` past ``max_orderings`` orderings.
    """
    shape = law.atom_shape
    atoms = [int(np.ravel_multi_index(idx, shape)) for idx in law.rates]
    m = len(atoms)
    if math.factorial(m) > max_orderings:
        raise ValueError(f"{m} valid atoms have {math.factorial(m)} orderings, more than the "
                         f"{max_orderings} this certificate enumerates; use a smaller size")
    full = sum(1 << a for a in atoms)
    records, paths, returned = {}, [], None
    w = np.full(shape, np.inf)
    for perm in itertools.permutations(atoms):
        for rank, a in enumerate(perm):
            w.flat[a] = rank + 1
        out = reference_fields(reference(w.copy()), names)
        if returned is None:
            returned = set(out)
        elif set(out) != returned:
            raise ValueError(f"the reference returned fields {sorted(out)} on one ordering and "
                             f"{sorted(returned)} on another; it must return the same fields")
        k = _key(out)
        records.setdefault(k, out)
        steps, left = [], full
        for a in perm:
            steps.append((a, left))
            left &= ~(1 << a)
        paths.append((steps, k))
    return _trie(paths), records, len(paths)


@dataclass
class ReferenceCertificate:
    """The outcome of :func:`reference_certificate`.

    ``applies``: the reference is order-only (detected or declared), so the certificate ran;
    ``ok``: it ran and every structure's probability agrees exactly (True when it does not
    apply: there is nothing to refute); ``message``: the readable verdict; ``orderings``:
    how many orderings were enumerated; ``structures``: how many distinct outputs (of the
    reference's fields) were compared; ``differing``: ``[(fields, P spec, P reference)]`` for
    every structure whose probabilities differ, as canonical sympy expressions (``p / q``,
    reduced) of the rate symbols ``law.rates``; ``shown``: the structure the message
    reports, its two probabilities as nested (exact, unsimplified) expressions, and their
    values at the rates named in ``where``."""
    applies: bool
    ok: bool
    message: str
    orderings: int = 0
    structures: int = 0
    differing: list = field(default_factory=list)
    shown: dict = field(default_factory=dict)


def describe_fields(fields):
    """A short text for a structure's fields: bool arrays as their True positions (a
    symmetric bool matrix as its edges ``u-v``), int arrays as lists."""
    parts = []
    for name in sorted(fields):
        a = np.asarray(fields[name])
        if a.dtype == bool and a.ndim == 2 and a.shape[0] == a.shape[1] and np.array_equal(a, a.T):
            text = "edges " + " ".join(f"{u}-{v}" for u, v in zip(*np.nonzero(np.triu(a)))) if a.any() else "no edge"
        elif a.dtype == bool:
            text = "True at " + (", ".join(str(tuple(map(int, i)) if a.ndim > 1 else int(i[0]))
                                           for i in np.argwhere(a)) or "nowhere")
        else:
            text = str(a.tolist())
        parts.append(f"{name} = {text}")
    return ", ".join(parts)


def reference_certificate(spec_or_program, atom_shape, reference=None, *, order_only=None,
                          max_orderings=40320, law=None, seed=0, **static):
    """Prove, or refute, that the spec's structure law is the law of ``reference`` on
    exponential noise, exactly, at atoms of shape ``atom_shape``.

    reference: the plain solver (default: the spec's ``@spec(reference=...)``); it returns
    some of the spec's fields, and the spec's law is marginalised onto those fields.
    order_only: ``None`` detects it with :func:`is_order_only`; ``True`` / ``False``
    declares it (skipping the detection).  When the reference is not order-only the
    certificate does not apply (``applies`` is False): a function of the weights' values
    has no law as a sum over orderings.
    law: a :class:`structdsl.symbolic.SymbolicLaw` already computed at this shape.

    Both laws are summed along their prefix trees (the spec's traces; the orderings) in
    sympy's field of rational functions of the rates over the rationals, whose elements are
    kept as reduced ``p / q``: two probabilities are equal exactly when ``cancel(a - b)`` is
    0.  Below a prefix whose every completion gives one structure, and whose every race
    branches on all its members, the completions sum to exactly 1; that prefix contributes
    1 without being expanded.  On a difference the message names the structure that differs
    with the shortest expressions and gives both probabilities, symbolically (nested along
    the prefix trees) and at numbers: all rates 1 if they differ there, else random integer
    rates in [1, 9] (seeded) at which they do.
    """
    from sympy import ZZ
    from sympy.polys.fields import field as rational_field

    from . import symbolic
    prog = spec_or_program
    if isinstance(spec_or_program, Spec):
        from . import compile as compile_spec
        prog = compile_spec(spec_or_program, **static)
        reference = spec_or_program.reference if reference is None else reference
    elif reference is None:
        reference = prog.spec.reference
    if reference is None:
        raise ValueError(f"{prog.ir.name} has no reference: pass reference= or declare @spec(reference=fn)")
    label = getattr(reference, "__name__", "the reference")
    atom_shape = tuple(int(d) for d in atom_shape)
    names = prog.Structure._fields

    if order_only is None:
        applies, why = is_order_only(reference, prog, atom_shape)
    else:
        applies, why = bool(order_only), "declared not order-only"
    if not applies:
        return ReferenceCertificate(False, True, f"not applicable: {label} does not depend only on the "
                                                 f"order of the weights ({why})")
    law = symbolic.law(prog, atom_shape) if law is None else law
    ref_root, records, orderings = ordering_law(reference, law, names, max_orderings)
    fields = sorted({k for k, _, _ in next(iter(records))})
    race_root = _race_trie(law, fields)

    flat = {int(np.ravel_multi_index(idx, atom_shape)): s for idx, s in law.rates.items()}
    K, *gens = rational_field(list(flat.values()), ZZ)     # Q(r): fractions of Z[r]
    gens = dict(zip(flat, gens))
    race_p, ref_p = _field_law(race_root, gens), _field_law(ref_root, gens)
    race_records = {}
    for i in range(len(law)):
        sub = {k: np.asarray(getattr(law.structure, k)[i]) for k in fields}
        race_records.setdefault(_key(sub), sub)
    keys = list(race_p) + [k for k in ref_p if k not in race_p]
    differing = [k for k in keys if race_p.get(k, K.zero) != ref_p.get(k, K.zero)]
    what = (f"all {orderings} orderings of the {len(flat)} valid atoms (each weighted by its "
            f"exponential-race probability) and {len(keys)} structures ({', '.join(fields)})")
    record = {**records, **race_records}
    cert = ReferenceCertificate(True, not differing, "", orderings, len(keys))
    if not differing:
        cert.message = (f"proved: the spec's law equals the law of {label} on exponential noise, exactly "
                        f"(as rational functions of the rates), over {what}")
        return cert
    cert.differing = [(record[k], race_p.get(k, K.zero).as_expr(), ref_p.get(k, K.zero).as_expr())
                      for k in differing]

    def at(value, rates):
        """The exact value of a field element at integer rates (an array of the atoms' shape)."""
        pairs = [(x, int(rates.flat[a])) for x, a in zip(K.ring.gens, flat)]
        return K.domain.to_sympy(value.numer.evaluate(pairs)) / K.domain.to_sympy(value.denom.evaluate(pairs))

    rng = np.random.default_rng(seed)
    tries = [np.ones(atom_shape, dtype=int)] + [rng.integers(1, 10, size=atom_shape) for _ in range(20)]
    shown = None
    for t, rates in enumerate(tries):
        candidates = []
        for k in differing:
            va, vb = at(race_p.get(k, K.zero), rates), at(ref_p.get(k, K.zero), rates)
            if va != vb:
                a, b = _nested(race_root, k, flat), _nested(ref_root, k, flat)
                candidates.append((len(str(a)) + len(str(b)), k, a, b, va, vb))
        if candidates:
            _, k, a, b, va, vb = min(candidates, key=lambda c: c[0])
            where = "all rates 1" if t == 0 else "the rates " + ", ".join(
                f"{flat[i]} = {rates.flat[i]}" for i in flat)
            shown = dict(structure=record[k], spec=a, reference=b, spec_value=va, reference_value=vb, where=where)
            break
    if shown is None:                    # not expected: distinct rational functions differ somewhere
        k = differing[0]
        shown = dict(structure=record[k], spec=_nested(race_root, k, flat), reference=_nested(ref_root, k, flat),
                     spec_value=None, reference_value=None, where=None)
    cert.shown = shown
    width = max(len("spec"), len(label)) + 3
    lines = [f"refuted: the spec's law is not the law of {label} on exponential noise: over {what}, "
             f"{len(differing)} structure(s) have a different probability.",
             f"For example the structure {describe_fields(shown['structure'])} has"]
    for name, expr in (("P(spec)", shown["spec"]), (f"P({label})", shown["reference"])):
        lines += textwrap.wrap(str(expr), width=100, initial_indent=f"  {name:{width}s} = ",
                               subsequent_indent=" " * (width + 7), break_on_hyphens=False)
    if shown["where"]:
        va, vb = shown["spec_value"], shown["reference_value"]
        lines.append(f"  at {shown['where']}: P(spec) = {va} = {float(va):.4f}, "
                     f"P({label}) = {vb} = {float(vb):.4f}")
    cert.message = "\n".join(lines)
    return cert


# ---- a user's spec file --------------------------------------------------------------------
class SpecFileError(Exception):
    """A spec file that cannot be checked at all: missing, unreadable, a syntax error, an
    exception while importing it, no ``@spec`` in it.  The message names the file and, when
    known, the line."""


def _user_frame(exc, path):
    """``(line, frame text)`` of the innermost traceback entry inside ``path``, or None."""
    path = os.path.realpath(path)
    found = None
    for fr in traceback.extract_tb(exc.__traceback__):
        if os.path.realpath(fr.filename) == path:
            found = (fr.lineno, (fr.line or "").strip())
    return found


def load_spec_file(path):
    """Import the Python file ``path`` as a module (its folder first on ``sys.path``, as when
    it runs as a script) and return ``(module, {name: Spec})`` for the specs defined in it
    (specs it only imports are left out).  Raises :class:`SpecFileError` with ``file:line``."""
    shown = path
    if not os.path.exists(path):
        raise SpecFileError(f"{shown}: no such file")
    if os.path.isdir(path):
        raise SpecFileError(f"{shown}: is a folder, not a Python file")
    real = os.path.realpath(path)
    name = "_structdsl_user_" + "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    loader_spec = importlib.util.spec_from_file_location(name, real)
    if loader_spec is None:
        raise SpecFileError(f"{shown}: cannot be imported as a Python module (is it a .py file?)")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    folder = os.path.dirname(real)
    sys.path.insert(0, folder)
    try:
        loader_spec.loader.exec_module(module)
    except SyntaxError as exc:
        line = f"{exc.lineno}:" if exc.lineno else ""
        text = f"\n    {exc.text.rstrip()}" if exc.text else ""
        raise SpecFileError(f"{shown}:{line} syntax error: {exc.msg}{text}") from None
    except SpecError as exc:
        raise SpecFileError(f"{exc} (while importing {shown})") from None
    except BaseException as exc:          # the user's module code: report, no traceback
        if isinstance(exc, KeyboardInterrupt):
            raise
        where = _user_frame(exc, real)
        loc = f"{shown}:{where[0]}: " if where else f"{shown}: "
        code = f"\n    {where[1]}" if where and where[1] else ""
        raise SpecFileError(f"{loc}{type(exc).__name__} while importing the file: {exc}{code}") from None
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    specs = {k: v for k, v in vars(module).items()
             if isinstance(v, Spec) and os.path.realpath(v.fn.__code__.co_filename) == real}
    if not specs:
        imported = sorted(k for k, v in vars(module).items() if isinstance(v, Spec))
        extra = (f" (it imports {', '.join(imported)}, but only specs defined in the file are checked)"
                 if imported else "")
        raise SpecFileError(f"{shown}: no @spec function in this file{extra}; declare one with "
                            f"`from structdsl import spec` and `@spec` above a function")
    return module, specs


def _indent(text, pad=" " * 22, width=100):
    """``text`` for a report row: lines past ``width`` wrapped at spaces, every line after
    the first indented by ``pad``."""
    lines = []
    for line in text.split("\n"):
        lines += textwrap.wrap(line, width, break_on_hyphens=False, drop_whitespace=True) if len(line) > width else [line]
    return ("\n" + pad).join(lines)


# ---- the command line's parameters, data and shapes --------------------------------------
class CheckUsageError(Exception):
    """A usage error of ``python -m structdsl check PATH``: a parameter a spec needs and was
    not given, one no checked spec takes, a data file that cannot be read, a shape of the
    wrong rank.  The message names the flag to add or fix; the command line reports it as a
    usage error (exit code 2)."""


DATA_SUFFIXES = (".npy", ".npz", ".json")


def parse_assignment(text, flag):
    """``NAME=VALUE`` or ``SPEC.NAME=VALUE`` -> ``(spec or None, name, value)``."""
    key, eq, value = text.partition("=")
    key = key.strip()
    spec_name, dot, name = key.rpartition(".")
    if not eq or not name.isidentifier() or (dot and not spec_name.isidentifier()):
        raise CheckUsageError(f"{flag} wants NAME=VALUE or SPEC.NAME=VALUE, got {text!r}")
    return (spec_name or None), name, value.strip()


def parse_param(text):
    """``--param [SPEC.]NAME=INT`` -> ``(spec or None, name, int)``."""
    spec_name, name, value = parse_assignment(text, "--param")
    try:
        return spec_name, name, int(value)
    except ValueError:
        raise CheckUsageError(f"--param wants [SPEC.]NAME=INT, got {text!r} (an array goes with "
                              f"--data {name}=FILE.npy)") from None


def load_data(path):
    """A data parameter's array from ``path``: ``FILE.npy``, ``FILE.npz`` holding one array,
    ``FILE.npz:KEY``, or ``FILE.json`` (nested lists of ints or bools).  Int and bool arrays
    only (the DSL has no floats).  Raises :class:`CheckUsageError` naming the file."""
    import json
    key = None
    base, colon, tail = path.rpartition(":")
    if colon and base.lower().endswith(".npz") and not os.path.exists(path):
        path, key = base, tail
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in DATA_SUFFIXES:
        raise CheckUsageError(f"{path}: a data file must be .npy, .npz (one array, or FILE.npz:KEY) "
                              f"or .json (nested lists), not {suffix or 'a file without a suffix'}")
    if not os.path.isfile(path):
        raise CheckUsageError(f"{path}: no such file")
    try:
        if suffix == ".json":
            with open(path) as f:
                array = np.asarray(json.load(f))
        elif suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.keys())
                if key is None and len(keys) != 1:
                    raise CheckUsageError(f"{path} holds {len(keys)} arrays ({', '.join(keys) or 'none'}): "
                                          f"name one as {path}:KEY")
                if key is not None and key not in keys:
                    raise CheckUsageError(f"{path} has no array {key!r}; it holds {', '.join(keys)}")
                array = npz[key if key is not None else keys[0]]
    except CheckUsageError:
        raise
    except Exception as exc:           # a malformed file: say which and why
        raise CheckUsageError(f"{path}: cannot be read as {suffix}: {type(exc).__name__}: {exc}") from None
    if array.dtype != bool and not np.issubdtype(array.dtype, np.integer):
        raise CheckUsageError(f"{path}: holds {array.dtype} values of shape {array.shape}; data parameters "
                              f"are int or bool arrays")
    return array


def parse_data(text):
    """``--data [SPEC.]NAME=FILE`` -> ``(spec or None, name, array)`` (:func:`load_data`)."""
    spec_name, name, value = parse_assignment(text, "--data")
    try:
        return spec_name, name, load_data(value)
    except CheckUsageError as exc:
        raise CheckUsageError(f"--data {text}: {exc}") from None


def parse_shape(text):
    """``--shape [SPEC=]N[,M...]`` (or ``NxM``) -> ``(spec or None, shape tuple)``."""
    spec_name, eq, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if (eq and not spec_name.strip().isidentifier()) or not shape or min(shape) < 1:
        raise CheckUsageError(f"--shape wants the atoms' dims, N or N,M (optionally SPEC=N,M), "
                              f"positive ints; got {text!r}")
    return (spec_name.strip() or None), shape


def _array_uses(spec):
    """``{parameter: line}`` of the parameters the spec's source indexes or reduces (an array
    parameter: ``dag[:, i]``, ``any(mask)``)."""
    import ast
    import inspect
    try:
        lines, first = inspect.getsourcelines(spec.fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return {}
    params = set(spec.ir.params)
    found = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            names = [node.value]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("any", "all", "sum", "len", "count", "argmin", "argmax")):
            names = [a for a in node.args if isinstance(a, ast.Name)]
        for n in names:
            if n.id in params:
                found.setdefault(n.id, first + n.lineno - 1)
    return found


def _flag_for(spec, name, array_uses):
    """The flag that gives parameter ``name`` of ``spec``, as a usage message shows it."""
    if name in array_uses and name not in spec.ir.static_names:
        return f"--data {name}=FILE.npy"
    return f"--param {name}=INT"


def resolve_params(specs, params, shapes=None, *, sources=None, path=None, file_specs=None):
    """Give each spec the parameters (and atoms' shape) meant for it.

    specs: ``{name: Spec}`` being checked.  params: ``{(spec or None, name): value}`` (ints
    from ``--param``, arrays from ``--data``); an unscoped one goes to every spec that takes
    a parameter of that name, a scoped one (``SPEC.NAME``) to that spec only, and wins over
    an unscoped one.  shapes: ``{spec or None: shape}`` likewise.  Returns ``{name: plan}``
    with ``plan = dict(params, shape, given, ignored)`` (``given``: how each parameter was
    given; ``ignored``: the unscoped flags this spec takes no parameter for).  Raises
    :class:`CheckUsageError` for a parameter no checked spec takes, a scope that names no
    spec, an int for an array parameter (or the reverse), a shape of the wrong rank, or
    parameters a spec needs and was not given (all of them, each with its flag)."""
    import inspect
    shapes = dict(shapes or {})
    plans = {}
    flags = {}
    irs = {}
    for sname, spec in specs.items():
        try:
            irs[sname] = spec.ir
        except SpecError:
            irs[sname] = None              # rejected: its verifier row says why
    names = {k: (ir.params if ir is not None else tuple(inspect.signature(specs[k].fn).parameters))
             for k, ir in irs.items()}
    for (scope, name), value in params.items():
        flag = "--data" if isinstance(value, np.ndarray) else "--param"
        flags[scope, name] = (sources or {}).get((scope, name)) or (
            f"{flag} {scope + '.' if scope else ''}{name}=" + (str(value) if flag == "--param" else "..."))
        if scope is not None and scope not in specs:
            raise CheckUsageError(f"{flags[scope, name]}: no spec named {scope!r} is checked; the specs "
                                  f"checked are {', '.join(sorted(specs))}")
        if scope is not None and name not in names[scope]:
            raise CheckUsageError(f"{flags[scope, name]}: spec {scope!r} has no parameter {name!r}; its "
                                  f"parameters are {', '.join(names[scope])}")
        everyone = {**{k: tuple(inspect.signature(f.fn).parameters) for k, f in (file_specs or {}).items()},
                    **names}
        if scope is None and not any(name in ps for ps in everyone.values()):
            takes = "; ".join(f"{k}: {', '.join(ps)}" for k, ps in everyone.items())
            raise CheckUsageError(f"{flags[scope, name]}: no spec in the file takes a parameter {name!r} "
                                  f"(parameters: {takes})")
    for scope in shapes:
        if scope is not None and scope not in specs:
            raise CheckUsageError(f"--shape {scope}=...: no spec named {scope!r} is checked; the specs "
                                  f"checked are {', '.join(sorted(specs))}")
    missing = []
    for sname, spec in specs.items():
        p = irs[sname]
        values, given, ignored = {}, {}, []
        for (scope, name), value in sorted(params.items(), key=lambda kv: kv[0][0] is not None):
            if scope not in (None, sname):
                continue
            if name not in names[sname]:
                ignored.append(flags[scope, name])
                continue
            values[name], given[name] = value, flags[scope, name]
        shape = shapes.get(sname, shapes.get(None))
        plans[sname] = dict(params=values, given=given, ignored=ignored, shape=shape)
        if p is None:
            continue
        uses = _array_uses(spec)
        for name, value in values.items():
            if isinstance(value, np.ndarray) and name in p.static_names:
                raise CheckUsageError(
                    f"{given[name]}: parameter {name!r} of spec {sname!r} is used as a size or bound at "
                    f"{p.where(p.static_names[name])}: it is an int, give it with --param {name}=INT")
            if not isinstance(value, np.ndarray) and name in uses and name not in p.static_names:
                raise CheckUsageError(
                    f"{given[name]}: parameter {name!r} of spec {sname!r} is an array (indexed at "
                    f"{p.where(uses[name])}): give it with --data {name}=FILE.npy (.npz, .json)")
        need = [s for s in p.statics if s not in values and s not in p.defaults]
        for name in need:
            flag = _flag_for(spec, name, uses)
            scoped = flag.replace(f" {name}=", f" {sname}.{name}=")
            kind = "an array" if flag.startswith("--data") else "an int"
            missing.append(f"spec {sname!r} ({path or p.file}:{spec.fn.__code__.co_firstlineno}) needs parameter "
                           f"{name!r} ({kind}): add {flag}" + (f" (or {scoped} for this spec only)"
                                                                if len(specs) > 1 else ""))
        if shape is not None and len(shape) != len(p.atoms.dims):
            raise CheckUsageError(f"--shape {'x'.join(map(str, shape))}: spec {sname!r} has atoms of rank "
                                  f"{len(p.atoms.dims)} ({', '.join(_ast_text(d) for d in p.atoms.dims)}), "
                                  f"so --shape wants {len(p.atoms.dims)} dim(s)")
    if missing:
        raise CheckUsageError("a parameter is missing:\n  " + "\n  ".join(missing) if len(missing) == 1 else
                              f"{len(missing)} parameters are missing:\n  " + "\n  ".join(missing))
    return plans


def _ast_text(node):
    import ast
    return ast.unparse(node)


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {tuple(value.shape)}"
    return str(value)


def _error_text(exc):
    """``Type: message`` and the exception's notes (PEP 678), for a report row."""
    notes = getattr(exc, "__notes__", None) or []
    return "\n".join([f"{type(exc).__name__}: {exc}"] + [str(n) for n in notes])


# ---- checking one spec ---------------------------------------------------------------------
def _check_one(spec, path, *, exact, backend, samples, seed, plan, strict, out, reports, summary):
    """Check one spec; print its section; return the number of failed checks.  Appends the
    spec's row of the final table to ``summary``."""
    from . import compile as compile_spec
    from .errors import EnumerationLimitError
    params = plan["params"]
    line = spec.fn.__code__.co_firstlineno
    ref = spec.reference
    ref_name = getattr(ref, "__name__", repr(ref)) if ref is not None else None
    print(f"\n{spec.name}  ({path}:{line}){f', reference {ref_name}' if ref is not None else ''}", file=out)
    failed = 0
    row_of = dict(name=spec.name, atoms="-", sizes="-", traces="-", structures="-", result="FAIL")
    summary.append(row_of)

    def row(what, verdict, text):
        print(f"  {what:<13s}{verdict:<6s} {_indent(text)}", file=out)

    if params:
        row("parameters", "", "; ".join(f"{k} = {_describe(v)} ({plan['given'][k]})" for k, v in params.items()))
    for flag in plan["ignored"]:
        row("parameters", "", f"{flag} not used: {spec.name} takes no parameter "
                              f"{flag.split('=')[0].split()[-1].split('.')[-1]!r}")

    t0 = time.perf_counter()
    try:
        prog = compile_spec(spec, backend=backend, **params)
    except SpecError as exc:
        hints = [f"\n({plan['given'][k]} gave an int array of 0s and 1s: if the spec reads {k} as bools, "
                 f"give a bool array (true/false in JSON))"
                 for k, v in params.items() if isinstance(v, np.ndarray) and v.dtype != bool
                 and v.size and np.isin(v, (0, 1)).all()]
        row("verifier", "FAIL", f"rejected: {exc}" + "".join(hints))
        return 1
    except (TypeError, ValueError) as exc:
        row("verifier", "FAIL", f"cannot compile: {exc}")
        return 1
    nested = " (nested=True promised)" if spec.nested else ""
    row("verifier", "pass", f"accepted: atoms {prog.expected_shape()}, {len(prog.ir.races)} race site(s){nested}, "
                            f"fields {', '.join(prog.Structure._fields)}")
    try:
        report = check_spec(spec, plan["shape"], backend=backend, reference=False, samples=samples, seed=seed,
                            raise_on_failure=False, strict=strict, **params)
    except EnumerationLimitError as exc:
        row("battery", "FAIL", f"{exc}\nthe battery enumerates every trace: check a smaller --shape")
        return failed + 1
    except Exception as exc:
        text = _error_text(exc)
        if plan["shape"] is not None:
            text += (f"\n(at --shape {'x'.join(map(str, plan['shape']))}, the atoms' shape you gave; "
                     f"pass another with --shape)")
        row("battery", "FAIL", text)
        return failed + 1
    reports.append(report)
    shape = report.atom_shape
    atoms = "x".join(map(str, shape))
    sizes = ", ".join(f"{k} = {v}" for k, v in report.sizes.items()) or "none"
    row_of.update(atoms=atoms, sizes=sizes.replace(" ", ""), traces=str(report.traces),
                  structures=str(report.structures))
    source = "given with --shape" if report.shape_source == "given" else f"picked: {report.shape_source}"
    row("size", "", f"atoms {atoms} (sizes: {sizes}), {source}")
    for w in report.warnings if not strict else ():           # (strict: a battery failure below)
        row("size", "warn", w + " (--strict makes this a failure)")
    summary_text = (f"atoms {atoms}: {report.traces} traces, {report.structures} structures, exact sum of p "
                    f"= {report.total_probability}, worst GOF p {report.worst_gof_p:.3f}, worst E|T p "
                    f"{report.worst_marginal_p:.3f}, atoms at -inf {'tested' if report.neg_inf_checked else 'n/a'}, "
                    f"{samples} samples per scenario ({time.perf_counter() - t0:.1f}s)")
    if report.ok:
        row("battery", "pass", summary_text)
    else:
        failed += 1
        row("battery", "FAIL", summary_text + "".join(f"\n! {f}" for f in report.failures))

    if ref is not None:
        try:
            cmp = compare_solve(prog, ref, shape, rng=np.random.default_rng(seed), trials=50, excluded_trials=20)
        except Exception as exc:         # solve itself raised (e.g. an empty race)
            failed += 1
            row("reference", "FAIL", f"solve raised on random weights: {type(exc).__name__}: {exc}")
            cmp = None
        if cmp is None:
            pass
        elif cmp.failure:
            failed += 1
            row("reference", "FAIL", cmp.failure)
        else:
            row("reference", "pass", f"solve == {ref_name} on {cmp.checked} random weight arrays and on "
                                     f"{cmp.excluded_checked} with excluded (+inf) atoms, atoms {atoms}")

    if exact is not None:
        if importlib.util.find_spec("sympy") is None:
            row(f"exact n={exact}", "FAIL", "--exact needs sympy: pip install -e '.[sympy]'")
            return failed + 1
        from . import symbolic
        t0 = time.perf_counter()
        try:
            eshape = atom_shape_at(prog, exact)
            law = symbolic.law(spec, eshape, **params)
            normalised = law.is_normalised()
        except Exception as exc:
            row(f"exact n={exact}", "FAIL", f"{type(exc).__name__}: {exc}")
            return failed + 1
        eatoms = "x".join(map(str, eshape))
        if normalised:
            row(f"exact n={exact}", "pass", f"atoms {eatoms}: the {len(law)} traces' probabilities sum to exactly 1 "
                                            f"as rational functions of {len(law.rates)} rate symbols (sympy) "
                                            f"({time.perf_counter() - t0:.1f}s)")
        else:
            failed += 1
            row(f"exact n={exact}", "FAIL", f"atoms {eatoms}: the {len(law)} traces' probabilities sum to "
                                            f"{law.total()}, not 1")
        if ref is None:
            row("certificate", "n/a", "the spec names no reference solver: declare @spec(reference=fn) to "
                                      "compare its law with the law of fn on exponential noise")
        else:
            t0 = time.perf_counter()
            try:
                cert = reference_certificate(prog, eshape, ref, law=law)
            except Exception as exc:
                failed += 1
                row("certificate", "FAIL", f"{type(exc).__name__}: {exc}")
            else:
                if not cert.applies:
                    row("certificate", "n/a", cert.message)
                else:
                    failed += not cert.ok
                    row("certificate", "pass" if cert.ok else "FAIL",
                        f"{cert.message} ({time.perf_counter() - t0:.1f}s)")
    return failed


def check_file(path, spec_name=None, *, exact=None, backend="numpy", samples=4000, seed=0,
               params=None, shape=None, strict=False, out=None, reports=None, sources=None):
    """``python -m structdsl check PATH``: check the specs of a user's file; print a report.

    spec_name: check only this spec (default: every spec defined in the file).  exact: also
    prove normalisation symbolically, and the reference certificate when the spec names a
    reference, with every size parameter set to ``exact``.  params: parameters for
    ``compile``, ints and (data parameters) int/bool arrays, keyed ``NAME`` (given to every
    checked spec that takes a parameter of that name; the report says which did not) or
    ``SPEC.NAME`` (that spec only).  shape: the atoms' shape the battery checks, a tuple for
    every spec or ``{SPEC: tuple}`` (default: :func:`structdsl.testing.pick_shape`).
    strict: a law with fewer than 3 structures fails (else a warning).  sources: ``{key of
    params: the flag that gave it}``, for the report.  reports: a list that
    receives each battery's :class:`SpecReport`.  Returns the exit code: 0 when every check
    passes, 1 when one fails, 2 when the file cannot be checked at all (the message says why,
    with the file and line).  Raises :class:`CheckUsageError` when the parameters or shapes
    given do not fit the specs (the message names the flag to add or fix).
    """
    out = out or sys.stdout
    scoped, labels = {}, {}
    for key, value in (params or {}).items():
        scope, _, name = key.rpartition(".") if isinstance(key, str) else (key[0] or "", "", key[1])
        scoped[scope or None, name] = value
        if sources and key in sources:
            labels[scope or None, name] = sources[key]
    shapes = shape if isinstance(shape, dict) else ({None: tuple(shape)} if shape is not None else {})
    reports = [] if reports is None else reports
    try:
        _, specs = load_spec_file(path)
    except SpecFileError as exc:
        print(f"structdsl check: {exc}", file=out)
        return 2
    file_specs = specs
    if spec_name is not None:
        if spec_name not in specs:
            print(f"structdsl check: {path}: no spec named {spec_name!r}; the file defines "
                  f"{', '.join(sorted(specs))}", file=out)
            return 2
        specs = {spec_name: specs[spec_name]}
        scoped = {k: v for k, v in scoped.items() if k[0] in (None, spec_name)}
        shapes = {k: v for k, v in shapes.items() if k in (None, spec_name)}
    plans = resolve_params(specs, scoped, shapes, sources=labels, path=path, file_specs=file_specs)
    print(f"structdsl check {path} ({backend} backend, {samples} samples per scenario, seed {seed}"
          f"{f', exact at n = {exact}' if exact is not None else ''}{', strict' if strict else ''}): "
          f"{len(specs)} spec(s)", file=out)
    failed_specs, summary = [], []
    for name, spec in specs.items():
        failed = _check_one(spec, path, exact=exact, backend=backend, samples=samples, seed=seed,
                            plan=plans[name], strict=strict, out=out, reports=reports, summary=summary)
        summary[-1]["result"] = "FAIL" if failed else "pass"
        if failed:
            failed_specs.append(name)
    width = max(len("spec"), *(len(r["name"]) for r in summary))
    print(f"\n{'spec':<{width}s}  {'atoms':>7s}  {'sizes':<12s} {'traces':>7s} {'structures':>10s}  result",
          file=out)
    for r in summary:
        print(f"{r['name']:<{width}s}  {r['atoms']:>7s}  {r['sizes']:<12s} {r['traces']:>7s} "
              f"{r['structures']:>10s}  {r['result']}", file=out)
    if failed_specs:
        print(f"\nFAIL: {len(failed_specs)} of {len(specs)} spec(s) failed a check: {', '.join(failed_specs)}", file=out)
        return 1
    print(f"\npass: {len(specs)} of {len(specs)} spec(s) pass every check", file=out)
    return 0
