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
import json
import re
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


# ---- --help is plain text ----------------------------------------------------------------------
SPHINX = re.compile(r"``|:(mod|func|class|meth|data|attr|exc|ref|doc|term):`")


@pytest.mark.parametrize("command", [[], ["check"], ["toy"]], ids=["main", "check", "toy"])
def test_every_help_is_plain_text(command):
    out = subprocess.run([sys.executable, "-m", "structdsl", *command, "--help"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m structdsl {' '.join(command)}".rstrip())
    assert not SPHINX.search(out.stdout), SPHINX.search(out.stdout).group(0)
    if command == ["check"]:
        for flag in ("--data [SPEC.]NAME=FILE", "--param [SPEC.]NAME=INT", "--shape", "--strict", "examples:"):
            assert flag in out.stdout, flag


# ---- parameters, data and sizes of a user's file --------------------------------------------------
TWO = '''\
from structdsl import atoms, full, race, spec, zeros


@spec
def pick_k(n, k):
    item = atoms(n)
    chosen = zeros(n, bool)
    for _ in range(k):
        w = race(item, lambda i: not chosen[i])
        chosen[w] = True
    return chosen


@spec
def order(n, dag):
    """A random linear extension of the DAG ``dag`` (a data parameter, bool [n, n])."""
    item = atoms(n)
    placed = zeros(n, bool)
    out = full(n, -1)
    for j in range(n):
        w = race(item, lambda i: not placed[i] and not any(dag[:, i] & ~placed))
        out[j] = w
        placed[w] = True
    return out
'''

# two DAGs and their numbers of linear extensions (= traces of `order`)
DAG_4 = np.zeros((4, 4), bool)
DAG_4[0, 1] = DAG_4[2, 3] = True            # 0 -> 1, 2 -> 3: 4! / (2 * 2) = 6 orders
DAG_5 = np.zeros((5, 5), bool)
DAG_5[0, 1] = DAG_5[1, 2] = True            # a chain 0 -> 1 -> 2 and two free nodes: 5! / 3! = 20


def two(tmp_path):
    path = tmp_path / "two.py"
    path.write_text(TWO)
    return path


def section(text, name):
    """The lines of spec ``name``'s section of a report (up to the next blank line)."""
    return text.split(f"\n{name} ")[1].split("\n\n")[0]


@pytest.mark.parametrize("form", ["npy", "npz", "npz:key", "json"])
def test_cli_takes_data_parameters_from_files(tmp_path, form):
    path = two(tmp_path)
    if form == "npy":
        np.save(tmp_path / "dag.npy", DAG_4)
        arg, dag, traces = "dag.npy", DAG_4, 6
    elif form == "npz":
        np.savez(tmp_path / "dag.npz", DAG_5)
        arg, dag, traces = "dag.npz", DAG_5, 20
    elif form == "npz:key":
        np.savez(tmp_path / "dags.npz", small=DAG_4, large=DAG_5)
        arg, dag, traces = "dags.npz:large", DAG_5, 20
    else:
        (tmp_path / "dag.json").write_text(json.dumps(DAG_4.tolist()))     # true/false
        arg, dag, traces = "dag.json", DAG_4, 6
    n = len(dag)
    out = cli(path, "--spec", "order", "--data", f"dag={arg}", "--samples", 300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert f"dag = bool array of shape ({n}, {n}) (--data dag={arg})" in joined(text)
    # the size is taken from the data, and said so; the law is the DAG's linear extensions
    assert f"atoms {n} (sizes: n = {n}), picked: n = {n}, fixed by the data (dag of shape ({n}, {n}))" in joined(text)
    assert f"battery pass atoms {n}: {traces} traces, {traces} structures, exact sum of p = 1" in joined(text)
    assert re.search(rf"^order\s+{n}\s+n={n}\s+{traces}\s+{traces}\s+pass$", text, re.M)     # the table


def test_cli_data_file_errors_are_usage_errors(tmp_path):
    path = two(tmp_path)
    np.savez(tmp_path / "two.npz", a=DAG_4, b=DAG_5)
    np.save(tmp_path / "floats.npy", DAG_4.astype(float))
    for arg, message in [("dag=two.npz", "two.npz holds 2 arrays (a, b): name one as two.npz:KEY"),
                         ("dag=two.npz:c", "two.npz has no array 'c'; it holds a, b"),
                         ("dag=floats.npy", "floats.npy: holds float64 values of shape (4, 4); data parameters "
                                            "are int or bool arrays"),
                         ("dag=absent.npy", "absent.npy: no such file"),
                         ("dag=dag.csv", "a data file must be .npy, .npz"),
                         ("dag", "--data wants NAME=VALUE or SPEC.NAME=VALUE")]:
        out = cli(path, "--spec", "order", "--data", arg, cwd=tmp_path)
        assert out.returncode == 2 and "usage: python -m structdsl check" in out.stderr, arg
        assert message in joined(out.stderr), (arg, out.stderr)
        assert out.stdout == "" and "Traceback" not in out.stderr


def test_cli_gives_each_spec_only_the_parameters_it_takes(tmp_path):
    """Unscoped parameters go to the specs that take them (the others say so); SPEC.NAME
    scopes one; a file with two specs no longer fails on the other one's parameter."""
    path = two(tmp_path)
    np.save(tmp_path / "dag.npy", DAG_4)
    out = cli(path, "--param", "k=2", "--data", "dag=dag.npy", "--samples", 300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    text = joined(out.stdout)
    pick, order = joined(section(out.stdout, "pick_k")), joined(section(out.stdout, "order"))
    assert "k = 2 (--param k=2)" in pick and "--data dag=dag.npy not used: pick_k takes no parameter 'dag'" in pick
    assert "--param k=2 not used: order takes no parameter 'k'" in order and "k = 2" not in order
    # pick_k at n = 6 with k = 2: 6 * 5 ordered pairs, C(6, 2) = 15 subsets
    assert "battery pass atoms 6: 30 traces, 15 structures" in pick
    assert "pass: 2 of 2 spec(s) pass every check" in text
    # scoped: k = 3 for pick_k only (the other spec is not told about it at all)
    out = cli(path, "--param", "pick_k.k=3", "--data", "order.dag=dag.npy", "--samples", 300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    pick, order = joined(section(out.stdout, "pick_k")), joined(section(out.stdout, "order"))
    assert "k = 3 (--param pick_k.k=3)" in pick and "not used" not in pick + order
    assert "atoms 6: 120 traces, 20 structures" in pick          # 6 * 5 * 4, C(6, 3)
    # a scoped parameter wins over an unscoped one
    out = cli(path, "--spec", "pick_k", "--param", "k=1", "--param", "pick_k.k=2", "--samples", 300, cwd=tmp_path)
    assert out.returncode == 0 and "k = 2 (--param pick_k.k=2)" in joined(out.stdout), out.stdout + out.stderr
    # with --spec, a parameter another spec of the file takes is not used, not an error
    out = cli(path, "--spec", "order", "--param", "k=2", "--data", "dag=dag.npy", "--samples", 300, cwd=tmp_path)
    assert out.returncode == 0 and "--param k=2 not used: order takes no parameter 'k'" in joined(out.stdout)


@pytest.mark.parametrize("args, messages", [
    ([], ["2 parameters are missing:",
          "spec 'pick_k' (two.py:4) needs parameter 'k' (an int): add --param k=INT (or --param pick_k.k=INT "
          "for this spec only)",
          "spec 'order' (two.py:14) needs parameter 'dag' (an array): add --data dag=FILE.npy (or --data "
          "order.dag=FILE.npy for this spec only)"]),
    (["--param", "k=2"], ["a parameter is missing:", "needs parameter 'dag' (an array): add --data dag=FILE.npy"]),
    (["--spec", "pick_k"], ["needs parameter 'k' (an int): add --param k=INT"]),
    (["--param", "z=3"], ["--param z=3: no spec in the file takes a parameter 'z' (parameters: pick_k: n, k; "
                          "order: n, dag)"]),
    (["--param", "nope.k=3"], ["--param nope.k=3: no spec named 'nope' is checked"]),
    (["--param", "pick_k.dag=3"], ["spec 'pick_k' has no parameter 'dag'; its parameters are n, k"]),
    (["--param", "dag=3", "--param", "k=2"], ["--param dag=3: parameter 'dag' of spec 'order' is an array (indexed "
                                              "at", "give it with --data dag=FILE.npy"]),
    (["--param", "k=two"], ["--param wants [SPEC.]NAME=INT, got 'k=two'"]),
    (["--shape", "4,4", "--param", "k=2", "--spec", "pick_k"],
     ["--shape 4x4: spec 'pick_k' has atoms of rank 1 (n), so --shape wants 1 dim(s)"]),
], ids=["both-missing", "data-missing", "int-missing", "unknown", "unknown-spec", "not-its-parameter",
        "int-for-array", "not-an-int", "shape-rank"])
def test_cli_parameter_mistakes_are_usage_errors_naming_the_flag(tmp_path, args, messages):
    two(tmp_path)
    np.save(tmp_path / "dag.npy", DAG_4)
    out = cli("two.py", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("usage: python -m structdsl check")
    assert "python -m structdsl check: error:" in out.stderr
    for m in messages:
        assert m in joined(out.stderr), (m, out.stderr)
    # not a verifier failure, no Python-API hint, nothing checked
    assert "verifier" not in out.stdout and "structdsl.compile(" not in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


ALLOWED = '''\
from structdsl import atoms, full, race, spec, zeros


@spec
def allowed_order(n, allowed):
    """Order the allowed items (allowed: int [n], read one atom at a time)."""
    item = atoms(n)
    placed = zeros(n, bool)
    out = full(n, -1)
    for j in range(n):
        w = race(item, lambda i: not placed[i] and allowed[i] > 0, allow_empty=True)
        if w < 0:
            break
        out[j] = w
        placed[w] = True
    return out
'''

GROWS = '''\
from structdsl import atoms, race, spec, zeros


@spec
def grows(n):
    item = atoms(n)
    seen = zeros(5, int)
    w = race(item)
    seen[w] = 1
    return seen
'''


def test_check_spec_takes_sizes_from_data_or_says_which_size_it_picked(tmp_path):
    from structdsl.errors import SpecIndexError
    from structdsl.testing import check_spec
    (tmp_path / "allowed.py").write_text(ALLOWED)
    (tmp_path / "grows.py").write_text(GROWS)
    allowed = load_spec_file(str(tmp_path / "allowed.py"))[1]["allowed_order"]
    # the data fixes n (its shape meets the spec's): n = 4 from a [4, 4] DAG, not n = 6
    spec = load_spec_file(str(two(tmp_path)))[1]
    r = check_spec(spec["order"], samples=300, dag=DAG_4)
    assert r.atom_shape == (4,) and r.sizes == {"n": 4} and r.traces == 6
    assert r.shape_source == "n = 4, fixed by the data (dag of shape (4, 4))"
    # read one atom at a time, [1, 1, 1] does not fix n; n = 4..6 would index it out of range
    # (this used to raise SpecIndexError at n = 4): the checker says why it took n = 3
    r = check_spec(allowed, samples=300, allowed=np.array([1, 1, 1]))
    assert r.atom_shape == (3,) and r.traces == 6
    assert r.shape_source == ("n = 3: the largest n <= 6 whose enumeration has at most 200 traces "
                              "(at n = 4, 5, 6 the spec indexes its data out of range)")
    # a size the checker picks fails: the error says which size it picked and how to pass another
    grows = load_spec_file(str(tmp_path / "grows.py"))[1]["grows"]
    with pytest.raises(SpecIndexError) as info:
        check_spec(grows, samples=300)
    note = " ".join(info.value.__notes__)
    assert "check_spec was trying atoms of shape (6,) (every size 6) to pick a size to check" in note
    assert "check_spec(grows, shape=...)" in note and "--shape" in note
    assert check_spec(grows, (5,), samples=300).ok            # the size passed instead
    out = cli(tmp_path / "grows.py", "--samples", 300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    text = joined(out.stdout)
    assert "battery FAIL SpecIndexError:" in text and "write index 5 is out of range" in text
    assert "check_spec was trying atoms of shape (6,)" in text and "(python -m structdsl check FILE --shape ...)" in text
    out = cli(tmp_path / "grows.py", "--samples", 300, "--shape", 5)
    assert out.returncode == 0, out.stdout
    assert "atoms 5 (sizes: n = 5), given with --shape" in joined(out.stdout)


def test_degenerate_size_warns_and_fails_under_strict(tmp_path):
    path = two(tmp_path)
    chain = np.zeros((3, 3), bool)
    chain[0, 1] = True                       # 0 before 1; 2 free: 3 orders
    tight = chain.copy()
    tight[1, 2] = True                       # 0 -> 1 -> 2: one order
    np.save(tmp_path / "chain.npy", chain)
    np.save(tmp_path / "tight.npy", tight)
    out = cli(path, "--spec", "order", "--data", "dag=tight.npy", "--samples", 300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    text = joined(out.stdout)
    assert ("size warn degenerate size: the law checked at atoms (3,) (n = 3) has only one structure, too few for "
            "the battery to tell a right sampler from a wrong one") in text
    assert "(--strict makes this a failure)" in text
    assert re.search(r"^order\s+3\s+n=3\s+1\s+1\s+pass$", out.stdout, re.M)          # the size in the table
    out = cli(path, "--spec", "order", "--data", "dag=tight.npy", "--samples", 300, "--strict", cwd=tmp_path)
    assert out.returncode == 1
    assert "battery FAIL" in joined(out.stdout) and "[strict]" in out.stdout
    assert re.search(r"^order\s+3\s+n=3\s+1\s+1\s+FAIL$", out.stdout, re.M)
    # three structures are enough
    out = cli(path, "--spec", "order", "--data", "dag=chain.npy", "--samples", 300, "--strict", cwd=tmp_path)
    assert out.returncode == 0 and "degenerate size" not in out.stdout, out.stdout
    # the Python API: a warning, and a failure under strict=True
    from structdsl.testing import check_spec
    spec = load_spec_file(str(path))[1]["order"]
    with pytest.warns(UserWarning, match="degenerate size"):
        r = check_spec(spec, samples=300, dag=tight)
    assert r.ok and r.structures == 1 and len(r.warnings) == 1
    r = check_spec(spec, samples=300, dag=tight, strict=True, raise_on_failure=False)
    assert not r.ok and "degenerate size" in r.failures[0]


# ---- enumeration past its limit is refused up front --------------------------------------------
def test_enumeration_past_the_limit_is_refused_after_few_runs(monkeypatch):
    """spanning_tree on K6 has 6^4 * 5! = 155520 traces.  Depth first, counting only finished
    traces, the guard (20000) tripped after about 20000 runs of the program (9-19 s on 2
    loaded cores); breadth first, counting every waiting prefix as at least one trace, it
    trips after about 1300 runs (0.6 s); random walks of the trace tree now refuse it
    before any run (next test).  The runs are counted here; the time is the benchmarks'
    business."""
    from structdsl import EnumerationLimitError
    prog = structdsl.compile(specs.spanning_tree)
    module = sys.modules[type(prog).__module__]
    runs = []
    init = module.Enumerator.__init__
    monkeypatch.setattr(module.Enumerator, "__init__", lambda self, *a, **k: runs.append(1) or init(self, *a, **k))
    with pytest.raises(EnumerationLimitError, match=r"more than 20000 traces"):
        prog.enumerate(rates=np.ones((6, 6), dtype=int))
    assert len(runs) < 2000, len(runs)
    # a small limit: refused after a handful of runs
    runs.clear()
    with pytest.raises(EnumerationLimitError, match=r"more than 200 traces"):
        prog.enumerate(rates=np.ones((6, 6), dtype=int), max_traces=200)
    assert len(runs) < 20
    # below the limit nothing changes: every trace once, in lexicographic order, one run each
    runs.clear()
    enum = prog.enumerate(rates=np.ones((5, 5), dtype=int))
    assert len(enum) == len(runs) == 5 ** 3 * 24                   # 125 trees, 4! orders of their edges
    keys = [tuple(t) for t in enum.traces.tolist()]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert sum(enum.probs) == 1


def test_random_walks_estimate_the_trace_count_and_refuse_before_the_walk(monkeypatch):
    """Knuth's estimator (a random root-to-leaf walk, the product of the member counts) is
    unbiased for the number of traces: its mean over many walks matches enumeration; on a
    law whose every walk branches alike (permutations) each walk is exact.  A law far past
    the limit is refused from the walks alone, before any enumeration run."""
    prog = structdsl.compile(specs.spanning_tree)
    module = sys.modules[type(prog).__module__]
    inst = prog.instance((5, 5))
    live = inst.valid.reshape(-1).copy()
    rng = np.random.default_rng(1)
    walks = []
    for _ in range(3000):
        w = module.Probe(prog, inst, live, rng)
        prog._call(w, inst, None)
        walks.append(w.estimate)
    exact = len(prog.enumerate(rates=np.ones((5, 5), dtype=int)))
    walks = np.array(walks, dtype=float)
    assert abs(walks.mean() - exact) < 4 * walks.std() / np.sqrt(len(walks)), (walks.mean(), exact)
    perm = structdsl.compile(specs.permutation)
    pinst = perm.instance((6,))
    w = module.Probe(perm, pinst, pinst.valid.reshape(-1).copy(), rng)
    perm._call(w, pinst, None)
    assert w.estimate == 720 == len(perm.enumerate(rates=np.ones(6, dtype=int)))
    runs = []
    init = module.Enumerator.__init__
    monkeypatch.setattr(module.Enumerator, "__init__", lambda self, *a, **k: runs.append(1) or init(self, *a, **k))
    from structdsl import EnumerationLimitError
    with pytest.raises(EnumerationLimitError, match=r"more than 20000 traces \(random walks"):
        structdsl.compile(specs.matching).enumerate(rates=np.ones((8, 8), dtype=int))
    assert runs == []


def test_cli_refuses_a_shape_past_the_enumeration_limit_quickly(tmp_path):
    path = tmp_path / "my_tree.py"
    path.write_text(GOOD)
    out = cli(path, "--shape", "6,6", "--samples", 100)
    assert out.returncode == 1, out.stdout + out.stderr
    text = joined(out.stdout)
    assert "battery FAIL my_tree with atoms (6, 6) has more than 20000 traces" in text
    assert "the battery enumerates every trace: check a smaller --shape" in text
