"""Shared fixtures: every built-in spec with a small test size and its static parameters."""
import pytest

from structdsl import specs

# (spec, atoms shape small enough to enumerate, static parameters)
CASES = {
    "categorical": (specs.categorical, (5,), {}),
    "top_k": (specs.top_k, (5,), {"k": 3}),
    "permutation": (specs.permutation, (4,), {}),
    "spanning_tree": (specs.spanning_tree, (4, 4), {}),
    "arborescence": (specs.arborescence, (4, 4), {}),
    "binary_tree": (specs.binary_tree, (5,), {}),
    "matching": (specs.matching, (3, 3), {}),
    "clustering": (specs.clustering, (4, 4), {"c": 2}),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    """(name, spec, shape, statics) for every built-in spec."""
    spec, shape, statics = CASES[request.param]
    return request.param, spec, shape, statics
