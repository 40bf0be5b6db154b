"""Shared fixtures: every built-in spec with a small test size and its static parameters."""
import os

import pytest
from hypothesis import settings

from structdsl import specs

# Hypothesis profiles: "ci" is reproducible (derandomized, no example database); "dev" keeps
# the database so a failure found locally is replayed first.  CI sets CI=true; pick another
# with HYPOTHESIS_PROFILE.  Loaded before any test module builds its own settings(...), so
# those inherit the profile's values for everything they do not set themselves.  Both
# derive from hypothesis' "default" profile: hypothesis itself switches to its own "ci"
# profile whenever a CI variable exists, even CI=false.
settings.register_profile("ci", settings.get_profile("default"), derandomize=True, database=None,
                          deadline=None, print_blob=True)
settings.register_profile("dev", settings.get_profile("default"), deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or (
    "ci" if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no") else "dev"))

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
