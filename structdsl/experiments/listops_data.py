"""ListOps (Nangia & Bowman 2018) with MIN, MAX and MED, bounded depth and length, generated
from a seed, with the gold dependency parse of every example (experiment 2).

An example is one bracketed expression whose first token is the outermost operator::

    [MAX 2 [MIN 4 7 ] 0 ]          label 4

Tokens (ids): the digits ``0..9`` (ids 0-9), ``[MIN`` (10), ``[MAX`` (11), ``[MED`` (12),
``]`` (13) and the padding ``PAD`` (14).  Operators: ``MIN``, ``MAX`` and ``MED`` =
``int(numpy.median(args))`` exactly as ListOps' ``make_data.py`` computes it (for an even
number of arguments the floor of the mean of the two middle values: ``MED 1 4 = 2``).

**Gold parse** (an arborescence rooted at token 0): every argument of an operator (a digit, or
the opening token ``[OP`` of a nested expression) has that operator's token as parent, and
every closing bracket ``]`` attaches to the operator it closes.  So every token but the root
has exactly one parent; ``parents[i, 0] = -1`` and ``-1`` on padding.

**Generation** (:func:`generate`): the root is an operator; an operator at depth ``d`` (the
root has depth 1) draws its operator uniformly from the three, its number of arguments
uniformly in ``[min_args, max_args]``, and each argument is a nested operator with
probability ``p_op`` if ``d < max_depth``, else a uniform digit.  Expressions longer than
``max_len`` tokens or shallower than ``min_depth`` are redrawn.  With ``balance=True`` (the
default) the classes are equalised by quota: the draws run in order and an example is kept
only while its label has fewer than ``ceil(num / 10)`` kept examples (then the first ``num``
are returned, in draw order).  Everything uses one ``numpy.random.default_rng`` stream per
split; :func:`make_splits` spawns the training and test streams from
``numpy.random.SeedSequence(seed)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["VOCAB", "PAD", "CLOSE", "MIN", "MAX", "MED", "NUM_CLASSES", "ListOpsData", "generate",
           "make_splits", "apply_op", "to_string", "label_histogram"]

MIN, MAX, MED, CLOSE, PAD = 10, 11, 12, 13, 14
VOCAB = tuple(str(d) for d in range(10)) + ("[MIN", "[MAX", "[MED", "]", "<pad>")
NUM_CLASSES = 10
OPERATORS = (MIN, MAX, MED)


def apply_op(op, values):
    """The value of operator ``op`` (token id) on a list of ints, as ListOps defines it."""
    if op == MIN:
        return min(values)
    if op == MAX:
        return max(values)
    if op == MED:
        return int(np.median(values))          # even count: floor of the mean of the middle two
    raise ValueError(f"not an operator token: {op}")


@dataclass
class ListOpsData:
    tokens: np.ndarray      # int64 [N, max_len], PAD after the sentence
    lengths: np.ndarray     # int64 [N]
    labels: np.ndarray      # int64 [N], 0..9
    parents: np.ndarray     # int64 [N, max_len]: gold head of every token, -1 at the root and padding
    depths: np.ndarray      # int64 [N]: operator nesting depth (the root alone: 1)

    def __len__(self):
        return len(self.labels)


def _draw(rng, max_depth, min_args, max_args, p_op):
    """One expression: (tokens, parents, value, depth), drawn depth first."""
    tokens, parents = [], []

    def node(parent, depth):
        me = len(tokens)
        op = OPERATORS[int(rng.integers(3))]
        tokens.append(op)
        parents.append(parent)
        k = int(rng.integers(min_args, max_args + 1))
        values, deepest = [], depth
        for _ in range(k):
            if depth < max_depth and rng.random() < p_op:
                v, d = node(me, depth + 1)
                deepest = max(deepest, d)
            else:
                v = int(rng.integers(10))
                tokens.append(v)
                parents.append(me)
            values.append(v)
        tokens.append(CLOSE)
        parents.append(me)
        return apply_op(op, values), deepest

    value, depth = node(-1, 1)
    return tokens, parents, value, depth


def generate(num, rng, max_len=30, max_depth=3, min_depth=2, min_args=2, max_args=4, p_op=0.3,
             balance=True, max_draws=None):
    """``num`` examples from ``rng`` (a ``numpy.random.Generator``, a ``SeedSequence`` or an int
    seed).  Returns :class:`ListOpsData` padded to ``max_len``."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if not (1 <= min_depth <= max_depth and 2 <= min_args <= max_args and 0 <= p_op <= 1):
        raise ValueError("need 1 <= min_depth <= max_depth, 2 <= min_args <= max_args, 0 <= p_op <= 1")
    if 2 + min_args > max_len:
        raise ValueError(f"max_len {max_len} is below the shortest expression ({2 + min_args} tokens)")
    quota = math.ceil(num / NUM_CLASSES) if balance else num
    max_draws = max_draws or 200 * num + 1000
    kept = np.zeros(NUM_CLASSES, dtype=np.int64)
    out = []
    draws = 0
    while len(out) < num:
        draws += 1
        if draws > max_draws:
            raise RuntimeError(f"ListOps generator: {len(out)} of {num} examples after {max_draws} draws "
                               f"(per class {kept.tolist()}); relax the bounds or balance=False")
        toks, pars, value, depth = _draw(rng, max_depth, min_args, max_args, p_op)
        if len(toks) > max_len or depth < min_depth or kept[value] >= quota:
            continue
        kept[value] += 1
        out.append((toks, pars, value, depth))
    tokens = np.full((num, max_len), PAD, dtype=np.int64)
    parents = np.full((num, max_len), -1, dtype=np.int64)
    lengths = np.zeros(num, dtype=np.int64)
    for i, (toks, pars, _, _) in enumerate(out):
        tokens[i, :len(toks)] = toks
        parents[i, :len(pars)] = pars
        lengths[i] = len(toks)
    labels = np.array([o[2] for o in out], dtype=np.int64)
    depths = np.array([o[3] for o in out], dtype=np.int64)
    return ListOpsData(tokens, lengths, labels, parents, depths)


def make_splits(num_train, num_test, seed=0, **kw):
    """``{"train", "test"}`` from ``SeedSequence(seed).spawn(2)`` (same keywords as
    :func:`generate`)."""
    tr, te = np.random.SeedSequence(seed).spawn(2)
    return {"train": generate(num_train, np.random.default_rng(tr), **kw),
            "test": generate(num_test, np.random.default_rng(te), **kw)}


def to_string(tokens, length=None):
    """The sentence as text, e.g. ``"[MAX 2 [MIN 4 7 ] 0 ]"``."""
    toks = list(tokens)[:length] if length is not None else [t for t in tokens if t != PAD]
    return " ".join(VOCAB[int(t)] for t in toks)


def label_histogram(data):
    return np.bincount(data.labels, minlength=NUM_CLASSES)
