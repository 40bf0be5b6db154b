"""``@spec(reference=fn)``, the reference certificate (structdsl.check) and
``python -m structdsl check path/to/spec.py``.

The certificate proves, with sympy, that a spec's structure law equals the law of a plain
order-only reference solver over all orderings of exponential noise: Kruskal-as-races
against a minimum spanning tree by sorting passes; Prim-as-races against the same reference
is refuted, naming a structure and both probabilities, which are checked here against
computations that do not use structdsl.  The command line runs as a subprocess on files
written here.
"""
import io
import itertools
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("sympy")

import structdsl  # noqa: E402
from structdsl import specs, symbolic  # noqa: E402
from structdsl.check import check_file, is_order_only, load_spec_file, reference_certificate  # noqa: E402
from structdsl.specs.spanning_tree import mst_by_sorting  # noqa: E402
from structdsl.testing import compare_solve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRIM = ROOT / "examples" / "prim_spanning_tree.py"
EDGES4 = list(itertools.combinations(range(4), 2))


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "structdsl", "check", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def joined(text):
    """The report with its rows' line wrapping undone (runs of whitespace -> one space)."""
    return " ".join(text.split())


def prim():
    return load_spec_file(str(PRIM))[1]["prim_spanning_tree"]


def mst_law_by_hand(rates):
    """{tree (sorted edges): Fraction}: the MST of independent Exp(rate) edge weights on K4,
    summing the Plackett-Luce probability of each of the 720 orders of the edges."""
    law = {}
    for order in itertools.permutations(EDGES4):
        p, left = Fraction(1), sum(rates[e] for e in EDGES4)
        for e in order:
            p *= Fraction(rates[e], left)
            left -= rates[e]
        comp, tree = list(range(4)), []
        for u, v in order:
            if comp[u] != comp[v]:
                tree.append((u, v))
                old = comp[v]
                comp = [comp[u] if c == old else c for c in comp]
        key = tuple(sorted(tree))
        law[key] = law.get(key, 0) + p
    return law


def edges(adjacency):
    return tuple((int(u), int(v)) for u, v in zip(*np.nonzero(np.triu(adjacency))))


# ---- the reference certificate ---------------------------------------------------------------
def test_spanning_tree_declares_its_reference_and_solve_agrees():
    assert specs.spanning_tree.reference is mst_by_sorting
    assert specs.categorical.reference is None                     # the keyword is optional
    prog = structdsl.compile(specs.spanning_tree)
    cmp = compare_solve(prog, mst_by_sorting, (5, 5), trials=30, excluded_trials=30)
    assert cmp.failure is None and cmp.checked == 30 and cmp.excluded_checked == 30


def test_kruskal_certificate_passes_against_mst_by_sorting():
    assert is_order_only(mst_by_sorting, structdsl.compile(specs.spanning_tree), (4, 4)) == (True, None)
    cert = reference_certificate(specs.spanning_tree, (4, 4))      # its own reference=
    assert cert.applies and cert.ok and not cert.differing
    assert (cert.orderings, cert.structures) == (720, 16)
    assert cert.message.startswith("proved: the spec's law equals the law of mst_by_sorting")


def test_prim_certificate_fails_naming_a_structure_and_both_values():
    spec = prim()
    assert spec.reference.__name__ == "mst_by_sorting"
    cert = reference_certificate(spec, (4, 4))
    assert cert.applies and not cert.ok
    assert len(cert.differing) == 16        # every tree: Prim grows from node 0, the MST does not
    shown = cert.shown
    tree = edges(shown["structure"]["adjacency"])
    assert shown["where"] == "all rates 1"
    # both values, recomputed without the certificate: Prim's law by exact enumeration of
    # its traces, the MST law by summing over the orders of the edges by hand
    ones = np.ones((4, 4), dtype=int)
    prim_law = {edges(s.adjacency): p for s, p in structdsl.compile(spec).enumerate(rates=ones).structure_law()}
    mst = mst_law_by_hand({e: 1 for e in EDGES4})
    assert shown["spec_value"] == prim_law[tree] and shown["reference_value"] == mst[tree]
    assert prim_law[tree] != mst[tree]
    # ... and the symbolic expressions are those laws (evaluated at other rates)
    rates = {e: r for e, r in zip(EDGES4, (2, 3, 5, 7, 11, 13))}
    subs = {spec_symbol: rates[idx] for idx, spec_symbol in symbolic.law(spec, (4, 4)).rates.items()}
    assert Fraction(str(shown["reference"].subs(subs))) == mst_law_by_hand(rates)[tree]
    # the message names the structure and gives both values
    text = " ".join(f"{u}-{v}" for u, v in tree)
    for part in ("refuted", f"edges {text}", "P(spec)", "P(mst_by_sorting)",
                 f"P(spec) = {prim_law[tree]}", f"P(mst_by_sorting) = {mst[tree]}"):
        assert part in cert.message, part


def test_a_wrong_reference_is_caught():
    prog = structdsl.compile(specs.spanning_tree)

    def maximum_spanning_tree(w):
        return mst_by_sorting(np.where(np.isfinite(w), -w, np.inf))

    cmp = compare_solve(prog, maximum_spanning_tree, (4, 4))
    assert cmp.checked == 0 and cmp.failure.startswith(
        "solve disagrees with the reference solver on field 'adjacency' for weights")
    assert "solve gives adjacency" in cmp.failure and "maximum_spanning_tree gives adjacency" in cmp.failure

    cmp = compare_solve(prog, lambda w: {"tree": mst_by_sorting(w)["adjacency"]}, (4, 4))
    assert "field(s) ['tree'], which the spec does not have" in cmp.failure


def test_certificate_marginalises_onto_the_reference_fields_and_needs_order_only():
    # top-k's reference returns only the subset: the law of the subset is compared
    def first_two(w):
        subset = np.zeros(len(w), bool)
        subset[np.argsort(w)[:2]] = True
        return {"subset": subset}

    cert = reference_certificate(specs.top_k, (4,), first_two, k=2)
    assert cert.ok and (cert.orderings, cert.structures) == (24, 6)
    # a reference that reads the values, not only their order: detected, not applicable
    def nearest_to_two(w):
        return {"index": int(np.argmin(np.abs(w - 2)))}

    ok, why = is_order_only(nearest_to_two, structdsl.compile(specs.categorical), (3,))
    assert not ok and "strictly increasing map" in why
    cert = reference_certificate(specs.categorical, (3,), nearest_to_two)
    assert not cert.applies and cert.ok and cert.message.startswith("not applicable")
    # declared order-only, it is run on ranks (where it picks the second to fire): refuted
    cert = reference_certificate(specs.categorical, (3,), nearest_to_two, order_only=True)
    assert cert.applies and not cert.ok and "P(nearest_to_two)" in cert.message


# ---- python -m structdsl check PATH ----------------------------------------------------------
GOOD = '''\
import numpy as np
from structdsl import arange, atoms, race, spec, where, zeros


def kruskal_plain(w):
    """Minimum spanning forest by sorting the finite weights w[u, v], u < v."""
    n = len(w)
    comp = list(range(n))
    adjacency = np.zeros((n, n), bool)
    for weight, u, v in sorted((w[u, v], u, v) for u in range(n) for v in range(u + 1, n)):
        if weight < np.inf and comp[u] != comp[v]:
            adjacency[u, v] = adjacency[v, u] = True
            old = comp[v]
            comp = [comp[u] if c == old else c for c in comp]
    return {"adjacency": adjacency}


@spec(nested=True, reference=kruskal_plain)
def my_tree(n):
    edge = atoms(n, n, valid=lambda u, v: u < v)
    comp = arange(n)
    adjacency = zeros((n, n), bool)
    for _ in range(n - 1):
        u, v = race(edge, lambda u, v: comp[u] != comp[v], allow_empty=True)
        if u < 0:
            break
        adjacency[u, v] = True
        adjacency[v, u] = True
        comp = where(comp == comp[v], comp[u], comp)
    return adjacency
'''


def test_cli_passes_a_good_spec_file(tmp_path):
    path = tmp_path / "my_tree.py"
    path.write_text(GOOD)
    out = cli(path, "--exact", 3, "--samples", 300)
    assert out.returncode == 0, out.stdout + out.stderr
    text = joined(out.stdout)
    assert f"my_tree ({path}:18), reference kruskal_plain" in text
    for row in ("verifier pass", "battery pass", "reference pass", "exact n=3 pass", "certificate pass"):
        assert row in text, row
    assert "solve == kruskal_plain on 50 random weight arrays" in text
    assert "over all 6 orderings of the 3 valid atoms" in text
    assert "pass: 1 of 1 spec(s)" in text and "Traceback" not in out.stderr


def test_cli_refutes_prim_with_exact():
    out = cli(PRIM.relative_to(ROOT), "--exact", 3, "--samples", 300)
    assert out.returncode == 1
    text = joined(out.stdout)
    assert "battery pass" in text                              # a valid distribution ...
    assert "reference FAIL solve disagrees with the reference solver on field 'adjacency'" in text
    assert "certificate FAIL refuted: the spec's law is not the law of mst_by_sorting" in text
    # K3 at equal rates, by hand: every tree is the MST with probability 1/3 (its missing edge
    # is the heaviest); Prim from node 0 takes 0-1, 0-2 with probability 1/2, each other tree 1/4
    assert "For example the structure adjacency = edges" in text
    assert "P(mst_by_sorting) = 1/3 = 0.3333" in text
    assert ("at all rates 1: P(spec) = 1/2 = 0.5000" in text) != ("at all rates 1: P(spec) = 1/4 = 0.2500" in text)
    assert "FAIL: 1 of 1 spec(s) failed a check: prim_spanning_tree" in text
    assert "Traceback" not in out.stdout + out.stderr


LEAK = '''\
from structdsl import atoms, race, spec, zeros


@spec
def leaky(n):
    item = atoms(n)
    first = zeros(n, bool)
    w = race(item)
    first[w] = True
    if item[w] < 1:
        first[0] = True
    return first
'''

SYNTAX = '''\
from structdsl import atoms, race, spec


@spec
def broken(n):
    item = atoms(n)
    w = race(item
    return w
'''

NOT_CALLABLE = '''\
from structdsl import atoms, race, spec


@spec(reference="argmin")
def first(n):
    item = atoms(n)
    w = race(item)
    return w
'''


@pytest.mark.parametrize("source, code, message", [
    (LEAK, 1, "{path}:10: noise 'item' indexed"),
    (SYNTAX, 2, "{path}:7: syntax error: '(' was never closed"),
    ("import numpy as np\nLIMIT = 3\n", 2, "{path}: no @spec function in this file"),
    (NOT_CALLABLE, 2, "{path}:4: TypeError while importing the file: @spec(reference=...) of 'first' "
                      "must be a function"),
], ids=["noise-leak", "syntax-error", "no-spec", "reference-not-callable"])
def test_cli_reports_a_bad_file_with_its_line_and_no_traceback(tmp_path, source, code, message):
    path = tmp_path / "user_spec.py"
    path.write_text(source)
    out = cli(path, "--samples", 100)
    assert out.returncode == code, out.stdout + out.stderr
    assert message.format(path=path) in joined(out.stdout)
    assert "Traceback" not in out.stdout + out.stderr


def test_check_file_picks_one_spec_and_names_the_others(tmp_path):
    path = tmp_path / "two.py"
    path.write_text(GOOD + '''

@spec
def first(n):
    item = atoms(n)
    w = race(item)
    return w
''')
    _, found = load_spec_file(str(path))
    assert sorted(found) == ["first", "my_tree"]
    out = io.StringIO()
    assert check_file(str(path), "first", samples=200, exact=3, out=out) == 0
    text = joined(out.getvalue())
    assert "first (" in text and "my_tree" not in text
    assert "exact n=3 pass atoms 3: the 3 traces' probabilities sum to exactly 1" in text
    assert "certificate n/a the spec names no reference solver" in text
    out = io.StringIO()
    assert check_file(str(path), "nope", out=out) == 2
    assert "no spec named 'nope'; the file defines first, my_tree" in out.getvalue()
    out = io.StringIO()
    assert check_file(str(tmp_path / "absent.py"), out=out) == 2
    assert "absent.py: no such file" in out.getvalue()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(2, 6).flatmap(lambda n: st.lists(st.floats(0.01, 100.0), min_size=n * n, max_size=n * n,
                                                    unique=True).map(lambda w: np.array(w).reshape(n, n))))
def test_kruskal_solve_equals_mst_by_sorting_on_hypothesis_weights(w):
    """Property form of the reference comparison: on any tie-free weights (hypothesis picks
    sizes and values, including near-ties), Kruskal's solve returns mst_by_sorting's tree."""
    got = structdsl.compile(specs.spanning_tree).solve(w).structure.adjacency
    assert (got == mst_by_sorting(w)["adjacency"]).all()
