"""Exact laws with symbolic rates: every trace of a small instance, its probability as a
rational function of the rates (sympy), and a symbolic proof that they sum to 1.

>>> from structdsl import specs, symbolic
>>> law = symbolic.law(specs.spanning_tree, (4, 4))
>>> law.is_normalised()               # the sum simplifies to exactly 1, not numerically
True
>>> structure, p = law.structure_law()[0]
>>> print(law.latex(p))

Needs the ``sympy`` extra.  The traces and their member sets come from the reference
backend (enumeration, then one replay); each probability is the product over the trace's
races of ``rate(winner) / sum of the members' rates``, with one positive symbol per valid
atom (``r_i`` or ``r_{i,j}``).
"""
from __future__ import annotations

import numpy as np
import sympy

from .dsl import Spec


def _symbol(index):
    name = "r_" + (str(index[0]) if len(index) == 1 else "{" + ",".join(map(str, index)) + "}")
    return sympy.Symbol(name, positive=True)


class SymbolicLaw:
    """The exact law of a spec's traces at one size, with symbolic rates.

    ``rates``: ``{atom index: Symbol}`` for the valid atoms; ``traces``: int64 ``[N, R]``;
    ``structure``: the spec's fields, each ``[N, ...]``; ``factors``: per trace, one
    ``rate(winner) / sum(members' rates)`` per race; ``probs``: their products;
    ``members``: per trace, per race, the frozenset of flat atom indices that raced.
    """

    def __init__(self, program, atom_shape, rates, traces, structure, factors, members=None):
        self.program, self.atom_shape, self.rates = program, atom_shape, rates
        self.traces, self.structure, self.factors = traces, structure, factors
        self.members = members
        self.probs = [sympy.Mul(*f) for f in factors]

    def __len__(self):
        return len(self.probs)

    def total(self):
        """The sum of every trace's probability, simplified.

        Summed along the tree of trace prefixes (distributivity): a prefix's sum is ``sum
        over its next winners w of rate(w) / sum(members) * (the sum below w)``, each
        simplified by ``sympy.cancel``; expanding all traces over one common denominator
        instead is far too slow past a few dozen traces."""
        branch, value = {}, {}
        for t, factors in zip(self.traces.tolist(), self.factors):
            used = tuple(w for w in t if w >= 0)
            for r in range(len(used)):
                branch[used[:r + 1]] = factors[r]
            value[used] = sympy.Integer(1)
        for length in range(max(map(len, value), default=0), 0, -1):
            sums = {}
            for prefix in [p for p in value if len(p) == length]:
                sums.setdefault(prefix[:-1], []).append(branch[prefix] * value.pop(prefix))
            for parent, terms in sums.items():
                value[parent] = sympy.cancel(sympy.together(sympy.Add(*terms)))
        return value.get((), sympy.Integer(0))

    def is_normalised(self):
        """True iff the probabilities sum to exactly 1 as rational functions of the rates
        (shown by simplification, not by evaluating at numbers)."""
        return sympy.cancel(self.total() - 1) == 0      # cancel: the canonical p/q form

    def _key(self, i):
        return tuple(np.ascontiguousarray(f[i]).tobytes() for f in self.structure)

    def structure_law(self):
        """``[(structure, probability)]``: every distinct structure (a record of the spec's
        fields) with the sum of its traces' probabilities, simplified."""
        first, total = {}, {}
        for i, p in enumerate(self.probs):
            k = self._key(i)
            first.setdefault(k, i)
            total[k] = total.get(k, 0) + p
        record = type(self.structure)
        # cancel gives the canonical p/q form; factor() can take minutes on 6 rates
        return [(record(*(f[first[k]] for f in self.structure)), sympy.cancel(sympy.together(p)))
                for k, p in total.items()]

    def probability_of(self, **fields):
        """The simplified probability of the structure whose fields equal ``fields``
        (a subset of the spec's fields), summed over every matching structure."""
        names = self.structure._fields
        unknown = set(fields) - set(names)
        if unknown:
            raise TypeError(f"{self.program.ir.name} has no field(s) {sorted(unknown)}; its fields are {list(names)}")
        out = 0
        for i, p in enumerate(self.probs):
            if all(np.array_equal(getattr(self.structure, k)[i], np.asarray(v)) for k, v in fields.items()):
                out += p
        return sympy.cancel(sympy.together(out))

    def at(self, expr, rates):
        """``expr`` with the rates replaced by exact numbers (ints, Fractions; floats are
        rationalised): ``rates`` an array of the atoms' shape."""
        rates = np.asarray(rates, dtype=object)
        return sympy.cancel(expr.subs({s: sympy.nsimplify(rates[idx]) for idx, s in self.rates.items()}))

    @staticmethod
    def latex(expr):
        """LaTeX of a probability (or any expression of the rates)."""
        return sympy.latex(expr)

    def __repr__(self):
        return (f"<SymbolicLaw of {self.program.ir.name} at {self.atom_shape}: {len(self)} traces, "
                f"{len(self.rates)} rates>")


def law(spec_or_program, atom_shape, max_traces=20000, **static):
    """The :class:`SymbolicLaw` of ``spec_or_program`` with atoms of shape ``atom_shape``.

    A spec is compiled for the reference backend with ``**static``; a compiled program of
    any backend is used through its reference.  Raises ``EnumerationLimitError`` past
    ``max_traces`` traces.
    """
    from . import compile as compile_spec
    if isinstance(spec_or_program, Spec):
        prog = compile_spec(spec_or_program, **static)
    else:
        prog = getattr(spec_or_program, "reference", spec_or_program)
        if static:
            raise TypeError("static parameters go to compile(); this program is compiled already")
    atom_shape = tuple(int(d) for d in atom_shape)
    inst = prog.instance(atom_shape)
    enum = prog.enumerate(rates=np.ones(atom_shape, dtype=int), max_traces=max_traces)
    members = prog.replay_flat(inst, enum.traces, np.zeros((len(enum), inst.num_atoms))).races.members
    valid = inst.valid.reshape(-1)
    index = list(np.ndindex(*atom_shape))
    rates = {index[a]: _symbol(index[a]) for a in range(inst.num_atoms) if valid[a]}
    flat = [rates.get(index[a], sympy.Integer(0)) for a in range(inst.num_atoms)]
    factors, raced = [], []
    for t, m in zip(enum.traces, members):
        factors.append([flat[w] / sympy.Add(*(flat[a] for a in np.flatnonzero(m[r])))
                        for r, w in enumerate(t) if w >= 0])
        raced.append([frozenset(np.flatnonzero(m[r]).tolist()) for r, w in enumerate(t) if w >= 0])
    return SymbolicLaw(prog, atom_shape, rates, enum.traces, enum.structure, factors, raced)


__all__ = ["law", "SymbolicLaw"]
