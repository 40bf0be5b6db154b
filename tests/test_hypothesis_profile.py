"""conftest.py loads a hypothesis profile: "ci" (derandomized, no example database) when CI
is set, "dev" otherwise, and settings(...) objects that test modules build at import time
(after conftest) inherit it.  Checked in fresh interpreters, one per environment."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json
import conftest                                   # what pytest imports before test modules
from hypothesis import HealthCheck, settings
# built like test_properties.SETTINGS
mine = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
print(json.dumps({"derandomize": mine.derandomize, "no_database": mine.database is None,
                  "max_examples": mine.max_examples, "default": settings.default.derandomize}))
"""


@pytest.fixture
def probe(tmp_path):
    """Run PROBE in a fresh interpreter (cwd: tmp_path, where hypothesis may write) with the
    given CI variables on top of an environment that has none."""
    def run(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
        path = [str(Path(__file__).parent)] + [p for p in [base.get("PYTHONPATH")] if p]
        env = {**base, "PYTHONPATH": os.pathsep.join(path), **env}
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    return run


@pytest.mark.parametrize("ci", ["true", "1", "True"])
def test_ci_profile_is_derandomized_without_database(probe, ci):
    got = probe(CI=ci)
    assert got == {"derandomize": True, "no_database": True, "max_examples": 25, "default": True}


@pytest.mark.parametrize("env", [{}, {"CI": "false"}, {"CI": ""}])
def test_dev_profile_otherwise(probe, env):
    got = probe(**env)
    assert got["derandomize"] is False and got["no_database"] is False and got["max_examples"] == 25
