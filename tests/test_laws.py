"""Which law a race program has: Kruskal (nested) versus Prim written as races (not nested).

``docs/laws.md`` ("Which law do you get", linked from the README) shows both exact laws on a
small graph.  Here we check that (1) the two laws differ and each sums to one, (2) every figure
the document shows is what its code prints *and* equals an independent computation without structdsl,
and (3) ``check_spec`` with a minimum-spanning-tree reference accepts Kruskal and reports
a solver disagreement for Prim-as-races (while the rest of Prim's battery passes).
"""
import io
import itertools
import math
import re
import runpy
from contextlib import redirect_stdout
from fractions import Fraction
from pathlib import Path

import numpy as np
import structdsl
from law_specs import prim_tree
from structdsl.specs import spanning_tree
from structdsl.testing import check_spec

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# The docs/laws.md example: the cycle 0-1-2-3-0 and the chord 0-2, with these integer rates.
EXAMPLE = {(0, 1): 1, (0, 2): 1, (0, 3): 3, (1, 2): 2, (2, 3): 1}
K4_EQUAL = {(u, v): 1 for u in range(4) for v in range(u + 1, 4)}


def rate_matrix(rates, n=4):
    r = np.zeros((n, n), dtype=int)
    for e, x in rates.items():
        r[e] = x
    return r


def law_by_enumeration(spec, rates):
    """{tree (sorted tuple of edges u < v): Fraction} from structdsl's exact enumeration."""
    exact = structdsl.compile(spec).enumerate(rates=rate_matrix(rates))
    return {tuple((int(u), int(v)) for u, v in zip(*np.nonzero(np.triu(s.adjacency)))): p
            for s, p in exact.structure_law()}


# ---- independent computations (plain Python, no structdsl) -------------------------------
def kruskal_tree(order, n=4):
    """The minimum spanning tree when the edge weights increase along ``order``."""
    comp, tree = list(range(n)), []
    for u, v in order:
        if comp[u] != comp[v]:
            tree.append((u, v))
            old = comp[v]
            comp = [comp[u] if c == old else c for c in comp]
    return tuple(sorted(tree))


def mst_law_brute_force(rates, n=4):
    """Law of the MST of independent Exp(rate) edge weights.

    The MST depends only on the order of the weights, and the order of independent
    exponentials is Plackett-Luce: the next smallest is e with probability
    rate_e / (sum of the rates not yet placed).  Sum over all orders of the edges.
    """
    law = {}
    for order in itertools.permutations(rates):
        p, left = Fraction(1), sum(rates.values())
        for e in order:
            p *= Fraction(rates[e], left)
            left -= rates[e]
        t = kruskal_tree(order, n)
        law[t] = law.get(t, 0) + p
    return law


def prim_race_law(rates, n=4):
    """Law of the Prim race process: from node 0, repeatedly pick one edge with exactly one
    endpoint in the tree, with probability proportional to its rate (memorylessness makes
    every race's winner law rate / sum of the racing rates)."""
    law = {}

    def grow(in_tree, tree, p):
        if len(in_tree) == n:
            t = tuple(sorted(tree))
            law[t] = law.get(t, 0) + p
            return
        racing = [e for e, r in rates.items() if r > 0 and (e[0] in in_tree) != (e[1] in in_tree)]
        total = sum(rates[e] for e in racing)
        for e in racing:
            grow(in_tree | set(e), tree + [e], p * Fraction(rates[e], total))

    grow({0}, [], Fraction(1))
    return law


def product_law(rates, n=4):
    trees = mst_law_brute_force(rates, n)         # its keys: every spanning tree of the graph
    weight = {t: math.prod(rates[e] for e in t) for t in trees}
    total = sum(weight.values())
    return {t: Fraction(w, total) for t, w in weight.items()}


def mst_by_sorting(w):
    """Textbook Kruskal on raw weights ``w[u, v]`` (u < v): the minimum spanning tree."""
    n = len(w)
    edges = sorted(((u, v) for u in range(n) for v in range(u + 1, n)), key=lambda e: w[e])
    adjacency = np.zeros((n, n), bool)
    for u, v in kruskal_tree(edges, n):
        adjacency[u, v] = adjacency[v, u] = True
    return adjacency


# ---- the docs/laws.md section ---------------------------------------------------------------------
def readme_section():
    text = (ROOT / "docs" / "laws.md").read_text()
    m = re.search(r"^# Which law do you get\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "docs/laws.md has no 'Which law do you get' section"
    return m.group(1)


def readme_blocks():
    """(python code, shown output) pairs of the section, in order."""
    return re.findall(r"```python\n(.*?)```\s*```\n(.*?)```", readme_section(), re.S)


def parse_table(shown):
    """{tree: (Kruskal, Prim, product)} from the printed table."""
    rows = {}
    for line in shown.splitlines():
        cell = r"\s+(\d+/\d+|1) = [\d.]+"
        m = re.fullmatch(r"((?:\d\d ?)+?)" + 3 * cell, line.strip())
        if m:
            tree = tuple((int(e[0]), int(e[1])) for e in m.group(1).split())
            rows[tree] = tuple(Fraction(x) for x in m.groups()[1:])
    return rows


# ---- (1) the two laws -----------------------------------------------------------------------
def test_kruskal_and_prim_laws_differ_and_sum_to_one():
    kruskal = law_by_enumeration(spanning_tree, EXAMPLE)
    prim = law_by_enumeration(prim_tree, EXAMPLE)
    assert sum(kruskal.values()) == 1 and sum(prim.values()) == 1
    assert set(kruskal) == set(prim) and len(kruskal) == 8     # 8 spanning trees of the graph
    assert kruskal != prim
    assert kruskal != product_law(EXAMPLE)                      # not the product-of-rates law


def test_enumerated_laws_match_independent_computations():
    for rates in (EXAMPLE, K4_EQUAL):
        assert law_by_enumeration(spanning_tree, rates) == mst_law_brute_force(rates)
        assert law_by_enumeration(prim_tree, rates) == prim_race_law(rates)


def test_kruskal_with_equal_rates_is_not_uniform():
    law = mst_law_brute_force(K4_EQUAL)
    assert len(law) == 16
    star = {t: p for t, p in law.items() if any(sum(x in e for e in t) == 3 for x in range(4))}
    assert len(star) == 4 and set(star.values()) == {Fraction(1, 15)}
    assert {p for t, p in law.items() if t not in star} == {Fraction(11, 180)}
    laws = " ".join((ROOT / "docs" / "laws.md").read_text().split())
    assert "each star has probability 1/15 and each path 11/180" in laws


# ---- (2) the figures of docs/laws.md ----------------------------------------------------------------
def test_readme_prim_spec_is_law_specs_prim_tree():
    code, _ = readme_blocks()[0]
    spec_text = re.search(r"@spec\ndef prim_tree.*?return adjacency\n", code, re.S).group(0)
    source = (HERE / "law_specs.py").read_text()
    assert spec_text in source


def test_readme_table_is_what_its_code_prints(tmp_path):
    code, shown = readme_blocks()[0]
    script = tmp_path / "readme_laws.py"            # specs need a source file to be read from
    script.write_text(code)
    out = io.StringIO()
    with redirect_stdout(out):
        runpy.run_path(str(script), run_name="readme_laws")
    assert out.getvalue().strip() == shown.strip()


def test_readme_table_matches_independent_laws():
    _, shown = readme_blocks()[0]
    rows = parse_table(shown)
    kruskal, prim = mst_law_brute_force(EXAMPLE), prim_race_law(EXAMPLE)
    product = product_law(EXAMPLE)
    assert set(rows) == set(kruskal) and len(rows) == 8
    for tree, (k, p, w) in rows.items():
        assert (k, p, w) == (kruskal[tree], prim[tree], product[tree]), tree
    # the decimals shown next to the fractions are the fractions, rounded
    for line in shown.splitlines():
        for frac, dec in re.findall(r"(\d+/\d+) = ([\d.]+)", line):
            assert f"{float(Fraction(frac)):.3f}" == dec
    assert "total    1 1" in shown


# ---- (3) check_spec against a minimum-spanning-tree reference ---------------------------------
def test_check_spec_tells_prim_from_kruskal():
    # fewer samples than the default keep this test fast; the outcome is the same
    kruskal = check_spec(spanning_tree, reference=mst_by_sorting, samples=1000,
                         raise_on_failure=False)
    assert kruskal.ok and kruskal.reference_checked == 50
    prim = check_spec(prim_tree, reference=mst_by_sorting, samples=1000, raise_on_failure=False)
    assert not prim.ok
    # a valid distribution (exact sum 1, sampling, log_prob and E | T all pass) ...
    assert prim.total_probability == 1
    # ... whose deterministic algorithm is not the minimum spanning tree
    assert len(prim.failures) == 1
    assert prim.failures[0].startswith(
        "solve disagrees with the reference solver on field 'adjacency'")
    # docs/laws.md shows exactly these outcomes
    _, shown = readme_blocks()[1]
    outcome = [str(kruskal.reference_checked), str(prim.ok), str(len(prim.failures))]
    assert shown.split()[:3] == outcome
    assert prim.failures[0].splitlines()[0] in shown

